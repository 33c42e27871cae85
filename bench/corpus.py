"""Benchmark corpora resampled from a real audit log, seeded and reproducible.

Every event of a corpus is a copy of one real kube-apiserver event from ``tests/data/audit.log``
(written by the test control plane, see tests/data/README.md; drawn uniformly with replacement,
so the mix of verbs, levels, resources and sizes is the log's mix), with the values that differ
between requests substituted *inside the original line text*, each with a string of the same
length:

- ``auditID``: a fresh UUIDv4;
- every RFC 3339 timestamp in the line: shifted so that ``stageTimestamp`` follows a Poisson
  arrival process at ``rate`` events/s (the file is in write order, so monotone), keeping the
  template's own received-to-stage latency and its precision (seconds or microseconds);
- every other UUID (object uids), except the requesting user's: a fresh UUIDv4 per copy,
  the same one everywhere it occurs in the line;
- the object name (``objectRef.name``, or the generated name of a create): one of a fixed pool
  of same-length names, changed consistently in ``requestURI``, ``objectRef`` and the bodies.

Key order and Go's escaping stay as the API server wrote them, and
every copy has exactly its template's size. Outputs: an ``audit.log`` (JSON lines) and Fluent Bit flush buffers in both
shapes the ``tail`` input produces (the JSON line in ``log``, or the ``json``-parsed map), framed
in a ``.chunks`` file (see ``write_chunks`` / ``read_chunks``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import re
import struct
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "data" / "audit.log"
CORPORA_DIR = REPO / "bench" / "corpora"

# Fluent Bit closes an input chunk at its filesystem soft limit (FLB_INPUT_CHUNK_FS_MAX_SIZE).
FLB_CHUNK_MAX_BYTES = 2_048_000
NAME_POOL_SIZE = 64
CORPUS_VERSION = 3  # part of the file names: a change to the generator must not reuse old files
DEFAULT_START = "2026-11-26T12:00:00Z"
DEFAULT_RATE = 5_000.0
# Fluent Bit stamps a record when tail reads it, a little after the API server wrote it.
READ_DELAY_US = 2_000

_TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def parse_timestamp_us(text: str) -> int:
    """Microseconds since the epoch of an RFC 3339 UTC timestamp as the API server writes it."""
    seconds, _, fraction = text.rstrip("Z").partition(".")
    base = dt.datetime.strptime(seconds, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    micros = int((fraction + "000000")[:6]) if fraction else 0
    return int((base - _EPOCH).total_seconds()) * 1_000_000 + micros


class _TimestampFormatter:
    """Formats epoch microseconds at a fixed precision, caching the per-second prefix."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def format(self, micros: int, digits: int) -> bytes:
        second, fraction = divmod(micros, 1_000_000)
        if second != self._second:
            self._second = second
            stamp = _EPOCH + dt.timedelta(seconds=second)
            self._prefix = stamp.strftime("%Y-%m-%dT%H:%M:%S").encode()
        if digits == 0:
            return self._prefix + b"Z"
        return b"%s.%sZ" % (self._prefix, (b"%06d" % fraction)[:digits].ljust(digits, b"0"))


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One varying value inside a template line."""

    kind: str  # "audit_id" | "time" | "uid" | "name"
    start: int
    end: int
    offset_us: int = 0  # time: the value minus the template's stage time
    digits: int = 0  # time: fractional digits
    key: int = 0  # uid: which distinct uid of the line


@dataclasses.dataclass
class Template:
    """One real event, cut into literal text and the slots a copy fills in."""

    line: bytes
    source: str
    level: str
    stage: str
    verb: str
    resource: str
    literals: list[bytes]
    slots: list[_Slot]
    uid_count: int
    names: list[bytes]  # the name pool; names[0] is the original

    @property
    def size(self) -> int:
        return len(self.line)


def _stage_time_us(event: dict[str, Any]) -> int:
    for key in ("stageTimestamp", "timestamp", "requestReceivedTimestamp"):
        if isinstance(event.get(key), str):
            return parse_timestamp_us(event[key])
    raise ValueError(f"event {event.get('auditID')!r} has no timestamp to anchor copies to")


def _user_uids(event: dict[str, Any]) -> set[bytes]:
    uids = set()
    for key in ("user", "impersonatedUser"):
        user = event.get(key)
        if isinstance(user, dict) and isinstance(user.get("uid"), str):
            uids.add(user["uid"].encode())
    return uids


def _object_names(event: dict[str, Any]) -> set[str]:
    """Names of the object the request is about, safe to vary (not system: or policy-named)."""
    names: set[str] = set()
    ref = event.get("objectRef") or {}
    if isinstance(ref.get("name"), str):
        names.add(ref["name"])
    for body_key in ("requestObject", "responseObject"):
        metadata = (event.get(body_key) or {}).get("metadata") or {}
        generate, name = metadata.get("generateName"), metadata.get("name")
        if isinstance(generate, str) and isinstance(name, str) and name.startswith(generate):
            names.add(name)
    namespace = ref.get("namespace")
    return {
        name
        for name in names
        if len(name) >= 3
        and ":" not in name
        and not name.startswith("coredns")
        and name != namespace
    }


def _name_pool(name: str, rng: random.Random) -> list[bytes]:
    """Same-length variants of a name: its last (up to) five characters redrawn."""
    keep = name[: max(len(name) - 5, 0)]
    pool = {name}
    while len(pool) < NAME_POOL_SIZE:
        tail = "".join(rng.choice(_NAME_CHARS) for _ in range(len(name) - len(keep)))
        pool.add(keep + tail)
    return [name.encode(), *sorted(n.encode() for n in pool if n != name)]


def compile_template(line: bytes, source: str, rng: random.Random) -> Template:
    """Finds the slots of one real event line."""
    event = json.loads(line)
    anchor = _stage_time_us(event)
    audit_id = str(event.get("auditID", "")).encode()
    user_uids = _user_uids(event)
    slots: list[_Slot] = []
    for match in _TIMESTAMP.finditer(line):
        text = match.group().decode()
        digits = len(text.rstrip("Z").partition(".")[2])
        offset = parse_timestamp_us(text) - anchor
        slots.append(_Slot("time", match.start(), match.end(), offset_us=offset, digits=digits))
    uid_keys: dict[bytes, int] = {}
    for match in _UUID.finditer(line):
        value = match.group()
        if value == audit_id:
            slots.append(_Slot("audit_id", match.start(), match.end()))
        elif value not in user_uids:
            key = uid_keys.setdefault(value, len(uid_keys))
            slots.append(_Slot("uid", match.start(), match.end(), key=key))
    names = sorted(_object_names(event), key=len, reverse=True)[:1]
    pool: list[bytes] = []
    if names:
        name = names[0]
        pool = _name_pool(name, rng)
        pattern = re.compile(rb'(?<=["/])' + re.escape(name.encode()) + rb'(?=["/?])')
        slots.extend(_Slot("name", m.start(), m.end()) for m in pattern.finditer(line))
    slots = _without_overlaps(slots)
    literals, position = [], 0
    for slot in slots:
        literals.append(line[position : slot.start])
        position = slot.end
    literals.append(line[position:])
    ref = event.get("objectRef") or {}
    resource = ref.get("resource") or "(non-resource)"
    if ref.get("subresource"):
        resource += "/" + ref["subresource"]
    return Template(
        line=line,
        source=source,
        level=str(event.get("level")),
        stage=str(event.get("stage")),
        verb=str(event.get("verb")),
        resource=resource,
        literals=literals,
        slots=slots,
        uid_count=len(uid_keys),
        names=pool,
    )


def _without_overlaps(slots: list[_Slot]) -> list[_Slot]:
    kept: list[_Slot] = []
    for slot in sorted(slots, key=lambda s: (s.start, -s.end)):
        if not kept or slot.start >= kept[-1].end:
            kept.append(slot)
    return kept


def load_templates(samples: Path = SAMPLES, seed: int = 0) -> list[Template]:
    """Every event of an audit log, in file order, compiled into a template."""
    if not samples.is_file():
        raise FileNotFoundError(
            f"{samples}: no such audit log (tests/data/regenerate.py writes it)"
        )
    rng = random.Random(f"templates-{seed}")
    return [
        compile_template(line, samples.name, rng)
        for line in samples.read_bytes().splitlines()
        if line.strip()
    ]


def _random_uuid(rng: random.Random) -> bytes:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()


@dataclasses.dataclass(frozen=True)
class CorpusEvent:
    """One event of a corpus: the JSON line and when Fluent Bit read it."""

    line: bytes
    read_time_ns: int
    template: Template


def generate(
    count: int,
    seed: int = 1,
    rate: float = DEFAULT_RATE,
    start: str = DEFAULT_START,
    templates: list[Template] | None = None,
) -> Iterator[CorpusEvent]:
    """Yields ``count`` events: the same seed gives the same bytes."""
    pool = templates if templates is not None else load_templates(seed=seed)
    rng = random.Random(seed)
    formatter = _TimestampFormatter()
    stage_us = parse_timestamp_us(start)
    for _ in range(count):
        stage_us += max(1, round(rng.expovariate(rate) * 1_000_000))
        template = pool[rng.randrange(len(pool))]
        yield CorpusEvent(
            _fill(template, stage_us, rng, formatter), (stage_us + READ_DELAY_US) * 1000, template
        )


def _fill(
    template: Template, stage_us: int, rng: random.Random, formatter: _TimestampFormatter
) -> bytes:
    uids = [_random_uuid(rng) for _ in range(template.uid_count)]
    audit_id = _random_uuid(rng)
    name = template.names[rng.randrange(len(template.names))] if template.names else b""
    parts = [template.literals[0]]
    for slot, literal in zip(template.slots, template.literals[1:], strict=True):
        if slot.kind == "time":
            parts.append(formatter.format(stage_us + slot.offset_us, slot.digits))
        elif slot.kind == "audit_id":
            parts.append(audit_id)
        elif slot.kind == "uid":
            parts.append(uids[slot.key])
        else:
            parts.append(name)
        parts.append(literal)
    return b"".join(parts)


# --- Fluent Bit flush buffers ---------------------------------------------------------------

_ARRAY2 = b"\xdd\x00\x00\x00\x02"  # Fluent Bit writes 32-bit headers even for tiny arrays
_EMPTY_METADATA = b"\xdf\x00\x00\x00\x00"
_LOG_KEY = b"\xa3log"


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


def event_time(nanoseconds: int) -> bytes:
    """The EventTime extension (type 0): big-endian uint32 seconds, uint32 nanoseconds."""
    return b"\xd7\x00" + struct.pack(">II", *divmod(nanoseconds, 1_000_000_000))


def fluent_bit_record(line: bytes, read_time_ns: int, parsed: bool) -> bytes:
    """One v2 event as Fluent Bit's tail input packs it: ``[[EventTime, {}], record]``."""
    header = _ARRAY2 + _ARRAY2 + event_time(read_time_ns) + _EMPTY_METADATA
    if not parsed:
        return header + b"\xdf\x00\x00\x00\x01" + _LOG_KEY + _pack(line.decode())
    fields = orjson.loads(line)
    body = b"".join(_pack(k) + _pack(v) for k, v in fields.items())
    return header + b"\xdf" + struct.pack(">I", len(fields)) + body


