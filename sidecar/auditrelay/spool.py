"""The durable spool of one pipeline: rows on disk until the workspace has confirmed them.

Layout of a spool directory::

    lock                        held (flock) by the one process using this spool
    cursor                      {"segment": N, "offset": M}: everything before it is delivered
    0000000000000001.seg ...    append-only segments of framed rows

A frame is ``<u32 length><u32 crc32(payload)><payload>`` (little endian); the payload is one row.
An ``append`` writes all frames of a call with one write and, with ``sync=True``, one fsync
before it returns, so a Push is acknowledged only once its rows would survive a power loss.
With ``sync=False`` the caller runs ``sync()`` on a timer and a power loss may lose what was
appended since the last one.

Each process writes to a new segment, so the segments of an earlier run are sealed: a torn
tail left by a crash (or a damaged record) is found by the reader when it gets there, reported
through ``on_corrupt`` and skipped up to the end of that segment; it is never fatal.

The reader streams frames from disk and the cursor moves only through ``acknowledge``, so a
restart sends again everything not confirmed (at-least-once) and memory does not grow with the
backlog. Segments behind the cursor are deleted. When the segments would exceed ``limit_bytes``,
``append`` raises ``SpoolFullError``; a full file system (ENOSPC) raises it too, after cutting
the segment back to where the failed append started.

The methods block on file I/O; ``sink`` calls them from a worker thread. They are thread-safe.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import structlog

from auditrelay.errors import SpoolError, SpoolFullError

log = structlog.get_logger(__name__)

FRAME: Final = struct.Struct("<II")
SEGMENT_SUFFIX: Final = ".seg"
CURSOR_FILE: Final = "cursor"
LOCK_FILE: Final = "lock"
MAX_SEGMENT_BYTES: Final = 64 << 20
MIN_SEGMENT_BYTES: Final = 64 << 10
READ_BLOCK: Final = 1 << 20
MAX_FRAME_PAYLOAD: Final = 64 << 20  # a length above this is damage, not a row
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_AGE_RESOLUTION: Final = 1.0  # seconds between two remembered append times
_MAX_AGES: Final = 4096  # remembered append times at most


class Position(NamedTuple):
    """A place in the spool: a segment number and a byte offset in it. Ordered."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class SpoolRead:
    """Rows read in order; ``end`` is the position to acknowledge once they are delivered."""

    rows: list[bytes]
    start: Position
    end: Position
    raw_bytes: int  # the rows' bytes, each with the read's row_overhead
    full: bool = False  # max_bytes is used up, or the next row would not have fit in it


@dataclass(frozen=True, slots=True)
class CorruptRegion:
    """A damaged stretch of a segment that the reader skipped."""

    path: Path
    offset: int
    skipped_bytes: int
    reason: str


def _segment_name(number: int) -> str:
    return f"{number:016d}{SEGMENT_SUFFIX}"


@dataclass(frozen=True, slots=True)
class SpoolSummary:
    """What a spool directory holds, read without opening (or locking) the spool."""

    used_bytes: int  # every segment file
    pending_bytes: int  # after the cursor, frames included
    pending_rows: int | None  # None when not counted


def summarize(directory: Path, *, count_rows: bool = False) -> SpoolSummary:
    """Reads a spool directory's segments and cursor without changing anything; safe while
    another process uses the spool (its figures are then a moment's snapshot)."""
    sizes: dict[int, int] = {}
    for path in directory.glob("*" + SEGMENT_SUFFIX):
        if path.stem.isdigit():
            try:
                sizes[int(path.stem)] = path.stat().st_size
            except FileNotFoundError:  # delivered and deleted while we looked
                continue
    cursor = _read_cursor(directory / CURSOR_FILE) or Position(min(sizes, default=1), 0)
    pending = [(n, size) for n, size in sorted(sizes.items()) if n >= cursor.segment]
    offset_in_first = cursor.offset if pending and pending[0][0] == cursor.segment else 0
    pending_bytes = max(0, sum(size for _, size in pending) - offset_in_first)
    rows = None
    if count_rows:
        rows = 0
        for number, size in pending:
            start = offset_in_first if number == cursor.segment else 0
            rows += _count_frames(directory / _segment_name(number), start, size)
    return SpoolSummary(sum(sizes.values()), pending_bytes, rows)


