"""One control-plane node's audit configuration: what it is, turning it on, and undoing that.

A ``NodeSetup`` binds a distribution's file (the kubeadm manifest, or the k3s/RKE2 config) to
the host paths it names, read under ``host_root`` (``/`` on the node, ``/host`` in a pod that
mounts the node's root). ``enable`` and ``rollback`` write only through ``files.atomic_write``,
after the backup is on disk, and only while holding the node lock.
"""

from __future__ import annotations

import difflib
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

from auditrelay.audit import kubeadm, rancher
from auditrelay.audit.backup import BackupRecord, BackupStore, FileChange
from auditrelay.audit.errors import AuditSetupError, RollbackRefusedError
from auditrelay.audit.files import atomic_write, check_writable, remove_stale_temporary, sha256
from auditrelay.audit.kubeadm import AuditFlags, ManifestEdit
from auditrelay.audit.readiness import Endpoint, await_audited, await_ready

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1


@dataclass
class Outcome:
    """What a run did, for the operator (table) and for programs (``--output json``)."""

    action: str
    distro: str
    target: str
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    diff: str = ""
    reason: str | None = None
    exit_code: int = EXIT_OK

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action,
            "distro": self.distro,
            "target": self.target,
            "changes": self.changes,
            "notes": self.notes,
            "diff": self.diff,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class WaitSettings:
    """How long to wait for the API server, and where it answers (None: from the config)."""

    enabled: bool = True
    timeout: float = 300.0
    apiserver_url: str | None = None
    ca_file: Path | None = None


