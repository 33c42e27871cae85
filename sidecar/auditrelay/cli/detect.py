"""``auditrelay detect``: run the detection rules locally over audit logs or the emulator's store.

auditrelay detect [--rules DIR_OR_FILE] [--output text|json] AUDIT_LOG ...
auditrelay detect [--rules DIR_OR_FILE] --emulator-state-dir DIR

Audit log lines (JSON lines, plain or .gz) become rows exactly as the sidecar encodes them for
the workspace; with ``--emulator-state-dir`` the rows are those the bundled emulator stored.
Each rule's KQL runs over every row (duckdb-kql on DuckDB), with ``ago()`` counted from the
newest row. Every alert names its rule and its evidence, the auditIDs of the requests that
raised it. Exit 0: no alert; 1: alerts; 2: bad input (a rule, a file, a line that is not an
audit event: named on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from auditrelay.cli import (
    EXIT_BAD_INPUT,
    EXIT_FINDING,
    EXIT_OK,
    add_output_option,
    emulator_store,
    plain,
    read_audit_log,
)
from auditrelay.detections import BUNDLED_RULES, Rule, load_rules
from auditrelay.errors import AuditRelayError, ConfigError, PropertyProblem

if TYPE_CHECKING:  # the engine needs duckdb-kql, an optional extra; imported when run
    from auditrelay.detect import Alert, Table

EXIT_NO_ALERT: Final = EXIT_OK
EXIT_ALERTS: Final = EXIT_FINDING
EVIDENCE_SHOWN: Final = 5


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``auditrelay detect``."""
    parser = subparsers.add_parser(
        "detect",
        help="run the detection rules (KQL) locally over audit logs or the emulator's store",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "audit_logs", nargs="*", type=Path, metavar="AUDIT_LOG", help="audit log files (.gz too)"
    )
    parser.add_argument(
        "--rules",
        type=Path,
        default=BUNDLED_RULES,
        help="a rule file or a directory of them (default: the bundled detections/)",
    )
    parser.add_argument(
        "--emulator-state-dir",
        type=Path,
        help="read the rows the bundled emulator stored in this state directory",
    )
    parser.add_argument(
        "--cluster-name",
        default="local",
        help="Cluster_Name of rows made from audit logs (default: local)",
    )
    add_output_option(parser)
    parser.set_defaults(run=run)


def audit_log_lines(paths: Sequence[Path]) -> Iterator[tuple[str, bytes]]:
    """``("FILE:LINE", line)`` for every non-empty line; ``.gz`` files are decompressed."""
    for path in paths:
        data = read_audit_log("AUDIT_LOG", path)
        for number, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                yield f"{path}:{number}", line


def load_table(args: argparse.Namespace) -> Table:
    """The rows to run the rules over, from the store or from the audit logs."""
    from auditrelay.detect import add_rows, new_table, rows_from_audit_lines

    table = new_table()
    if args.emulator_state_dir is not None:
        if args.audit_logs:
            raise ConfigError(
                [PropertyProblem("AUDIT_LOG", "given", "either audit logs or --emulator-state-dir")]
            )
        store = emulator_store("--emulator-state-dir", args.emulator_state_dir)
        add_rows(table, (row.row for row in store.rows() if row.row is not None))
        return table
    if not args.audit_logs:
        raise ConfigError(
            [PropertyProblem("AUDIT_LOG", "none", "audit log files or --emulator-state-dir")]
        )
    lines = audit_log_lines(args.audit_logs)
    add_rows(table, rows_from_audit_lines(table, lines, args.cluster_name))
    return table


def print_table(rules: Sequence[Rule], alerts: dict[str, list[Alert]], table: Table) -> None:
    """One block per alert, then the count per rule."""
    fired = [alert for rule in rules for alert in alerts[rule.slug]]
    for alert in fired:
        ids = alert.audit_ids
        more = f" (+{len(ids) - EVIDENCE_SHOWN} more)" if len(ids) > EVIDENCE_SHOWN else ""
        print(f"{alert.rule.severity.upper():<13} {alert.rule.slug}: {alert.rule.name}")
        print(f"{'':14}{alert.entities_text()}")
        print(f"{'':14}evidence auditIDs: {', '.join(ids[:EVIDENCE_SHOWN])}{more}")
    print()
    print(
        f"{len(fired)} alert(s) from {sum(1 for r in rules if alerts[r.slug])} of "
        f"{len(rules)} rules over {table.rows} rows."
    )


def _json_report(rules: Sequence[Rule], alerts: dict[str, list[Alert]], table: Table) -> Any:
    return {
        "rows": table.rows,
        "skipped": table.skipped,
        "rules": {rule.slug: len(alerts[rule.slug]) for rule in rules},
        "alerts": [alert.to_json() for rule in rules for alert in alerts[rule.slug]],
    }


def run(args: argparse.Namespace) -> int:
    """Loads rules and rows, runs every rule, prints the alerts."""
    rules = load_rules(args.rules)
    try:
        from auditrelay.detect import run_rules
    except ImportError as error:
        raise AuditRelayError(
            f"the local KQL engine is not installed ({error}): pip install 'auditrelay[detect]'"
        ) from error
    table = load_table(args)
    alerts = run_rules(table, rules)
    if args.output == "json":
        print(json.dumps(_json_report(rules, alerts, table), indent=2))
    else:
        print_table(rules, alerts, table)
    for skipped in table.skipped:
        print(f"auditrelay detect: {skipped}", file=sys.stderr)
    if table.skipped:
        return EXIT_BAD_INPUT
    return EXIT_ALERTS if any(alerts.values()) else EXIT_NO_ALERT
