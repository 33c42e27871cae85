"""The upstream oracle: the policycheck program (policycheck/) built from k8s.io/apiserver.

The binary is built once per change of its sources and kept under ``.cache/`` (gitignored),
named by a hash of go.mod, go.sum and the Go files, so repeated runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
CACHE = HERE / ".cache"


def _source_hash() -> str:
    digest = hashlib.sha256()
    sources = [HERE / "go.mod", HERE / "go.sum", *sorted((HERE / "policycheck").glob("*.go"))]
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_policycheck() -> Path:
    """The policycheck binary for the current sources, built when not cached yet."""
    binary = CACHE / f"policycheck-{_source_hash()}"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        pytest.fail("the conformance tests need the Go toolchain (go) on PATH")
    CACHE.mkdir(exist_ok=True)
    partial = binary.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run(
        [go, "build", "-p", "1", "-trimpath", "-o", str(partial), "./policycheck"],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if result.returncode != 0:
        pytest.fail(f"building policycheck failed:\n{result.stderr}")
    partial.replace(binary)
    for stale in CACHE.glob("policycheck-*"):
        if stale != binary:
            stale.unlink(missing_ok=True)
    return binary


class Upstream:
    """A running policycheck process: kube-apiserver's loader and checker, one line at a time."""

    def __init__(self, binary: Path) -> None:
        self._process = subprocess.Popen(
            [str(binary)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._ids = 0

    def _ask(self, question: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(json.dumps(question) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"policycheck exited with {self._process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def load(self, policy_text: str) -> tuple[str, dict[str, Any]]:
        """Loads a policy with upstream's loader; returns its id and the loader's answer."""
        self._ids += 1
        policy_id = f"p{self._ids}"
        return policy_id, self._ask({"op": "load", "id": policy_id, "policy": policy_text})

    def evaluate(self, policy_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """Upstream's checker's answer for ``request`` under a loaded policy."""
        return self._ask({"op": "eval", "id": policy_id, "request": request})

    def close(self) -> None:
        """Ends the process by closing its input."""
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.close()
        self._process.wait(timeout=30)
        self._process.stdout.close()
