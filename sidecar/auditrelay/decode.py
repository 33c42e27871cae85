"""Decoding of a Fluent Bit chunk: msgpack event stream -> audit events and dead letters.

A chunk is the concatenation of events, with no outer array. Fluent Bit writes each event as
``[timestamp, record]`` (up to v2.0) or ``[[timestamp, metadata], record]`` (v2.1 and later);
the timestamp is an integer, a float or the EventTime extension (ext type 0, 8 bytes:
big-endian uint32 seconds and nanoseconds, as fixext8 or ext8). Since v3.1 group start/end
markers (EventTime seconds 0xFFFFFFFF / 0xFFFFFFFE) may appear between events; they are skipped.

A record is either the raw JSON line in ``log`` (Fluent Bit's tail without a parser, what the
shipped configuration does), or an audit event Fluent Bit's json parser already parsed (a map).

This is the hot path, and it decodes only what the policy and the row encoder read
(``model.AuditEvent`` is the contract). The usual event, ``[[EventTime, {}], {"log": "<line>"}]``
as Fluent Bit's tail writes it, is recognised by its fixed msgpack prefix, which gives the line's
length; the line is decoded by one ``msgspec`` call into a ``model.JsonEvent``: the header fields
typed, the bodies left as the line's own bytes (``msgspec.Raw``), nothing else built. From the
first event in another form on, each event's bytes are found with msgpack's ``skip`` and decoded
by a typed ``msgspec.msgpack`` call; anything else (a parsed map, an integer or float timestamp,
a group marker, a line that is not a well-typed event) takes the careful way: the event is
unpacked whole with ``msgpack`` (EventTime as its integer seconds) and its line parsed whole with
``orjson``, and either becomes an event or a ``DeadLetter`` with a specific reason. A bad record
never stops the good records of the same chunk. Only a chunk that does not even start with an
event is refused whole (``DecodeError``).

The fields the policy reads (``verb``, ``requestURI``, ``user.username``, ``user.groups``, the
``objectRef`` names) must hold text: an event with a number, list or map there is set aside as
``wrong_field_type`` (``null`` reads as absent). Of duplicate keys the last one wins, as in
kube-apiserver's JSON decoding (and orjson's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

import msgpack
import msgspec
import orjson
from msgspec import UNSET, UnsetType

from auditrelay.errors import DecodeError
from auditrelay.model import JSON_EVENT_DECODER, AuditEvent, DeadLetter, DecodedChunk, JsonEvent

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
    WRONG_FIELD_TYPE: Final = "wrong_field_type"  # a field the policy reads is not text
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
        WRONG_FIELD_TYPE,
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


class _LogRecord(msgspec.Struct):
    """A record of Fluent Bit's tail without a parser: the line in ``log``."""

    log: str
    kind: msgspec.Raw | UnsetType = UNSET  # a record with `kind` is a parsed event, not a line


_FRAME_DECODER: Final = msgspec.msgpack.Decoder(
    tuple[tuple[msgspec.msgpack.Ext, dict[str, Any]], _LogRecord]
)
_ARRAY_TYPES: Final = frozenset((*range(0x90, 0xA0), 0xDC, 0xDD))  # fixarray, array16, array32
_GROUP_MARKER_PREFIX: Final = b"\xff\xff\xff"  # EventTime seconds 0xFFFFFFFF / 0xFFFFFFFE


# The event Fluent Bit's tail writes without a parser, up to the length of its line:
# [[EventTime, {}], {"log": <str>}], with 32-bit array and map headers (Fluent Bit's own), or the
# shortest headers (other msgpack writers).
_USUAL_FORMS: Final = (
    (
        b"\xdd\x00\x00\x00\x02\xdd\x00\x00\x00\x02\xd7\x00",
        b"\xdf\x00\x00\x00\x00\xdf\x00\x00\x00\x01\xa3log",
    ),
    (b"\x92\x92\xd7\x00", b"\x80\x81\xa3log"),
)


def _usual_line(chunk: bytes, start: int) -> tuple[int, int] | None:
    """Where the line of the usual event at ``start`` begins and ends (the event ends there
    too), or None when the event there is not in the usual form, or is cut short."""
    for head, middle in _USUAL_FORMS:
        if not chunk.startswith(head, start):
            continue
        seconds = start + len(head)
        if chunk.startswith(_GROUP_MARKER_PREFIX, seconds):
            return None
        text = seconds + 8
        if not chunk.startswith(middle, text):
            return None
        text += len(middle)
        header = chunk[text : text + 5]
        if len(header) < 2:
            return None
        kind = header[0]
        if kind == 0xDA:
            begin, length = text + 3, int.from_bytes(header[1:3])
        elif kind == 0xDB:
            begin, length = text + 5, int.from_bytes(header[1:5])
        elif kind == 0xD9:
            begin, length = text + 2, header[1]
        elif 0xA0 <= kind <= 0xBF:
            begin, length = text + 1, kind & 0x1F
        else:
            return None
        end = begin + length
        return (begin, end) if end <= len(chunk) and begin <= end else None
    return None


