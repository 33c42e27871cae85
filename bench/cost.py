"""Ingestion cost: the bytes a corpus puts on the wire, with the audit policy and without.

Rows are packed into request bodies by the pipeline's own ``BatchBuilder`` the way the sink's
pump gathers them (up to the builder's target of uncompressed bytes, then compressed and split
under the 1 MB limit). Log Analytics bills the ingested (uncompressed) size; the compressed size
is what crosses the network.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Sequence

from auditrelay.batch import BatchBuilder


@dataclasses.dataclass
class WireBytes:
    """The bodies one set of rows becomes."""

    rows: int = 0
    requests: int = 0
    uncompressed: int = 0
    compressed: int = 0

    @property
    def ratio(self) -> float:
        return self.uncompressed / self.compressed if self.compressed else 0.0


def pipeline_bytes(rows: Sequence[bytes], compression_level: int = 1) -> WireBytes:
    """What the sidecar's batching sends for these rows."""
    builder = BatchBuilder(compression_level)
    result = WireBytes(rows=len(rows))
    start = size = 0
    for index, row in enumerate(rows):
        size += len(row) + 1
        if size >= builder.target_raw_bytes or index == len(rows) - 1:
            for body in builder.pack(rows[start : index + 1]):
                result.requests += 1
                result.uncompressed += body.raw_bytes
                result.compressed += len(body.data)
            start, size = index + 1, 0
    return result


def sdk_bytes(rows: Sequence[bytes]) -> WireBytes:
    """What azure-monitor-ingestion's ``upload()`` sends for the same rows (json.dumps,
    ≤ 1 MiB chunks, gzip level 6), computed the way its ``_helpers`` does."""
    result = WireBytes(rows=len(rows))
    chunk: list[object] = []
    size = 0

    def flush() -> None:
        body = json.dumps(chunk).encode()
        compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        result.requests += 1
        result.uncompressed += len(body)
        result.compressed += len(compressor.compress(body) + compressor.flush())

    for row in rows:
        record = json.loads(row)
        record_size = len(json.dumps(record).encode())
        if chunk and size + record_size > 1024 * 1024:
            flush()
            chunk, size = [], 0
        chunk.append(record)
        size += record_size
    if chunk:
        flush()
    return result