class ChunkBuilder:
    """Groups records into flush buffers of at most ``max_bytes`` (one record may exceed it)."""

    def __init__(self, max_bytes: int = FLB_CHUNK_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._records: list[bytes] = []
        self._size = 0

    def add(self, record: bytes) -> bytes | None:
        """Adds a record; returns the chunk it closed, if adding it would overflow that one."""
        closed = None
        if self._records and self._size + len(record) > self.max_bytes:
            closed = self.flush()
        self._records.append(record)
        self._size += len(record)
        return closed

    def flush(self) -> bytes | None:
        """Returns the open chunk, if any, and starts a new one."""
        if not self._records:
            return None
        chunk = b"".join(self._records)
        self._records, self._size = [], 0
        return chunk


def fluent_bit_chunks(
    events: Iterable[CorpusEvent], parsed: bool, max_bytes: int = FLB_CHUNK_MAX_BYTES
) -> Iterator[bytes]:
    """The flush buffers Fluent Bit would hand the output for these events."""
    builder = ChunkBuilder(max_bytes)
    for event in events:
        closed = builder.add(fluent_bit_record(event.line, event.read_time_ns, parsed))
        if closed is not None:
            yield closed
    last = builder.flush()
    if last is not None:
        yield last


class ChunkWriter:
    """Writes chunks to a ``.chunks`` file, each framed by a big-endian uint32 length."""

    def __init__(self, path: Path) -> None:
        self._out = path.open("wb")
        self.chunks = 0
        self.bytes = 0

    def write(self, chunk: bytes | None) -> None:
        if chunk is None:
            return
        self._out.write(struct.pack(">I", len(chunk)))
        self._out.write(chunk)
        self.chunks += 1
        self.bytes += len(chunk)

    def close(self) -> None:
        self._out.close()


def write_chunks(path: Path, chunks: Iterable[bytes]) -> tuple[int, int]:
    """Writes a ``.chunks`` file; returns (chunks, bytes of chunks)."""
    writer = ChunkWriter(path)
    try:
        for chunk in chunks:
            writer.write(chunk)
    finally:
        writer.close()
    return writer.chunks, writer.bytes


def read_chunks(path: Path) -> Iterator[bytes]:
    """The flush buffers of a ``.chunks`` file, one at a time."""
    with path.open("rb") as source:
        while header := source.read(4):
            (length,) = struct.unpack(">I", header)
            chunk = source.read(length)
            if len(chunk) != length:
                raise ValueError(f"{path}: truncated chunk ({len(chunk)} of {length} bytes)")
            yield chunk


# --- building a corpus on disk --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusPaths:
    """The files of one corpus."""

    jsonl: Path
    raw_chunks: Path
    parsed_chunks: Path
    manifest: Path

    @classmethod
    def for_corpus(cls, events: int, seed: int, directory: Path = CORPORA_DIR) -> CorpusPaths:
        stem = directory / f"audit-v{CORPUS_VERSION}-{events}-seed{seed}"
        return cls(
            jsonl=stem.with_suffix(".log"),
            raw_chunks=Path(f"{stem}.raw.chunks"),
            parsed_chunks=Path(f"{stem}.parsed.chunks"),
            manifest=Path(f"{stem}.json"),
        )

    def exist(self) -> bool:
        return all(
            p.exists() for p in (self.jsonl, self.raw_chunks, self.parsed_chunks, self.manifest)
        )


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[int(rank) - 1]


def mix_summary(templates: Iterable[Template]) -> dict[str, Any]:
    """Level, verb and resource shares and size percentiles of a list of events."""
    chosen = list(templates)
    sizes = sorted(t.size for t in chosen)
    total = len(chosen) or 1

    def shares(values: Iterable[str]) -> dict[str, float]:
        return {k: round(v / total, 4) for k, v in Counter(values).most_common()}

    return {
        "events": len(chosen),
        "bytes": sum(sizes),
        "size_bytes": {
            "mean": round(sum(sizes) / total, 1),
            "p50": percentile(sizes, 0.5),
            "p90": percentile(sizes, 0.9),
            "p99": percentile(sizes, 0.99),
            "max": sizes[-1] if sizes else 0,
        },
        "level": shares(t.level for t in chosen),
        "verb": shares(t.verb for t in chosen),
        "resource": shares(t.resource for t in chosen),
    }


def build(
    events: int,
    seed: int = 1,
    rate: float = DEFAULT_RATE,
    directory: Path = CORPORA_DIR,
    samples: Path = SAMPLES,
    chunk_bytes: int = FLB_CHUNK_MAX_BYTES,
    force: bool = False,
) -> tuple[CorpusPaths, dict[str, Any]]:
    """Writes the audit.log and both chunk files of a corpus (reused when already built)."""
    paths = CorpusPaths.for_corpus(events, seed, directory)
    if paths.exist() and not force:
        manifest: dict[str, Any] = json.loads(paths.manifest.read_text())
        return paths, manifest
    directory.mkdir(parents=True, exist_ok=True)
    templates = load_templates(samples, seed)
    used: list[Template] = []
    builders = {False: ChunkBuilder(chunk_bytes), True: ChunkBuilder(chunk_bytes)}
    writers = {False: ChunkWriter(paths.raw_chunks), True: ChunkWriter(paths.parsed_chunks)}
    try:
        with paths.jsonl.open("wb") as log:
            for event in generate(events, seed, rate, templates=templates):
                log.write(event.line + b"\n")
                used.append(event.template)
                for parsed, builder in builders.items():
                    record = fluent_bit_record(event.line, event.read_time_ns, parsed)
                    writers[parsed].write(builder.add(record))
        for parsed, builder in builders.items():
            writers[parsed].write(builder.flush())
    finally:
        for writer in writers.values():
            writer.close()
    chunk_stats = {
        "parsed" if parsed else "raw": {"chunks": w.chunks, "bytes": w.bytes}
        for parsed, w in writers.items()
    }
    manifest = {
        "version": CORPUS_VERSION,
        "events": events,
        "seed": seed,
        "rate_events_per_s": rate,
        "start": DEFAULT_START,
        "chunk_max_bytes": chunk_bytes,
        "jsonl_bytes": paths.jsonl.stat().st_size,
        "chunks": chunk_stats,
        "mix": mix_summary(used),
        "template_mix": mix_summary(templates),
    }
    paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return paths, manifest


def iter_lines(path: Path) -> Iterator[bytes]:
    """The event lines of an audit.log."""
    with path.open("rb") as log:
        for line in log:
            yield line.rstrip(b"\n")
