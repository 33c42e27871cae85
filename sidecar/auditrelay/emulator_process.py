"""The bundled emulator in a process of its own, for pipelines without an ``endpoint``.

``auditrelay serve`` with no endpoint delivers to the bundled Logs Ingestion + Entra emulator.
Its work (TLS, decompression, JSON parsing, SQLite) is as large as the sidecar's own per event,
so it runs as ``auditrelay emulator serve`` in a child process: trying the product on its
defaults costs the sidecar's interpreter nothing. The child writes what clients need to
``<state_dir>/emulator.json`` and prints ``ready``; its store is read from here through SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

import auditrelay
from auditrelay.emulator.server import INFO_FILE
from auditrelay.emulator.store import Store
from auditrelay.errors import AuditRelayError

log = structlog.get_logger(__name__)

# The child imports this very package, wherever it was imported from here.
_PACKAGE_ROOT: Final = str(Path(auditrelay.__file__).resolve().parent.parent)
# `python -m auditrelay`, after asking Linux for SIGTERM should this process die first (even by
# SIGKILL), so that no emulator outlives the sidecar that started it.
_CHILD: Final = (
    "import ctypes, runpy, sys\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGTERM\n"
    "sys.argv[0] = 'auditrelay'\n"
    "runpy.run_module('auditrelay', run_name='__main__', alter_sys=True)\n"
)
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class EmulatorInfo:
    """What a client of the running emulator needs (its ``emulator.json``)."""

    endpoint: str
    authority_host: str
    ca_file: Path
    dcr_id: str
    audience: str
    database: Path


class EmulatorProcess:
    """``auditrelay emulator serve`` as a child process; start it, use it, stop it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._process: asyncio.subprocess.Process | None = None
        self._info: EmulatorInfo | None = None
        self._store: Store | None = None

    @property
    def info(self) -> EmulatorInfo:
        if self._info is None:
            raise RuntimeError("the emulator process is not started")
        return self._info

    @property
    def endpoint(self) -> str:
        return self.info.endpoint

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def store(self) -> Store:
        """The emulator's store, read from this process."""
        if self._store is None:
            self._store = Store.in_directory(self.state_dir)
        return self._store

    async def start(self) -> None:
        """Starts the child and returns once it answers; AuditRelayError when it does not."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / INFO_FILE).unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            "emulator",
            "serve",
            "--state-dir",
            str(self.state_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        self._process = process
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._await_ready(process)
        except (TimeoutError, AuditRelayError) as error:
            await self.stop()
            raise AuditRelayError(
                f"the bundled emulator did not start in {self.state_dir}: {error}"
            ) from error
        self._info = self._read_info()
        log.info("emulator_process_started", pid=process.pid, endpoint=self._info.endpoint)

    async def _await_ready(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            line = await process.stdout.readline()
            if not line:
                code = await process.wait()
                raise AuditRelayError(f"auditrelay emulator serve exited with code {code}")
            if line.strip() == b"ready":
                break
        # Nothing more is printed; keep the pipe from filling should that change.
        asyncio.get_running_loop().create_task(process.stdout.read())

    def _read_info(self) -> EmulatorInfo:
        info = json.loads((self.state_dir / INFO_FILE).read_text(encoding="utf-8"))
        return EmulatorInfo(
            endpoint=info["endpoint"],
            authority_host=info["authority_host"],
            ca_file=Path(info["ca_file"]),
            dcr_id=info["dcr_id"],
            audience=info["audience"],
            database=Path(info["database"]),
        )

    async def wait_for_rows(self, count: int, within: float = 10.0) -> None:
        """Returns once at least ``count`` rows are stored; TimeoutError after ``within``."""
        deadline = time.monotonic() + within
        while await asyncio.to_thread(self.store.count) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"fewer than {count} rows stored after {within}s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the store is closed here too."""
        process, self._process = self._process, None
        if self._store is not None:
            self._store.close()
            self._store = None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        log.info("emulator_process_stopped", pid=process.pid, code=process.returncode)
