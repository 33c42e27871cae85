"""The durable spool of one pipeline: rows on disk until the workspace has confirmed them.

Layout of a spool directory::

    lock                        held (flock) by the one process using this spool
    cursor                      what is delivered (``spool_state``)
    chunks                      ids of the latest chunks appended (``spool_state``)
    0000000000000001.seg ...    append-only segments of framed rows (``spool_segments``)

An ``append`` writes all frames of a call with one write and, with ``sync=True``, one fsync
before it returns, so a Push is acknowledged only once its rows would survive a power loss.
With ``sync=False`` the caller runs ``sync()`` on a timer and a power loss may lose what was
appended since the last one. An append may name its chunk; ``holds_chunk`` then recognises the
same chunk sent again after its answer was lost, so that it is not stored twice.

Each process writes to a new segment, so the segments of an earlier run are sealed: a torn
tail left by a crash (or a damaged record) is found by the reader when it gets there, reported
through ``on_corrupt`` and skipped up to the end of that segment; it is never fatal.

The reader streams frames from disk. The cursor moves only through ``acknowledge``, in order;
a batch confirmed while an earlier one is outstanding is recorded with ``acknowledge_ahead``,
and the reader of a later run skips it. So a restart sends again only what was not confirmed
(at-least-once), and memory does not grow with the backlog. Segments behind the cursor are
deleted. When the segments would exceed ``limit_bytes``, ``append`` raises ``SpoolFullError``;
a full file system (ENOSPC) raises it too, after cutting the segment back to where the failed
append started.

The methods block on file I/O; ``sink`` calls them from a worker thread. They are thread-safe.
"""

from __future__ import annotations

import bisect
import errno
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from auditrelay.errors import SpoolError, SpoolFullError
from auditrelay.spool_segments import (
    FRAME,
    SEGMENT_SUFFIX,
    CorruptRegion,
    Position,
    frame,
    read_frames,
    segment_name,
    segment_sizes,
    storage_error,
)
from auditrelay.spool_state import (
    CURSOR_FILE,
    LOCK_FILE,
    MAX_AHEAD,
    AppendTimes,
    ChunkLog,
    Range,
    SpoolSummary,
    in_use,
    past_delivered,
    read_cursor,
    summarize,
    sync_directory,
    take_lock,
    write_cursor,
)

__all__ = [
    "CURSOR_FILE",
    "FRAME",
    "LOCK_FILE",
    "SEGMENT_SUFFIX",
    "CorruptRegion",
    "Position",
    "Spool",
    "SpoolRead",
    "SpoolSummary",
    "frame",
    "in_use",
    "summarize",
]

log = structlog.get_logger(__name__)

