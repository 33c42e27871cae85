"""What a spool remembers besides its rows: how far it is delivered, and which chunks it holds.

``cursor`` is ``{"segment": N, "offset": M, "ahead": [[s, o, s2, o2], ...]}``: everything before
(N, M) is delivered, and so is each range of ``ahead``, a batch the workspace confirmed while an
earlier one was still outstanding. A restart skips those ranges instead of sending them again.
It is replaced atomically (write, fsync, rename) on every change.

``chunks`` lists the ids (a digest of tag and bytes) of the latest chunks whose rows were
appended, 16 bytes each, so that a chunk Fluent Bit sends again because its answer was lost
(the sidecar killed after the append, before the reply) is recognised and not stored twice.
An id is written after the chunk's rows are durable, never before, so a crash in between can
only duplicate, never lose. It is appended without fsync: a killed process loses nothing the
kernel has; a power loss may forget the last ids, and those chunks are stored again.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from auditrelay.errors import SpoolError
from auditrelay.spool_segments import Position, count_frames, segment_name, segment_sizes

log = structlog.get_logger(__name__)

LOCK_FILE: Final = "lock"
CURSOR_FILE: Final = "cursor"
CHUNKS_FILE: Final = "chunks"
CHUNK_ID_BYTES: Final = 16
MAX_AHEAD: Final = 1024  # delivered ranges kept ahead of the cursor; more are resent on restart
REMEMBERED_CHUNKS: Final = 16384  # ids kept: hours of Fluent Bit retries at any usual rate
_AGE_RESOLUTION: Final = 1.0  # seconds between two remembered append times
_MAX_AGES: Final = 4096  # remembered append times at most

Range = tuple[Position, Position]
_END: Final = Position(sys.maxsize, 0)


def chunk_id(tag: str, chunk: bytes) -> bytes:
    """The id of a chunk: equal tag and bytes are the same chunk (the plugin forwards them
    unchanged)."""
    digest = hashlib.blake2b(tag.encode("utf-8", "surrogateescape"), digest_size=CHUNK_ID_BYTES)
    digest.update(b"\0")
    digest.update(chunk)
    return digest.digest()


def read_cursor(path: Path) -> tuple[Position, list[Range]] | None:
    """The cursor and the ranges delivered ahead of it; None when absent or unreadable
    (a damaged file is logged)."""
    try:
        stored = json.loads(path.read_text(encoding="ascii"))
        cursor = Position(int(stored["segment"]), int(stored["offset"]))
        ahead = [
            (Position(int(a), int(b)), Position(int(c), int(d)))
            for a, b, c, d in stored.get("ahead", [])
        ]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("spool_cursor_unreadable", path=str(path), error=str(error))
        return None
    return cursor, sorted(item for item in ahead if item[0] < item[1] and item[1] > cursor)


def write_cursor(directory: Path, cursor: Position, ahead: Iterable[Range]) -> None:
    """Replaces the cursor file atomically; raises OSError."""
    path = directory / CURSOR_FILE
    temporary = path.with_suffix(".tmp")
    stored: dict[str, object] = {"segment": cursor.segment, "offset": cursor.offset}
    ranges = [[start.segment, start.offset, end.segment, end.offset] for start, end in ahead]
    if ranges:
        stored["ahead"] = ranges
    with open(temporary, "w", encoding="ascii") as file:
        file.write(json.dumps(stored, separators=(",", ":")))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_directory(directory)


def sync_directory(directory: Path) -> None:
    """fsync of a directory, so that a created, renamed or removed name is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkLog:
    """The ids of the latest chunks appended to a spool, in memory and in its ``chunks`` file.

    Bounded: the newest ``capacity`` ids are kept; the file is rewritten with them when it has
    grown to twice that. Not thread-safe: the spool calls it under its write lock.
    """

    def __init__(self, directory: Path, capacity: int = REMEMBERED_CHUNKS) -> None:
        self.path = directory / CHUNKS_FILE
        self.capacity = capacity
        self._ids: dict[bytes, None] = dict.fromkeys(self._load())
        self._in_file = len(self._ids)
        self._fd = -1

    def _load(self) -> list[bytes]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as error:
            log.warning("spool_chunk_ids_unreadable", path=str(self.path), error=str(error))
            return []
        whole = len(data) - len(data) % CHUNK_ID_BYTES  # a torn last id is left out
        ids = [data[at : at + CHUNK_ID_BYTES] for at in range(0, whole, CHUNK_ID_BYTES)]
        return ids[-self.capacity :]

    def __contains__(self, chunk: bytes) -> bool:
        return chunk in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def remember(self, chunk: bytes) -> None:
        """Adds an id (after its rows are durable); a failure to write it is only logged: the
        chunk would be stored again if it came back."""
        self._ids[chunk] = None
        if len(self._ids) > self.capacity:
            del self._ids[next(iter(self._ids))]
        try:
            if self._in_file >= 2 * self.capacity:
                self._rewrite()
            else:
                self._append(chunk)
        except OSError as error:
            log.warning("spool_chunk_id_not_saved", path=str(self.path), error=str(error))

    def _append(self, chunk: bytes) -> None:
        if self._fd < 0:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        os.write(self._fd, chunk)
        self._in_file += 1

    def _rewrite(self) -> None:
        self.close()
        temporary = self.path.with_suffix(".tmp")
        temporary.write_bytes(b"".join(self._ids))
        os.replace(temporary, self.path)
        self._in_file = len(self._ids)

    def close(self) -> None:
        """Closes the file (the ids stay in memory)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class AppendTimes:
    """When rows were appended, to about a second: (position, time), oldest first. Bounded:
    past 4,096 entries every other one goes (the oldest stays exact), so ages get coarser."""

    def __init__(self) -> None:
        self._times: deque[tuple[Position, float]] = deque()

    def add(self, start: Position, when: float) -> None:
        """Rows were appended at ``start`` at wall-clock time ``when``."""
        if self._times and when - self._times[-1][1] < _AGE_RESOLUTION:
            return
        self._times.append((start, when))
        if len(self._times) > _MAX_AGES:
            self._times = deque(list(self._times)[::2])

    def oldest(self) -> float | None:
        """The time of the oldest entry kept."""
        return self._times[0][1] if self._times else None

    def at(self, position: Position) -> float | None:
        """When the row at ``position`` was appended."""
        found = None
        for start, when in self._times:
            if start > position:
                break
            found = when
        return found

    def forget_before(self, position: Position) -> None:
        """Drops the entries of rows delivered (the one ``position`` is in stays)."""
        while len(self._times) > 1 and self._times[1][0] <= position:
            self._times.popleft()


@dataclass(frozen=True, slots=True)
class SpoolSummary:
    """What a spool directory holds, read without opening (or locking) the spool."""

    used_bytes: int  # every segment file
    pending_bytes: int  # after the cursor, frames included
    pending_rows: int | None  # None when not counted


def summarize(directory: Path, *, count_rows: bool = False) -> SpoolSummary:
    """Reads a spool directory's segments and cursor without changing anything; safe while
    another process uses the spool (its figures are then a moment's snapshot)."""
    sizes = segment_sizes(directory)
    stored = read_cursor(directory / CURSOR_FILE)
    cursor = stored[0] if stored else Position(min(sizes, default=1), 0)
    pending = [(n, size) for n, size in sorted(sizes.items()) if n >= cursor.segment]
    offset_in_first = cursor.offset if pending and pending[0][0] == cursor.segment else 0
    pending_bytes = max(0, sum(size for _, size in pending) - offset_in_first)
    rows = None
    if count_rows:
        rows = 0
        for number, size in pending:
            start = offset_in_first if number == cursor.segment else 0
            rows += count_frames(directory / segment_name(number), start, size)
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


def past_delivered(
    ahead: list[Range], position: Position, normalized: Callable[[Position], Position]
) -> tuple[Position, Position]:
    """``position``, moved past the ranges delivered ahead (sorted) that hold it, and where
    the next such range starts."""
    index = bisect.bisect_right(ahead, (position, _END)) - 1
    while 0 <= index < len(ahead) and ahead[index][0] <= position < ahead[index][1]:
        position = normalized(ahead[index][1])
        index = bisect.bisect_right(ahead, (position, _END)) - 1
    following = index + 1
    return position, ahead[following][0] if following < len(ahead) else _END


def take_lock(directory: Path) -> int:
    """Locks a spool directory for this process (flock on its lock file); raises SpoolError
    when another process holds it. The lock goes with the descriptor, or the process."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(f"spool {directory} is in use by another process") from None
    return fd
