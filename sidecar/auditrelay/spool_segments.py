"""The spool's segment files: framed rows, and how they are named, read and counted.

A segment is an append-only file ``<number:016d>.seg`` of frames
``<u32 length><u32 crc32(payload)><payload>`` (little endian); the payload is one row. A torn
tail (a crash mid-write) or a damaged frame is found by the reader when it gets there and
reported as damage; the spool skips it.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from auditrelay.errors import SpoolError, SpoolFullError

FRAME: Final = struct.Struct("<II")
SEGMENT_SUFFIX: Final = ".seg"
READ_BLOCK: Final = 1 << 20
MAX_FRAME_PAYLOAD: Final = 64 << 20  # a length above this is damage, not a row
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


class Position(NamedTuple):
    """A place in the spool: a segment number and a byte offset in it. Ordered."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class CorruptRegion:
    """A damaged stretch of a segment that the reader skipped."""

    path: Path
    offset: int
    skipped_bytes: int
    reason: str


@dataclass(frozen=True, slots=True)
class FramesRead:
    """What one pass over a segment found: the offset reached, the bytes added (each row
    with its overhead), whether a row did not fit, or the damage that stopped it."""

    offset: int
    added: int
    full: bool = False
    damage: str = ""


def segment_name(number: int) -> str:
    """The file name of segment ``number``."""
    return f"{number:016d}{SEGMENT_SUFFIX}"


def segment_sizes(directory: Path) -> dict[int, int]:
    """Segment number -> bytes on disk, of every segment file in ``directory``."""
    sizes: dict[int, int] = {}
    for path in directory.glob("*" + SEGMENT_SUFFIX):
        if path.stem.isdigit():
            try:
                sizes[int(path.stem)] = path.stat().st_size
            except FileNotFoundError:  # delivered and deleted while we looked
                continue
    return sizes


def frame(rows: Sequence[bytes]) -> bytes:
    """The bytes one append writes: every row framed with its length and CRC32."""
    pack = FRAME.pack
    crc = zlib.crc32
    parts: list[bytes] = []
    for row in rows:
        parts.append(pack(len(row), crc(row)))
        parts.append(row)
    return b"".join(parts)


def count_frames(path: Path, start: int, end: int) -> int:
    """Whole frames from ``start``, by their lengths alone (a torn tail ends the count)."""
    count = 0
    try:
        with open(path, "rb") as segment:
            segment.seek(start)
            offset = start
            while offset + FRAME.size <= end:
                length, _ = FRAME.unpack(segment.read(FRAME.size))
                if length > MAX_FRAME_PAYLOAD or offset + FRAME.size + length > end:
                    break
                segment.seek(length, os.SEEK_CUR)
                offset += FRAME.size + length
                count += 1
    except (OSError, struct.error):
        pass  # gone or torn while we looked: what was counted stands
    return count


def read_frames(
    fd: int, offset: int, end: int, rows: list[bytes], budget: int, row_overhead: int
) -> FramesRead:
    """Frames of an open segment from ``offset`` up to ``end`` into ``rows``, within
    ``budget`` bytes (at least one row when ``rows`` is empty, however large)."""
    added = 0
    block = b""
    base = offset  # block holds the file's bytes from base on
    while added < budget and offset < end:
        at = offset - base
        if len(block) - at < FRAME.size:
            block = os.pread(fd, min(READ_BLOCK, end - offset), offset)
            base, at = offset, 0
            if len(block) < FRAME.size:
                return FramesRead(offset, added, damage="torn frame header")
        length, checksum = FRAME.unpack_from(block, at)
        if length > MAX_FRAME_PAYLOAD or offset + FRAME.size + length > end:
            return FramesRead(offset, added, damage="torn frame")
        if rows and added + length + row_overhead > budget:
            return FramesRead(offset, added, full=True)
        at += FRAME.size
        if at + length <= len(block):
            payload = block[at : at + length]
        else:
            payload = os.pread(fd, length, offset + FRAME.size)
        if len(payload) != length or zlib.crc32(payload) != checksum:
            return FramesRead(offset, added, damage="checksum mismatch")
        rows.append(payload)
        added += length + row_overhead
        offset += FRAME.size + length
    return FramesRead(offset, added)


def storage_error(directory: Path, action: str, error: OSError) -> SpoolError:
    """The spool's error for a failed write: ``SpoolFullError`` for a full file system."""
    if error.errno in _DISK_FULL:
        return SpoolFullError(
            f"no space left on the file system of spool {directory} during {action} "
            f"({os.strerror(error.errno or 0)}); the failed rows were cut off again, "
            "nothing stored before is affected"
        )
    return SpoolError(f"spool {directory}: {action} failed: {error}")
