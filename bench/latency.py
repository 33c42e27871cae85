"""Latency from Push to the emulator's receipt of each kept event, at a steady input rate."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import msgpack
import orjson

from bench.pipeline import PipelineRun, quantile


def audit_ids_per_chunk(chunks: Iterable[bytes]) -> list[list[str]]:
    """The auditIDs in each chunk, in order (either tail shape)."""
    result = []
    for chunk in chunks:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(chunk) + 1)
        unpacker.feed(chunk)
        ids = []
        for _header, record in unpacker:
            fields = orjson.loads(record["log"]) if "log" in record else record
            ids.append(fields["auditID"])
        result.append(ids)
    return result


@dataclasses.dataclass
class Latencies:
    """Seconds from the start of each event's Push to the emulator storing its row."""

    seconds: list[float]
    unmatched: int

    def quantile(self, fraction: float) -> float:
        return quantile(self.seconds, fraction)


def push_to_receipt(
    run: PipelineRun, chunk_ids: list[list[str]], received: dict[str, float]
) -> Latencies:
    """Pairs each stored auditID with the time its chunk was pushed."""
    pushed: dict[str, float] = {}
    for started, ids in zip(run.push_started, chunk_ids, strict=False):
        for audit_id in ids:
            pushed[audit_id] = started
    seconds = []
    unmatched = 0
    for audit_id, at in received.items():
        start = pushed.get(audit_id)
        if start is None:
            unmatched += 1
        else:
            seconds.append(at - start)
    return Latencies(seconds, unmatched)


def received_times(emulator: object) -> dict[str, float]:
    """auditID -> when the emulator stored it (the first time, if it came more than once)."""
    times: dict[str, float] = {}
    for row in emulator.store().rows():  # type: ignore[attr-defined]
        if row.audit_id is not None and row.audit_id not in times:
            times[row.audit_id] = row.received
    return times
