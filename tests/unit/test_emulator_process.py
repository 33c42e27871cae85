"""The bundled emulator of ``serve`` runs in a child process, and never outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from auditrelay.emulator_process import EmulatorProcess

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose: its parent (not us) has yet to reap it.
    with Path(f"/proc/{pid}/stat").open() as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


async def test_the_emulator_runs_in_its_own_process(tmp_path: Path) -> None:
    """It answers at the endpoint it reports, from another process, and stops on request."""
    emulator = EmulatorProcess(tmp_path / "emulator")
    await emulator.start()
    try:
        pid = emulator.pid
        assert pid is not None
        assert os.getpid() != pid
        assert emulator.endpoint.startswith("https://127.0.0.1:")
        assert 0 == emulator.store.count()
    finally:
        await emulator.stop()

    assert not _alive(pid)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_emulator_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL of the process that started it (no chance to clean up) ends the emulator too."""
    script = (
        "import asyncio, sys, time\n"
        "from pathlib import Path\n"
        "from auditrelay.emulator_process import EmulatorProcess\n"
        "async def main():\n"
        "    emulator = EmulatorProcess(Path(sys.argv[1]))\n"
        "    await emulator.start()\n"
        "    print('emulator-pid', emulator.pid, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "emulator")],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(SIDECAR)},
    ) as parent:
        pid = _emulator_pid_then_kill(parent)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert not _alive(pid)


def _emulator_pid_then_kill(parent: subprocess.Popen[bytes]) -> int:
    try:
        assert parent.stdout is not None
        lines = iter(parent.stdout.readline, b"")
        pid = next(int(line.split()[1]) for line in lines if line.startswith(b"emulator-pid "))
        assert _alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
    return pid
