"""Waiting, bounded, for a restarted API server: /readyz answers 200 and the audit log grows.

The old API server (audit logging off) can answer /readyz but cannot write the audit log, so a
growing log is what shows the new one runs with the new flags. Each poll sends an anonymous
``GET /version``, which the bundled policy records (rule 1; a request whose authentication
fails falls to its last rule), so the log grows even on an idle cluster.
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the API server answers, and the CA its serving certificate chains to."""

    url: str
    ca_file: Path | None

    def get(self, path: str) -> int:
        """Status of an anonymous GET, or 0 when nothing answers."""
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.ca_file is None:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(self.url.rstrip("/") + path, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError, OSError):
            return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def await_audited(endpoint: Endpoint, audit_log: Path, timeout: float) -> str | None:
    """None once the log has grown past its size at the call and /readyz answers 200; else
    the reason, after ``timeout`` seconds."""
    start = _size(audit_log)

    def grown() -> bool:
        endpoint.get("/version")
        return _size(audit_log) > max(start, 0)

    if not wait_for(grown, timeout):
        state = "did not appear" if _size(audit_log) < 0 else "did not grow"
        return (
            f"the audit log {audit_log} {state} within {timeout:.0f}s: the API server did not "
            f"come back with audit logging on ({endpoint.url}/readyz answers "
            f"{endpoint.get('/readyz') or 'nothing'})"
        )
    if not wait_for(lambda: endpoint.get("/readyz") == 200, timeout):
        return f"{endpoint.url}/readyz did not answer 200 within {timeout:.0f}s"
    return None


def await_ready(endpoint: Endpoint, timeout: float) -> str | None:
    """None once /readyz answers 200; else the reason after ``timeout`` seconds."""
    if wait_for(lambda: endpoint.get("/readyz") == 200, timeout):
        return None
    return f"{endpoint.url}/readyz did not answer 200 within {timeout:.0f}s"
