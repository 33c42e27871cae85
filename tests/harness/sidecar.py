"""The real sidecar (``auditrelay serve``) as a subprocess, for the plugin tests.

Readiness is awaited through the standard grpc.health.v1 service, never by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import orjson
from auditrelay.receive import wait_for_health

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS: Final = 30.0


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

    def start(self) -> None:
        """Starts the process and returns once its Relay service reports SERVING."""
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
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        self.wait_serving(START_TIMEOUT_SECONDS)

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
