"""Where ``auditrelay replay`` is in each audit log file: identities, checkpoints, line batches.

After a batch of a file's lines is durable in the spool, the file's checkpoint is written
(atomically, fsynced): the file's identity (path, inode, size, SHA-256 of its first KiB) and the
offset and number of the first line not yet spooled. A file whose identity changed (rotated,
rewritten) is read from its start. A file is plain text, or gzip by its magic bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import orjson

HEAD_BYTES: Final = 1024  # the start of a file that, with its inode, identifies it
BATCH_LINES: Final = 2000
BATCH_BYTES: Final = 4 << 20
GZIP_MAGIC: Final = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What tells one audit log file from another that later took its path."""

    path: str
    inode: int
    size: int
    head_sha256: str
    head_bytes: int


def identify(path: Path) -> FileIdentity:
    """The identity of the file at ``path`` as it is now."""
    with path.open("rb") as handle:
        stat = os.fstat(handle.fileno())
        head = handle.read(HEAD_BYTES)
    return FileIdentity(
        str(path.resolve()), stat.st_ino, stat.st_size, hashlib.sha256(head).hexdigest(), len(head)
    )


def _same_file(recorded: FileIdentity, path: Path, current: FileIdentity) -> bool:
    """The same inode with the same first bytes (as far as the recorded head went)."""
    if recorded.inode != current.inode or recorded.head_bytes > current.head_bytes:
        return False
    with path.open("rb") as handle:
        head = handle.read(recorded.head_bytes)
    return hashlib.sha256(head).hexdigest() == recorded.head_sha256


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far one file is durably spooled: ``offset`` bytes of its (decompressed) text, which
    are its first ``line`` lines; ``complete`` once its last line is spooled."""

    identity: FileIdentity
    offset: int
    line: int
    complete: bool = False


class CheckpointStore:
    """One checkpoint file per input file, written atomically and fsynced."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, source: Path) -> Path:
        """Where the checkpoint of ``source`` lives."""
        digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def load(self, source: Path, current: FileIdentity) -> Checkpoint | None:
        """The checkpoint of this very file, or None (never read, or a different file now)."""
        try:
            document = orjson.loads(self.path_for(source).read_bytes())
            checkpoint = Checkpoint(
                identity=FileIdentity(**document["identity"]),
                offset=int(document["offset"]),
                line=int(document["line"]),
                complete=bool(document["complete"]),
            )
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # a damaged checkpoint: reading again from the start loses nothing
        if not _same_file(checkpoint.identity, source, current):
            return None
        return checkpoint

    def save(self, source: Path, checkpoint: Checkpoint) -> None:
        """Replaces the checkpoint of ``source``; on return it survives a crash."""
        target = self.path_for(source)
        temporary = target.with_suffix(".tmp")
        data = orjson.dumps(asdict(checkpoint), option=orjson.OPT_INDENT_2)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


@dataclass(slots=True)
class LineBatch:
    """Consecutive lines of one file: the first one's number, and where the batch ends."""

    lines: list[bytes]
    first_line: int  # 1-based number of lines[0]
    end_offset: int  # text offset just after the batch
    end_line: int  # lines of the file up to and including the batch
    raw_position: int  # bytes of the file on disk consumed so far (progress)


def _open_text(path: Path) -> tuple[io.BufferedReader, io.BufferedIOBase]:
    """The file on disk, and its text: the same object, or a gzip reader over it."""
    raw = path.open("rb")
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return raw, gzip.GzipFile(fileobj=raw, mode="rb")
    raw.seek(0)
    return raw, raw


def read_batches(
    path: Path, offset: int, line: int, max_bytes: int = BATCH_BYTES
) -> Generator[LineBatch, None, None]:
    """The lines of ``path`` after the first ``offset`` bytes (``line`` lines) of its text."""
    raw, text = _open_text(path)
    with raw, text:
        if text is raw:
            raw.seek(offset)
        else:
            _skip(text, offset)
        lines: list[bytes] = []
        size = 0
        first = line + 1
        for current in text:
            offset += len(current)
            line += 1
            lines.append(current)
            size += len(current)
            if len(lines) >= BATCH_LINES or size >= max_bytes:
                yield LineBatch(lines, first, offset, line, raw.tell())
                lines, size, first = [], 0, line + 1
        if lines:
            yield LineBatch(lines, first, offset, line, raw.tell())


def _skip(text: io.BufferedIOBase, count: int) -> None:
    """Reads and discards ``count`` bytes (a gzip stream cannot seek cheaply)."""
    left = count
    while left > 0:
        block = text.read(min(left, 1 << 20))
        if not block:
            break
        left -= len(block)
