"""The ``auditrelay audit`` transcripts in README.md, docs/audit-logging.md and docs/helm.md.

Each transcript is produced by running the commands, in process, against a node's root made
in a temporary directory from the committed test files (tests/audit/data: kubeadm's manifest,
k3s and RKE2 config files), and is written between the markers
``<!-- transcript: NAME ... -->`` and ``<!-- /transcript -->`` of every page that shows it.
The temporary directory is shown as ``/tmp``; a diff longer than a page is shown by its length
where a transcript says so. Nothing else is changed: every line is what the command printed.

Two transcripts need a running API server and are made with ``--controlplane`` (the test
control plane's build, ``make controlplane``): ``kubeadm-online`` (the stand-in kubelet of
tests/controlplane/staticpod.py runs kube-apiserver from the manifest; ``enable`` waits for it
and changes the kubeadm-config ConfigMap) and ``openshift`` (kube-apiserver serving the
APIServer CRD). Without ``--controlplane`` they are left as they are.

``python3 tests/audit/transcripts.py [--controlplane]`` (``make transcripts``: with) rewrites
the pages; tests/unit/test_audit_transcripts.py fails when an offline transcript is stale.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "sidecar"), str(REPO / "tests")]

from auditrelay.cli import main  # noqa: E402

DATA = REPO / "tests" / "audit" / "data"
PAGES = (REPO / "README.md", REPO / "docs" / "audit-logging.md", REPO / "docs" / "helm.md")
MARKED = re.compile(
    r"(?P<open><!-- transcript: (?P<name>[\w-]+)[^>]*-->\n)(?P<body>.*?)(?P<close><!-- /transcript -->)",
    re.DOTALL,
)
OUTCOME = re.compile(
    r"^(dry-run|enabled|policy-replaced|unchanged|rolled-back|nothing-to-do|audit logging):"
)
SHOWN_TMP = "/tmp"
SHORT_DIFF_LINES = 15  # a shorter diff is shown even where a transcript is short
KUBEADM_DIR = DATA / sorted(p.name for p in DATA.glob("kubeadm-v1.*"))[-1]
NODE_FILES = {
    "kubeadm": {
        "etc/kubernetes/manifests/kube-apiserver.yaml": KUBEADM_DIR / "kube-apiserver.yaml"
    },
    "k3s": {"etc/rancher/k3s/config.yaml": DATA / "k3s" / "config.yaml"},
    "rke2": {"etc/rancher/rke2/config.yaml": DATA / "rke2" / "config.yaml"},
    "rke2-cis": {"etc/rancher/rke2/config.yaml": DATA / "rke2" / "config-cis.yaml"},
}
CRD = DATA / "openshift" / "apiservers-crd.yaml"
HELM_JOB_ARGS = ("--backup-dir=/host/var/lib/auditrelay/audit-backup", "--lock-wait=60")
HELM_RESTART = (
    "--restart-command=nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart "
)
HELM_UNITS = {"k3s": "k3s", "rke2": "rke2-server"}


@dataclass(frozen=True)
class Step:
    """``auditrelay audit ARGS``; ``short``: a diff longer than SHORT_DIFF_LINES is shown by
    its length."""

    args: tuple[str, ...]
    short: bool = False


def run_step(step: Step, real: str, shown: str) -> str:
    """The command line and what it printed (stdout, then stderr) and its exit status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["audit", *step.args])
    printed = (out.getvalue() + err.getvalue()).replace(real, shown)
    if step.short:
        printed = _diff_by_its_length(printed)
    command = shlex.join(step.args).replace(real, shown)
    return f"$ auditrelay audit {command}\n{printed}(exit status {code})\n"


def _diff_by_its_length(printed: str) -> str:
    lines = printed.splitlines(keepends=True)
    diff = 0
    while diff < len(lines) and not OUTCOME.match(lines[diff]):
        diff += 1
    if diff <= SHORT_DIFF_LINES or diff == len(lines):
        return printed
    return f"({diff} lines of unified diff, as --dry-run prints them)\n" + "".join(lines[diff:])


def run_steps(steps: tuple[Step, ...], real: str, shown: str) -> str:
    return "\n".join(run_step(step, real, shown) for step in steps)


