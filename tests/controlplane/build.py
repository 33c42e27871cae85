"""Build the test control plane's binaries once and keep them in a cache keyed by their inputs.

kube-apiserver, kube-controller-manager, kube-scheduler and kubectl come from the pinned
k8s.io/kubernetes release in ``go.mod``; ``etcd`` is our own small program around the embed
package of go.etcd.io/etcd/server/v3, ``loadgen`` our request generator for benchmark corpora.
Run ``python3 tests/controlplane/build.py``; a second run with unchanged inputs does nothing. The cache directory name carries the Kubernetes version and a
hash of everything that goes into the build (go.mod, go.sum, our Go sources, the flags, the Go
toolchain), so a change to any of them builds into a fresh directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent
CACHE_ROOT = Path(os.environ.get("AUDITRELAY_CONTROLPLANE_CACHE", MODULE_DIR / ".cache"))
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
OUR_COMMANDS = ("etcd", "loadgen")
ALL_COMMANDS = KUBERNETES_COMMANDS + OUR_COMMANDS
_VERSION_PACKAGES = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
_STAMP = "build.json"


class BuildError(Exception):
    """The control-plane binaries could not be built or found."""


@dataclass(frozen=True)
class Binaries:
    """Paths of the built control-plane programs."""

    directory: Path

    def path(self, command: str) -> Path:
        return self.directory / command

    @property
    def kube_apiserver(self) -> Path:
        return self.path("kube-apiserver")

    @property
    def kube_controller_manager(self) -> Path:
        return self.path("kube-controller-manager")

    @property
    def kube_scheduler(self) -> Path:
        return self.path("kube-scheduler")

    @property
    def kubectl(self) -> Path:
        return self.path("kubectl")

    @property
    def etcd(self) -> Path:
        return self.path("etcd")

    @property
    def loadgen(self) -> Path:
        return self.path("loadgen")


def kubernetes_version() -> str:
    """The k8s.io/kubernetes version that go.mod pins."""
    text = (MODULE_DIR / "go.mod").read_text(encoding="utf-8")
    match = re.search(r"^(?:require )?\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)\b", text, re.MULTILINE)
    if match is None:
        raise BuildError(f"{MODULE_DIR / 'go.mod'}: no requirement of k8s.io/kubernetes vX.Y.Z")
    return match.group(1)


def ldflags(version: str) -> str:
    """Linker flags that stamp the release version the way Kubernetes' own build does."""
    major, minor, _ = version.removeprefix("v").split(".")
    stamps = [
        f"-X {package}.{name}={value}"
        for package in _VERSION_PACKAGES
        for name, value in (
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitVersion", version),
            ("gitTreeState", "clean"),
        )
    ]
    return " ".join(["-s", "-w", *stamps])


def _go_version() -> str:
    try:
        return subprocess.run(
            ["go", "env", "GOVERSION", "GOOS", "GOARCH"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        raise BuildError(
            f"the Go toolchain is needed to build the control plane: {error}"
        ) from error


def input_hash(version: str) -> str:
    """Hash of every input of the build; the cache directory is named after it."""
    digest = hashlib.sha256()
    sources = [MODULE_DIR / "go.mod", MODULE_DIR / "go.sum", *sorted(MODULE_DIR.glob("*/*.go"))]
    for source in sources:
        digest.update(source.relative_to(MODULE_DIR).as_posix().encode())
        digest.update(source.read_bytes())
    digest.update(ldflags(version).encode())
    digest.update(" ".join(ALL_COMMANDS).encode())
    digest.update(_go_version().encode())
    return digest.hexdigest()[:16]


def cache_directory() -> Path:
    version = kubernetes_version()
    return CACHE_ROOT / f"kubernetes-{version}-{input_hash(version)}"


def cached_binaries() -> Binaries:
    """The binaries built from the current inputs; BuildError naming the command when absent."""
    directory = cache_directory()
    if not (directory / _STAMP).is_file():
        raise BuildError(
            f"control-plane binaries for the current inputs are not built ({directory} is missing);"
            " run: python3 tests/controlplane/build.py"
        )
    return Binaries(directory)


def _go_build(output: Path, version: str, jobs: int) -> None:
    env = dict(os.environ, CGO_ENABLED="0")
    command = [
        "go",
        "build",
        f"-p={jobs}",
        "-trimpath",
        f"-ldflags={ldflags(version)}",
        "-o",
        f"{output}/",
        *(f"k8s.io/kubernetes/cmd/{name}" for name in KUBERNETES_COMMANDS),
        *(f"./{name}" for name in OUR_COMMANDS),
    ]
    niced = ["nice", "-n", "10", *command] if shutil.which("nice") else command
    print("+", " ".join(command), flush=True)
    result = subprocess.run(niced, cwd=MODULE_DIR, env=env, check=False)
    if result.returncode != 0:
        raise BuildError(f"go build failed with exit status {result.returncode} (output above)")


def build(jobs: int) -> Binaries:
    """Build into the cache unless the current inputs are already built; return the binaries."""
    directory = cache_directory()
    if (directory / _STAMP).is_file():
        print(f"control plane up to date: {directory}", flush=True)
        return Binaries(directory)
    version = kubernetes_version()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE_ROOT))
    try:
        started = time.monotonic()
        _go_build(staging, version, jobs)
        seconds = round(time.monotonic() - started, 1)
        missing = [name for name in ALL_COMMANDS if not (staging / name).is_file()]
        if missing:
            raise BuildError(f"go build did not produce {', '.join(missing)} in {staging}")
        stamp = {"kubernetes": version, "commands": list(ALL_COMMANDS), "build_seconds": seconds}
        (staging / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_builds(keep=directory)
    print(f"control plane built in {seconds}s: {directory}", flush=True)
    return Binaries(directory)


def _remove_stale_builds(keep: Path) -> None:
    """Builds from earlier inputs are never used again; each holds about 400 MB."""
    for stale in CACHE_ROOT.glob("kubernetes-*"):
        if stale != keep and (stale / _STAMP).is_file():
            shutil.rmtree(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("AUDITRELAY_CONTROLPLANE_BUILD_JOBS", os.cpu_count() or 1)),
        help="packages go build compiles at once (go build -p); default: all cores, niced",
    )
    parser.add_argument(
        "--print-dir", action="store_true", help="print the cache directory of the current inputs"
    )
    args = parser.parse_args(argv)
    try:
        if args.print_dir:
            print(cache_directory())
            return 0
        build(args.jobs)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