MAX_SEGMENT_BYTES: Final = 64 << 20
MIN_SEGMENT_BYTES: Final = 64 << 10
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True, slots=True)
class SpoolRead:
    """Rows read in order; ``end`` is the position to acknowledge once they are delivered."""

    rows: list[bytes]
    start: Position
    end: Position
    raw_bytes: int  # the rows' bytes, each with the read's row_overhead
    full: bool = False  # max_bytes is used up, or the next row would not have fit in it


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
        self._lock_fd = take_lock(directory)
        self._sizes = segment_sizes(directory)  # segment number -> bytes (sealed and current)
        cursor, self._ahead = self._load_cursor()
        self._report_missing_segments(cursor)
        self._ack = self._normalized_start(cursor)
        self._delete_before(self._ack.segment)
        self._read = self._ack
        self._ages = AppendTimes()
        for number in sorted(n for n in self._sizes if n >= self._ack.segment):
            self._ages.add(Position(number, 0), (directory / segment_name(number)).stat().st_mtime)
        self._chunks = ChunkLog(directory)
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
            return self._ages.oldest()

    def append_time(self, position: Position) -> float | None:
        """Wall-clock time the row at ``position`` was appended (to about a second)."""
        with self._state_lock:
            return self._ages.at(position)

    # --- writing --------------------------------------------------------------------------------

    def holds_chunk(self, chunk: bytes) -> bool:
        """Whether the rows of the chunk with this id (``spool_state.chunk_id``) were appended
        already, in this run or an earlier one (the latest ones are remembered)."""
        with self._write_lock:
            return chunk in self._chunks

    def append(self, rows: Sequence[bytes], *, chunk: bytes | None = None) -> Position:
        """Stores the rows durably (with sync) and returns the position after the last one;
        ``chunk`` (the id of the chunk they came from) is remembered once they are."""
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
            if chunk is not None:
                self._chunks.remember(chunk)
            end = Position(start.segment, start.offset + len(data))
            self._appended(start, end)
            if end.offset >= self.segment_bytes:
                self._rotate_quietly(end.segment + 1)
            return end

    def _appended(self, start: Position, end: Position) -> None:
        with self._state_lock:
            self._write = end
            self._sizes[end.segment] = end.offset
            self._ages.add(start, time.time())

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
                raise storage_error(self.directory, "sync", error) from error

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
            raise storage_error(self.directory, "append", error) from error

    def _undo_write(self, offset: int) -> None:
        try:
            os.ftruncate(self._writer_fd, offset)
            os.fsync(self._writer_fd)
        except OSError as error:
            log.exception("spool_truncate_failed", directory=str(self.directory), error=str(error))

    def _open_segment(self, number: int) -> None:
        path = self.directory / segment_name(number)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise storage_error(self.directory, "segment creation", error) from error
        sync_directory(self.directory)
        previous = self._writer_fd
        with self._state_lock:
            self._writer_fd = fd
            self._write = Position(number, 0)
            self._sizes[number] = 0
        if previous >= 0:
            os.close(previous)

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
                    position, stop = past_delivered(self._ahead, position, self._normalized)
                    write = self._write
                    limit = write.offset if position.segment == write.segment else None
                    size = self._sizes.get(position.segment)
                if size is None:  # deleted behind us: cannot happen while reads lead acks
                    break
                if limit is None and position.offset >= size:
                    position = self._next_segment(position.segment)
                    continue
                end = limit if limit is not None else size
                if stop.segment == position.segment:
                    end = min(end, stop.offset)  # a range delivered ahead starts there
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
                # Only damage or delivered ranges were passed over and nothing is outstanding:
                # move the cursor past them so their segments can go and nothing waits on them.
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
        path = self.directory / segment_name(position.segment)
        try:
            segment = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return self._skip(path, position.segment, position.offset, end, "segment file missing")
        except OSError as error:
            raise SpoolError(f"spool {self.directory}: cannot read {path.name}: {error}") from error
        with segment:
            found = read_frames(segment.fileno(), position.offset, end, rows, budget, row_overhead)
        if found.damage:
            skipped_to, _, _ = self._skip(path, position.segment, found.offset, end, found.damage)
            return skipped_to, found.added, False
        return Position(position.segment, found.offset), found.added, found.full

    def _skip(
        self, path: Path, segment: int, offset: int, end: int, reason: str
    ) -> tuple[Position, int, bool]:
        self._report(CorruptRegion(path, offset, end - offset, reason))
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
                self._ack = position = self._past_ahead(position)
                self._ages.forget_before(position)
                ahead = list(self._ahead)
            self._store_cursor(position, ahead)
            self._delete_before(position.segment)

    def acknowledge_ahead(self, start: Position, end: Position) -> None:
        """Marks the rows from ``start`` to ``end`` delivered while earlier ones are not yet
        (a batch confirmed out of order), durably: a later run does not send them again. The
        cursor itself moves only through ``acknowledge``."""
        with self._ack_lock:
            with self._state_lock:
                if end <= self._ack or len(self._ahead) >= MAX_AHEAD:
                    return  # already behind the cursor, or too many: then sent again on restart
                bisect.insort(self._ahead, (start, end))
                ack, ahead = self._ack, list(self._ahead)
            self._store_cursor(ack, ahead)

    def _past_ahead(self, position: Position) -> Position:
        """``position`` moved past the ranges delivered ahead that it reaches, which are
        dropped (state lock held)."""
        while self._ahead and self._ahead[0][0] <= position:
            _, end = self._ahead.pop(0)
            position = max(position, self._normalized(end))
        return position

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

    def _store_cursor(self, position: Position, ahead: list[Range]) -> None:
        try:
            write_cursor(self.directory, position, ahead)
        except OSError as error:
            # The rows are delivered; a stale cursor only means they are sent again after a restart.
            log.warning("spool_cursor_not_saved", directory=str(self.directory), error=str(error))

    def _load_cursor(self) -> tuple[Position, list[Range]]:
        stored = read_cursor(self.directory / CURSOR_FILE)
        if stored is None:
            return Position(min(self._sizes, default=1), 0), []
        return stored

    def _normalized_start(self, cursor: Position) -> Position:
        if cursor.segment in self._sizes:
            return cursor
        later = [n for n in self._sizes if n > cursor.segment]
        return Position(min(later), 0) if later else Position(cursor.segment + 1, 0)

    def _report_missing_segments(self, cursor: Position) -> None:
        """Segments between the cursor and the newest that are gone: their rows are lost."""
        for number in range(cursor.segment, max(self._sizes, default=cursor.segment)):
            if number not in self._sizes:
                offset = cursor.offset if number == cursor.segment else 0
                path = self.directory / segment_name(number)
                self._report(CorruptRegion(path, offset, 0, "segment file missing"))

    def _report(self, region: CorruptRegion) -> None:
        log.warning(
            "spool_damage_skipped",
            segment=str(region.path),
            offset=region.offset,
            skipped_bytes=region.skipped_bytes,
            reason=region.reason,
        )
        if self._on_corrupt is not None:
            self._on_corrupt(region)

    def _delete_before(self, segment: int) -> None:
        with self._state_lock:
            doomed = [n for n in self._sizes if n < segment]
            for number in doomed:
                del self._sizes[number]
        for number in doomed:
            (self.directory / segment_name(number)).unlink(missing_ok=True)

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Syncs and closes the current segment and releases the directory."""
        with self._write_lock:
            if self._writer_fd >= 0:
                try:
                    os.fsync(self._writer_fd)
                finally:
                    os.close(self._writer_fd)
                    self._writer_fd = -1
            self._chunks.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
