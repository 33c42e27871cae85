"""Types the stages of the data path hand to each other.

receive -> decode -> filter -> (shape rows) -> spool -> batch -> deliver. Stages never import
each other; they meet here, and ``app`` wires them together.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

import msgspec
import orjson
from msgspec import UNSET, UnsetType


class PushStatus(enum.Enum):
    """The answer to one Fluent Bit flush; the plugin maps it to FLB_OK / FLB_RETRY / FLB_ERROR."""

    ACCEPTED = "accepted"
    RETRY_LATER = "retry_later"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class PushResult:
    """What became of one chunk."""

    status: PushStatus
    events_received: int = 0
    events_accepted: int = 0
    events_filtered: int = 0
    events_invalid: int = 0
    message: str = ""


class UserInfo(msgspec.Struct, forbid_unknown_fields=True):
    """``user`` / ``impersonatedUser`` of an event (authentication.k8s.io UserInfo)."""

    username: str | UnsetType = UNSET
    uid: str | UnsetType = UNSET
    groups: list[str] | UnsetType = UNSET
    extra: msgspec.Raw | UnsetType = UNSET


class ObjectReference(msgspec.Struct, forbid_unknown_fields=True):
    """``objectRef`` of an event."""

    resource: str | UnsetType = UNSET
    namespace: str | UnsetType = UNSET
    name: str | UnsetType = UNSET
    uid: str | UnsetType = UNSET
    apiGroup: str | UnsetType = UNSET  # noqa: N815 - the event's own field names
    apiVersion: str | UnsetType = UNSET  # noqa: N815
    resourceVersion: str | UnsetType = UNSET  # noqa: N815
    subresource: str | UnsetType = UNSET


class EventHeader(msgspec.Struct):
    """What the policy and the row encoder read of an event: its header fields, typed.

    A field the event does not have is ``UNSET``. Every event has a header; ``JsonEvent`` is the
    header of an event decoded from its JSON text, which also holds every other field.
    """

    kind: str | UnsetType = UNSET
    apiVersion: str | UnsetType = UNSET  # noqa: N815 - the event's own field names
    level: str | UnsetType = UNSET
    auditID: str | UnsetType = UNSET  # noqa: N815
    stage: str | UnsetType = UNSET
    requestURI: str | UnsetType = UNSET  # noqa: N815
    verb: str | UnsetType = UNSET
    user: UserInfo | UnsetType = UNSET
    objectRef: ObjectReference | UnsetType = UNSET  # noqa: N815
    requestReceivedTimestamp: str | UnsetType = UNSET  # noqa: N815
    stageTimestamp: str | UnsetType = UNSET  # noqa: N815
    timestamp: str | UnsetType = UNSET


class JsonEvent(EventHeader, forbid_unknown_fields=True):
    """A whole audit event decoded from its JSON text without parsing its bodies.

    It declares every top-level field that is a column of the stream (``stream.COLUMNS``): the
    header typed, the rest as ``msgspec.Raw``, the event's own JSON text of that value. So a
    ``JsonEvent`` exists only for an event whose every top-level field is a column of the right
    type (an unknown field, or a ``null`` or a number where text belongs, fails the decode and the
    event takes the careful way: a whole parse). ``msgspec.json.encode`` of it is the event again,
    bodies byte for byte, which is how a lowered event is rebuilt without parsing its bodies.
    Duplicate keys: the last one wins, as in kube-apiserver's JSON decoding and in orjson.
    """

    impersonatedUser: UserInfo | UnsetType = UNSET  # noqa: N815
    sourceIPs: msgspec.Raw | UnsetType = UNSET  # noqa: N815
    userAgent: str | UnsetType = UNSET  # noqa: N815
    responseStatus: msgspec.Raw | UnsetType = UNSET  # noqa: N815
    requestObject: msgspec.Raw | UnsetType = UNSET  # noqa: N815
    responseObject: msgspec.Raw | UnsetType = UNSET  # noqa: N815
    annotations: msgspec.Raw | UnsetType = UNSET
    metadata: msgspec.Raw | UnsetType = UNSET


JSON_EVENT_DECODER: Final = msgspec.json.Decoder(JsonEvent)


class AuditEvent:
    """One audit.k8s.io Event on its way through the stages: the contract between them.

    - ``header``: the fields the policy and the row encoder read, typed (``EventHeader``). When
      it is a ``JsonEvent`` the event came from JSON text, every top-level field is a column of
      the right type, and ``raw`` is exactly ``msgspec.json.encode(header)`` in meaning.
    - ``raw``: the event's JSON text, or None. For an event the filter keeps whole it is the API
      server's own bytes (the ``log`` line); for an event the filter lowered, its JSON rebuilt
      from the header and the raw fields it keeps. Rows are made from it by splicing.
    - ``fields``: the whole event as Python objects, parsed only when asked for (from ``raw``)
      or given (a record Fluent Bit's json parser already parsed, or an event built in code).

    Built from ``fields`` (and optionally its ``raw`` text), the header is read from the fields
    leniently: text where text is expected, else as if absent (``header_from_fields``).
    """

    __slots__ = ("_fields", "header", "raw")

    def __init__(
        self,
        fields: dict[str, Any] | None = None,
        raw: bytes | None = None,
        *,
        header: EventHeader | None = None,
    ) -> None:
        if header is None:
            if fields is None:
                raise ValueError("an AuditEvent needs its fields or its header")
            header = header_from_fields(fields)
        elif fields is None and raw is None:
            raise ValueError("an AuditEvent needs its fields or its JSON text")
        self.header = header
        self.raw = raw
        self._fields = fields

    @property
    def fields(self) -> dict[str, Any]:
        """The whole event, parsed from ``raw`` on first use."""
        fields = self._fields
        if fields is None:
            assert self.raw is not None  # the constructor guarantees one of them
            fields = self._fields = orjson.loads(self.raw)
        return fields

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuditEvent):
            return NotImplemented
        return self.fields == other.fields and self.raw == other.raw

    def __hash__(self) -> int:
        raise TypeError("an AuditEvent is mutable and compared by value: not hashable")

    def __repr__(self) -> str:
        return f"AuditEvent(auditID={self.header.auditID!r}, raw={self.raw is not None})"


def _text(value: Any) -> str | UnsetType:
    return value if type(value) is str else UNSET


def _user(value: Any) -> UserInfo | UnsetType:
    if type(value) is not dict:
        return UNSET
    groups = value.get("groups")
    return UserInfo(
        username=_text(value.get("username")),
        groups=[group for group in groups if type(group) is str] if type(groups) is list else UNSET,
    )


def _object_reference(value: Any) -> ObjectReference | UnsetType:
    if type(value) is not dict:
        return UNSET
    get = value.get
    return ObjectReference(
        resource=_text(get("resource")),
        namespace=_text(get("namespace")),
        name=_text(get("name")),
        apiGroup=_text(get("apiGroup")),
        apiVersion=_text(get("apiVersion")),
        subresource=_text(get("subresource")),
    )


def header_from_fields(fields: dict[str, Any]) -> EventHeader:
    """The header of an event given as Python objects; a value of the wrong type reads as absent
    (the decoder sets events with such values aside before they get here)."""
    get = fields.get
    return EventHeader(
        kind=_text(get("kind")),
        apiVersion=_text(get("apiVersion")),
        level=_text(get("level")),
        auditID=_text(get("auditID")),
        stage=_text(get("stage")),
        requestURI=_text(get("requestURI")),
        verb=_text(get("verb")),
        user=_user(get("user")),
        objectRef=_object_reference(get("objectRef")),
        requestReceivedTimestamp=_text(get("requestReceivedTimestamp")),
        stageTimestamp=_text(get("stageTimestamp")),
        timestamp=_text(get("timestamp")),
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that is not an audit event, kept aside with the reason."""

    reason: str
    payload: bytes
    tag: str = ""


@dataclass(slots=True)
class DecodedChunk:
    """The audit events of one chunk, and what was set aside from it."""

    events: list[AuditEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    records_seen: int = 0


class EventFilter(Protocol):
    """The audit-policy filter as ``app`` uses it."""

    def apply(self, event: AuditEvent) -> AuditEvent | None:
        """Returns the event lowered to what the policy keeps, or None to drop it."""


class EventSink(Protocol):
    """Where accepted events go: the durable spool of a pipeline."""

    async def append(self, events: Sequence[AuditEvent]) -> None:
        """Returns once every event is durable; raises SpoolFullError when over the limit."""


class RowWriter(Protocol):
    """The rows of one chunk on their way into a ``RowSink``; used by one thread at a time."""

    def add(self, event: AuditEvent) -> None:
        """Encodes the event to its row at once (so its fields can be freed); an event that
        cannot be encoded is set aside as a dead letter at ``commit``."""

    def already_stored(self) -> bool:
        """Whether the sink stored this chunk's rows already: Fluent Bit sent it again because
        the answer to an earlier Push was lost. Then nothing is added or committed."""

    def commit(self) -> None:
        """Blocks until every row added is durable; raises SpoolFullError when over the limit.
        Safe to call from a worker thread."""


@runtime_checkable
class RowSink(Protocol):
    """An ``EventSink`` that also takes a chunk's events one at a time on a worker thread, so
    that decode, filter, row encoding and the durable append of a chunk are one hand-off."""

    async def append(self, events: Sequence[AuditEvent]) -> None:
        """As ``EventSink.append``."""

    def rows(self, tag: str = "", chunk: bytes | None = None) -> RowWriter:
        """A writer for the rows of one chunk (given, so that it is stored only once)."""


class DeadLetterSink(Protocol):
    """Where records that are not audit events are set aside."""

    def put(self, letters: Sequence[DeadLetter]) -> None:
        """Stores the letters with their reasons."""
