"""Errors of ``auditrelay audit``; the command turns them into exit codes.

::

    AuditRelayError
    └── AuditSetupError        bad input: a file that is not what it should be (exit 2)
        ├── LockBusyError      another run holds this node's lock
        └── BackupError        a backup that is missing, damaged or does not fit the file
    RollbackRefusedError            the file changed since enable; --force overrides (exit 1)
"""

from __future__ import annotations

from auditrelay.errors import AuditRelayError


class AuditSetupError(AuditRelayError):
    """A manifest, config file, policy or directory that cannot be used as it is."""


class LockBusyError(AuditSetupError):
    """Another ``auditrelay audit`` run on this node holds the lock."""


class BackupError(AuditSetupError):
    """A backup that is missing, damaged, or does not match the file it is for."""


class RollbackRefusedError(Exception):
    """The file was changed by someone else since ``enable``; restoring would undo that."""
