"""The DCR stream: the one definition of a row and its encoder.

The Logs Ingestion API answers 204 even for rows that do not match the stream's declared
columns, and then drops them silently. So the row shape lives here and nowhere else: the
encoder writes rows of exactly these columns, ``row_problems`` checks a row against them, and
``make generate`` (tools/dcr_template.py) declares the same columns in the table and the data
collection rule of deploy/azure/auditrelay.json.

One audit event becomes one row: ``TimeGenerated``, the event's top-level fields as columns,
``Cluster_Name`` and ``Cluster_Id``. A top-level field that is not a column, or whose value does
not fit its column's type, goes into ``AdditionalFields`` under its own name, so nothing the API
server wrote is silently dropped by the service.

Size rules (the service truncates field values above 64 KB on its own, which would cut a
``dynamic`` value into invalid JSON, and refuses any call above 1 MB):

- a ``string`` value longer than ``MAX_FIELD_BYTES`` (UTF-8) is cut at a character boundary and
  ends with ``TRUNCATION_SUFFIX`` plus the original size;
- a ``dynamic`` value whose JSON is longer than ``MAX_FIELD_BYTES`` is replaced by the marker
  object ``{"auditrelayTruncated": true, "originalBytes": N, "head": "<first HEAD_BYTES of its
  JSON text>"}``;
- a row still longer than ``MAX_ROW_BYTES`` after that has its largest fields replaced the same
  way (dynamic: marker with an empty head; string: cut to ``HEAD_BYTES``) until it fits.

A row is serialized exactly once. When the event has its JSON text (``AuditEvent.raw``: the API
server's own bytes, or a lowered event's rebuilt text) and every field fits, the extra columns
are spliced into that text instead of serializing the event again; for an event decoded as a
``model.JsonEvent`` that needs no look at its fields at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from msgspec import UNSET

from auditrelay.model import AuditEvent, EventHeader, JsonEvent

TABLE_NAME: Final = "KubeAudit_CL"
STREAM_NAME: Final = f"Custom-{TABLE_NAME}"

MAX_FIELD_BYTES: Final = 64_000  # the service keeps 64 KB per field; stay under either reading
MAX_ROW_BYTES: Final = 1_000_000  # one row must fit in one 1 MB call, compressed or not
HEAD_BYTES: Final = 4_096  # what a truncation marker keeps of the original value
TRUNCATION_SUFFIX: Final = "...[truncated by auditrelay, original bytes: "


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the stream and the table, with its DCR type."""

    name: str
    type: str  # DCR column type: string, int, long, real, boolean, datetime, dynamic
    description: str


COLUMNS: Final[tuple[Column, ...]] = (
    Column("TimeGenerated", "datetime",
           "stageTimestamp of the event, else requestReceivedTimestamp, else timestamp, "
           "else the time the sidecar encoded it"),
    Column("Cluster_Name", "string", "The cluster_name property of the pipeline"),
    Column("Cluster_Id", "string", "The cluster_id property of the pipeline (e.g. the Arc resource id)"),
    Column("kind", "string", "Always Event"),
    Column("apiVersion", "string", "audit.k8s.io/v1 or audit.k8s.io/v1beta1"),
    Column("level", "string", "Audit level: Metadata, Request or RequestResponse"),
    Column("auditID", "string", "Unique id of the request, shared by all its stages"),
    Column("stage", "string", "RequestReceived, ResponseStarted, ResponseComplete or Panic"),
    Column("requestURI", "string", "The request URI as sent by the client"),
    Column("verb", "string", "Kubernetes verb: get, list, watch, create, update, patch, delete, ..."),
    Column("user", "dynamic", "Authenticated user: username, uid, groups, extra"),
    Column("impersonatedUser", "dynamic", "Impersonated user, when the request impersonated one"),
    Column("sourceIPs", "dynamic", "Source IPs of the request, from the client to the API server"),
    Column("userAgent", "string", "User agent reported by the client"),
    Column("objectRef", "dynamic", "The object the request targets"),
    Column("responseStatus", "dynamic", "The response status (code, reason, message)"),
    Column("requestObject", "dynamic", "Request body (Request and RequestResponse levels)"),
    Column("responseObject", "dynamic", "Response body (RequestResponse level)"),
    Column("requestReceivedTimestamp", "datetime", "When the request reached the API server"),
    Column("stageTimestamp", "datetime", "When the request reached this stage"),
    Column("annotations", "dynamic", "Annotations such as the authorization decision and reason"),
    Column("timestamp", "datetime", "Event time in audit.k8s.io/v1beta1 events"),
    Column("metadata", "dynamic", "Object metadata in audit.k8s.io/v1beta1 events"),
    Column("AdditionalFields", "dynamic",
           "Top-level event fields that are not columns, or whose value does not fit the column"),
)  # fmt: skip

