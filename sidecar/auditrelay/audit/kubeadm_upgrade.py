"""kubeadm: the audit settings kept for ``kubeadm upgrade``, in the kubeadm-config ConfigMap.

``kubeadm upgrade`` writes the API server's manifest again from the ClusterConfiguration in
``kube-system/kubeadm-config``; without the audit flags there it turns audit logging off.

* ``--cluster-config FILE`` (offline): the document in FILE gets the settings and is written
  beside the backup, with the command that applies it.
* ``--no-wait`` without it (offline): the cluster is not asked; the output says so.
* Otherwise, once this node's API server answers again with audit logging on: through the API
  (``audit.kubeadm_config``), and ``rollback`` restores it.

The settings are the ones the manifest runs with after ``enable`` (its policy file, log path and
rotation), so an operator's own paths are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import PurePosixPath

from auditrelay.audit import kubeadm_config
from auditrelay.audit.backup import BackupStore
from auditrelay.audit.errors import AuditSetupError
from auditrelay.audit.kubeadm import (
    KUBEADM_TARGET,
    AuditTarget,
    plan_cluster_configuration,
    read_static_pod,
)
from auditrelay.audit.node import EXIT_FAILED, NodeSetup, Outcome


def planned_target(setup: NodeSetup) -> AuditTarget:
    """The audit settings of the node's manifest, kubeadm's defaults where one is not set."""
    flags = read_static_pod(setup.target).flags
    default = KUBEADM_TARGET

    def number(name: str, fallback: int) -> int:
        value = flags.get(name, "")
        return int(value) if value.isdigit() else fallback

    return AuditTarget(
        policy_path=PurePosixPath(flags.get("audit-policy-file") or default.policy_path),
        log_path=PurePosixPath(flags.get("audit-log-path") or default.log_path),
        max_age_days=number("audit-log-maxage", default.max_age_days),
        max_backups=number("audit-log-maxbackup", default.max_backups),
        max_size_mb=number("audit-log-maxsize", default.max_size_mb),
    )


def keep_for_upgrade(
    args: argparse.Namespace, setup: NodeSetup, store: BackupStore, outcome: Outcome
) -> None:
    """After ``enable`` turned audit logging on here: the kubeadm-config ConfigMap too."""
    if setup.distro != "kubeadm" or outcome.exit_code != 0:
        return
    if outcome.action in ("policy-replaced", "unchanged"):
        return
    if args.cluster_config is not None:
        _to_file(args, setup, store, outcome)
    elif args.no_wait:
        outcome.notes.append(
            "kubeadm-config not changed (--no-wait: the cluster is not asked); kubeadm upgrade "
            "writes the manifest again from it: run enable once more with the API server up, "
            "or pass its ClusterConfiguration with --cluster-config"
        )
    else:
        _through_the_api(args, setup, store, outcome)


def finish_for_upgrade(
    args: argparse.Namespace, setup: NodeSetup, store: BackupStore, outcome: Outcome
) -> None:
    """Audit logging is on: if an earlier ``enable`` here turned it on but could not change
    the ConfigMap (offline, or the cluster did not answer), this run does it."""
    finished = setup.distro != "kubeadm" or kubeadm_config.has_backup(store.slot)
    if finished or store.active() is None:
        return
    if args.cluster_config is not None:
        _to_file(args, setup, store, outcome)
    elif not args.no_wait:
        _through_the_api(args, setup, store, outcome)


def restore_for_upgrade(
    args: argparse.Namespace, setup: NodeSetup, store: BackupStore, outcome: Outcome
) -> None:
    """``rollback``, before the node's files (whose restore restarts the API server): restores
    the ConfigMap enable changed from this node. Changed since enable: refused, nothing written
    (RollbackRefusedError). The cluster does not answer, or a damaged backup: the node's files
    are restored all the same, the ConfigMap's backup stays for the next rollback, and the run
    exits 1 with the reason (set in ``outcome``, which the caller merges into the node's)."""
    if setup.distro != "kubeadm" or not kubeadm_config.has_backup(store.slot):
        return
    if args.dry_run:
        outcome.notes.append(f"would restore {kubeadm_config.WHERE}")
        return
    try:
        api = kubeadm_config.connect(args.kubeconfig, args.host_root)
        outcome.changes += kubeadm_config.rollback(api, store.slot, args.force).changes
    except AuditSetupError as error:
        outcome.reason = (
            f"kubeadm-config not restored: {error}; its backup is kept in {store.slot}: "
            "run rollback again"
        )
        outcome.exit_code = EXIT_FAILED


def _to_file(
    args: argparse.Namespace, setup: NodeSetup, store: BackupStore, outcome: Outcome
) -> None:
    try:
        text = args.cluster_config.read_text(encoding="utf-8")
    except OSError as error:
        raise AuditSetupError(
            f"--cluster-config {args.cluster_config}: {error.strerror}"
        ) from error
    edit = plan_cluster_configuration(text, str(args.cluster_config), planned_target(setup))
    outcome.changes += [f"ClusterConfiguration: {change}" for change in edit.changes]
    if args.dry_run:
        return
    written = store.slot / "cluster-configuration.yaml"
    written.write_text(edit.text, encoding="utf-8")
    outcome.notes.append(
        f"the ClusterConfiguration with the audit settings is in {written}; apply it with: "
        "kubectl -n kube-system create configmap kubeadm-config --dry-run=client -o yaml "
        f"--from-file=ClusterConfiguration={written} | kubectl apply -f -"
    )


def _through_the_api(
    args: argparse.Namespace, setup: NodeSetup, store: BackupStore, outcome: Outcome
) -> None:
    try:
        api = kubeadm_config.connect(args.kubeconfig, args.host_root)
        found = kubeadm_config.enable(api, store.slot, planned_target(setup), args.dry_run)
    except AuditSetupError as error:
        if args.dry_run:
            outcome.notes.append(f"kubeadm-config: cannot plan its change: {error}")
            return
        warning = (
            f"kubeadm-config NOT changed: {error}. kubeadm upgrade would turn audit logging "
            "off again: run enable once more when the cluster answers, or pass the "
            "ClusterConfiguration with --cluster-config and apply the file it writes"
        )
        print(f"auditrelay audit enable: warning: {warning}", file=sys.stderr)
        outcome.notes.append(warning)
        return
    outcome.changes += [f"{kubeadm_config.WHERE}: {change}" for change in found.changes]
    if found.action == "unchanged":
        outcome.notes.append(f"{kubeadm_config.WHERE} already has the audit settings")
    elif found.conflicts:
        outcome.notes.append(
            f"{kubeadm_config.WHERE}: written after {found.conflicts} conflict(s) with "
            "another writer"
        )
