"""Malloc tuning: one glibc arena for the whole process, whatever its threads do."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Four threads allocate at once (bytes objects above pymalloc's 512-byte limit come from
# malloc), then glibc's malloc_stats() lists one "Arena N:" block per arena on stderr.
_PROBE = """
import ctypes, sys, threading
from auditrelay.malloc import limit_arenas
if sys.argv[1] == "limit":
    assert limit_arenas(1)
started = threading.Barrier(4)
def allocate():
    started.wait()
    kept = [bytes(4096 + i) for i in range(2000)]
    del kept
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()
"""

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's"
)


def _arenas(mode: str) -> int:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "sidecar")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return sum(1 for line in done.stderr.splitlines() if line.startswith("Arena "))


@glibc_only
def test_threads_share_one_arena_after_the_limit() -> None:
    """After limit_arenas(1) threads allocating at once all use glibc's main arena."""
    assert 1 == _arenas("limit")


@glibc_only
def test_threads_get_arenas_of_their_own_without_the_limit() -> None:
    """Without the limit the same threads get arenas of their own (what the limit prevents)."""
    assert _arenas("default") > 1
