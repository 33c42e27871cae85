"""Fuzz target ``decode``: Fluent Bit chunks (msgpack framing, EventTime, both record shapes,
hostile lengths), alone and with a fuzzed event between two good ones. The good ones must come out;
when the fuzzed bytes break the framing itself, what follows them must be set aside in the dead
letters, never dropped."""

from __future__ import annotations

from typing import Final

import atheris
import msgpack
import orjson
from auditrelay.decode import ChunkStream, decode_chunk
from auditrelay.errors import DecodeError
from auditrelay.model import AuditEvent
from fixtures.chunks import (
    audit_event,
    event_time,
    event_time_ext8,
    float_time,
    int_time,
    legacy_event,
    log_record,
    map32,
    raw_str,
    v2_event,
)

from fuzz.targets.values import some_bytes, value

GOOD_BEFORE: Final = "good-before-0000-0000-000000000000"
GOOD_AFTER: Final = "good-after-00000-0000-000000000000"


def _good_event(audit_id: str, raw_log: bool) -> bytes:
    """A good event in one of the two shapes tail writes: the raw line in ``log``, or parsed."""
    fields = audit_event(audit_id)
    if raw_log:
        return v2_event(event_time(1_795_000_000, 1), log_record(orjson.dumps(fields)))
    return v2_event(event_time(1_795_000_000, 2), map32(fields))


def _timestamp(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A timestamp of every form Fluent Bit writes, or bytes the fuzzer picks (hostile ones)."""
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 0:
        return event_time(fdp.ConsumeIntInRange(0, 0xFFFFFFFF), fdp.ConsumeIntInRange(0, 2**32 - 1))
    if kind == 1:
        return event_time_ext8(fdp.ConsumeIntInRange(0, 0xFFFFFFFF))
    if kind == 2:
        return int_time(fdp.ConsumeInt(8))
    if kind == 3:
        return float_time(fdp.ConsumeFloat())
    if kind == 4:  # an ext of another type or length
        length = fdp.ConsumeIntInRange(0, 20)
        data: bytes = msgpack.packb(
            msgpack.ExtType(fdp.ConsumeIntInRange(0, 127), fdp.ConsumeBytes(length))
        )
        return data
    return some_bytes(fdp, 16)


def _record(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A record: a `log` line of any bytes, an audit event with fuzzed fields, or raw bytes."""
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return log_record(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400)))
    if kind == 1:
        fields = audit_event("fuzzed-0000")
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            key = fdp.PickValueInList([*fields, "log", "kind", "apiVersion", "x"])
            fields[key] = value(fdp)
        return map32(fields)
    if kind == 2:
        packed: bytes = msgpack.packb(value(fdp), use_bin_type=fdp.ConsumeBool())
        return packed
    return some_bytes(fdp, 64)


def _fuzzed_event(fdp: atheris.FuzzedDataProvider) -> bytes:
    """One event between good ones: framed as Fluent Bit frames it, with fuzzed parts, or any
    bytes at all (hostile lengths: str32/array32/map32 headers claiming gigabytes)."""
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        return v2_event(_timestamp(fdp), _record(fdp))
    if kind == 1:
        return legacy_event(_timestamp(fdp), _record(fdp))
    if kind == 2:  # a v2 header with fuzzed metadata
        return v2_event(_timestamp(fdp), _record(fdp), metadata=_record(fdp))
    if kind == 3:
        return raw_str(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    return some_bytes(fdp, 512)


def _is_one_array(data: bytes) -> bool:
    """True when ``data`` is exactly one complete msgpack array: a well-framed event."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        first = unpacker.unpack()
    except (msgpack.UnpackException, ValueError, TypeError):
        return False
    return isinstance(first, list) and unpacker.tell() == len(data)


def _check_decoded(chunk: bytes) -> list[AuditEvent] | None:
    """Decodes ``chunk`` both ways; None when it is refused whole (DecodeError)."""
    try:
        decoded = decode_chunk(chunk, "kube.audit")
    except DecodeError:
        try:
            list(ChunkStream(chunk))
        except DecodeError:
            return None
        raise AssertionError("ChunkStream took a chunk decode_chunk refused") from None
    assert len(decoded.events) + len(decoded.dead_letters) == decoded.records_seen
    for event in decoded.events:
        fields = event.fields
        assert fields["kind"] == "Event"
        assert type(fields["auditID"]) is str and fields["auditID"]
        assert type(fields["stage"]) is str and type(fields["level"]) is str
        if event.raw is not None:
            assert orjson.loads(event.raw) == fields
    for letter in decoded.dead_letters:
        assert letter.reason and letter.tag == "kube.audit"
    return decoded.events


def fuzz(data: bytes) -> None:
    """Any bytes as a chunk; and a fuzzed event between two good ones."""
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        _check_decoded(fdp.ConsumeBytes(len(data)))
        return
    before = _good_event(GOOD_BEFORE, raw_log=fdp.ConsumeBool())
    after = _good_event(GOOD_AFTER, raw_log=fdp.ConsumeBool())
    middle = _fuzzed_event(fdp)
    chunk = before + middle + after
    events = _check_decoded(chunk)
    assert events is not None, "a chunk that starts with a good event was refused whole"
    ids = [event.fields["auditID"] for event in events]
    assert GOOD_BEFORE in ids, "the good event before a bad one did not come out"
    if _is_one_array(middle):
        assert GOOD_AFTER in ids, "a well-framed bad event held back the good one after it"
    elif GOOD_AFTER not in ids:
        # The fuzzed bytes broke the framing: what follows them cannot be told apart from them.
        # It must then be set aside (in the letters' bytes, one after another), not dropped.
        payloads = [letter.payload for letter in decode_chunk(chunk).dead_letters]
        assert (
            after in b"".join(payloads)
            or _rest_set_aside(after, payloads)
            or _ends_cut_short(middle)
        ), "the good event was lost"


def _ends_cut_short(data: bytes) -> bool:
    """Whether the last msgpack object in ``data`` is incomplete: its lengths reach past the
    end, so whatever follows (the good event, whole or in part) is read as its rest."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    whole = 0  # the bytes of the complete objects read so far
    try:
        while True:
            unpacker.skip()
            whole = int(unpacker.tell())
    except msgpack.OutOfData:
        return whole < len(data)
    except (msgpack.UnpackException, ValueError, TypeError):
        return False


def _rest_set_aside(after: bytes, payloads: list[bytes]) -> bool:
    """Whether the last dead letter is the good event from some point to its end: the broken
    record's lengths swallowed the event's start (it cannot be told apart from them), and the
    decoder set aside all that was left when no record could be read there."""
    return bool(payloads) and bool(payloads[-1]) and after.endswith(payloads[-1])