class ChunkStream:
    """The audit events of one chunk, one at a time, so each can be filtered, encoded and freed
    before the next is decoded.

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
        chunk = self.chunk
        size = len(chunk)
        start = 0
        while start < size:
            span = _usual_line(chunk, start)
            if span is None:
                break
            line = chunk[span[0] : span[1]]
            if not line.isascii():
                try:
                    line.decode()
                except UnicodeDecodeError:
                    break  # the careful way sets the event aside with its msgpack bytes
            self.records_seen += 1
            result = _event_from_json(line)
            if isinstance(result, str):
                self._letter(result, line, b"")
            else:
                yield result
            start = span[1]
        if start < size:
            yield from self._framed(start)

    def _framed(self, base: int) -> Iterator[AuditEvent]:
        """The events from ``base`` on, each found by msgpack's ``skip`` and decoded by msgspec,
        or the careful way."""
        chunk = self.chunk
        size = len(chunk)
        unpacker = msgpack.Unpacker(max_buffer_size=max(size - base, 1))
        unpacker.feed(memoryview(chunk)[base:] if base else chunk)
        skip, tell = unpacker.skip, unpacker.tell
        view = memoryview(chunk)
        decode_frame = _FRAME_DECODER.decode
        start = base
        while start < size:
            if not self._skipped(skip, start):
                return
            end = base + tell()
            try:
                (timestamp, _), record = decode_frame(view[start:end])
            except msgspec.MsgspecError:
                result = self._carefully(chunk[start:end])
            else:
                seconds = bytes(timestamp.data)
                if (
                    timestamp.code != EVENT_TIME_EXT
                    or len(seconds) != 8
                    or seconds[:3] == _GROUP_MARKER_PREFIX
                    or record.kind is not UNSET
                ):
                    result = self._carefully(chunk[start:end])
                else:
                    self.records_seen += 1
                    line = _event_from_line(record.log)
                    if isinstance(line, str):
                        self._letter(line, record.log.encode(), chunk[start:end])
                        result = None
                    else:
                        result = line
            start = end
            if result is not None:
                yield result

    def _skipped(self, skip: Callable[[], None], start: int) -> bool:
        """Moves past the event at ``start``; False (with the rest set aside) when the stream is
        broken there: not an array (text read as msgpack would otherwise become one letter per
        byte), invalid msgpack, or the chunk ends inside it."""
        chunk = self.chunk
        if chunk[start] in _ARRAY_TYPES:
            try:
                skip()
            except msgpack.OutOfData:
                if start == 0:
                    raise DecodeError(
                        "the chunk is not msgpack: it ends inside its first object"
                    ) from None
                self._set_aside(Reason.TRUNCATED_MSGPACK, start)
                return False
            except (msgpack.UnpackException, ValueError) as error:
                if start == 0:
                    raise DecodeError(f"the chunk is not msgpack: {error}") from error
                self._set_aside(Reason.MALFORMED_MSGPACK, start)
                return False
            return True
        if start == 0:
            raise DecodeError("the chunk does not start with a Fluent Bit event")
        self._set_aside(Reason.MALFORMED_MSGPACK, start)
        return False

    def _set_aside(self, reason: str, start: int) -> None:
        self.records_seen += 1
        self.dead_letters.append(DeadLetter(reason, self.chunk[start:], self.tag))

    def _letter(self, reason: str, line: bytes | None, event_bytes: bytes) -> None:
        """Sets a bad record aside: the `log` line itself when it carried one."""
        payload = line if line is not None else event_bytes
        self.dead_letters.append(DeadLetter(reason, payload, self.tag))

    def _carefully(self, event_bytes: bytes) -> AuditEvent | None:
        """The event in ``event_bytes`` by the careful way; None when it is set aside or is a
        group marker."""
        try:
            item, careful = _unpack_carefully(event_bytes)
        except TypeError:  # msgpack could not use a map as a dict key
            self.records_seen += 1
            self._letter(Reason.UNHASHABLE_MAP_KEY, None, event_bytes)
            return None
        except (msgpack.UnpackException, ValueError):
            self.records_seen += 1
            self._letter(Reason.MALFORMED_MSGPACK, None, event_bytes)
            return None
        reason = _event_problem(item)
        if reason is _GROUP_MARKER:
            return None
        self.records_seen += 1
        if reason is not None:
            self._letter(reason, None, event_bytes)
            return None
        record: dict[Any, Any] = item[1]
        result = _audit_event(record, careful)
        if type(result) is str:
            self._letter(result, _log_line(record), event_bytes)
            return None
        assert isinstance(result, AuditEvent)
        return result


def _unpack_carefully(event_bytes: bytes) -> tuple[Any, bool]:
    """The event unpacked, and whether its text needed surrogate escapes (non-UTF-8 bytes,
    which keep the record readable until it is set aside)."""
    try:
        return _unpack(event_bytes, "strict"), False
    except UnicodeDecodeError:
        return _unpack(event_bytes, "surrogateescape"), True


def _unpack(event_bytes: bytes, unicode_errors: str) -> Any:
    return msgpack.unpackb(
        event_bytes,
        raw=False,
        ext_hook=_event_time_seconds,
        unicode_errors=unicode_errors,
        strict_map_key=False,
    )


def _event_time_seconds(code: int, data: bytes) -> Any:
    """EventTime becomes its seconds, an int: cheaper than msgpack's ExtType, and JSON-safe."""
    if code == EVENT_TIME_EXT and len(data) == 8:
        return int.from_bytes(data[:4])
    return msgpack.ExtType(code, data)


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
        log = record["log"]
        if type(log) is str:
            return _event_from_line(log)
        if type(log) is bytes:  # msgpack bin: Fluent Bit does not write it, but it is unambiguous
            return _event_from_json(log)
        return Reason.LOG_NOT_STRING
    if careful and not _is_utf8_clean(record):
        return Reason.NON_UTF8
    problem = _audit_problem(record)
    return AuditEvent(record) if problem is None else problem


