"""The rows the sidecar must deliver for a corpus, computed offline from the audit.log lines.

Each line is taken as the event it is, the policy's filter is applied to it and the kept event
is encoded into its row with the pipeline's own row encoder, with no decode, spool, batch or
network in between. The delivered rows must match these: same auditIDs, same content.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from auditrelay.config import BUNDLED_POLICY
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from auditrelay.stream import RowEncoder

from bench.emulator import RunningEmulator

CLUSTER_NAME = "bench"
CLUSTER_ID = "bench-cluster"


@dataclasses.dataclass
class Expected:
    """What the policy keeps of a corpus, as rows keyed by auditID."""

    events: int = 0
    rows: dict[str, bytes] = dataclasses.field(default_factory=dict)
    every_row: list[bytes] = dataclasses.field(default_factory=list)  # with no policy at all


def expected_rows(
    lines: Iterable[bytes], policy: Path = BUNDLED_POLICY, keep_all_rows: bool = False
) -> Expected:
    """Applies the policy to every line; keeps the rows of what it keeps."""
    event_filter = PolicyFilter.from_file(policy)
    encoder = RowEncoder(CLUSTER_NAME, CLUSTER_ID)
    expected = Expected()
    for line in lines:
        event = AuditEvent(orjson.loads(line), line)
        expected.events += 1
        if keep_all_rows:
            expected.every_row.append(encoder.encode(event))
        kept = event_filter.apply(event)
        if kept is not None:
            expected.rows[kept.fields["auditID"]] = encoder.encode(kept)
    return expected


@dataclasses.dataclass
class Comparison:
    """The delivered rows against the expected ones."""

    expected: int = 0
    delivered_rows: int = 0
    missing: list[str] = dataclasses.field(default_factory=list)
    altered: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    duplicates: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.altered or self.unexpected)


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its TimeGenerated text, which the table stores normalized."""
    return {key: value for key, value in row.items() if key != "TimeGenerated"}


def compare(expected: Expected, emulator: RunningEmulator) -> Comparison:
    """Reads every stored row and checks it against the expected rows."""
    comparison = Comparison(expected=len(expected.rows))
    seen: set[str] = set()
    for stored in emulator.store().rows():
        comparison.delivered_rows += 1
        audit_id = stored.audit_id
        if audit_id in seen:
            comparison.duplicates += 1
            continue
        seen.add(audit_id)
        want = expected.rows.get(audit_id)
        if want is None:
            comparison.unexpected.append(str(audit_id))
        elif stored.row is not None and _comparable(stored.row) != _comparable(orjson.loads(want)):
            comparison.altered.append(audit_id)
    comparison.missing = [audit_id for audit_id in expected.rows if audit_id not in seen]
    return comparison