COLUMN_TYPES: Final[Mapping[str, str]] = {column.name: column.type for column in COLUMNS}
_ADDED_COLUMNS: Final = frozenset(
    {"TimeGenerated", "Cluster_Name", "Cluster_Id", "AdditionalFields"}
)
_EVENT_COLUMNS: Final[Mapping[str, str]] = {
    name: kind for name, kind in COLUMN_TYPES.items() if name not in _ADDED_COLUMNS
}
_EVENT_KEYS: Final = frozenset(_EVENT_COLUMNS)
# Python types a decoded JSON value may have for each DCR type (bool is not an int here).
_FITS: Final[Mapping[str, tuple[type, ...]]] = {
    "string": (str,),
    "datetime": (str,),
    "dynamic": (dict, list, str, int, float, bool, type(None)),
    "int": (int,),
    "long": (int,),
    "real": (int, float),
    "boolean": (bool,),
}
_EVENT_FITS: Final[Mapping[str, tuple[type, ...]]] = {
    name: _FITS[kind] for name, kind in _EVENT_COLUMNS.items()
}
_TIME_FIELDS: Final = ("stageTimestamp", "requestReceivedTimestamp", "timestamp")


_TEXT_COLUMNS: Final = tuple(
    name for name, kind in _EVENT_COLUMNS.items() if kind in ("string", "datetime")
)


def _fits_columns(fields: Mapping[str, Any]) -> bool:
    """Every key is an event column and every value fits its column's type (only string and
    datetime columns constrain the value, dynamic ones take anything); an empty object needs
    no comma before the spliced columns, so it does not fit."""
    if not fields or not fields.keys() <= _EVENT_KEYS:
        return False
    get = fields.get
    for name in _TEXT_COLUMNS:  # noqa: SIM110 - a third faster than all() over a generator
        if type(get(name, "")) is not str:
            return False
    return True


