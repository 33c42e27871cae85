"""Stream declarations and the per-row checks of the emulator's data collection rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from auditrelay.emulator.schema import (
    MAX_FIELD_BYTES,
    DeclarationError,
    RowChecker,
    StreamDeclaration,
    load_declarations,
    parse_declarations,
    shipped_declarations,
)

RECEIVED = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
COLUMNS = {
    "TimeGenerated": "datetime",
    "auditID": "string",
    "code": "int",
    "bytes": "long",
    "latency": "real",
    "allowed": "boolean",
    "stageTimestamp": "datetime",
    "user": "dynamic",
}


def checker(fill_time_generated: bool = False) -> RowChecker:
    return RowChecker(
        StreamDeclaration("Custom-T_CL", COLUMNS), fill_time_generated=fill_time_generated
    )


def good_row(**changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "TimeGenerated": "2026-05-01T11:59:00Z",
        "auditID": "a-1",
        "code": 200,
        "bytes": 10,
        "latency": 1,
        "allowed": True,
        "stageTimestamp": "2026-05-01T11:59:00.123456Z",
        "user": {"username": "admin", "groups": ["system:masters"]},
    }
    row.update(changes)
    return row


def test_dcr_resource_stream_declarations_and_plain_mapping_give_the_same_columns(
    tmp_path: Path,
) -> None:
    """A whole DCR, its streamDeclarations, and {stream: {column: type}} are all accepted."""
    columns = [{"name": "TimeGenerated", "type": "datetime"}, {"name": "auditID", "type": "string"}]
    resource = {"properties": {"streamDeclarations": {"Custom-T_CL": {"columns": columns}}}}
    path = tmp_path / "dcr.json"
    path.write_text(json.dumps(resource))
    plain = {"Custom-T_CL": {"TimeGenerated": "datetime", "auditID": "string"}}

    expected = {"TimeGenerated": "datetime", "auditID": "string"}
    assert expected == dict(load_declarations(path)["Custom-T_CL"].columns)
    assert expected == dict(parse_declarations(resource["properties"])["Custom-T_CL"].columns)
    assert expected == dict(parse_declarations(plain)["Custom-T_CL"].columns)


def test_audit_id_column_is_found_whatever_its_case() -> None:
    """The auditID column is recognised by name, case-insensitively."""
    assert "AuditId" == StreamDeclaration("S", {"AuditId": "string"}).audit_id_column
    assert StreamDeclaration("S", {"x": "string"}).audit_id_column is None


@pytest.mark.parametrize(
    ("columns", "complaint"),
    [
        ({"code": "integer"}, "column 'code' has type 'integer'"),
        ({"1st": "string"}, "column '1st' must start with a letter"),
        ({"TenantId": "string"}, "column 'TenantId' is a reserved name"),
        ({"a" * 46: "string"}, "at most 45"),
    ],
)
def test_declarations_the_service_would_refuse_name_the_column(
    columns: dict[str, str], complaint: str
) -> None:
    """A bad column type or name is refused with the column in the message."""
    with pytest.raises(DeclarationError, match=complaint):
        StreamDeclaration("Custom-T_CL", columns)


def test_unreadable_declaration_file_names_the_file(tmp_path: Path) -> None:
    """A declaration file that is not JSON is refused with its path."""
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(DeclarationError, match=r"broken\.json"):
        load_declarations(path)


def test_a_row_matching_the_declaration_is_kept_unchanged() -> None:
    """Declared columns with fitting types (an int in a real column too) pass as they are."""
    checked = checker().check([good_row()], RECEIVED)

    assert [good_row()] == checked.rows
    assert [] == checked.problems


@pytest.mark.parametrize(
    ("change", "kind", "detail"),
    [
        ({"code": "200"}, "ColumnTypeMismatch", "column code is declared int, got string"),
        ({"bytes": True}, "ColumnTypeMismatch", "column bytes is declared long, got boolean"),
        ({"latency": "fast"}, "ColumnTypeMismatch", "column latency is declared real"),
        ({"allowed": 1}, "ColumnTypeMismatch", "column allowed is declared boolean, got long"),
        ({"stageTimestamp": "yesterday"}, "ColumnTypeMismatch", "stageTimestamp is declared"),
        ({"TimeGenerated": 5}, "ColumnTypeMismatch", "TimeGenerated is declared datetime"),
        ({"verb": "get"}, "UndeclaredColumn", "not declared in Custom-T_CL: verb"),
    ],
)
def test_rows_that_do_not_fit_are_dropped_with_the_reason(
    change: dict[str, Any], kind: str, detail: str
) -> None:
    """A row with a wrong type or an undeclared column is dropped; the problem says why."""
    checked = checker().check([good_row(auditID="kept"), good_row(**change)], RECEIVED)

    assert ["kept"] == [row["auditID"] for row in checked.rows]
    assert [(1, kind)] == [(problem.index, problem.kind) for problem in checked.problems]
    assert detail in checked.problems[0].message


def test_null_values_fit_any_column() -> None:
    """JSON null is an empty cell, accepted in every column."""
    row = good_row(code=None, user=None, stageTimestamp=None)
    assert [row] == checker().check([row], RECEIVED).rows


def test_a_record_that_is_not_an_object_is_dropped() -> None:
    """An array element that is not an object is dropped as RecordNotObject."""
    checked = checker().check([good_row(), [1, 2]], RECEIVED)

    assert 1 == len(checked.rows)
    assert ["RecordNotObject"] == [problem.kind for problem in checked.problems]


def test_row_without_time_generated_is_dropped_unless_the_rule_fills_it() -> None:
    """Without TimeGenerated a row is dropped; a filling rule gives it the time received."""
    row = good_row()
    del row["TimeGenerated"]

    dropped = checker().check([dict(row)], RECEIVED)
    filled = checker(fill_time_generated=True).check([dict(row)], RECEIVED)

    assert ([], ["TimeGeneratedMissing"]) == (
        dropped.rows,
        [problem.kind for problem in dropped.problems],
    )
    assert ["2026-05-01T12:00:00Z"] == [kept["TimeGenerated"] for kept in filled.rows]


@pytest.mark.parametrize("offset", [timedelta(days=-3), timedelta(days=2)])
def test_time_generated_outside_the_window_is_replaced_by_the_time_received(
    offset: timedelta,
) -> None:
    """TimeGenerated more than 2 days old or 1 day ahead becomes the time received; row kept."""
    far = (RECEIVED + offset).isoformat()
    checked = checker().check([good_row(TimeGenerated=far)], RECEIVED)

    assert ["2026-05-01T12:00:00Z"] == [row["TimeGenerated"] for row in checked.rows]
    assert [("TimeGeneratedReplaced", False)] == [
        (problem.kind, problem.dropped) for problem in checked.problems
    ]


def test_string_longer_than_64_kb_is_cut_to_64_kb() -> None:
    """A string value over 64 KB keeps its first 64 KB (whole characters); the row is kept."""
    long_value = "é" * MAX_FIELD_BYTES  # two bytes each in UTF-8
    checked = checker().check([good_row(auditID=long_value)], RECEIVED)

    kept = checked.rows[0]["auditID"]
    assert MAX_FIELD_BYTES == len(kept.encode("utf-8"))
    assert ["FieldTruncated"] == [problem.kind for problem in checked.problems]


def test_shipped_declaration_is_the_deployed_rules_stream() -> None:
    """Without --streams the emulator declares what the deployed ARM template's data collection
    rule declares (the package's copy of deploy/azure/auditrelay.json), not the encoder's table."""
    repo = Path(__file__).resolve().parents[2]
    deployed = load_declarations(repo / "deploy" / "azure" / "auditrelay.json")

    declarations = shipped_declarations()

    assert ["Custom-KubeAudit_CL"] == list(declarations)
    assert dict(deployed["Custom-KubeAudit_CL"].columns) == dict(
        declarations["Custom-KubeAudit_CL"].columns
    )
    assert "auditID" == declarations["Custom-KubeAudit_CL"].audit_id_column


def test_a_template_without_exactly_one_rule_is_refused() -> None:
    """An ARM template is read through its one data collection rule; none is a named error."""
    with pytest.raises(
        DeclarationError, match=r"expected one Microsoft\.Insights/dataCollectionRules"
    ):
        parse_declarations({"resources": [{"type": "Microsoft.Storage/storageAccounts"}]}, "t.json")
