"""The real sidecar (``auditrelay serve``) as a subprocess, for the plugin tests.

Readiness is awaited through the standard grpc.health.v1 service, never by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import orjson
from auditrelay.receive import wait_for_health

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
# Importing the CLI takes ~1 s on an idle machine and over 10 s on a loaded CI runner.
START_TIMEOUT_SECONDS: Final = 60.0


class SidecarError(RuntimeError):
    """The sidecar did not start, or did not stop, as expected."""


class Sidecar:
    """One ``auditrelay serve`` process; start, stop, kill, pause and resume it at will."""

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
    def on_socket(cls, socket: Path, state_dir: Path, extra_args: Sequence[str] = ()) -> Sidecar:
        """A sidecar listening on a Unix socket."""
        return cls(f"unix://{socket}", state_dir, extra_args)

    def _channel(self) -> grpc.Channel:
        if self.address.startswith("unix://"):
            return grpc.insecure_channel("unix:" + self.address.removeprefix("unix://"))
        assert self.credentials is not None, "a TCP sidecar needs TLS credentials"
        return grpc.secure_channel(self.address, self.credentials)

    def start(self, *, health_check: bool = True) -> None:
        """Starts the process and returns once its Relay service reports SERVING, or, without
        ``health_check`` (a certificate the test's own client would refuse), once it logged
        ``server_started``."""
        if self.process is not None:
            raise SidecarError("already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
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
            "debug",
            *self.extra_args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sidecar")}
        started_before = len(self.events("server_started"))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        if health_check:
            self.wait_serving(START_TIMEOUT_SECONDS)
        else:
            self.wait_logged("server_started", START_TIMEOUT_SECONDS, before=started_before)

    def wait_logged(self, event: str, timeout: float, *, before: int = 0) -> None:
        """Waits until the sidecar has logged ``event`` more than ``before`` times; fails early
        when the process exits."""
        deadline = time.monotonic() + timeout
        while len(self.events(event)) <= before:
            if not self._running():
                raise SidecarError(f"the sidecar exited before {event}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise SidecarError(f"no {event} within {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def wait_serving(self, timeout: float) -> None:
        """Polls the health service until SERVING; fails early when the process exits."""
        with self._channel() as channel:
            try:
                wait_for_health(channel, timeout, alive=self._running, where=self.address)
            except RuntimeError:
                raise SidecarError(
                    f"the sidecar exited while starting:\n{self.log_text()}"
                ) from None
            except TimeoutError:
                raise SidecarError(
                    f"the sidecar did not serve within {timeout}s:\n{self.log_text()}"
                ) from None

    def _running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then waits for a graceful exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; the socket file stays behind."""
        self._end(signal.SIGKILL)

    def _end(self, signum: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a paused process must see the signal
            process.send_signal(signum)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise SidecarError(f"the sidecar ignored {signum.name}:\n{self.log_text()}") from None

    def pause(self) -> None:
        """SIGSTOP: the sidecar keeps its connections but answers nothing (a hung sidecar)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        """Everything the sidecar printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        """The sidecar's JSON log records of one event name."""
        records = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            record: dict[str, Any] = orjson.loads(line)
            if record.get("event") == name:
                records.append(record)
        return records