def _time_generated(fields: Mapping[str, Any]) -> str:
    for name in _TIME_FIELDS:
        value = fields.get(name)
        if type(value) is str and value:
            return value
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _header_time(header: EventHeader) -> str:
    for value in (header.stageTimestamp, header.requestReceivedTimestamp, header.timestamp):
        if value is not UNSET and value:
            return value
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def dumps(value: Any) -> bytes:
    """Compact JSON, the way rows are written (orjson; the stdlib for what orjson refuses)."""
    try:
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits and other rarities: correct first, fast second.
        text = json.dumps(
            value, default=_json_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
        return text.encode("utf-8", "replace")


def _truncated_string(value: str, limit: int) -> str:
    encoded = value.encode("utf-8", "replace")
    suffix = f"{TRUNCATION_SUFFIX}{len(encoded)}]"
    keep = max(0, limit - len(suffix.encode()))
    return encoded[:keep].decode("utf-8", "ignore") + suffix


def _truncation_marker(serialized: bytes, head_bytes: int) -> dict[str, Any]:
    return {
        "auditrelayTruncated": True,
        "originalBytes": len(serialized),
        "head": serialized[:head_bytes].decode("utf-8", "ignore"),
    }


@dataclass(slots=True)
class EncodeStats:
    """What the encoder did beyond the plain path; the sink turns it into metrics."""

    spliced: int = 0
    reserialized: int = 0
    fields_truncated: int = 0


class RowEncoder:
    """Turns audit events into row JSON bytes for one pipeline (one cluster identity)."""

    def __init__(self, cluster_name: str, cluster_id: str) -> None:
        self._cluster = {"Cluster_Name": cluster_name, "Cluster_Id": cluster_id}
        # The tail every spliced row ends with, serialized once per pipeline.
        self._suffix = (
            b',"Cluster_Name":' + dumps(cluster_name) + b',"Cluster_Id":' + dumps(cluster_id) + b"}"
        )
        self.stats = EncodeStats()

    def encode(self, event: AuditEvent) -> bytes:
        """One row: the event's JSON text with the extra columns spliced in when possible."""
        raw = event.raw
        header = event.header
        if (
            raw is not None
            and len(raw) <= MAX_FIELD_BYTES
            and raw[-1:] == b"}"
            and (type(header) is JsonEvent or _fits_columns(event.fields))
        ):
            # A JsonEvent has only column fields of the right types (its decode checked them).
            self.stats.spliced += 1
            return b"".join(
                (
                    memoryview(raw)[:-1],
                    b',"TimeGenerated":',
                    dumps(_header_time(header)),
                    self._suffix,
                )
            )
        self.stats.reserialized += 1
        return self.reserialize(event.fields)

    def reserialize(self, fields: Mapping[str, Any]) -> bytes:
        """One row built from the decoded fields, with the size rules applied."""
        row: dict[str, Any] = {"TimeGenerated": _time_generated(fields)}
        extra: dict[str, Any] = {}
        for key, value in fields.items():
            fits = _EVENT_FITS.get(key)
            if fits is not None and type(value) in fits:
                row[key] = value
            else:
                extra[key] = value
        row.update(self._cluster)
        if extra:
            row["AdditionalFields"] = extra
        encoded = dumps(row)
        if len(encoded) <= MAX_FIELD_BYTES:
            return encoded
        return self._fit(row)

    def _fit(self, row: dict[str, Any]) -> bytes:
        sizes: dict[str, int] = {}
        for key, value in row.items():
            if COLUMN_TYPES[key] == "dynamic":
                serialized = dumps(value)
                if len(serialized) > MAX_FIELD_BYTES:
                    row[key] = _truncation_marker(serialized, HEAD_BYTES)
                    self.stats.fields_truncated += 1
                    serialized = dumps(row[key])
                sizes[key] = len(serialized)
            elif isinstance(value, str):
                size = len(value.encode("utf-8", "replace"))
                if size > MAX_FIELD_BYTES:
                    row[key] = _truncated_string(value, MAX_FIELD_BYTES)
                    self.stats.fields_truncated += 1
                    size = MAX_FIELD_BYTES
                sizes[key] = size
        encoded = dumps(row)
        for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if len(encoded) <= MAX_ROW_BYTES:
                break
            value = row[key]
            if COLUMN_TYPES[key] == "dynamic":
                row[key] = _truncation_marker(dumps(value), 0)
            else:
                row[key] = _truncated_string(value, HEAD_BYTES)
            self.stats.fields_truncated += 1
            encoded = dumps(row)
        return encoded


# --- checking rows against the declaration ------------------------------------------------------


def _is_datetime(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def row_problems(row: bytes) -> list[str]:
    """Why a row would not land in the declared columns; empty when it matches exactly."""
    try:
        parsed = orjson.loads(row)
    except orjson.JSONDecodeError as error:
        return [f"not JSON: {error}"]
    if not isinstance(parsed, dict):
        return [f"not a JSON object but {type(parsed).__name__}"]
    problems: list[str] = []
    if "TimeGenerated" not in parsed:
        problems.append("TimeGenerated is missing")
    for key, value in parsed.items():
        kind = COLUMN_TYPES.get(key)
        if kind is None:
            problems.append(f"{key}: not a declared column")
        elif kind == "datetime" and not _is_datetime(value):
            problems.append(f"{key}: expected an ISO 8601 datetime, got {value!r:.80}")
        elif type(value) not in _FITS[kind]:
            problems.append(f"{key}: expected {kind}, got {type(value).__name__}")
        elif kind in ("string", "dynamic") and len(dumps(value)) > MAX_FIELD_BYTES + 2:
            problems.append(f"{key}: longer than {MAX_FIELD_BYTES} bytes")
    if len(row) > MAX_ROW_BYTES:
        problems.append(f"row: {len(row)} bytes, more than {MAX_ROW_BYTES}")
    return problems
