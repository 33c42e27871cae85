"""Build the chart tests' tools once and keep them in tests/helm/.cache (gitignored).

- ``helm`` at the pinned version, from the Go module proxy (``go install helm.sh/helm/v3/cmd/helm``),
  about two and a half minutes of one core the first time.
- ``kubecheck``, our small program (tests/helm/kubecheck) that strictly decodes rendered manifests
  into the k8s.io/api types, about ten seconds.

Each lands in a directory named after its inputs (helm's version and the Go toolchain; kubecheck's
sources), so a change builds afresh and an unchanged run does nothing. ``$AUDITRELAY_HELM`` names a
helm binary to use instead of building one. Run ``python3 tests/helm/build.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELM_VERSION = "v3.22.0"
MODULE_DIR = Path(__file__).resolve().parent
CACHE_ROOT = MODULE_DIR / ".cache"
KUBECHECK_DIR = MODULE_DIR / "kubecheck"


class BuildError(Exception):
    """A tool could not be built."""


def _go_version() -> str:
    try:
        return subprocess.run(
            ["go", "env", "GOVERSION"], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        raise BuildError(
            f"the chart tests build helm with Go, which is not usable: {error}"
        ) from error


def _frugal_env(gobin: Path | None = None) -> dict[str, str]:
    """One compile at a time: the machine's cores are shared."""
    env = dict(os.environ, GOFLAGS="-p=1", CGO_ENABLED="0")
    if gobin is not None:
        env["GOBIN"] = str(gobin)
    return env


def _remove_earlier_builds(binary: str, keep: Path) -> None:
    """Builds of earlier inputs (another version, older sources) are never used again."""
    for earlier in CACHE_ROOT.glob(f"{binary}-*"):
        if earlier != keep and earlier.is_dir():
            shutil.rmtree(earlier, ignore_errors=True)


def _build_into(
    directory: Path, binary: str, command: list[str], cwd: Path | None, use_gobin: bool
) -> Path:
    """Runs a build into a fresh temporary directory, then renames it into place whole."""
    target = directory / binary
    if target.exists():
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=CACHE_ROOT))
    try:
        full_command = ["nice", "-n", "10", *command]
        if not use_gobin:
            full_command += ["-o", str(staging / binary), "."]
        started = time.monotonic()
        result = subprocess.run(
            full_command,
            cwd=cwd,
            env=_frugal_env(staging if use_gobin else None),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BuildError(f"building {binary} failed ({' '.join(command)}):\n{result.stderr}")
        print(f"built {binary} in {time.monotonic() - started:.0f}s", file=sys.stderr)
        staging.rename(directory)
        _remove_earlier_builds(binary, keep=directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def helm() -> Path:
    """The helm binary: $AUDITRELAY_HELM, or the pinned version built into the cache."""
    override = os.environ.get("AUDITRELAY_HELM")
    if override:
        return Path(override)
    directory = CACHE_ROOT / f"helm-{HELM_VERSION}-{_go_version()}"
    return _build_into(
        directory,
        "helm",
        ["go", "install", f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"],
        cwd=None,
        use_gobin=True,
    )


def kubecheck() -> Path:
    """The kubecheck binary, built from tests/helm/kubecheck into the cache."""
    digest = hashlib.sha256(_go_version().encode())
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (KUBECHECK_DIR / name).read_bytes())
    directory = CACHE_ROOT / f"kubecheck-{digest.hexdigest()[:16]}"
    return _build_into(directory, "kubecheck", ["go", "build"], cwd=KUBECHECK_DIR, use_gobin=False)


def main() -> int:
    try:
        print(helm())
        print(kubecheck())
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
