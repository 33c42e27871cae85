"""The bundled emulator of ``serve`` runs in a child process, and never outlives its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from auditrelay.embedded import EmbeddedEmulator
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


def _emulator_children() -> list[int]:
    """Live child processes of this one that run the emulator."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"emulator" in command:
            children.append(int(stat.parent.name))
    return children


async def test_a_cancelled_caller_leaves_the_start_to_the_next_one(tmp_path: Path) -> None:
    """serve starts the emulator on the first Configure of a pipeline without an endpoint. A
    Configure cancelled at the plugin's deadline while the child starts does not abort the
    start: the next call gets that same child, and no second one is started."""
    embedded = EmbeddedEmulator(tmp_path / "emulator")
    first = asyncio.ensure_future(embedded.ensure_started())
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    try:
        emulator = await embedded.ensure_started()
        assert emulator is await embedded.ensure_started()
        assert [emulator.pid] == _emulator_children()
    finally:
        await embedded.stop()
    assert [] == _emulator_children()


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
