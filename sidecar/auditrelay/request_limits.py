"""Which bytes the Logs Ingestion API's 1 MiB limit of a call counts, as one pipeline learns it.

Azure documents the limit for "both compressed and uncompressed data"; the 413 observed counts
the bytes on the wire, and Microsoft's SDK keeps every request under 1 MiB uncompressed, so it
never finds out. ``RequestLimits`` learns it at the cost of at most one refused request: until a
body over 1 MiB uncompressed has been answered, such bodies go one at a time (``probe``); a 204
for one settles the wire reading; a 413 for one under the wire limit settles the uncompressed
reading, and the pipeline's uncompressed bound drops to 1 MiB for the rest of its life.
``deliver.Deliverer`` consults it before and after every request.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Final

WIRE_LIMIT: Final = 1_048_576  # the service's limit on the bytes of one call, as sent
UNCOMPRESSED_LIMIT: Final = 1_048_576  # the same limit, where it counts uncompressed bytes


class SizeReading(enum.Enum):
    """Which bytes the endpoint's 1 MiB limit counts, as far as the pipeline knows."""

    UNKNOWN = "unknown"  # no body over 1 MiB uncompressed answered yet
    WIRE = "wire"  # such a body was accepted: the limit counts the bytes sent
    UNCOMPRESSED = "uncompressed"  # such a body, under the wire limit, was refused with 413


@dataclass(frozen=True, slots=True)
class RawLimitEvidence:
    """The refused request that showed the endpoint counts uncompressed bytes."""

    wire_bytes: int
    raw_bytes: int
    status: str
    message: str
    raw_limit: int  # the uncompressed bound from now on


class RequestLimits:
    """One pipeline's bound on a body's uncompressed size and what it knows of the endpoint.

    ``raw_bytes`` starts at the pipeline's ``max_request_raw_bytes``. While the reading is
    unknown, bodies over ``UNCOMPRESSED_LIMIT`` are sent one at a time (``probe``), so that the
    endpoint's answer to the first settles the question before a second can be refused.
    """

    def __init__(self, raw_bytes: int, *, wire_bytes: int = WIRE_LIMIT) -> None:
        self.raw_bytes = raw_bytes
        self.wire_bytes = wire_bytes
        self.reading = SizeReading.UNKNOWN
        self._probe = asyncio.Lock()

    def too_large(self, raw_bytes: int) -> bool:
        """Whether a body of ``raw_bytes`` must be packed again before it is sent."""
        return raw_bytes > self.raw_bytes

    def needs_probe(self, raw_bytes: int) -> bool:
        """Whether a body of ``raw_bytes`` would test the unknown reading."""
        return self.reading is SizeReading.UNKNOWN and raw_bytes > UNCOMPRESSED_LIMIT

    @property
    def probe(self) -> asyncio.Lock:
        """Held while a body that tests the reading is in flight."""
        return self._probe

    def accepted(self, raw_bytes: int) -> None:
        """A body of ``raw_bytes`` uncompressed was delivered."""
        if raw_bytes > UNCOMPRESSED_LIMIT and self.reading is SizeReading.UNKNOWN:
            self.reading = SizeReading.WIRE

    def refused(
        self, wire_bytes: int, raw_bytes: int, status: str, message: str
    ) -> RawLimitEvidence | None:
        """A 413 for this body: the evidence when it shows, for the first time, that the
        endpoint counts uncompressed bytes (the bound is then lowered); None otherwise."""
        if (
            self.reading is SizeReading.UNCOMPRESSED
            or wire_bytes > self.wire_bytes
            or raw_bytes <= UNCOMPRESSED_LIMIT
        ):
            return None
        self.reading = SizeReading.UNCOMPRESSED
        self.raw_bytes = min(self.raw_bytes, UNCOMPRESSED_LIMIT)
        return RawLimitEvidence(wire_bytes, raw_bytes, status, message, self.raw_bytes)
