"""The bundled Logs Ingestion emulator as a separate process, pinned to its own core."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TENANT_ID = "72f988bf-0000-0000-0000-0000000000be"
CLIENT_ID = "0a1b2c3d-0000-0000-0000-0000000000be"
CLIENT_SECRET = "bench-client-secret"  # noqa: S105 - the emulator accepts any secret


@dataclasses.dataclass
class RunningEmulator:
    """Where a started emulator listens, and its store."""

    state_dir: Path
    endpoint: str
    authority_host: str
    ca_file: str
    dcr_id: str
    process: subprocess.Popen[str]

    def store(self) -> Any:
        from auditrelay.emulator import Store

        return Store.in_directory(self.state_dir)

    def count(self) -> int:
        return int(self.store().count())

    def pipeline_properties(self, **overrides: str) -> dict[str, str]:
        """The ``[OUTPUT]`` properties of a pipeline that delivers here with a client secret."""
        properties = {
            "endpoint": self.endpoint,
            "endpoint_ca": self.ca_file,
            "dcr_id": self.dcr_id,
            "auth": "client_secret",
            "authority_host": self.authority_host,
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "cluster_name": "bench",
            "cluster_id": "bench-cluster",
        }
        properties.update(overrides)
        return properties


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """``command`` under ``taskset -c cpu`` (or as it is when no CPU is given)."""
    return ["taskset", "-c", str(cpu), *command] if cpu is not None else command


def python_env() -> dict[str, str]:
    """The environment for a child Python that imports this checkout's package."""
    return {**os.environ, "PYTHONPATH": str(REPO / "sidecar")}


@contextlib.contextmanager
def emulator(
    state_dir: Path,
    cpu: int | None = 0,
    store: str = "ids",
    timeout: float = 60.0,
    port: int = 0,
    limits: str = "wire",
) -> Iterator[RunningEmulator]:
    """Starts ``auditrelay emulator serve`` without its throughput limits, waits for ready;
    ``limits`` is its reading of the 1 MiB limit (``--limits``: wire or uncompressed)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    command = pinned(
        [
            sys.executable, "-m", "auditrelay", "emulator", "serve",
            "--state-dir", str(state_dir),
            "--store", store,
            "--port", str(port),
            "--requests-per-minute", "100000000",
            "--bytes-per-minute", "1000G",
            "--limits", limits,
        ],
        cpu,
    )  # fmt: skip
    log = (state_dir / "emulator.log").open("w")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log, text=True, env=python_env()
    )
    try:
        info = _await_ready(process, timeout)
        yield RunningEmulator(
            state_dir=state_dir,
            endpoint=info["endpoint"],
            authority_host=info["authority_host"],
            ca_file=info["ca_file"],
            dcr_id=info["dcr_id"],
            process=process,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _await_ready(process: subprocess.Popen[str], timeout: float) -> dict[str, str]:
    """Reads the emulator's announcement (``key: value`` lines, then ``ready``) on a thread,
    so a silent emulator cannot block past the deadline."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, name="emulator-stdout", daemon=True).start()
    info: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if not line:
            raise RuntimeError(f"the emulator exited early with {process.wait()}")
        if line.strip() == "ready":
            return info
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    raise TimeoutError(f"the emulator was not ready within {timeout} s")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
