"""``auditrelay serve`` of this package as a child process: the demo's sidecar and the tests'.

It listens on the address given (a Unix socket, or TCP with TLS for which the caller passes the
client credentials), keeps its state in ``state_dir`` and logs JSON to
``state_dir/sidecar.log``. Readiness is awaited through grpc.health.v1, never by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Self

import grpc
import orjson

import auditrelay
from auditrelay.receive import wait_for_health

# Importing the CLI takes ~1 s on an idle machine and over 10 s on a loaded CI runner.
START_TIMEOUT_SECONDS: Final = 60.0
STOP_TIMEOUT_SECONDS: Final = 30.0
POLL_SECONDS: Final = 0.05
PACKAGE_ROOT: Final = Path(auditrelay.__file__).resolve().parents[1]


class SidecarError(RuntimeError):
    """The sidecar did not start, or did not stop, as expected."""


class SidecarProcess:
    """One ``auditrelay serve`` process; start it, stop or kill it, read its log."""

    log_level = "info"

    def __init__(
        self,
        address: str,
        state_dir: Path,
        extra_args: Sequence[str] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address  # --listen, and the plugin's sidecar_address
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.credentials = credentials  # for the health checks over TCP (TLS)
        self.log_path = state_dir / "sidecar.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def on_socket(cls, socket: Path, state_dir: Path, extra_args: Sequence[str] = ()) -> Self:
        """A sidecar listening on a Unix socket."""
        return cls(f"unix://{socket}", state_dir, extra_args)

    def command(self) -> list[str]:
        """The serve command line, run with this interpreter."""
        return [
            sys.executable,
            "-m",
            "auditrelay",
            "serve",
            "--listen",
            self.address,
            "--state-dir",
            str(self.state_dir),
            "--metrics-address",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def start(self, *, health_check: bool = True) -> None:
        """Starts the process and returns once its Relay service reports SERVING, or, without
        ``health_check`` (a certificate the caller's own client would refuse), once it logged
        ``server_started``."""
        if self.process is not None:
            raise SidecarError("already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # The package this process imported, also from a checkout beside an installed one.
        path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        started_before = len(self.events("server_started"))
        with self.log_path.open("ab") as log:
            if log.tell() and not self.log_path.read_bytes().endswith(b"\n"):
                log.write(b"\n")  # a SIGKILL cut the last line: the new process starts its own
                log.flush()
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": path},
            )
        if health_check:
            self.wait_serving(START_TIMEOUT_SECONDS)
        else:
            self.wait_logged("server_started", START_TIMEOUT_SECONDS, before=started_before)

    def wait_logged(self, event: str, timeout: float, *, before: int = 0) -> None:
        """Waits until the sidecar has logged ``event`` more than ``before`` times; fails early
        when the process exits."""
        deadline = time.monotonic() + timeout
        while len(self.events(event)) <= before:
            if not self.alive():
                raise SidecarError(f"the sidecar exited before {event}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise SidecarError(f"no {event} within {timeout}s:\n{self.log_text()}")
            time.sleep(POLL_SECONDS)

    def wait_serving(self, timeout: float) -> None:
        """Polls the health service until SERVING; fails early when the process exits."""
        with self._channel() as channel:
            try:
                wait_for_health(channel, timeout, alive=self.alive, where=self.address)
            except RuntimeError:
                raise SidecarError(
                    f"the sidecar exited while starting:\n{self.log_text()}"
                ) from None
            except TimeoutError:
                raise SidecarError(
                    f"the sidecar did not serve within {timeout}s:\n{self.log_text()}"
                ) from None

    def _channel(self) -> grpc.Channel:
        if self.address.startswith("unix://"):
            return grpc.insecure_channel("unix:" + self.address.removeprefix("unix://"))
        if self.credentials is None:
            raise SidecarError(f"{self.address}: a TCP sidecar needs TLS client credentials")
        return grpc.secure_channel(self.address, self.credentials)

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def metrics_url(self) -> str:
        """The /metrics URL the sidecar logged when it started."""
        self.wait_logged("server_started", START_TIMEOUT_SECONDS)
        return f"{self.events('server_started')[-1]['metrics']}/metrics"

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM, and the exit code once the sidecar has drained and stopped."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: a crash; the socket file stays behind."""
        return self._end(signal.SIGKILL, STOP_TIMEOUT_SECONDS)

    def _end(self, signum: signal.Signals, timeout: float) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a stopped process must see the signal
            process.send_signal(signum)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise SidecarError(f"the sidecar ignored {signum.name}:\n{self.log_text()}") from None

    def log_text(self) -> str:
        """Everything the sidecar printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        """The sidecar's JSON log records of one event name."""
        records = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record: dict[str, Any] = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # the last line of a process killed while writing it
            if record.get("event") == name:
                records.append(record)
        return records
