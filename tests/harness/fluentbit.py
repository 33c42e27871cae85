"""Fluent Bit's side of the integration tests: chunks of fresh real audit events, one output
instance flushed and retried as Fluent Bit's engine does, and the sidecar's HTTP endpoints.

Events are the bundled real audit log's (in the package's data/), each given a fresh auditID;
``Chunks.sent`` counts the auditIDs the bundled policy keeps, worked out with the real filter.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from itertools import count
from typing import Any, Final

import orjson
from auditrelay.config import BUNDLED_POLICY
from auditrelay.devtools.flbproxy import GoProxy, Instance, Level, Result
from auditrelay.emulator import Emulator
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from fixtures.chunks import event_time, log_record, v2_event

from harness.sidecar import REPO_ROOT, Sidecar

TAG: Final = "kube.audit"
BUNDLED_LOG: Final = REPO_ROOT / "sidecar" / "auditrelay" / "data" / "audit2rbac-demo.jsonl"
_POLICY: Final = PolicyFilter.from_file(BUNDLED_POLICY)
_TEMPLATES: Final = [
    orjson.loads(line) for line in BUNDLED_LOG.read_bytes().splitlines() if line.strip()
]


class Chunks:
    """Fluent Bit chunks of fresh events; ``sent`` counts the auditIDs the policy keeps."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._numbers = count()
        self.sent: Counter[str] = Counter()

    def make(self, events: int = 40, extra_records: list[bytes] | None = None) -> bytes:
        """``events`` events as raw ``log`` records, then ``extra_records`` (already framed)."""
        number = next(self._numbers)
        parts = []
        for index in range(events):
            fields: dict[str, Any] = dict(_TEMPLATES[index % len(_TEMPLATES)])
            fields["auditID"] = f"{self.prefix}-{number:03d}-{index:03d}"
            line = orjson.dumps(fields)
            parts.append(v2_event(event_time(int(time.time())), log_record(line)))
            if _POLICY.apply(AuditEvent(dict(fields), line)) is not None:
                self.sent[fields["auditID"]] += 1
        return b"".join(parts + (extra_records or []))


class FluentBit:
    """Fluent Bit with one auditrelay output; ``restart`` brings it back with other properties."""

    def __init__(self, proxy: GoProxy, properties: dict[str, str]) -> None:
        self.proxy = proxy
        self.properties = properties
        self.instance: Instance = proxy.init(properties, log_level=Level.DEBUG)

    def send(self, chunk: bytes, within: float = 60.0) -> None:
        """Flushes until FLB_OK, as Fluent Bit retries a chunk answered FLB_RETRY."""
        deadline = time.monotonic() + within
        while (result := self.proxy.flush(self.instance, chunk, TAG)) is not Result.OK:
            assert result is Result.RETRY, self.proxy.lines()[-3:]
            assert time.monotonic() < deadline, self.proxy.lines()[-3:]
            time.sleep(0.05)

    def restart(self, **changes: str) -> None:
        """Stops (its instance exits) and starts again with the properties changed."""
        self.proxy.exit(self.instance, hot_reload=True)
        self.proxy.unregister()
        self.proxy.register(hot_reloading=True)
        self.properties = {**self.properties, **changes}
        self.instance = self.proxy.init(self.properties, log_level=Level.DEBUG)


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    """Polls ``condition`` until true; fails naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


def missing(emulator: Emulator, sent: Counter[str]) -> list[str]:
    """The kept auditIDs not (or not as often as sent) in the emulator's store."""
    stored = emulator.store.audit_id_counts()
    return sorted(audit_id for audit_id, n in sent.items() if stored.get(audit_id, 0) < n)


def http_get(sidecar: Sidecar, path: str) -> tuple[int, str]:
    """Status and text of one of the sidecar's HTTP endpoints (/metrics, /readyz)."""
    [started] = sidecar.events("server_started")[-1:]
    try:
        with urllib.request.urlopen(f"{started['metrics']}{path}", timeout=5) as reply:  # noqa: S310
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()