@dataclass
class NodeSetup:
    """A file-configured API server: kubeadm static pod, k3s or RKE2."""

    distro: str
    target: Path
    host_root: Path
    restart_command: str | None = None

    def host(self, path: str | PurePosixPath) -> Path:
        """A node path as this process sees it."""
        return self.host_root / PurePosixPath(path).relative_to("/")

    # -- reading ---------------------------------------------------------------------------------

    def audit_flags(self) -> AuditFlags:
        if self.distro == "kubeadm":
            return kubeadm.read_static_pod(self.target).audit
        return self._rancher().audit

    def policy_on_host(self, flags: AuditFlags) -> Path | None:
        """Where the node keeps the policy the API server is told to read."""
        if flags.policy_file is None:
            return None
        if self.distro == "kubeadm":
            host = kubeadm.read_static_pod(self.target).host_path(flags.policy_file)
            return None if host is None else self.host(host)
        return self.host(flags.policy_file)

    def log_on_host(self, flags: AuditFlags) -> Path | None:
        if flags.log_path is None or flags.log_path == "-":
            return None
        if self.distro == "kubeadm":
            host = kubeadm.read_static_pod(self.target).host_path(flags.log_path)
            return None if host is None else self.host(host)
        return self.host(flags.log_path)

    def _rancher(self) -> rancher.RancherConfig:
        return rancher.read_config(rancher.DISTRIBUTIONS[self.distro], self.target)

    # -- planning --------------------------------------------------------------------------------

    def plan(self) -> tuple[ManifestEdit, kubeadm.AuditTarget]:
        if self.distro == "kubeadm":
            pod = kubeadm.read_static_pod(self.target)
            target = kubeadm.KUBEADM_TARGET
            flags = pod.flags
            planned = kubeadm.AuditTarget(
                policy_path=PurePosixPath(flags.get("audit-policy-file") or target.policy_path),
                log_path=PurePosixPath(flags.get("audit-log-path") or target.log_path),
            )
            return kubeadm.plan_enable(pod, target), planned
        config = self._rancher()
        return rancher.plan_enable(config), config.distro.target

    def endpoint(self, wait: WaitSettings) -> Endpoint:
        if self.distro == "kubeadm":
            flags = kubeadm.read_static_pod(self.target).flags
            address = flags.get("advertise-address") or "127.0.0.1"
            url = f"https://{address}:{flags.get('secure-port', '6443')}"
            ca = flags.get("client-ca-file")
            pod = kubeadm.read_static_pod(self.target)
            ca_host = pod.host_path(ca) if ca else None
            ca_file = self.host(ca_host) if ca_host else None
        else:
            url = "https://127.0.0.1:6443"
            ca_file = self.host(rancher.DISTRIBUTIONS[self.distro].server_ca)
        return Endpoint(wait.apiserver_url or url, wait.ca_file or ca_file)

    # -- enable ----------------------------------------------------------------------------------

    def enable(
        self, store: BackupStore, policy: bytes, wait: WaitSettings, dry_run: bool
    ) -> Outcome:
        """Turns audit logging on (the caller checked it is off) and waits for it to work."""
        original = self._read_target()
        edit, planned = self.plan()
        policy_path = self.host(planned.policy_path)
        log_dir = self.host(planned.log_path.parent)
        outcome = Outcome("enabled", self.distro, str(self.target), list(edit.changes))
        outcome.diff = unified_diff(original.decode(), edit.text, str(self.target))
        if dry_run:
            outcome.action = "dry-run"
            outcome.changes.append(f"would install the audit policy at {planned.policy_path}")
            return outcome
        outcome.changes.append(f"installed the audit policy at {planned.policy_path}")
        check_writable(self.target.parent)
        remove_stale_temporary(self.target)
        record = self._record(edit, original, policy_path, policy)
        originals = {str(self.target): original} if original else {}
        if policy_path.exists():
            originals[str(policy_path)] = policy_path.read_bytes()
        store.save(record, originals)
        policy_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(policy_path, policy, mode=0o600)
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.target, edit.text.encode(), mode=0o600)
        return self._await_or_restore(store, outcome, wait, self.host(planned.log_path))

    def replace_policy(
        self, store: BackupStore, policy: bytes, wait: WaitSettings, dry_run: bool
    ) -> Outcome:
        """Audit logging is on: the node's policy file gets ``policy``, and the API server is
        restarted to read it (kubeadm: an annotation with the policy's checksum changes the
        pod, so the kubelet restarts it; k3s and RKE2: the restart command)."""
        flags = self.audit_flags()
        policy_path = self.policy_on_host(flags)
        if policy_path is None:
            raise AuditSetupError(
                f"the policy file {flags.policy_file} is not on a hostPath volume of "
                f"{self.target}; replace it by hand"
            )
        outcome = Outcome("policy-replaced", self.distro, str(self.target))
        current = policy_path.read_bytes() if policy_path.exists() else b""
        if current == policy:
            outcome.action = "unchanged"
            outcome.notes.append(f"{policy_path} already holds the required policy")
            return outcome
        original = self._read_target()
        written = original
        if self.distro == "kubeadm":
            pod = kubeadm.read_static_pod(self.target)
            edit = kubeadm.plan_policy_restart(pod, sha256(policy))
            written = edit.text.encode()
            outcome.changes += list(edit.changes)
        outcome.diff = unified_diff(
            current.decode(errors="replace"), policy.decode(), str(policy_path)
        )
        outcome.diff += unified_diff(original.decode(), written.decode(), str(self.target))
        outcome.changes.append(f"replaced the policy {policy_path}")
        if dry_run:
            outcome.action = "dry-run"
            return outcome
        check_writable(policy_path.parent)
        files = [FileChange(str(policy_path), sha256(current) if current else None, sha256(policy))]
        originals = {str(policy_path): current} if current else {}
        if written != original:
            check_writable(self.target.parent)
            files.append(FileChange(str(self.target), sha256(original), sha256(written)))
            originals[str(self.target)] = original
        store.save(BackupRecord(self.distro, list(outcome.changes), files), originals)
        atomic_write(policy_path, policy)
        if written != original:
            atomic_write(self.target, written)
        log = self.log_on_host(flags)
        if log is None:
            outcome.notes.append("the audit log is not on a hostPath: not waited")
            return outcome
        return self._await_or_restore(store, outcome, wait, log)

    def _read_target(self) -> bytes:
        try:
            return self.target.read_bytes()
        except FileNotFoundError:
            if self.distro == "kubeadm":
                raise AuditSetupError(f"{self.target}: no such file") from None
            return b""

    def _record(
        self, edit: ManifestEdit, original: bytes, policy_path: Path, policy: bytes
    ) -> BackupRecord:
        files = [
            FileChange(
                path=str(self.target),
                original_sha256=sha256(original) if original else None,
                written_sha256=sha256(edit.text.encode()),
            ),
            FileChange(
                path=str(policy_path),
                original_sha256=sha256(policy_path.read_bytes()) if policy_path.exists() else None,
                written_sha256=sha256(policy),
            ),
        ]
        return BackupRecord(distro=self.distro, changes=list(edit.changes), files=files)

    def _await_or_restore(
        self, store: BackupStore, outcome: Outcome, wait: WaitSettings, log: Path
    ) -> Outcome:
        if not wait.enabled:
            outcome.notes.append(self._apply_hint())
            return outcome
        self._restart()
        reason = await_audited(self.endpoint(wait), log, wait.timeout)
        if reason is None:
            outcome.notes.append(f"the API server answers /readyz and writes {log}")
            return outcome
        restored = self.rollback(store, wait, force=True)
        outcome.action = "rolled-back"
        outcome.reason = reason
        outcome.notes += [f"restored the backup: {change}" for change in restored.changes]
        outcome.notes += restored.notes
        outcome.exit_code = EXIT_FAILED
        return outcome

    def _apply_hint(self) -> str:
        if self.distro == "kubeadm":
            return (
                "not waited (--no-wait): the kubelet restarts kube-apiserver from the new manifest"
            )
        return f"not waited (--no-wait): restart the server to apply it ({self.restart_command})"

    def _restart(self) -> None:
        """k3s and RKE2 read their config at start; the kubelet restarts a static pod itself."""
        if self.distro == "kubeadm" or not self.restart_command:
            return
        result = subprocess.run(
            shlex.split(self.restart_command), check=False, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise AuditSetupError(
                f"{self.restart_command}: exit status {result.returncode}: {result.stderr.strip()}"
            )

    # -- rollback --------------------------------------------------------------------------------

    def rollback(self, store: BackupStore, wait: WaitSettings, force: bool) -> Outcome:
        """Restores every file ``enable`` wrote, byte for byte, and removes what it created."""
        outcome = Outcome("rolled-back", self.distro, str(self.target))
        record = store.active()
        if record is None:
            return _nothing_to_roll_back(store, outcome)
        restore = _restorations(store, record, force)
        for path, data, change in restore:
            if data is None:
                path.unlink(missing_ok=True)
                outcome.changes.append(f"removed {path} (created by enable)")
                continue
            atomic_write(path, data)
            if sha256(path.read_bytes()) != change.original_sha256:
                raise AuditSetupError(f"{path}: restored bytes do not match the backup's sha256")
            outcome.changes.append(f"restored {path} (sha256 {change.original_sha256})")
        store.retire(record, "restored")
        if wait.enabled:
            self._restart()
            reason = await_ready(self.endpoint(wait), wait.timeout)
            if reason is not None:
                outcome.reason = reason
                outcome.exit_code = EXIT_FAILED
        return outcome


def _nothing_to_roll_back(store: BackupStore, outcome: Outcome) -> Outcome:
    done = store.rolled_back()
    if done is None:
        raise AuditSetupError(
            f"{store.slot}: no backup here; auditrelay enabled nothing on this node "
            "(or --backup-dir names another directory)"
        )
    outcome.action = "nothing-to-do"
    outcome.notes.append(f"already rolled back at {done.get('rolledBackAt')}")
    return outcome


def _restorations(
    store: BackupStore, record: BackupRecord, force: bool
) -> list[tuple[Path, bytes | None, FileChange]]:
    """Every file to put back, checked before any is written: originals intact, and the
    files as enable left them (unless ``force``)."""
    found = []
    for change in record.files:
        path = Path(change.path)
        current = path.read_bytes() if path.exists() else None
        if current is not None and sha256(current) != change.written_sha256 and not force:
            raise RollbackRefusedError(
                f"{path} changed since auditrelay enabled audit logging on {record.created_at} "
                f"(sha256 {sha256(current)[:12]}..., enable wrote {change.written_sha256[:12]}...); "
                "restoring would undo that change. Check it, then use --force"
            )
        data = None if change.created else store.original(change)
        found.append((path, data, change))
    return found


def unified_diff(before: str, after: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"{name} (now)",
            tofile=f"{name} (after enable)",
        )
    )