@contextlib.contextmanager
def node(kind: str) -> Iterator[tuple[Path, str]]:
    """A temporary directory holding ``node-<distro>``, a node root with the committed files."""
    with tempfile.TemporaryDirectory(prefix="transcript-") as tmp:
        root = Path(tmp) / f"node-{kind.split('-')[0]}"
        for path, source in NODE_FILES[kind].items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / path)
        shutil.copyfile(KUBEADM_DIR / "cluster-configuration.yaml", Path(tmp) / "cc.yaml")
        yield root, tmp


def file_transcript(kind: str, steps: Callable[[str, str], tuple[Step, ...]]) -> str:
    with node(kind) as (root, tmp):
        return run_steps(steps(str(root), tmp), tmp, SHOWN_TMP)


def _kubeadm_full(root: str, tmp: str) -> tuple[Step, ...]:
    at = ("--host-root", root)
    return (
        Step(("status", *at)),
        Step(("enable", *at, "--dry-run", "--no-wait")),
        Step(("enable", *at, "--no-wait", "--cluster-config", f"{tmp}/cc.yaml"), short=True),
        Step(("status", *at)),
        Step(("enable", *at, "--no-wait")),
        Step(("rollback", *at, "--no-wait")),
        Step(("rollback", *at, "--no-wait")),
    )


def _file_full(root: str, _: str) -> tuple[Step, ...]:
    at = ("--host-root", root)
    return (
        Step(("status", *at)),
        Step(("enable", *at, "--no-wait")),
        Step(("status", *at)),
        Step(("rollback", *at, "--no-wait")),
        Step(("rollback", *at, "--no-wait")),
    )


def _file_short(root: str, _: str) -> tuple[Step, ...]:
    at = ("--host-root", root)
    return (
        Step(("status", *at)),
        Step(("enable", *at, "--no-wait"), short=True),
        Step(("status", *at)),
        Step(("rollback", *at, "--no-wait")),
    )


def _short(distro: str) -> Callable[[str, str], tuple[Step, ...]]:
    """status, enable, status, rollback as the chart's Job runs them (``/host`` the node's
    root), with --no-wait: no API server runs beside the copy of the node."""

    def steps(root: str, _: str) -> tuple[Step, ...]:
        job: tuple[str, ...] = (f"--distro={distro}", f"--host-root={root}", *HELM_JOB_ARGS)
        job = tuple(arg.replace("/host/", f"{root}/") for arg in job)
        if distro in HELM_UNITS:
            job += (HELM_RESTART + HELM_UNITS[distro],)
        return (
            Step(("status", f"--distro={distro}", f"--host-root={root}")),
            Step(("enable", *job, "--no-wait"), short=True),
            Step(("status", f"--distro={distro}", f"--host-root={root}")),
            Step(("rollback", *job, "--no-wait", "--missing-ok")),
        )

    return steps


def host_transcript(kind: str) -> str:
    """As ``file_transcript``, the node's root shown as the Job's ``/host``."""
    distro = kind.split("-")[0]
    with node(kind) as (root, _):
        return run_steps(_short(distro)(str(root), ""), str(root), "/host")


OFFLINE: dict[str, Callable[[], str]] = {
    "kubeadm": lambda: file_transcript("kubeadm", _kubeadm_full),
    "k3s": lambda: file_transcript("k3s", _file_full),
    "rke2-cis": lambda: file_transcript("rke2-cis", _file_short),
    "rke2": lambda: file_transcript("rke2", _file_full),
    "short-kubeadm": lambda: file_transcript("kubeadm", _file_short),
    "short-k3s": lambda: file_transcript("k3s", _file_short),
    "short-rke2": lambda: file_transcript("rke2", _file_short),
    "job-kubeadm": lambda: host_transcript("kubeadm"),
    "job-k3s": lambda: host_transcript("k3s"),
    "job-rke2": lambda: host_transcript("rke2"),
}


def normalized(text: str) -> str:
    """What may differ between two honest runs: the time of a rollback."""
    return re.sub(r"rolled back at \S+", "rolled back at <time>", text)


