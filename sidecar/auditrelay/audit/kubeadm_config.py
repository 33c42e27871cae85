"""kubeadm: the audit settings in the ``kube-system/kubeadm-config`` ConfigMap, through the API.

``kubeadm upgrade`` writes the API server's manifest again from the ClusterConfiguration kept in
that ConfigMap; without the audit flags there it silently turns audit logging off. ``enable``
adds them (``kubeadm.plan_cluster_configuration``: v1beta3 and v1beta4 shapes) and ``rollback``
puts the original document back. Both keep the original beside the node's backup, and both
write with the resourceVersion they read: a 409 Conflict (someone else wrote in between) means
reading again and deciding again.

The credentials: ``--kubeconfig``, else the node's ``/etc/kubernetes/admin.conf`` (every
kubeadm control-plane node has it, and whoever may edit the static pod manifest is already
root there), else the pod's service account.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from auditrelay.audit.errors import AuditSetupError, BackupError, RollbackRefusedError
from auditrelay.audit.files import atomic_write, sha256
from auditrelay.audit.kubeadm import AuditTarget, plan_cluster_configuration

NAMESPACE: Final = "kube-system"
NAME: Final = "kubeadm-config"
KEY: Final = "ClusterConfiguration"
NODE_ADMIN_KUBECONFIG: Final = Path("etc/kubernetes/admin.conf")
RECORD: Final = "kubeadm-config.json"
ORIGINAL: Final = "kubeadm-config-original.yaml"
ROLLED_BACK: Final = "kubeadm-config-rolled-back.json"
ATTEMPTS: Final = 5
REQUEST_TIMEOUT_SECONDS: Final = 30.0  # the client's default is to wait for ever
WHERE: Final = f"configmap {NAMESPACE}/{NAME}"


class ConfigMaps(Protocol):
    """The two calls of kubernetes.client.CoreV1Api this module makes."""

    def read_namespaced_config_map(self, name: str, namespace: str, **options: Any) -> Any: ...

    def replace_namespaced_config_map(
        self, name: str, namespace: str, body: Any, **options: Any
    ) -> Any: ...


def connect(kubeconfig: Path | None, host_root: Path) -> ConfigMaps:
    """A CoreV1Api from ``kubeconfig``, the node's admin.conf, or the pod's service account."""
    node_admin = host_root / NODE_ADMIN_KUBECONFIG
    chosen = kubeconfig or (node_admin if node_admin.is_file() else None)
    try:
        if chosen is not None:
            api_client = config.new_client_from_config(config_file=str(chosen))
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
    except (config.ConfigException, OSError) as error:
        where = chosen or f"{node_admin} (absent) or the pod's service account"
        raise AuditSetupError(f"cannot reach the cluster with {where}: {error}") from error
    api: ConfigMaps = client.CoreV1Api(api_client)
    return api


@dataclass
class ConfigMapOutcome:
    """What a run did to the kubeadm-config ConfigMap."""

    action: str
    changes: list[str] = field(default_factory=list)
    conflicts: int = 0
    text: str = ""


def enable(api: ConfigMaps, slot: Path, target: AuditTarget, dry_run: bool) -> ConfigMapOutcome:
    """Adds the audit settings to the ClusterConfiguration; the original is kept in ``slot``."""
    for attempt in range(ATTEMPTS):
        found = _read(api)
        current = _document(found)
        edit = plan_cluster_configuration(current, WHERE, target)
        outcome = ConfigMapOutcome("unchanged", list(edit.changes), attempt, edit.text)
        if not edit.changes:
            return outcome
        outcome.action = "dry-run" if dry_run else "updated"
        if dry_run:
            return outcome
        _keep_original(slot, current, edit.text, outcome.changes)
        found.data[KEY] = edit.text
        if _replaced(api, found):
            return outcome
    raise AuditSetupError(f"{WHERE}: {ATTEMPTS} writes in a row met a conflict")


def has_backup(slot: Path) -> bool:
    return (slot / RECORD).is_file()


def rollback(api: ConfigMaps, slot: Path, force: bool) -> ConfigMapOutcome:
    """Puts the original ClusterConfiguration back; refuses when it changed since enable."""
    record = _record(slot)
    original = _original(slot, record)
    for attempt in range(ATTEMPTS):
        found = _read(api)
        current = _document(found)
        if sha256(current.encode()) != record["writtenSha256"] and not force:
            raise RollbackRefusedError(
                f"{WHERE}: its {KEY} changed since auditrelay enabled audit logging on "
                f"{record['createdAt']}; restoring would undo that change. Check it, then use "
                "--force"
            )
        found.data[KEY] = original
        if _replaced(api, found):
            note = {"rolledBackAt": _now(), "record": record}
            atomic_write(slot / ROLLED_BACK, orjson.dumps(note, option=orjson.OPT_INDENT_2))
            (slot / RECORD).unlink()
            (slot / ORIGINAL).unlink()
            changes = [f"{WHERE}: restored {KEY} (sha256 {record['originalSha256']})"]
            return ConfigMapOutcome("rolled-back", changes, attempt)
    raise AuditSetupError(f"{WHERE}: {ATTEMPTS} writes in a row met a conflict")


def _read(api: ConfigMaps) -> Any:
    try:
        return api.read_namespaced_config_map(
            NAME, NAMESPACE, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
    except ApiException as error:
        raise AuditSetupError(
            f"{WHERE}: cannot read it ({error.status} {error.reason}); is this a kubeadm "
            "cluster, and may this identity get configmaps in kube-system?"
        ) from error
    except HTTPError as error:
        raise AuditSetupError(f"{WHERE}: cannot reach the API server: {error}") from error


def _document(found: Any) -> str:
    text = (found.data or {}).get(KEY)
    if not isinstance(text, str):
        raise AuditSetupError(f"{WHERE}: data.{KEY}: missing (kubeadm init writes it)")
    return text


def _replaced(api: ConfigMaps, body: Any) -> bool:
    """True when written; False on 409 Conflict (the resourceVersion is stale: read again)."""
    try:
        api.replace_namespaced_config_map(
            NAME, NAMESPACE, body, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
    except ApiException as error:
        if error.status == 409:
            return False
        raise AuditSetupError(f"{WHERE}: write refused ({error.status} {error.reason})") from error
    except HTTPError as error:
        raise AuditSetupError(f"{WHERE}: cannot reach the API server: {error}") from error
    return True


def _keep_original(slot: Path, original: str, written: str, changes: list[str]) -> None:
    """The original first, then the record naming it: a record always has its original."""
    slot.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(slot / ORIGINAL, original.encode())
    record = {
        "configMap": f"{NAMESPACE}/{NAME}",
        "key": KEY,
        "originalSha256": sha256(original.encode()),
        "writtenSha256": sha256(written.encode()),
        "changes": changes,
        "createdAt": _now(),
    }
    atomic_write(slot / RECORD, orjson.dumps(record, option=orjson.OPT_INDENT_2))


def _record(slot: Path) -> dict[str, Any]:
    path = slot / RECORD
    try:
        found: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError as error:
        raise BackupError(f"{path}: no backup of {WHERE} here") from error
    except orjson.JSONDecodeError as error:
        raise BackupError(f"{path}: not a backup record auditrelay wrote: {error}") from error
    return found


def _original(slot: Path, record: dict[str, Any]) -> str:
    path = slot / ORIGINAL
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise BackupError(f"{path}: the backup of {WHERE} is missing; nothing restored") from error
    if sha256(data) != record.get("originalSha256"):
        raise BackupError(
            f"{path}: the backup of {WHERE} does not match its recorded sha256 "
            f"{record.get('originalSha256')} (it was altered); nothing restored"
        )
    return data.decode()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
