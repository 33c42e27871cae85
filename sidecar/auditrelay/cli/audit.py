"""``auditrelay audit status|enable|rollback``: API-server audit logging on a control-plane node.

* ``status`` reports how this node runs its API server (kubeadm static pod, k3s or RKE2 config;
  OpenShift's APIServer resource), whether audit logging is on, its policy, log path, format and
  rotation, and the ``policy verify`` verdict of that policy against the required one.
  Exit status: 0 on, 1 off or on but with gaps, 2 bad input or cannot tell.
* ``enable`` turns it on where it is off, keeps a backup, waits for the API server to come back
  writing its log, and restores the backup when it does not. Already on: changes nothing and
  prints the verdict. Exit status: 0 done or nothing to do, 1 rolled back, 2 bad input.
* ``rollback`` restores what ``enable`` changed, byte for byte. Exit status as for enable.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Final

import orjson

from auditrelay.audit import kubeadm_upgrade, openshift, rancher
from auditrelay.audit.backup import DEFAULT_BACKUP_DIR, BackupStore
from auditrelay.audit.errors import AuditSetupError, RollbackRefusedError
from auditrelay.audit.files import node_lock
from auditrelay.audit.kubeadm import DEFAULT_MANIFEST
from auditrelay.audit.node import NodeSetup, Outcome, WaitSettings
from auditrelay.audit.status import assess
from auditrelay.cli import EXIT_BAD_INPUT, EXIT_FINDING, EXIT_OK, add_output_option
from auditrelay.config import BUNDLED_POLICY
from auditrelay.errors import PolicyError
from auditrelay.policy import parse_policy

EXIT_ON: Final = EXIT_OK
EXIT_GAPS: Final = EXIT_FINDING
EXIT_OFF: Final = EXIT_FINDING
EXIT_CANNOT_TELL: Final = EXIT_BAD_INPUT
DISTROS: Final = ("auto", "kubeadm", "k3s", "rke2", "openshift")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``auditrelay audit`` and its three sub-commands."""
    parser = subparsers.add_parser(
        "audit",
        help="turn API-server audit logging on where it is off, with a backup and rollback",
        description="Report, turn on and roll back kube-apiserver audit logging on this node.",
    )
    parser.set_defaults(run=run)
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="is audit logging on here, and does its policy record what Defender needs",
        description="Exit status: 0 on, 1 off or on but with gaps, 2 bad input or cannot tell.",
    )
    enable = commands.add_parser(
        "enable",
        help="turn audit logging on where it is off (backup, wait, automatic rollback)",
        description="Exit status: 0 enabled, or already on and left alone (the policy verify "
        "verdict is printed), 1 rolled back after a failed restart (the reason is printed), "
        "2 bad input.",
    )
    rollback = commands.add_parser(
        "rollback",
        help="restore what enable changed, byte for byte",
        description="Exit status: 0 restored or nothing to do, 1 refused (the file changed since "
        "enable; --force) or the API server did not come back, 2 bad input or damaged backup.",
    )
    for command in (status, enable, rollback):
        _add_common(command)
    for command in (enable, rollback):
        _add_writing(command)
    enable.add_argument(
        "--replace-policy",
        action="store_true",
        help="also when audit logging is already on: install --policy in place of the node's "
        "policy file (backed up) and restart the API server to read it",
    )
    enable.add_argument(
        "--cluster-config",
        type=Path,
        help="kubeadm, offline: the ClusterConfiguration of the kubeadm-config ConfigMap; the "
        "same settings are written beside the backup for you to apply, so kubeadm upgrade keeps "
        "them (without it, enable changes the ConfigMap through the API unless --no-wait)",
    )
    rollback.add_argument(
        "--force", action="store_true", help="restore even if the file changed since enable"
    )
    rollback.add_argument(
        "--missing-ok",
        action="store_true",
        help="no backup (enable changed nothing here) is not an error: exit 0",
    )
    status.set_defaults(action=_status)
    enable.set_defaults(action=_enable)
    rollback.set_defaults(action=_rollback)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distro", choices=DISTROS, default="auto", help="default: detected")
    parser.add_argument(
        "--manifest", type=Path, help=f"kubeadm: the static pod (default: {DEFAULT_MANIFEST})"
    )
    parser.add_argument("--config", type=Path, help="k3s or RKE2: the config file")
    parser.add_argument(
        "--host-root",
        type=Path,
        default=Path("/"),
        help="where the node's root file system is mounted (default: /)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        default=BUNDLED_POLICY,
        help="the required audit policy, installed by enable (default: the bundled one)",
    )
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        help="OpenShift: the cluster to change; kubeadm: for the kubeadm-config ConfigMap "
        "(default: the node's /etc/kubernetes/admin.conf under --host-root, else the pod's "
        "service account)",
    )
    add_output_option(parser)


