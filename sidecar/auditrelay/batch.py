"""Request bodies: rows joined into a JSON array and gzip-compressed under the per-call limit.

Rows arrive already serialized (``stream``); here they are only concatenated, ``[`` row ``,``
row ... ``]``, never parsed or serialized again. The Logs Ingestion API refuses a call whose body
on the wire exceeds 1,048,576 bytes (413), so a body is compressed first and checked after: the
builder aims at an uncompressed size from the compression ratio it has seen so far, and a body
that still comes out too large is split in two and compressed again. A body is also bounded by
its uncompressed size, ``max_raw_bytes``: the pipeline's ``max_request_raw_bytes``, lowered to
1 MiB when the service turns out to count uncompressed bytes (``request_limits.RequestLimits``).

``compression_level`` picks the codec. 1-3 use ISA-L (``isal``, gzip-compatible) at its levels
1-3: on the real audit samples about 0.5 million rows/s of CPU at a ratio of ~12. 4-9 use zlib
at that level, for links where bytes matter more than CPU: level 6 reaches a ratio of ~19 at
about 50,000 rows/s. (ISA-L's own top level stays near a ratio of 13, so it is not offered for
4-9.) Ingestion is billed on the data as stored, not on the bytes sent, so the default is 1.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

isal_zlib: Any
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps the sidecar running
    isal_zlib = None

MAX_BODY_BYTES: Final = 1_048_576  # the service's limit on the bytes of one call
MAX_RAW_BYTES: Final = 32 << 20  # the most uncompressed bytes one body may carry (memory bound)
_GZIP_WBITS: Final = 31  # deflate with a gzip header and trailer
_INITIAL_RATIO: Final = 4.0  # assumed before the first body; audit rows compress 8-15x
_HEADROOM: Final = 0.85  # aim below the limit so that ratio swings rarely force a split

Codec = Literal["isal", "zlib"]


ISAL_LEVELS: Final = range(1, 4)  # compression levels served by ISA-L; the others by zlib


def codec_for(compression_level: int) -> Codec:
    """The codec a 1-9 compression level uses."""
    return "isal" if compression_level in ISAL_LEVELS and isal_zlib is not None else "zlib"


def raw_size(rows: Sequence[bytes]) -> int:
    """The uncompressed bytes of the JSON array of ``rows``."""
    return sum(map(len, rows)) + len(rows) + 1


@dataclass(frozen=True, slots=True)
class Body:
    """One request body and the rows it carries, in spool order."""

    rows: Sequence[bytes]
    data: bytes
    raw_bytes: int


class BatchBuilder:
    """Packs rows into gzip bodies under ``max_body_bytes``."""

    def __init__(
        self,
        compression_level: int = 1,
        *,
        codec: Codec | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_raw_bytes: int = MAX_RAW_BYTES,
    ) -> None:
        if not 1 <= compression_level <= 9:
            raise ValueError(f"compression_level must be 1 to 9, got {compression_level}")
        self.codec: Codec = codec or codec_for(compression_level)
        self._module: Any = isal_zlib if self.codec == "isal" else zlib
        # ISA-L knows levels 0-3; a higher level given with codec="isal" means its best.
        self._level = min(3, compression_level) if self.codec == "isal" else compression_level
        self.max_body_bytes = max_body_bytes
        self.max_raw_bytes = max_raw_bytes
        self._ratio = _INITIAL_RATIO

    @property
    def target_raw_bytes(self) -> int:
        """How many uncompressed row bytes to gather for one body."""
        return max(1, min(self.max_raw_bytes, int(self.max_body_bytes * _HEADROOM * self._ratio)))

    def compress(self, rows: Sequence[bytes]) -> bytes:
        """The gzip of the JSON array of ``rows``."""
        compressor = self._module.compressobj(self._level, zlib.DEFLATED, _GZIP_WBITS)
        parts = [compressor.compress(b"["), compressor.compress(b",".join(rows))]
        parts.append(compressor.compress(b"]"))
        parts.append(compressor.flush())
        return b"".join(parts)

    def pack(self, rows: Sequence[bytes]) -> list[Body]:
        """Bodies for ``rows`` in order, each under the limits (a single row is sent as it is)."""
        bodies: list[Body] = []
        start = 0
        size = 1  # the body's uncompressed bytes: "[", then each row and its "," or "]"
        target = self.target_raw_bytes
        for index, row in enumerate(rows):
            if index > start and size + len(row) + 1 > target:
                bodies += self._compress_fitting(rows[start:index])
                start, size, target = index, 1, self.target_raw_bytes
            size += len(row) + 1
        if start < len(rows):
            bodies += self._compress_fitting(rows[start:])
        return bodies

    def _compress_fitting(self, rows: Sequence[bytes]) -> list[Body]:
        raw_bytes = raw_size(rows)
        data = self.compress(rows)
        self._learn(raw_bytes, len(data))
        if (len(data) <= self.max_body_bytes and raw_bytes <= self.max_raw_bytes) or len(rows) == 1:
            return [Body(rows=rows, data=data, raw_bytes=raw_bytes)]
        middle = len(rows) // 2
        return self._compress_fitting(rows[:middle]) + self._compress_fitting(rows[middle:])

    def split(self, rows: Sequence[bytes]) -> list[Body]:
        """Bodies for the two halves of ``rows`` (after a 413, or to isolate a refused row);
        rows over ``max_raw_bytes`` (packed before it was lowered) are packed again instead,
        into as few bodies as the bound allows."""
        if raw_size(rows) > self.max_raw_bytes:
            return self.pack(rows)
        middle = len(rows) // 2
        return self._compress_fitting(rows[:middle]) + self._compress_fitting(rows[middle:])

    def _learn(self, raw_bytes: int, compressed_bytes: int) -> None:
        if raw_bytes < 64 << 10:
            return  # small bodies compress worse and would pull the estimate down
        observed = raw_bytes / max(1, compressed_bytes)
        self._ratio = 0.7 * self._ratio + 0.3 * observed