def rewrite(page: Path, transcripts: dict[str, str]) -> bool:
    """Puts each transcript between its markers; True when the page changed."""
    text = page.read_text(encoding="utf-8")

    def replaced(match: re.Match[str]) -> str:
        body = transcripts.get(match["name"])
        old = match["body"].removeprefix("```\n").removesuffix("```\n")
        if body is None or normalized(body) == normalized(old):
            return match[0]  # a rollback's time is no reason to rewrite a page
        return f"{match['open']}```\n{body}```\n{match['close']}"

    new = MARKED.sub(replaced, text)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


def shown(page: Path) -> dict[str, str]:
    """The transcripts a page shows, by name, without the fence."""
    found = {}
    for match in MARKED.finditer(page.read_text(encoding="utf-8")):
        body = match["body"]
        found[match["name"]] = body.removeprefix("```\n").removesuffix("```\n")
    return found


# ---------------------------------------------------------------------------------------------
# the two that need a running API server


def controlplane_transcripts() -> dict[str, str]:
    return {"kubeadm-online": kubeadm_online(), "openshift": openshift()}


def kubeadm_online() -> str:
    from auditrelay.audit.readiness import Endpoint
    from controlplane.build import cached_binaries
    from controlplane.cluster import wait_until
    from controlplane.staticpod import StandInKubelet, node_root
    from kubernetes import client, config

    binaries = cached_binaries()
    with tempfile.TemporaryDirectory(prefix="transcript-") as tmp:
        root = Path(tmp) / "node-kubeadm"
        node = node_root(binaries, root)
        with StandInKubelet(binaries, node):  # stops the node's etcd on exit
            endpoint = Endpoint(f"https://127.0.0.1:{node.port}", node.ca)
            wait_until(lambda: endpoint.get("/readyz") == 200, timeout=180, what="/readyz")
            core = client.CoreV1Api(
                config.new_client_from_config(config_file=str(node.admin_kubeconfig))
            )
            text = (KUBEADM_DIR / "cluster-configuration.yaml").read_text()
            core.create_namespaced_config_map(
                "kube-system",
                {"metadata": {"name": "kubeadm-config"}, "data": {"ClusterConfiguration": text}},
            )
            at = ("--host-root", str(root))
            return run_steps(
                (
                    Step(("status", *at)),
                    Step(("enable", *at), short=True),
                    Step(("status", *at)),
                    Step(("rollback", *at)),
                ),
                tmp,
                SHOWN_TMP,
            )


def openshift() -> str:
    import yaml
    from controlplane.build import cached_binaries
    from controlplane.cluster import ADMIN_USER, AuditSettings, running, wait_until
    from controlplane.harness import REPO_POLICY
    from kubernetes import client, config

    binaries = cached_binaries()
    with (
        tempfile.TemporaryDirectory(prefix="transcript-") as tmp,
        running(binaries, Path(tmp), AuditSettings(policy=REPO_POLICY), controllers=False) as plane,
    ):
        kubeconfig = plane.kubeconfig(ADMIN_USER)
        api = config.new_client_from_config(config_file=str(kubeconfig))
        extensions = client.ApiextensionsV1Api(api)
        extensions.create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
        wait_until(lambda: _established(extensions), timeout=60, what="the CRD")
        client.CustomObjectsApi(api).create_cluster_custom_object(
            "config.openshift.io",
            "v1",
            "apiservers",
            {
                "apiVersion": "config.openshift.io/v1",
                "kind": "APIServer",
                "metadata": {"name": "cluster"},
                "spec": {"audit": {"profile": "Default"}},
            },
        )
        at = ("--distro", "openshift", "--kubeconfig", str(kubeconfig))
        steps = tuple(
            Step((command, *at))
            for command in ("status", "enable", "status", "enable", "rollback", "rollback")
        )
        return run_steps(steps, str(kubeconfig), "admin.kubeconfig")


def _established(extensions: Any) -> bool:
    crd = extensions.read_custom_resource_definition("apiservers.config.openshift.io")
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or ())


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--controlplane",
        action="store_true",
        help="also the transcripts that need the test control plane (kubeadm-online, openshift)",
    )
    args = parser.parse_args(argv)
    transcripts = {name: make() for name, make in OFFLINE.items()}
    if args.controlplane:
        transcripts |= controlplane_transcripts()
    for page in PAGES:
        if rewrite(page, transcripts):
            print(f"rewrote {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