def _add_writing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backup-dir",
        type=Path,
        help=f"where backups are kept (default: {DEFAULT_BACKUP_DIR} under --host-root)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the diff, write nothing")
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="do not wait for the API server (offline preparation of a node or image)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the API server to come back (default: 300)",
    )
    parser.add_argument(
        "--lock-wait",
        type=float,
        default=0.0,
        help="seconds to wait for another run on this node to finish (default: 0, refuse)",
    )
    parser.add_argument("--apiserver-url", help="default: from the manifest or distribution")
    parser.add_argument("--ca-file", type=Path, help="CA of the API server's serving certificate")
    parser.add_argument(
        "--restart-command", help="k3s/RKE2: how to restart the server (default: systemctl)"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the chosen ``auditrelay audit`` sub-command; errors become exit statuses."""
    try:
        code: int = args.action(args)
    except (AuditSetupError, PolicyError) as error:
        print(f"auditrelay audit {args.audit_command}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RollbackRefusedError as error:
        print(f"auditrelay audit {args.audit_command}: refused: {error}", file=sys.stderr)
        return EXIT_GAPS
    return code


# ---------------------------------------------------------------------------------------------
# which node, which file


def node_setup(args: argparse.Namespace) -> NodeSetup | None:
    """The node's API-server configuration, or None when none of the known ones is here."""
    distro = args.distro
    root: Path = args.host_root
    if distro == "auto":
        distro = _detect(args, root)
        if distro is None:
            return None
    if distro == "kubeadm":
        manifest = args.manifest or root / DEFAULT_MANIFEST.relative_to("/")
        return NodeSetup("kubeadm", manifest, root)
    found = rancher.DISTRIBUTIONS[distro]
    config = args.config or root / found.config.relative_to("/")
    restart = getattr(args, "restart_command", None) or found.restart_command
    return NodeSetup(distro, config, root, restart)


def _detect(args: argparse.Namespace, root: Path) -> str | None:
    if args.manifest is not None:
        return "kubeadm"
    if args.config is not None:
        for name in rancher.DISTRIBUTIONS:
            if f"/{name}/" in f"/{args.config.as_posix()}/":
                return name
        raise AuditSetupError(f"--config {args.config}: say which distribution: --distro k3s|rke2")
    for name, found in rancher.DISTRIBUTIONS.items():
        if (root / found.config.relative_to("/")).exists() or (
            root / "var/lib/rancher" / name / "server"
        ).is_dir():
            return name
    if (root / DEFAULT_MANIFEST.relative_to("/")).exists():
        return "kubeadm"
    return None


def _backup_store(args: argparse.Namespace, distro: str) -> BackupStore:
    directory = args.backup_dir or args.host_root / DEFAULT_BACKUP_DIR.relative_to("/")
    return BackupStore(directory, distro)


def _required_policy(args: argparse.Namespace) -> bytes:
    """The required policy's bytes, refused unless kube-apiserver would load it."""
    try:
        data: bytes = args.policy.read_bytes()
    except OSError as error:
        raise AuditSetupError(f"--policy {args.policy}: cannot read: {error.strerror}") from error
    for warning in parse_policy(data, str(args.policy)).warnings:
        print(f"auditrelay audit: {args.policy}: warning: {warning}", file=sys.stderr)
    return data


# ---------------------------------------------------------------------------------------------
# status


_STATE_CODES: Final = {
    "on": EXIT_ON,
    "on-but-gaps": EXIT_GAPS,
    "off": EXIT_OFF,
    "cannot-tell": EXIT_CANNOT_TELL,
}


def _status(args: argparse.Namespace) -> int:
    if args.distro == "openshift":
        return _openshift_status(args)
    setup = node_setup(args)
    if setup is None:
        report: dict[str, Any] = {
            "state": "cannot-tell",
            "problems": [
                f"no kubeadm manifest, k3s or RKE2 config under {args.host_root}; "
                "name one with --manifest, --config or --distro"
            ],
        }
    else:
        report = assess(setup, args.policy)
    _print_status(args, report)
    return _STATE_CODES[report["state"]]


def _print_status(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.output == "json":
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    print(f"audit logging: {report['state']}")
    if "distro" in report:
        print(f"distribution:  {report['distro']} ({report['file']})")
        audit = report["audit"]
        print(f"policy file:   {audit['policyFile'] or '-'}")
        print(f"log path:      {audit['logPath'] or '-'} (format {audit['logFormat']})")
        rotation = (audit["logMaxAgeDays"], audit["logMaxBackups"], audit["logMaxSizeMB"])
        if any(value is not None for value in rotation):
            shown = "max age {} days, {} backups, {} MB".format(*(v or "unset" for v in rotation))
        else:
            shown = "unset (kube-apiserver's defaults)"
        print(f"rotation:      {shown}")
    if "requestsChecked" in report:
        checked, missing = report["requestsChecked"], len(report["missing"])
        print(
            f"policy verify: {checked - missing} of {checked} request classes recorded as required, {missing} missing"
        )
        for found in report["missing"]:
            print(f"  missing: {found['request']}: {found['problem']}")
    for problem in report["problems"]:
        print(f"  {problem}")


# ---------------------------------------------------------------------------------------------
# enable and rollback


def _wait_settings(args: argparse.Namespace) -> WaitSettings:
    return WaitSettings(
        enabled=not args.no_wait,
        timeout=args.timeout,
        apiserver_url=args.apiserver_url,
        ca_file=args.ca_file,
    )


def _enable(args: argparse.Namespace) -> int:
    if args.distro == "openshift":
        return _openshift_enable(args)
    policy = _required_policy(args)
    setup = _require_setup(args)
    store = _backup_store(args, setup.distro)
    assess(setup, args.policy)  # a file that cannot be read is refused before anything is written
    with (
        node_lock(store.slot.parent, args.lock_wait)
        if not args.dry_run
        else contextlib.nullcontext()
    ):
        report = assess(setup, args.policy)
        replace = args.replace_policy or report.get("rke2PolicyMissing", False)
        if report["state"] != "off" and not replace:
            return _already_on(args, setup, report, store)
        if report["state"] != "off":
            outcome = setup.replace_policy(store, policy, _wait_settings(args), args.dry_run)
        else:
            outcome = setup.enable(store, policy, _wait_settings(args), args.dry_run)
        kubeadm_upgrade.keep_for_upgrade(args, setup, store, outcome)
    _print_outcome(args, outcome)
    return outcome.exit_code


def _already_on(
    args: argparse.Namespace, setup: NodeSetup, report: dict[str, Any], store: BackupStore
) -> int:
    outcome = Outcome("unchanged", setup.distro, str(setup.target))
    outcome.notes.append(f"audit logging is already {report['state']}: nothing changed")
    outcome.notes += [f"missing: {m['request']}: {m['problem']}" for m in report["missing"]]
    outcome.notes += report["problems"]
    kubeadm_upgrade.finish_for_upgrade(args, setup, store, outcome)
    _print_outcome(args, outcome)
    return EXIT_ON


def _rollback(args: argparse.Namespace) -> int:
    if args.distro == "openshift":
        return _openshift_rollback(args)
    setup = _require_setup(args)
    store = _backup_store(args, setup.distro)
    if args.dry_run:
        record = store.active()
        outcome = Outcome("dry-run", setup.distro, str(setup.target))
        outcome.notes.append(
            "nothing to roll back"
            if record is None
            else f"would restore: {[f.path for f in record.files]}"
        )
        kubeadm_upgrade.restore_for_upgrade(args, setup, store, outcome)
        _print_outcome(args, outcome)
        return 0
    if args.missing_ok and store.active() is None and store.rolled_back() is None:
        outcome = Outcome("nothing-to-do", setup.distro, str(setup.target))
        outcome.notes.append(f"no backup in {store.slot}: enable changed nothing on this node")
        _print_outcome(args, outcome)
        return EXIT_ON
    with node_lock(store.slot.parent, args.lock_wait):
        cluster = Outcome("rolled-back", setup.distro, str(setup.target))
        kubeadm_upgrade.restore_for_upgrade(args, setup, store, cluster)
        outcome = setup.rollback(store, _wait_settings(args), args.force)
    outcome.changes[:0] = cluster.changes
    if cluster.exit_code:  # a cluster that did not answer never keeps the node from its restore
        outcome.reason = "; ".join(filter(None, [outcome.reason, cluster.reason]))
        outcome.exit_code = cluster.exit_code
    _print_outcome(args, outcome)
    return outcome.exit_code


def _require_setup(args: argparse.Namespace) -> NodeSetup:
    setup = node_setup(args)
    if setup is None:
        raise AuditSetupError(
            f"no kubeadm manifest, k3s or RKE2 config under {args.host_root}; "
            "name one with --manifest, --config or --distro"
        )
    return setup


def _print_outcome(args: argparse.Namespace, outcome: Outcome) -> None:
    if args.output == "json":
        sys.stdout.write(
            orjson.dumps(outcome.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n"
        )
        return
    if outcome.diff:
        sys.stdout.write(outcome.diff)
    print(f"{outcome.action}: {outcome.distro} ({outcome.target})")
    for change in outcome.changes:
        print(f"  {change}")
    for note in outcome.notes:
        print(f"  {note}")
    if outcome.reason:
        print(f"reason: {outcome.reason}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# OpenShift: the APIServer resource, through the Kubernetes API


def _openshift_status(args: argparse.Namespace) -> int:
    found = openshift.status(openshift.connect(args.kubeconfig))
    state = openshift.state_of(found.profile)
    report = found.to_json() | {"state": state}
    if args.output == "json":
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"audit logging: {state}")
        print(f"distribution:  openshift ({report['target']})")
        print(f"audit profile: {found.profile}")
        for rule in found.custom_rules:
            print(f"  customRule: group {rule.get('group')} -> profile {rule.get('profile')}")
        if state != "on":
            print(f"  {found.profile} records no request bodies; Defender needs {openshift.WANTED}")
    return _STATE_CODES[state]


def _openshift_enable(args: argparse.Namespace) -> int:
    outcome = openshift.enable(openshift.connect(args.kubeconfig), dry_run=args.dry_run)
    _print_profile(args, outcome)
    return EXIT_ON


def _openshift_rollback(args: argparse.Namespace) -> int:
    outcome = openshift.rollback(openshift.connect(args.kubeconfig), force=args.force)
    _print_profile(args, outcome)
    return EXIT_ON


def _print_profile(args: argparse.Namespace, outcome: openshift.ProfileOutcome) -> None:
    report = outcome.to_json()
    if args.output == "json":
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    previous = f" (was {outcome.previous})" if outcome.previous else ""
    print(f"{outcome.action}: openshift ({report['target']}) profile {outcome.profile}{previous}")
    for note in outcome.notes:
        print(f"  {note}")
