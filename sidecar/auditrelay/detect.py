"""Runs the detection rules locally: the auditrelay table in DuckDB, the rules' KQL through duckdb-kql.

The table is built from the one stream definition (``stream.COLUMNS``): the same column names,
``dynamic`` columns as DuckDB JSON, ``datetime`` columns as timestamps. Rows come from audit
log lines (encoded by ``stream.RowEncoder`` exactly as the sidecar encodes them for the
workspace) or from the bundled emulator's store (the rows as delivered).

Each rule runs once over every loaded row, with ``now`` set just after the newest row, so that
a rule's ``ago()`` windows cover the logs however old they are. Every result row of a rule is
an alert; its evidence is the ``AuditIds`` column.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import duckdb_kql
import orjson

from auditrelay.detections import EVIDENCE_COLUMN, Rule
from auditrelay.errors import AuditRelayError
from auditrelay.model import AuditEvent
from auditrelay.stream import COLUMNS, TABLE_NAME, RowEncoder

if TYPE_CHECKING:
    from duckdb import DuckDBPyConnection

_DUCKDB_TYPES: Final = {
    "string": "VARCHAR",
    "datetime": "TIMESTAMP",
    "dynamic": "JSON",
    "int": "INTEGER",
    "long": "BIGINT",
    "real": "DOUBLE",
    "boolean": "BOOLEAN",
}
NOW_MARGIN: Final = timedelta(seconds=1)


class DetectError(AuditRelayError):
    """A rule the local engine could not run; the message names the rule's file."""


@dataclass(frozen=True, slots=True)
class Alert:
    """One result row of one rule: what fired, on what, with which requests as evidence."""

    rule: Rule
    columns: Mapping[str, Any]
    audit_ids: tuple[str, ...]

    def entities_text(self) -> str:
        """``Account=..., Cluster_Name=...``: the values of the columns the entities map."""
        shown = []
        for entity in self.rule.entities:
            for _, column in entity.fields:
                value = self.columns.get(column)
                if value not in (None, ""):
                    shown.append(f"{column}={value}")
        return ", ".join(dict.fromkeys(shown))

    def to_json(self) -> dict[str, Any]:
        """The alert as the ``--output json`` line shows it."""
        return {
            "rule": self.rule.slug,
            "id": self.rule.id,
            "name": self.rule.name,
            "severity": self.rule.severity,
            "defenderAlerts": list(self.rule.defender_alerts),
            "auditIds": list(self.audit_ids),
            "columns": {key: _jsonable(value) for key, value in self.columns.items()},
        }


@dataclass(slots=True)
class Table:
    """The auditrelay table in an in-memory DuckDB, and what could not go into it."""

    connection: DuckDBPyConnection
    rows: int = 0
    newest: datetime | None = None
    skipped: list[str] = field(default_factory=list)  # "FILE:LINE: why"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _cell(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "dynamic":
        return orjson.dumps(value).decode()
    if kind == "datetime":
        return _timestamp(value)
    return value


def new_table() -> Table:
    """An empty auditrelay table with the stream's columns."""
    connection = duckdb_kql.connect()
    declared = ", ".join(f'"{c.name}" {_DUCKDB_TYPES[c.type]}' for c in COLUMNS)
    connection.execute(f'CREATE TABLE "{TABLE_NAME}" ({declared})')
    return Table(connection)


def add_rows(table: Table, rows: Iterable[Mapping[str, Any]]) -> None:
    """Inserts workspace rows (column name -> value, as delivered)."""
    placeholders = ", ".join("?" for _ in COLUMNS)
    batch = []
    for row in rows:
        values = [_cell(column.type, row.get(column.name)) for column in COLUMNS]
        batch.append(values)
        generated = values[0]
        if isinstance(generated, datetime) and (table.newest is None or generated > table.newest):
            table.newest = generated
    if batch:
        # Only our own constants go into the statement; the values are bound parameters.
        insert = f'INSERT INTO "{TABLE_NAME}" VALUES ({placeholders})'  # noqa: S608
        table.connection.executemany(insert, batch)
        table.rows += len(batch)


def rows_from_audit_lines(
    table: Table, lines: Iterable[tuple[str, bytes]], cluster_name: str
) -> list[dict[str, Any]]:
    """Audit log lines (``(where, line)``) encoded as the sidecar encodes them for the table.

    A line that is not a JSON object is recorded in ``table.skipped`` and left out.
    """
    encoder = RowEncoder(cluster_name, "")
    rows = []
    for where, line in lines:
        try:
            fields = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            table.skipped.append(f"{where}: not JSON ({error})")
            continue
        if not isinstance(fields, dict) or "auditID" not in fields:
            table.skipped.append(f"{where}: not an audit event (no auditID)")
            continue
        rows.append(orjson.loads(encoder.encode(AuditEvent(fields, bytes(line)))))
    return rows


def run_rule(table: Table, rule: Rule) -> list[Alert]:
    """The alerts of one rule over the whole table."""
    now = (table.newest or datetime.now(UTC).replace(tzinfo=None)) + NOW_MARGIN
    try:
        relation = duckdb_kql.kql(table.connection, rule.query, query_now=now)
        names = list(relation.columns)
        found = relation.fetchall()
    except Exception as error:  # duckdb-kql and DuckDB raise many types; the rule is named
        raise DetectError(
            f"{rule.path}: the local KQL engine cannot run the query: {error}"
        ) from error
    if EVIDENCE_COLUMN not in names:
        raise DetectError(f"{rule.path}: the query's result has no {EVIDENCE_COLUMN} column")
    alerts = []
    for values in found:
        columns = dict(zip(names, values, strict=True))
        evidence = _jsonable(columns[EVIDENCE_COLUMN])
        audit_ids = (
            tuple(sorted(str(item) for item in evidence)) if isinstance(evidence, list) else ()
        )
        alerts.append(Alert(rule, columns, audit_ids))
    return alerts


def run_rules(table: Table, rules: Sequence[Rule]) -> dict[str, list[Alert]]:
    """Every rule's alerts, by rule slug (rules that raised none map to an empty list)."""
    return {rule.slug: run_rule(table, rule) for rule in rules}
