"""Atomic file replacement and the per-node lock.

A replaced file is written to a dot-named temporary file in the same directory (the kubelet
ignores dot-files in its static-pod directory), flushed and fsynced, renamed over the target and
the directory fsynced: a crash at any point leaves either the old or the new file whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from auditrelay.audit.errors import AuditSetupError, LockBusyError

LOCK_NAME = ".lock"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temporary_name(target: Path) -> Path:
    """Where ``target``'s next version is written before the rename."""
    return target.with_name(f".{target.name}.auditrelay-tmp")


def atomic_write(target: Path, data: bytes, mode: int | None = None) -> None:
    """Replaces (or creates) ``target`` with ``data`` so that no reader ever sees a partial file.

    An existing file's mode and owner are kept; a new file gets ``mode`` (default 0600).
    """
    existing = _stat_or_none(target)
    temporary = temporary_name(target)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as error:
        raise AuditSetupError(f"{target.parent}: cannot write here: {error.strerror}") from error
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if existing is not None:
            os.chmod(temporary, existing.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(temporary, existing.st_uid, existing.st_gid)
        else:
            os.chmod(temporary, 0o600 if mode is None else mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporary(target: Path) -> None:
    """A temporary file an interrupted run left behind is never the target's content."""
    with contextlib.suppress(FileNotFoundError):
        temporary_name(target).unlink()


def check_writable(directory: Path) -> None:
    """AuditSetupError unless files can be created in ``directory``, before anything is written."""
    if not directory.is_dir():
        raise AuditSetupError(f"{directory}: no such directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise AuditSetupError(f"{directory}: directory is not writable")
    probe = directory / f".auditrelay-probe-{os.getpid()}"
    try:
        probe.touch()
    except OSError as error:
        raise AuditSetupError(f"{directory}: cannot write here: {error.strerror}") from error
    probe.unlink()


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def node_lock(directory: Path, wait_seconds: float) -> Iterator[None]:
    """Holds ``directory/.lock`` exclusively; waits up to ``wait_seconds`` for another holder.

    The lock is an flock: it goes away with the process that held it, so a crashed run never
    leaves the node locked.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _acquire(descriptor, path, wait_seconds)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(descriptor)


def _acquire(descriptor: int, path: Path, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        else:
            return
        if time.monotonic() >= deadline:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockBusyError(
                f"{path}: another auditrelay audit run (pid {holder}) is changing this node; "
                f"waited {wait_seconds:.0f}s (--lock-wait)"
            )
        time.sleep(0.1)
