"""Types the stages of the data path hand to each other.

receive -> decode -> filter -> (shape rows) -> spool -> batch -> deliver. Stages never import
each other; they meet here, and ``app`` wires them together.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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


@dataclass(slots=True)
class AuditEvent:
    """One audit.k8s.io Event as decoded from a Fluent Bit record.

    ``fields`` is the parsed event. ``raw`` is the exact JSON text the API server wrote when
    the record carried it as a ``log`` line, and stays set only while ``fields`` is unchanged,
    so that an event the filter keeps as it is can be shipped without serializing it again.
    """

    fields: dict[str, Any]
    raw: bytes | None = None


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

    def commit(self) -> None:
        """Blocks until every row added is durable; raises SpoolFullError when over the limit.
        Safe to call from a worker thread."""


@runtime_checkable
class RowSink(Protocol):
    """An ``EventSink`` that also takes a chunk's events one at a time on a worker thread, so
    that decode, filter, row encoding and the durable append of a chunk are one hand-off."""

    async def append(self, events: Sequence[AuditEvent]) -> None:
        """As ``EventSink.append``."""

    def rows(self) -> RowWriter:
        """A writer for the rows of one chunk."""


class DeadLetterSink(Protocol):
    """Where records that are not audit events are set aside."""

    def put(self, letters: Sequence[DeadLetter]) -> None:
        """Stores the letters with their reasons."""
