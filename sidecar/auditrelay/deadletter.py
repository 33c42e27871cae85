"""The dead-letter area: records that are not audit events, kept aside with the reason.

One directory per pipeline (``<state_dir>/deadletter/<pipeline>/``) of append-only JSON-lines
files, one line per letter::

    {"time": "2026-11-26T14:02:11.532Z", "reason": "log_not_json", "tag": "kube.audit",
     "payload_text": "..."}          # or "payload_base64" when the payload is not UTF-8

Files roll over at ``max_file_bytes``; past ``max_total_bytes`` the oldest files are removed and
counted, so a flood of bad records can never fill the disk. Letters are flushed and fsynced
before ``put`` returns: a chunk is acknowledged only once its bad records are on disk.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final

import orjson

from auditrelay.model import DeadLetter

DEFAULT_MAX_FILE_BYTES: Final = 16 << 20
DEFAULT_MAX_TOTAL_BYTES: Final = 256 << 20
FILE_SUFFIX: Final = ".jsonl"


@dataclass(slots=True)
class DeadLetterCounts:
    """What the area has seen since start: letters written, files and bytes removed by the bound."""

    letters_written: int = 0
    bytes_written: int = 0
    files_removed: int = 0
    bytes_removed: int = 0


class DeadLetterStore:
    """A bounded, append-only dead-letter directory; implements model.DeadLetterSink."""

    def __init__(
        self,
        directory: Path,
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    ) -> None:
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.counts = DeadLetterCounts()
        self._lock = threading.Lock()  # put() runs on the decode thread; close() on the loop
        self._sequence = itertools.count()
        self._file: BinaryIO | None = None
        self._file_path: Path | None = None
        self._file_bytes = 0

    def put(self, letters: Sequence[DeadLetter]) -> None:
        """Appends the letters and makes them durable; removes the oldest files past the bound."""
        if not letters:
            return
        lines = b"".join(_line(letter) for letter in letters)
        with self._lock:
            handle = self._writable_file()
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
            self._file_bytes += len(lines)
            self.counts.letters_written += len(letters)
            self.counts.bytes_written += len(lines)
            if self._file_bytes >= self.max_file_bytes:
                self._close_file()
            self._enforce_bound()

    def files(self) -> list[Path]:
        """The letter files, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"*{FILE_SUFFIX}"))

    def close(self) -> None:
        """Closes the current file; a later put opens a new one."""
        with self._lock:
            self._close_file()

    def _writable_file(self) -> BinaryIO:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
            # Sorted by name is oldest first: UTC time to the microsecond, then a sequence.
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            name = f"{stamp}-{next(self._sequence):06d}{FILE_SUFFIX}"
            path = self.directory / name
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o640)
            self._file = os.fdopen(descriptor, "ab")
            self._file_path = path
            self._file_bytes = 0
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._file_path = None

    def _enforce_bound(self) -> None:
        files = self.files()
        sizes = [path.stat().st_size for path in files]
        total = sum(sizes)
        for path, size in zip(files, sizes, strict=True):
            if total <= self.max_total_bytes or path == self._file_path:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.counts.files_removed += 1
            self.counts.bytes_removed += size


def _line(letter: DeadLetter) -> bytes:
    record: dict[str, str] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "reason": letter.reason,
        "tag": letter.tag,
    }
    try:
        record["payload_text"] = letter.payload.decode()
    except UnicodeDecodeError:
        record["payload_base64"] = base64.b64encode(letter.payload).decode("ascii")
    return orjson.dumps(record) + b"\n"


def read_letters(path: Path) -> list[dict[str, str]]:
    """The letters of one file, as written (for tests and the operator's tooling)."""
    with path.open("rb") as handle:
        return [orjson.loads(line) for line in handle if line.strip()]


def payload_of(letter: dict[str, str]) -> bytes:
    """The exact payload bytes of a letter read back with read_letters."""
    if "payload_text" in letter:
        return letter["payload_text"].encode()
    return base64.b64decode(letter["payload_base64"])
