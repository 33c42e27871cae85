"""Make the kubeadm test data: kube-apiserver.yaml exactly as kubeadm writes it, per release.

For each Kubernetes release in ``RELEASES`` this builds kubeadm from the k8s.io/kubernetes
module at that version (in a cache outside the checkout: ``$AUDITRELAY_KUBEADM_CACHE``, default
``~/.cache/auditrelay/kubeadm``), then runs it in a scratch root (``--rootfs``, so nothing on
the machine is touched) and keeps, under ``tests/audit/data/kubeadm-<minor>/``:

- ``kube-apiserver.yaml``: ``kubeadm init phase control-plane apiserver`` with a plain
  ClusterConfiguration (audit logging off, as kubeadm leaves it);
- ``kube-apiserver-audited.yaml``: the same with audit flags and volumes in the
  ClusterConfiguration (audit logging already on, the way kubeadm's documentation shows it);
- ``cluster-configuration.yaml``: the ClusterConfiguration that ``kubeadm config print
  init-defaults`` prints, in that release's default API version (v1beta3 or v1beta4), as it
  sits in the ``kubeadm-config`` ConfigMap.

Each build takes several minutes of CPU; it runs niced, one at a time. The generated files are
committed so that the tests never rebuild kubeadm. Run ``python3 tests/audit/make_kubeadm_manifests.py``
(``--release v1.37.2`` for one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.build import ldflags

RELEASES = ("v1.30.14", "v1.33.13", "v1.37.2")
DATA_DIR = Path(__file__).resolve().parent / "data"
CACHE_ROOT = Path(
    os.environ.get("AUDITRELAY_KUBEADM_CACHE", Path.home() / ".cache" / "auditrelay" / "kubeadm")
)
ADVERTISE_ADDRESS = "192.0.2.10"  # TEST-NET-1: a documentation address, never routed
NODE_NAME = "control-plane-1"

AUDIT_EXTRA_ARGS = {
    "audit-policy-file": "/etc/kubernetes/audit/policy.yaml",
    "audit-log-path": "/var/log/kubernetes/audit/audit.log",
    "audit-log-maxage": "30",
    "audit-log-maxbackup": "10",
    "audit-log-maxsize": "100",
}
AUDIT_VOLUMES = (
    ("audit-policy", "/etc/kubernetes/audit/policy.yaml", True, "File"),
    ("audit-log", "/var/log/kubernetes/audit", False, "DirectoryOrCreate"),
)


class MakeError(Exception):
    """kubeadm could not be built or run."""


def _go(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    command = ["nice", "-n", "10", "go", *args]
    print("+", " ".join(command), f"(in {cwd})", flush=True)
    result = subprocess.run(command, cwd=cwd, env=env, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise MakeError(f"go {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def _staging_modules(release: str, workdir: Path) -> list[str]:
    """The k8s.io modules that k8s.io/kubernetes replaces with its own staging directories."""
    info = json.loads(_go(["mod", "download", "-json", f"k8s.io/kubernetes@{release}"], workdir))
    text = Path(info["GoMod"]).read_text(encoding="utf-8")
    return sorted(set(re.findall(r"(k8s\.io/[\w.-]+) => \./staging/", text)))


def build_kubeadm(release: str) -> Path:
    """kubeadm at ``release``, built once into the cache."""
    module = CACHE_ROOT / release
    binary = module / "kubeadm"
    if binary.is_file():
        return binary
    module.mkdir(parents=True, exist_ok=True)
    (module / "go.mod").write_text("module auditrelay.local/kubeadm\n\ngo 1.24\n", encoding="utf-8")
    staging_version = "v0." + release.removeprefix("v1.")
    replaces = "".join(
        f"\t{name} => {name} {staging_version}\n" for name in _staging_modules(release, module)
    )
    (module / "go.mod").write_text(
        "module auditrelay.local/kubeadm\n\ngo 1.24\n\n"
        f"require k8s.io/kubernetes {release}\n\nreplace (\n{replaces})\n\n"
        "tool k8s.io/kubernetes/cmd/kubeadm\n",
        encoding="utf-8",
    )
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod")
    _go(["mod", "tidy"], module, env)
    _go(
        [
            "build",
            "-p=2",
            "-trimpath",
            f"-ldflags={ldflags(release)}",
            "-o",
            str(binary),
            "k8s.io/kubernetes/cmd/kubeadm",
        ],
        module,
        env,
    )
    return binary


def _cluster_configuration(api_version: str, release: str, audited: bool) -> str:
    lines = [
        f"apiVersion: kubeadm.k8s.io/{api_version}",
        "kind: ClusterConfiguration",
        f"kubernetesVersion: {release}",
    ]
    if audited:
        lines.append("apiServer:")
        if api_version == "v1beta3":
            lines.append("  extraArgs:")
            lines += [f'    {name}: "{value}"' for name, value in AUDIT_EXTRA_ARGS.items()]
        else:
            lines.append("  extraArgs:")
            for name, value in AUDIT_EXTRA_ARGS.items():
                lines += [f"  - name: {name}", f'    value: "{value}"']
        lines.append("  extraVolumes:")
        for name, host_path, read_only, path_type in AUDIT_VOLUMES:
            lines += [
                f"  - name: {name}",
                f"    hostPath: {host_path}",
                f"    mountPath: {host_path}",
                f"    readOnly: {str(read_only).lower()}",
                f"    pathType: {path_type}",
            ]
    return "\n".join(lines) + "\n"


def _init_configuration(api_version: str) -> str:
    return (
        f"apiVersion: kubeadm.k8s.io/{api_version}\n"
        "kind: InitConfiguration\n"
        "localAPIEndpoint:\n"
        f"  advertiseAddress: {ADVERTISE_ADDRESS}\n"
        "  bindPort: 6443\n"
        "nodeRegistration:\n"
        f"  name: {NODE_NAME}\n"
        "  criSocket: unix:///run/containerd/containerd.sock\n"
    )


def _default_api_version(kubeadm: Path) -> str:
    printed = subprocess.run(
        [str(kubeadm), "config", "print", "init-defaults"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(r"apiVersion: kubeadm\.k8s\.io/(v1beta\d)", printed)
    if match is None:
        raise MakeError(f"{kubeadm} config print init-defaults: no kubeadm.k8s.io apiVersion")
    return match.group(1)


def _cluster_configuration_defaults(kubeadm: Path) -> str:
    printed = subprocess.run(
        [str(kubeadm), "config", "print", "init-defaults"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for document in printed.split("\n---\n"):
        if "kind: ClusterConfiguration" in document:
            return document.strip() + "\n"
    raise MakeError(f"{kubeadm} config print init-defaults: no ClusterConfiguration")


def _manifest(kubeadm: Path, release: str, api_version: str, audited: bool) -> bytes:
    with tempfile.TemporaryDirectory(prefix="kubeadm-root-") as scratch:
        root = Path(scratch)
        (root / "etc" / "kubernetes" / "manifests").mkdir(parents=True)
        (root / "tmp").mkdir()
        config = root / "tmp" / "kubeadm.yaml"
        config.write_text(
            _init_configuration(api_version)
            + "---\n"
            + _cluster_configuration(api_version, release, audited),
            encoding="utf-8",
        )
        result = subprocess.run(
            [
                str(kubeadm),
                "init",
                "phase",
                "control-plane",
                "apiserver",
                "--config=/tmp/kubeadm.yaml",
                f"--rootfs={root}",
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise MakeError(
                f"kubeadm {release} init phase control-plane apiserver:\n{result.stderr}"
            )
        return (root / "etc" / "kubernetes" / "manifests" / "kube-apiserver.yaml").read_bytes()


def make(release: str) -> Path:
    kubeadm = build_kubeadm(release)
    api_version = _default_api_version(kubeadm)
    minor = ".".join(release.split(".")[:2])
    out = DATA_DIR / f"kubeadm-{minor}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kube-apiserver.yaml").write_bytes(_manifest(kubeadm, release, api_version, False))
    (out / "kube-apiserver-audited.yaml").write_bytes(
        _manifest(kubeadm, release, api_version, True)
    )
    (out / "cluster-configuration.yaml").write_text(
        _cluster_configuration_defaults(kubeadm), encoding="utf-8"
    )
    print(f"{release}: {api_version}, written to {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--release", action="append", help="only this release (repeatable)")
    args = parser.parse_args(argv)
    if shutil.which("go") is None:
        print("error: the Go toolchain is needed to build kubeadm", file=sys.stderr)
        return 1
    try:
        for release in args.release or RELEASES:
            make(release)
    except (MakeError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