def _event_from_line(log: str) -> AuditEvent | str:
    try:
        raw = log.encode()
    except UnicodeEncodeError:  # surrogates: the careful pass met non-UTF-8 bytes here
        return Reason.NON_UTF8
    return _event_from_json(raw)


def _event_from_json(raw: bytes) -> AuditEvent | str:
    """The event of a JSON line: its header only when it is a well-typed event, else parsed
    whole (the careful way, which also names what is wrong)."""
    try:
        header = JSON_EVENT_DECODER.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _event_from_parsed_json(raw)
    problem = _header_problem(header)
    return AuditEvent(raw=raw, header=header) if problem is None else problem


def _event_from_parsed_json(raw: bytes) -> AuditEvent | str:
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Reason.LOG_NOT_JSON
    if type(fields) is not dict:
        return Reason.JSON_NOT_OBJECT
    problem = _audit_problem(fields)
    return AuditEvent(fields, raw) if problem is None else problem


def _header_problem(header: JsonEvent) -> str | None:
    """``_audit_problem`` for a decoded header (its fields are text or absent)."""
    if header.kind != "Event":
        return Reason.NOT_AUDIT_EVENT
    if header.apiVersion not in AUDIT_API_VERSIONS:
        return Reason.UNSUPPORTED_API_VERSION
    if not header.auditID:  # UNSET is false too
        return Reason.MISSING_AUDIT_ID
    if header.stage is UNSET:
        return Reason.MISSING_STAGE
    if header.level is UNSET:
        return Reason.MISSING_LEVEL
    return None


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
    return _field_type_problem(fields)


_POLICY_TEXT: Final = ("verb", "requestURI")
_USER_TEXT: Final = ("username",)
_REF_TEXT: Final = ("namespace", "name", "apiGroup", "resource", "subresource")


def _field_type_problem(fields: dict[Any, Any]) -> str | None:
    """WRONG_FIELD_TYPE when a field the policy reads holds something other than text."""
    if not _texts_or_null(fields, _POLICY_TEXT):
        return Reason.WRONG_FIELD_TYPE
    user = fields.get("user")
    if user is not None:
        if type(user) is not dict or not _texts_or_null(user, _USER_TEXT):
            return Reason.WRONG_FIELD_TYPE
        groups = user.get("groups")
        if groups is not None and (
            type(groups) is not list or any(type(group) is not str for group in groups)
        ):
            return Reason.WRONG_FIELD_TYPE
    ref = fields.get("objectRef")
    if ref is not None and (type(ref) is not dict or not _texts_or_null(ref, _REF_TEXT)):
        return Reason.WRONG_FIELD_TYPE
    return None


def _texts_or_null(mapping: dict[Any, Any], keys: tuple[str, ...]) -> bool:
    return all(type(value) is str or value is None for value in map(mapping.get, keys))


def decode_line(line: bytes) -> AuditEvent | str:
    """The audit event of one JSON line as kube-apiserver writes it, or the Reason it is set
    aside for: what a record's ``log`` line goes through, for lines read from a file
    (``auditrelay replay``) without first packing them into a chunk."""
    return _event_from_json(line)


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


def _log_line(record: dict[Any, Any]) -> bytes | None:
    """The `log` line of a record that carried one, as bytes, for its dead letter."""
    log = record.get("log")
    if "kind" not in record and type(log) is str:
        try:
            return log.encode()
        except UnicodeEncodeError:
            return None  # non-UTF-8 bytes in the line: keep the event's msgpack bytes instead
    return None
