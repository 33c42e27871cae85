"""The real sidecar (``auditrelay serve``) as a subprocess, for the plugin tests: the demo's
launcher (``auditrelay.devtools.sidecar``), logging at debug level, and able to pause.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Final

from auditrelay.devtools.sidecar import START_TIMEOUT_SECONDS, SidecarError, SidecarProcess

REPO_ROOT: Final = Path(__file__).resolve().parents[2]

__all__ = ["REPO_ROOT", "START_TIMEOUT_SECONDS", "Sidecar", "SidecarError", "free_port"]


class Sidecar(SidecarProcess):
    """One ``auditrelay serve`` process; start, stop, kill, pause and resume it at will."""

    log_level = "debug"

    def pause(self) -> None:
        """SIGSTOP: the sidecar keeps its connections but answers nothing (a hung sidecar)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