def in_use(directory: Path) -> bool:
    """Whether a process has the spool open (holds its lock); never creates anything."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock we may have taken
    return False


def _read_cursor(path: Path) -> Position | None:
    try:
        stored = json.loads(path.read_text(encoding="ascii"))
        return Position(int(stored["segment"]), int(stored["offset"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _count_frames(path: Path, start: int, end: int) -> int:
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


def frame(rows: Sequence[bytes]) -> bytes:
    """The bytes one append writes: every row framed with its length and CRC32."""
    pack = FRAME.pack
    crc = zlib.crc32
    parts: list[bytes] = []
    for row in rows:
        parts.append(pack(len(row), crc(row)))
        parts.append(row)
    return b"".join(parts)


class Spool:
    """Append-only, acknowledged, size-limited row storage of one pipeline."""

    def __init__(
        self,
        directory: Path,
        *,
        limit_bytes: int,
        sync: bool = True,
        segment_bytes: int | None = None,
        on_corrupt: Callable[[CorruptRegion], None] | None = None,
    ) -> None:
        self.directory = directory
        self.limit_bytes = limit_bytes
        self.sync_on_append = sync
        self.segment_bytes = segment_bytes or min(
            MAX_SEGMENT_BYTES, max(MIN_SEGMENT_BYTES, limit_bytes // 16)
        )
        self._on_corrupt = on_corrupt
        self._state_lock = threading.Lock()  # guards the fields below; never held during I/O
        self._write_lock = threading.Lock()  # one append (or rotation) at a time
        self._ack_lock = threading.Lock()  # one cursor update at a time
        self._read_lock = threading.Lock()  # one reader at a time
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        self._sizes: dict[int, int] = {}  # segment number -> bytes on disk (sealed and current)
        for path in sorted(directory.glob("*" + SEGMENT_SUFFIX)):
            if path.stem.isdigit():
                self._sizes[int(path.stem)] = path.stat().st_size
        cursor = self._load_cursor()
        self._report_missing_segments(cursor)
        self._ack = self._normalized_start(cursor)
        self._delete_before(self._ack.segment)
        self._read = self._ack
        self._ages: deque[tuple[Position, float]] = deque()
        for number in sorted(n for n in self._sizes if n >= self._ack.segment):
            mtime = (directory / _segment_name(number)).stat().st_mtime
            self._ages.append((Position(number, 0), mtime))
        self._writer_fd = -1
        self._write = Position(0, 0)
        self._open_segment(max(self._sizes, default=self._ack.segment) + 1)
        if self._ack.segment not in self._sizes:
            self._ack = Position(min(self._sizes), 0)
            self._read = self._ack

    # --- state ----------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of all segment files, delivered parts of the oldest one included."""
        with self._state_lock:
            return sum(self._sizes.values())

    @property
    def pending_bytes(self) -> int:
        """Bytes (frames included) not yet acknowledged."""
        with self._state_lock:
            ack = self._ack
            behind = sum(size for number, size in self._sizes.items() if number >= ack.segment)
            return behind - ack.offset

    @property
    def acknowledged(self) -> Position:
        """Everything before this position is delivered."""
        with self._state_lock:
            return self._ack

    @property
    def write_position(self) -> Position:
        """Where the next append goes."""
        with self._state_lock:
            return self._write

    def oldest_pending_time(self) -> float | None:
        """Wall-clock time the oldest unacknowledged row was appended (to about a second)."""
        with self._state_lock:
            if self._ack >= self._write:
                return None
            return self._ages[0][1] if self._ages else None

    def append_time(self, position: Position) -> float | None:
        """Wall-clock time the row at ``position`` was appended (to about a second)."""
        with self._state_lock:
            found = None
            for start, when in self._ages:
                if start > position:
                    break
                found = when
            return found

    # --- writing --------------------------------------------------------------------------------

    def append(self, rows: Sequence[bytes]) -> Position:
        """Stores the rows durably (with sync) and returns the position after the last one."""
        data = frame(rows)
        if not data:
            return self.write_position
        with self._write_lock:
            self._make_room(len(data))
            start = self._write
            try:
                self._write_all(data, start)
            except SpoolFullError:
                if not self._reclaim():  # a disk full of delivered rows frees itself
                    raise
                start = self._write
                self._write_all(data, start)
            end = Position(start.segment, start.offset + len(data))
            with self._state_lock:
                self._write = end
                self._sizes[end.segment] = end.offset
                now = time.time()
                if not self._ages or now - self._ages[-1][1] >= _AGE_RESOLUTION:
                    self._ages.append((start, now))
                    if len(self._ages) > _MAX_AGES:
                        # A long backlog: keep every other time (the oldest stays exact), so
                        # memory stays flat and ages only get coarser.
                        self._ages = deque(list(self._ages)[::2])
            if end.offset >= self.segment_bytes:
                self._rotate_quietly(end.segment + 1)
            return end

    def _rotate_quietly(self, number: int) -> None:
        try:
            self._open_segment(number)
        except SpoolError as error:
            # The rows are stored; the current segment just grows until a rotation succeeds.
            log.warning("spool_rotation_failed", directory=str(self.directory), error=str(error))

    def sync(self) -> None:
        """Flushes appended rows to disk (the timer of ``sync=False`` spools calls this)."""
        with self._write_lock:
            try:
                os.fsync(self._writer_fd)
            except OSError as error:
                raise self._storage_error("sync", error) from error

    def _make_room(self, needed: int) -> None:
        if self.used_bytes + needed <= self.limit_bytes:
            return
        self._reclaim()
        used = self.used_bytes
        if used == 0:
            # One chunk larger than the whole limit would otherwise be refused forever; an
            # empty spool takes it, so the limit is exceeded by at most one chunk.
            log.warning(
                "spool_limit_exceeded_by_one_chunk", directory=str(self.directory), bytes=needed
            )
            return
        if used + needed > self.limit_bytes:
            raise SpoolFullError(
                f"spool {self.directory} is full: {used} of {self.limit_bytes} bytes in use, "
                f"{needed} more needed; the rows wait until earlier ones are delivered"
            )

    def _reclaim(self) -> bool:
        """When the current segment holds only delivered rows, starts a new one so it can go."""
        with self._state_lock:
            everything_delivered = self._ack >= self._write and self._write.offset > 0
        if everything_delivered:
            self._open_segment(self._write.segment + 1)
            self.acknowledge(self.write_position)
        return everything_delivered

    def _write_all(self, data: bytes, start: Position) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._writer_fd, view)
                view = view[written:]
            if self.sync_on_append:
                os.fsync(self._writer_fd)
        except OSError as error:
            self._undo_write(start.offset)
            raise self._storage_error("append", error) from error

    def _undo_write(self, offset: int) -> None:
        try:
            os.ftruncate(self._writer_fd, offset)
            os.fsync(self._writer_fd)
        except OSError as error:
            log.exception("spool_truncate_failed", directory=str(self.directory), error=str(error))

    def _storage_error(self, action: str, error: OSError) -> SpoolError:
        if error.errno in _DISK_FULL:
            return SpoolFullError(
                f"no space left on the file system of spool {self.directory} during {action} "
                f"({os.strerror(error.errno or 0)}); the failed rows were cut off again, "
                "nothing stored before is affected"
            )
        return SpoolError(f"spool {self.directory}: {action} failed: {error}")

    def _open_segment(self, number: int) -> None:
        path = self.directory / _segment_name(number)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise self._storage_error("segment creation", error) from error
        self._sync_directory()
        previous = self._writer_fd
        with self._state_lock:
            self._writer_fd = fd
            self._write = Position(number, 0)
            self._sizes[number] = 0
        if previous >= 0:
            os.close(previous)

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- reading --------------------------------------------------------------------------------

    def read(self, max_bytes: int, *, row_overhead: int = 0) -> SpoolRead | None:
        """The next rows after the previous read, at most ``max_bytes`` of them, each counted
        with ``row_overhead`` bytes more (a separator in a request body); None if none.

        Always returns at least one row when one is there, however large; a row that would not
        fit after others is left for the next read (``full``).
        """
        with self._read_lock:
            rows: list[bytes] = []
            total = 0
            full = False
            start = position = self._read_position()
            while total < max_bytes and not full:
                with self._state_lock:
                    write = self._write
                    limit = write.offset if position.segment == write.segment else None
                    size = self._sizes.get(position.segment)
                if size is None:  # deleted behind us: cannot happen while reads lead acks
                    break
                if limit is None and position.offset >= size:
                    position = self._next_segment(position.segment)
                    continue
                end = limit if limit is not None else size
                if position.offset >= end:
                    break
                position, added, full = self._read_frames(
                    position, end, rows, max_bytes - total, row_overhead
                )
                total += added
            with self._state_lock:
                self._read = position = self._normalized(position)
                skipped_only = not rows and position > start and start == self._ack
            if skipped_only:
                # Only damage was passed over and nothing is outstanding: move the cursor past it
                # so the damaged segment can go and nothing waits on it.
                self.acknowledge(position)
            if not rows:
                return None
            full = full or total >= max_bytes
            return SpoolRead(rows=rows, start=start, end=position, raw_bytes=total, full=full)

    def rewind(self) -> None:
        """Reads again from the acknowledged position (after dropping unacknowledged reads)."""
        with self._read_lock, self._state_lock:
            self._read = self._ack

    def _read_position(self) -> Position:
        with self._state_lock:
            return max(self._read, self._ack)

    def _next_segment(self, number: int) -> Position:
        with self._state_lock:
            later = [n for n in self._sizes if n > number]
        return Position(min(later), 0) if later else Position(number, self._sizes[number])

    def _read_frames(
        self, position: Position, end: int, rows: list[bytes], budget: int, row_overhead: int
    ) -> tuple[Position, int, bool]:
        """Frames of one segment from ``position`` up to ``end`` into ``rows``, within
        ``budget``: the new position, the bytes added, and whether a row did not fit."""
        path = self.directory / _segment_name(position.segment)
        offset = position.offset
        added = 0
        try:
            segment = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return self._skip(path, position.segment, offset, end, "segment file missing")
        except OSError as error:
            raise SpoolError(f"spool {self.directory}: cannot read {path.name}: {error}") from error
        with segment:
            fd = segment.fileno()
            block = b""
            base = offset  # block holds the file's bytes from base on
            while added < budget and offset < end:
                at = offset - base
                if len(block) - at < FRAME.size:
                    block = os.pread(fd, min(READ_BLOCK, end - offset), offset)
                    base, at = offset, 0
                    if len(block) < FRAME.size:
                        return self._skip(path, position.segment, offset, end, "torn frame header")
                length, checksum = FRAME.unpack_from(block, at)
                if length > MAX_FRAME_PAYLOAD or offset + FRAME.size + length > end:
                    return self._skip(path, position.segment, offset, end, "torn frame")
                if rows and added + length + row_overhead > budget:
                    return Position(position.segment, offset), added, True
                at += FRAME.size
                if at + length <= len(block):
                    payload = block[at : at + length]
                else:
                    payload = os.pread(fd, length, offset + FRAME.size)
                if len(payload) != length or zlib.crc32(payload) != checksum:
                    return self._skip(path, position.segment, offset, end, "checksum mismatch")
                rows.append(payload)
                added += length + row_overhead
                offset += FRAME.size + length
        return Position(position.segment, offset), added, False

    def _skip(
        self, path: Path, segment: int, offset: int, end: int, reason: str
    ) -> tuple[Position, int, bool]:
        region = CorruptRegion(path=path, offset=offset, skipped_bytes=end - offset, reason=reason)
        log.warning(
            "spool_damage_skipped",
            segment=str(path),
            offset=offset,
            skipped_bytes=region.skipped_bytes,
            reason=reason,
        )
        if self._on_corrupt is not None:
            self._on_corrupt(region)
        with self._state_lock:
            writing_here = segment == self._write.segment
        if writing_here:
            return Position(segment, end), 0, False
        return self._next_segment(segment), 0, False

    # --- acknowledging --------------------------------------------------------------------------

    def acknowledge(self, position: Position) -> None:
        """Marks everything before ``position`` delivered, durably; frees whole segments."""
        with self._ack_lock:
            with self._state_lock:
                position = self._normalized(position)
                if position <= self._ack:
                    return
                self._ack = position
                while len(self._ages) > 1 and self._ages[1][0] <= position:
                    self._ages.popleft()
            self._store_cursor(position)
            self._delete_before(position.segment)

    def _normalized(self, position: Position) -> Position:
        """The same place, moved past the end of sealed segments (state lock held)."""
        while position.segment != self._write.segment and position.offset >= self._sizes.get(
            position.segment, 0
        ):
            later = [n for n in self._sizes if n > position.segment]
            if not later:
                break
            position = Position(min(later), 0)
        return position

    def _store_cursor(self, position: Position) -> None:
        path = self.directory / CURSOR_FILE
        temporary = path.with_suffix(".tmp")
        text = json.dumps({"segment": position.segment, "offset": position.offset})
        try:
            with open(temporary, "w", encoding="ascii") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
            self._sync_directory()
        except OSError as error:
            # The rows are delivered; a stale cursor only means they are sent again after a restart.
            log.warning("spool_cursor_not_saved", directory=str(self.directory), error=str(error))

    def _load_cursor(self) -> Position:
        path = self.directory / CURSOR_FILE
        oldest = Position(min(self._sizes, default=1), 0)
        try:
            stored = json.loads(path.read_text(encoding="ascii"))
            return Position(int(stored["segment"]), int(stored["offset"]))
        except FileNotFoundError:
            return oldest
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("spool_cursor_unreadable", path=str(path), error=str(error))
            return oldest

    def _normalized_start(self, cursor: Position) -> Position:
        if cursor.segment in self._sizes:
            return cursor
        later = [n for n in self._sizes if n > cursor.segment]
        return Position(min(later), 0) if later else Position(cursor.segment + 1, 0)

    def _report_missing_segments(self, cursor: Position) -> None:
        """Segments between the cursor and the newest that are gone: their rows are lost."""
        if not self._sizes:
            return
        for number in range(cursor.segment, max(self._sizes)):
            if number not in self._sizes:
                self._skip_missing(self.directory / _segment_name(number), cursor, number)

    def _skip_missing(self, path: Path, cursor: Position, number: int) -> None:
        region = CorruptRegion(
            path=path,
            offset=cursor.offset if number == cursor.segment else 0,
            skipped_bytes=0,
            reason="segment file missing",
        )
        log.warning(
            "spool_damage_skipped", segment=str(path), skipped_bytes=0, reason=region.reason
        )
        if self._on_corrupt is not None:
            self._on_corrupt(region)

    def _delete_before(self, segment: int) -> None:
        with self._state_lock:
            doomed = [n for n in self._sizes if n < segment]
            for number in doomed:
                del self._sizes[number]
        for number in doomed:
            (self.directory / _segment_name(number)).unlink(missing_ok=True)

    # --- lifecycle ------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"spool {self.directory} is in use by another process") from None
        return fd

    def close(self) -> None:
        """Syncs and closes the current segment and releases the directory."""
        with self._write_lock:
            if self._writer_fd >= 0:
                try:
                    os.fsync(self._writer_fd)
                finally:
                    os.close(self._writer_fd)
                    self._writer_fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
