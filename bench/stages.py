"""What each step of the data path costs per event on real flush buffers, for both tail shapes.

These are the floor costs of the building blocks (msgpack, orjson, zlib, ISA-L) with no
project code in between: the ceiling any sidecar design can reach on one core. The pipeline
benchmark measures the project's own code; comparing the two shows the overhead it adds.
"""

from __future__ import annotations

import dataclasses
import gc
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
from isal import isal_zlib

from bench.results import Stopwatch


@dataclasses.dataclass
class StageCost:
    """CPU time of one step over a corpus."""

    name: str
    events: int
    cpu_s: float

    @property
    def us_per_event(self) -> float:
        return self.cpu_s / self.events * 1e6 if self.events else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.cpu_s if self.cpu_s else 0.0


def _records(chunk: bytes, raw: bool) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=raw, max_buffer_size=len(chunk) + 1)
    unpacker.feed(chunk)
    return [record for _header, record in unpacker]


def _timed(name: str, events: int, work: Callable[[], object]) -> StageCost:
    """Times ``work`` with the setup data frozen out of the cyclic GC's way, as in a process
    that handles one chunk at a time and keeps nothing."""
    gc.collect()
    gc.freeze()
    clock = Stopwatch()
    try:
        with clock.running():
            work()
    finally:
        gc.unfreeze()
    return StageCost(name, events, clock.cpu)


def _each(function: Callable[[Any], object], items: list[Any]) -> Callable[[], None]:
    def run() -> None:
        for item in items:
            function(item)

    return run


def measure(raw_chunks: list[bytes], parsed_chunks: list[bytes]) -> list[StageCost]:
    """Per-step costs; every step runs over the whole corpus once."""
    raw_records = [_records(c, raw=True) for c in raw_chunks]
    log_lines: list[list[bytes]] = [[r[b"log"] for r in records] for records in raw_records]
    parsed_records = [_records(c, raw=False) for c in parsed_chunks]
    events = sum(len(lines) for lines in log_lines)
    bodies = [b"[" + b",".join(lines) + b"]" for lines in log_lines]
    lines = [line for chunk_lines in log_lines for line in chunk_lines]
    records = [r for chunk_records in parsed_records for r in chunk_records]
    return [
        _timed(
            "unpack raw-log chunk (raw=True, bytes)",
            events,
            _each(lambda c: _records(c, raw=True), raw_chunks),
        ),
        _timed(
            "unpack raw-log chunk (raw=False, str)",
            events,
            _each(lambda c: _records(c, raw=False), raw_chunks),
        ),
        _timed(
            "unpack json-parsed chunk to dicts",
            events,
            _each(lambda c: _records(c, raw=False), parsed_chunks),
        ),
        _timed("orjson.loads of the log line", events, _each(orjson.loads, lines)),
        _timed("orjson.dumps of a parsed record", events, _each(orjson.dumps, records)),
        _timed(
            "join rows into one JSON array",
            events,
            _each(lambda ls: b"[" + b",".join(ls) + b"]", log_lines),
        ),
        _timed("gzip level 1 (zlib)", events, _each(lambda b: _gzip(zlib, b, 1), bodies)),
        _timed(
            "gzip level 6 (zlib, the SDK's)", events, _each(lambda b: _gzip(zlib, b, 6), bodies)
        ),
        _timed("gzip level 1 (ISA-L)", events, _each(lambda b: _gzip(isal_zlib, b, 1), bodies)),
        _timed("gzip level 2 (ISA-L)", events, _each(lambda b: _gzip(isal_zlib, b, 2), bodies)),
    ]


def _gzip(module: Any, body: bytes, level: int) -> bytes:
    compressor = module.compressobj(level, module.DEFLATED, 16 + 15)
    out: bytes = compressor.compress(body) + compressor.flush()
    return out


def compression_ratios(raw_chunks: list[bytes]) -> dict[str, float]:
    """Raw JSON bytes over gzip bytes for ~1 MB request bodies, per codec."""
    lines = [r[b"log"] for c in raw_chunks[:8] for r in _records(c, raw=True)]
    bodies: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > 1_000_000:
            bodies.append(b"[" + b",".join(current) + b"]")
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    bodies.append(b"[" + b",".join(current) + b"]")
    raw = sum(map(len, bodies))
    return {
        name: raw / sum(len(_gzip(module, b, level)) for b in bodies)
        for name, module, level in (
            ("zlib-1", zlib, 1),
            ("zlib-6", zlib, 6),
            ("isal-1", isal_zlib, 1),
            ("isal-2", isal_zlib, 2),
        )
    }


def project_costs(chunks: list[bytes], directory: Any) -> list[StageCost]:
    """The project's own stage code, one stage after another, synchronously in one thread:
    what the pipeline would cost with no event loop, threads or network in between."""
    from pathlib import Path

    from auditrelay.batch import BatchBuilder
    from auditrelay.config import BUNDLED_POLICY
    from auditrelay.decode import decode_chunk
    from auditrelay.filter import PolicyFilter
    from auditrelay.spool import Spool
    from auditrelay.stream import RowEncoder

    event_filter = PolicyFilter.from_file(BUNDLED_POLICY)
    encoder = RowEncoder("bench", "bench-cluster")
    builder = BatchBuilder(1)
    decoded = [decode_chunk(chunk).events for chunk in chunks]
    events = sum(map(len, decoded))
    kept = [[k for e in chunk if (k := event_filter.apply(e)) is not None] for chunk in decoded]
    rows = [[encoder.encode(e) for e in chunk] for chunk in kept]
    spool = Spool(Path(directory), limit_bytes=1 << 40, sync=True)
    target = builder.target_raw_bytes
    costs = [
        _timed("decode_chunk", events, _each(decode_chunk, chunks)),
        _timed(
            "PolicyFilter.apply",
            events,
            _each(lambda chunk: [event_filter.apply(e) for e in chunk], decoded),
        ),
        _timed(
            "RowEncoder.encode (kept)",
            events,
            _each(lambda chunk: [encoder.encode(e) for e in chunk], kept),
        ),
        _timed("Spool.append (fsync per chunk)", events, _each(spool.append, rows)),
    ]

    def drain() -> None:
        while (read := spool.read(target)) is not None:
            for body in builder.pack(read.rows):
                len(body.data)
            spool.acknowledge(read.end)

    costs.append(_timed("Spool.read + BatchBuilder.pack + acknowledge", events, drain))
    spool.close()
    return costs
