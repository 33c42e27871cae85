"""Decoding of a Fluent Bit chunk: msgpack event stream -> audit events and dead letters.

A chunk is the concatenation of events, with no outer array. Fluent Bit writes each event as
``[timestamp, record]`` (up to v2.0) or ``[[timestamp, metadata], record]`` (v2.1 and later);
the timestamp is an integer, a float or the EventTime extension (ext type 0, 8 bytes:
big-endian uint32 seconds and nanoseconds, as fixext8 or ext8). Since v3.1 group start/end
markers (EventTime seconds 0xFFFFFFFF / 0xFFFFFFFE) may appear between events; they are skipped.

A record is either an audit event parsed by Fluent Bit's json parser (a map), or the raw JSON
line in ``log`` (no parser), which is parsed here and kept byte for byte in ``AuditEvent.raw``.

This is the hot path: per event, a handful of type checks and dict lookups, nothing more.
EventTime values are decoded to their integer seconds (the sidecar needs no timestamp beyond
recognising group markers, and msgpack's ExtType costs more than the rest of our per-event work).
Anything that is not an audit.k8s.io Event becomes a ``DeadLetter`` with a specific reason and
never stops the good records of the same chunk. Only a chunk that does not even start with an
event is refused whole (``DecodeError``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import msgpack
import orjson

from auditrelay.errors import DecodeError
from auditrelay.model import AuditEvent, DeadLetter, DecodedChunk

# A tuple, not a set: membership must not hash a value that may be a list or a map.
AUDIT_API_VERSIONS: Final = ("audit.k8s.io/v1", "audit.k8s.io/v1beta1")
EVENT_TIME_EXT: Final = 0
GROUP_START_SECONDS: Final = 0xFFFFFFFF
GROUP_END_SECONDS: Final = 0xFFFFFFFE


class Reason:
    """Why a record was set aside; the values are stable (logs, metrics labels, dead-letter files)."""

    NOT_AN_EVENT: Final = "not_an_event"  # not a 2-element array
    BAD_EVENT_HEADER: Final = "bad_event_header"  # v2 header is not [timestamp, metadata map]
    BAD_TIMESTAMP: Final = "bad_timestamp"  # neither int, float nor EventTime
    RECORD_NOT_MAP: Final = "record_not_map"  # the record is an array, a string, ...
    NON_UTF8: Final = "non_utf8"  # a string of the record is not valid UTF-8
    LOG_NOT_STRING: Final = "log_not_string"  # `log` holds something other than text
    LOG_NOT_JSON: Final = "log_not_json"  # `log` is not valid JSON
    JSON_NOT_OBJECT: Final = "json_not_object"  # `log` is JSON but not an object
    NOT_AUDIT_EVENT: Final = "not_audit_event"  # kind is not Event
    UNSUPPORTED_API_VERSION: Final = "unsupported_api_version"  # not audit.k8s.io/v1 or v1beta1
    MISSING_AUDIT_ID: Final = "missing_audit_id"
    MISSING_STAGE: Final = "missing_stage"
    MISSING_LEVEL: Final = "missing_level"
    TRUNCATED_MSGPACK: Final = "truncated_msgpack"  # the chunk ends inside an event
    MALFORMED_MSGPACK: Final = "malformed_msgpack"  # invalid bytes after good events
    UNHASHABLE_MAP_KEY: Final = "unhashable_map_key"  # a map key is a map: no dict can hold it
    NOT_MSGPACK: Final = "not_msgpack"  # the whole chunk (see DecodeError)

    ALL: Final = (
        NOT_AN_EVENT,
        BAD_EVENT_HEADER,
        BAD_TIMESTAMP,
        RECORD_NOT_MAP,
        NON_UTF8,
        LOG_NOT_STRING,
        LOG_NOT_JSON,
        JSON_NOT_OBJECT,
        NOT_AUDIT_EVENT,
        UNSUPPORTED_API_VERSION,
        MISSING_AUDIT_ID,
        MISSING_STAGE,
        MISSING_LEVEL,
        TRUNCATED_MSGPACK,
        MALFORMED_MSGPACK,
        UNHASHABLE_MAP_KEY,
        NOT_MSGPACK,
    )


def decode_chunk(chunk: bytes, tag: str = "") -> DecodedChunk:
    """Decodes one Fluent Bit chunk; raises DecodeError when it is not an event stream at all."""
    stream = ChunkStream(chunk, tag)
    events = list(stream)
    return DecodedChunk(events, stream.dead_letters, stream.records_seen)


class ChunkStream:
    """The audit events of one chunk, one at a time, so each can be filtered, encoded and freed
    before the next is decoded (a chunk's events all alive at once are tens of MB of dicts).

    Iterate it once; ``dead_letters`` and ``records_seen`` are complete when the iteration ends.
    The iteration raises DecodeError, before yielding anything, when the chunk is not an event
    stream at all.
    """

    def __init__(self, chunk: bytes, tag: str = "") -> None:
        self.chunk = chunk
        self.tag = tag
        self.dead_letters: list[DeadLetter] = []
        self.records_seen = 0

    def __iter__(self) -> Iterator[AuditEvent]:
        progress = _Progress(0)
        careful = False
        while True:
            try:
                yield from _decode(self, progress, careful=careful)
            except _UndecodableError:
                # The events before ``progress.end`` decoded cleanly; go on from there carefully.
                careful = True
            except _UnhashableKeyError:
                # One event holds a map used as a map key; set it aside and go on after it.
                self._set_aside_one_event(progress)
            else:
                return

    def _set_aside_one_event(self, progress: _Progress) -> None:
        start = progress.end
        unpacker = msgpack.Unpacker(max_buffer_size=max(len(self.chunk) - start, 1))
        unpacker.feed(memoryview(self.chunk)[start:])
        reason = Reason.UNHASHABLE_MAP_KEY
        try:
            unpacker.skip()  # skipping builds no dict, so it finds where the event ends
            progress.end = start + unpacker.tell()
        except (msgpack.UnpackException, ValueError):  # the chunk ends inside that event
            reason, progress.end = Reason.TRUNCATED_MSGPACK, len(self.chunk)
        self.records_seen += 1
        self.dead_letters.append(DeadLetter(reason, self.chunk[start : progress.end], self.tag))


class _UndecodableError(Exception):
    """Internal: a string of the chunk is not UTF-8; decode on the slow, careful way."""


class _UnhashableKeyError(Exception):
    """Internal: an event has a map as a map key; set that event aside and resume after it."""


class _Progress:
    """Where the decoding of a chunk has got to (absolute offsets in the chunk)."""

    __slots__ = ("end",)

    def __init__(self, end: int) -> None:
        self.end = end


def _event_time_seconds(code: int, data: bytes) -> Any:
    """EventTime becomes its seconds, an int: cheaper than msgpack's ExtType, and JSON-safe."""
    if code == EVENT_TIME_EXT and len(data) == 8:
        return int.from_bytes(data[:4])
    return msgpack.ExtType(code, data)


def _decode(stream: ChunkStream, progress: _Progress, *, careful: bool) -> Iterator[AuditEvent]:
    """Yields the events of ``stream.chunk`` from ``progress.end`` on; ``progress.end`` follows
    the last event read, so that a strict pass that meets non-UTF-8 text can be resumed there."""
    chunk, tag = stream.chunk, stream.tag
    base = progress.end
    unpacker = msgpack.Unpacker(
        raw=False,
        ext_hook=_event_time_seconds,
        # surrogateescape keeps the stream aligned past bad bytes; each record is then checked.
        unicode_errors="surrogateescape" if careful else "strict",
        strict_map_key=False,
        max_buffer_size=max(len(chunk) - base, 1),
    )
    unpacker.feed(memoryview(chunk)[base:] if base else chunk)
    letters = stream.dead_letters
    end = base
    tell = unpacker.tell
    try:
        for item in unpacker:
            start, end = end, base + tell()
            progress.end = end
            reason = _event_problem(item)
            if reason is None:
                record: dict[Any, Any] = item[1]
                stream.records_seen += 1
                result = _audit_event(record, careful)
                if isinstance(result, str):
                    letters.append(_letter(result, record, chunk[start:end], tag))
                else:
                    yield result
            elif reason is _GROUP_MARKER:
                continue
            elif type(item) is not list:
                # Fluent Bit writes only arrays at the top level: the stream is broken from here
                # on (text read as msgpack would otherwise become one letter per byte).
                if start == 0:
                    raise DecodeError("the chunk does not start with a Fluent Bit event")
                stream.records_seen += 1
                letters.append(DeadLetter(Reason.MALFORMED_MSGPACK, chunk[start:], tag))
                end = len(chunk)
                break
            else:
                stream.records_seen += 1
                letters.append(DeadLetter(reason, chunk[start:end], tag))
    except UnicodeDecodeError as error:
        if careful:  # cannot happen with surrogateescape; kept so a bug cannot loop
            raise DecodeError(f"undecodable text in the chunk: {error}") from error
        raise _UndecodableError from error
    except TypeError as error:  # msgpack could not use a map as a dict key
        raise _UnhashableKeyError from error
    except (msgpack.UnpackException, ValueError) as error:
        if end == 0:
            raise DecodeError(f"the chunk is not msgpack: {error}") from error
        letters.append(DeadLetter(Reason.MALFORMED_MSGPACK, chunk[end:], tag))
        stream.records_seen += 1
        end = len(chunk)
    if end < len(chunk):
        if end == 0:
            raise DecodeError("the chunk is not msgpack: it ends inside its first object")
        letters.append(DeadLetter(Reason.TRUNCATED_MSGPACK, chunk[end:], tag))
        stream.records_seen += 1


_GROUP_MARKER: Final = "group_marker"


def _event_problem(item: Any) -> str | None:
    """None for a well-formed event, _GROUP_MARKER for a marker, or the reason it is malformed."""
    if type(item) is not list or len(item) != 2:
        return Reason.NOT_AN_EVENT
    header = item[0]
    if type(header) is list:  # v2: [timestamp, metadata]
        if len(header) != 2 or type(header[1]) is not dict:
            return Reason.BAD_EVENT_HEADER
        header = header[0]
    header_type = type(header)
    if header_type is int:  # integer seconds, or EventTime (see _event_time_seconds)
        # A marker's body is a map; anything else there is skipped only with a letter.
        if GROUP_END_SECONDS <= header <= GROUP_START_SECONDS and type(item[1]) is dict:
            return _GROUP_MARKER
    elif header_type is not float:
        return Reason.BAD_TIMESTAMP
    if type(item[1]) is not dict:
        return Reason.RECORD_NOT_MAP
    return None


def _audit_event(record: dict[Any, Any], careful: bool) -> AuditEvent | str:
    """The audit event a record carries, or the reason it is not one."""
    if "kind" not in record and "log" in record:
        return _event_from_log(record["log"])
    if careful and not _is_utf8_clean(record):
        return Reason.NON_UTF8
    problem = _audit_problem(record)
    return AuditEvent(record) if problem is None else problem


def _event_from_log(log: Any) -> AuditEvent | str:
    if type(log) is str:
        try:
            raw = log.encode()
        except UnicodeEncodeError:  # surrogates: the careful pass met non-UTF-8 bytes here
            return Reason.NON_UTF8
    elif type(log) is bytes:  # msgpack bin: Fluent Bit does not write it, but it is unambiguous
        raw = log
    else:
        return Reason.LOG_NOT_STRING
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Reason.LOG_NOT_JSON
    if type(fields) is not dict:
        return Reason.JSON_NOT_OBJECT
    problem = _audit_problem(fields)
    return AuditEvent(fields, raw) if problem is None else problem


def _audit_problem(fields: dict[Any, Any]) -> str | None:
    """None when the fields form an audit.k8s.io Event this sidecar can filter and ship."""
    if fields.get("kind") != "Event":
        return Reason.NOT_AUDIT_EVENT
    if fields.get("apiVersion") not in AUDIT_API_VERSIONS:
        return Reason.UNSUPPORTED_API_VERSION
    audit_id = fields.get("auditID")
    if type(audit_id) is not str or not audit_id:
        return Reason.MISSING_AUDIT_ID
    if type(fields.get("stage")) is not str:
        return Reason.MISSING_STAGE
    if type(fields.get("level")) is not str:
        return Reason.MISSING_LEVEL
    return None


def audit_problem(fields: dict[Any, Any]) -> str | None:
    """The one rule of what an audit event is, for previews that must agree with serve
    (``auditrelay policy filter``): None, or the Reason it would be set aside for."""
    return _audit_problem(fields)


def _is_utf8_clean(record: dict[Any, Any]) -> bool:
    """False when a string holds surrogate escapes of non-UTF-8 bytes (careful pass only)."""
    try:
        orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return False
    return True


def _letter(reason: str, record: dict[Any, Any], event_bytes: bytes, tag: str) -> DeadLetter:
    """The letter for a bad record: the `log` line itself when the record carried one."""
    log = record.get("log")
    if "kind" not in record and type(log) is str:
        try:
            return DeadLetter(reason, log.encode(), tag)
        except UnicodeEncodeError:
            pass  # non-UTF-8 bytes in the line: keep the event's msgpack bytes instead
    return DeadLetter(reason, event_bytes, tag)
