"""The backup of what ``enable`` changed, kept outside the directories it changed.

One slot per distribution under the backup directory (default ``/var/lib/auditrelay/audit-backup``;
never the static-pod directory, where the kubelet would run a copy of the manifest as a second
pod)::

    <dir>/<distro>/record.json       what changed: each file's path, original and written sha256
    <dir>/<distro>/original-<n>      the original bytes of each file that was replaced
    <dir>/<distro>/rolled-back.json  the record of the last rollback (makes a second one a no-op)
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from auditrelay.audit.errors import BackupError
from auditrelay.audit.files import atomic_write, sha256

DEFAULT_BACKUP_DIR: Final = Path("/var/lib/auditrelay/audit-backup")
RECORD: Final = "record.json"
ROLLED_BACK: Final = "rolled-back.json"


@dataclass(slots=True)
class FileChange:
    """One file ``enable`` wrote: replaced (its original is kept) or created."""

    path: str
    original_sha256: str | None
    written_sha256: str
    original_name: str | None = None

    @property
    def created(self) -> bool:
        return self.original_sha256 is None


@dataclass(slots=True)
class BackupRecord:
    """What one ``enable`` changed on this node (or in the cluster, for OpenShift)."""

    distro: str
    changes: list[str]
    files: list[FileChange] = field(default_factory=list)
    created_at: str = ""
    previous_profile: str | None = None
    written_profile: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes, source: Path) -> BackupRecord:
        try:
            raw: dict[str, Any] = orjson.loads(data)
            raw["files"] = [FileChange(**entry) for entry in raw.get("files", [])]
            return cls(**raw)
        except (orjson.JSONDecodeError, TypeError, AttributeError) as error:
            raise BackupError(f"{source}: not a backup record auditrelay wrote: {error}") from error


class BackupStore:
    """The backup slot of one distribution in ``directory``."""

    def __init__(self, directory: Path, distro: str) -> None:
        self.slot = directory / distro
        self.distro = distro

    @property
    def record_path(self) -> Path:
        return self.slot / RECORD

    def active(self) -> BackupRecord | None:
        """The record of an enable not rolled back yet, or None."""
        try:
            data = self.record_path.read_bytes()
        except FileNotFoundError:
            return None
        return BackupRecord.from_json(data, self.record_path)

    def rolled_back(self) -> dict[str, Any] | None:
        """The last rollback's record, or None."""
        try:
            found: dict[str, Any] = orjson.loads((self.slot / ROLLED_BACK).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return found

    def save(self, record: BackupRecord, originals: dict[str, bytes]) -> None:
        """Stores each original (by path) and then the record: the record is written last, so
        a record on disk always has its originals beside it."""
        self.slot.mkdir(parents=True, exist_ok=True, mode=0o700)
        record.created_at = record.created_at or _now()
        for index, change in enumerate(record.files):
            if change.path in originals:
                change.original_name = f"original-{index}"
                atomic_write(self.slot / change.original_name, originals[change.path])
        atomic_write(self.record_path, record.to_json())

    def original(self, change: FileChange) -> bytes:
        """The original bytes of a replaced file, checked against the recorded sha256."""
        if change.original_name is None:
            raise BackupError(f"{self.record_path}: no original kept for {change.path}")
        path = self.slot / change.original_name
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            raise BackupError(
                f"{path}: the backup of {change.path} is missing; nothing restored"
            ) from error
        if sha256(data) != change.original_sha256:
            raise BackupError(
                f"{path}: the backup of {change.path} does not match its recorded sha256 "
                f"{change.original_sha256} (it was altered); nothing restored"
            )
        return data

    def retire(self, record: BackupRecord, outcome: str) -> None:
        """After a rollback: keeps a note of it and removes the record and originals."""
        note = {"rolledBackAt": _now(), "outcome": outcome, "record": asdict(record)}
        atomic_write(self.slot / ROLLED_BACK, orjson.dumps(note, option=orjson.OPT_INDENT_2))
        self.record_path.unlink()
        for change in record.files:
            if change.original_name is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self.slot / change.original_name).unlink()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
