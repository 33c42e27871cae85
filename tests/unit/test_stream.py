"""The DCR stream: rows match the declared columns, keep every field, and respect the size rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditrelay.model import AuditEvent
from auditrelay.stream import (
    COLUMN_TYPES,
    COLUMNS,
    HEAD_BYTES,
    MAX_FIELD_BYTES,
    MAX_ROW_BYTES,
    STREAM_NAME,
    TRUNCATION_SUFFIX,
    RowEncoder,
    row_problems,
)
from fixtures.chunks import sample_lines

from tools.dcr_template import (
    MONITORING_METRICS_PUBLISHER,
    RETENTION_DAYS,
    TABLE_PLAN,
    arm_template,
)

REPO = Path(__file__).resolve().parents[2]
ADDED = {"TimeGenerated": None, "Cluster_Name": "prod-1", "Cluster_Id": "/subscriptions/s/arc/c1"}


def encoder() -> RowEncoder:
    return RowEncoder(ADDED["Cluster_Name"] or "", ADDED["Cluster_Id"] or "")


def without_time(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "TimeGenerated"}


def test_samples_are_present() -> None:
    """The real audit log this file checks has events at every level, with request and response
    bodies, so the checks below mean something."""
    events = [orjson.loads(line) for line in sample_lines()]
    assert {"Metadata", "Request", "RequestResponse"} <= {event["level"] for event in events}
    assert any("requestObject" in event for event in events)
    assert any("responseObject" in event for event in events)


@pytest.mark.parametrize("keep_raw", [True, False], ids=["spliced", "reserialized"])
def test_every_sample_row_matches_the_declaration(keep_raw: bool) -> None:
    """Rows of all real samples, on both encoder paths, have only declared columns of the right
    type; with the API server's text kept, every event whose fields are all columns is spliced
    (a field the table does not declare goes to AdditionalFields through reserializing)."""
    rows_encoder = encoder()
    for line in sample_lines():
        event = AuditEvent(orjson.loads(line), line if keep_raw else None)
        row = rows_encoder.encode(event)
        assert [] == row_problems(row), line[:200]
    declared = set(COLUMN_TYPES)
    all_columns = sum(set(orjson.loads(line)) <= declared for line in sample_lines())
    spliced = all_columns if keep_raw else 0
    assert (spliced, len(sample_lines()) - spliced) == (
        rows_encoder.stats.spliced,
        rows_encoder.stats.reserialized,
    )


def test_rows_keep_every_field_and_add_the_cluster_identity() -> None:
    """A row is the event's fields plus TimeGenerated, Cluster_Name and Cluster_Id, on both paths;
    fields the table does not declare are kept in AdditionalFields."""
    rows_encoder = encoder()
    for line in sample_lines():
        fields = orjson.loads(line)
        spliced = orjson.loads(rows_encoder.encode(AuditEvent(fields, line)))
        rebuilt = orjson.loads(rows_encoder.encode(AuditEvent(fields, None)))
        undeclared = {key: value for key, value in fields.items() if key not in COLUMN_TYPES}
        expected = {key: value for key, value in fields.items() if key in COLUMN_TYPES}
        if undeclared:
            expected["AdditionalFields"] = undeclared
        expected |= {"Cluster_Name": "prod-1", "Cluster_Id": "/subscriptions/s/arc/c1"}
        assert expected == without_time(spliced)
        assert spliced == rebuilt


def test_splice_keeps_the_api_servers_bytes() -> None:
    """The spliced row starts with the API server's own text, byte for byte (escapes included)."""
    line = (
        b'{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a1",'
        b'"stage":"ResponseComplete","requestURI":"/api?x=1\\u0026y=\\u003c","verb":"get",'
        b'"user":{"username":"j\xc3\xa9r\xc3\xb4me"},"sourceIPs":["10.0.0.1"],'
        b'"stageTimestamp":"2024-01-02T03:04:05.123456Z"}'
    )
    row = encoder().encode(AuditEvent(orjson.loads(line), line))
    assert line[:-1] == row[: len(line) - 1]
    assert "2024-01-02T03:04:05.123456Z" == orjson.loads(row)["TimeGenerated"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"stageTimestamp": "2024-01-01T00:00:02Z", "requestReceivedTimestamp": "x"},
            "2024-01-01T00:00:02Z",
        ),
        ({"requestReceivedTimestamp": "2024-01-01T00:00:01Z"}, "2024-01-01T00:00:01Z"),
        ({"timestamp": "2017-09-11T20:00:00Z"}, "2017-09-11T20:00:00Z"),
    ],
    ids=["stage", "received", "v1beta1"],
)
def test_time_generated_comes_from_the_event(fields: dict[str, Any], expected: str) -> None:
    """TimeGenerated is stageTimestamp, else requestReceivedTimestamp, else timestamp."""
    row = orjson.loads(encoder().encode(AuditEvent({"auditID": "a", **fields})))
    assert expected == row["TimeGenerated"]


def test_time_generated_falls_back_to_now() -> None:
    """An event without any timestamp still gets a valid TimeGenerated."""
    row = encoder().encode(AuditEvent({"auditID": "a"}))
    assert [] == row_problems(row)


def test_unknown_and_misfit_fields_go_to_additional_fields() -> None:
    """A field that is no column, or whose type does not fit its column, is kept in AdditionalFields."""
    fields = {"auditID": "a", "verb": 7, "futureField": {"x": 1}, "TimeGenerated": "spoof"}
    line = orjson.dumps(fields)
    row_bytes = encoder().encode(AuditEvent(fields, line))
    row = orjson.loads(row_bytes)
    assert [] == row_problems(row_bytes)
    assert {"verb": 7, "futureField": {"x": 1}, "TimeGenerated": "spoof"} == row["AdditionalFields"]
    assert "a" == row["auditID"]
    assert "verb" not in row


def test_an_oversized_string_field_is_cut_with_a_marker() -> None:
    """A string longer than the field limit ends in the truncation suffix and stays under the limit."""
    uri = "/api/v1/pods?" + "é" * 50_000
    row_bytes = encoder().encode(AuditEvent({"auditID": "a", "requestURI": uri}))
    row = orjson.loads(row_bytes)
    assert [] == row_problems(row_bytes)
    assert row["requestURI"].endswith(f"{TRUNCATION_SUFFIX}{len(uri.encode())}]")
    assert len(row["requestURI"].encode()) <= MAX_FIELD_BYTES
    assert row["requestURI"].startswith("/api/v1/pods?éé")


def test_an_oversized_object_is_replaced_by_a_marker() -> None:
    """A dynamic value too large becomes a marker with its size and head; other fields stay whole."""
    config_map = {"kind": "ConfigMap", "data": {f"k{i}": "v" * 1000 for i in range(100)}}
    original = orjson.dumps(config_map)
    event = {"auditID": "big", "verb": "create", "requestObject": config_map}
    row_bytes = encoder().encode(AuditEvent(event, orjson.dumps(event)))
    row = orjson.loads(row_bytes)
    assert [] == row_problems(row_bytes)
    marker = row["requestObject"]
    assert (True, len(original)) == (marker["auditrelayTruncated"], marker["originalBytes"])
    assert original[:HEAD_BYTES].decode() == marker["head"]
    assert ("big", "create") == (row["auditID"], row["verb"])


def test_a_row_of_many_large_fields_is_cut_to_the_row_limit() -> None:
    """A row whose fields are each under the field limit but together over the row limit is cut."""
    near_limit = "x" * (MAX_FIELD_BYTES - 100)
    event: dict[str, Any] = dict.fromkeys(
        ("requestURI", "userAgent", "level", "stage", "verb"), near_limit
    )
    event |= {name: {"v": near_limit} for name in ("user", "objectRef", "responseStatus")}
    event |= {name: [near_limit] for name in ("requestObject", "responseObject", "annotations")}
    event |= {"metadata": {"v": near_limit}, "impersonatedUser": {"v": near_limit}}
    event |= {"sourceIPs": [near_limit], "auditID": near_limit, "kind": near_limit}
    row_bytes = encoder().encode(AuditEvent(event))
    assert len(row_bytes) <= MAX_ROW_BYTES
    assert [] == row_problems(row_bytes)


def test_values_json_cannot_hold_are_still_encoded() -> None:
    """Bytes, sets and integers beyond 64 bits from a decoder do not fail the row."""
    fields = {"auditID": "a", "annotations": {"b": b"\xff", "s": {1}, "n": 1 << 70}}
    row = orjson.loads(encoder().encode(AuditEvent(fields)))
    assert {"b": "\ufffd", "s": [1], "n": 1 << 70} == row["annotations"]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (b'{"TimeGenerated":"2024-01-01T00:00:00Z","Extra":1}', "Extra: not a declared column"),
        (b'{"TimeGenerated":"2024-01-01T00:00:00Z","verb":3}', "verb: expected string, got int"),
        (b'{"TimeGenerated":"yesterday"}', "TimeGenerated: expected an ISO 8601 datetime"),
        (b'{"verb":"get"}', "TimeGenerated is missing"),
        (b'[{"verb":"get"}]', "not a JSON object but list"),
    ],
)
def test_row_problems_names_what_does_not_match(row: bytes, problem: str) -> None:
    """The checker the tests rely on does find mismatching rows."""
    problems = row_problems(row)
    assert 1 == len(problems)
    assert problems[0].startswith(problem)


def test_the_template_declares_the_encoders_columns() -> None:
    """The DCR stream and the table declare exactly the columns rows are checked against."""
    resources = {resource["type"]: resource for resource in arm_template()["resources"]}
    dcr = resources["Microsoft.Insights/dataCollectionRules"]["properties"]
    table = resources["Microsoft.OperationalInsights/workspaces/tables"]["properties"]
    declared = {c["name"]: c["type"] for c in dcr["streamDeclarations"][STREAM_NAME]["columns"]}
    tabled = {c["name"]: c["type"] for c in table["schema"]["columns"]}
    assert dict(COLUMN_TYPES) == declared
    assert dict(COLUMN_TYPES) == tabled
    assert [STREAM_NAME] == dcr["dataFlows"][0]["streams"]
    assert (TABLE_PLAN, RETENTION_DAYS, RETENTION_DAYS) == (
        table["plan"],
        table["retentionInDays"],
        table["totalRetentionInDays"],
    )
    role = resources["Microsoft.Authorization/roleAssignments"]["properties"]
    assert MONITORING_METRICS_PUBLISHER in role["roleDefinitionId"]


def test_column_names_follow_the_workspace_rules() -> None:
    """Column names start with a letter, are at most 45 characters, and avoid reserved names."""
    reserved = {"id", "type", "tenantid", "_resourceid", "_subscriptionid", "uniqueid", "title"}
    for column in COLUMNS:
        assert column.name[0].isalpha(), column.name
        assert len(column.name) <= 45, column.name
        assert column.name.lower() not in reserved, column.name
    assert len(COLUMNS) == len({column.name.lower() for column in COLUMNS})


def test_the_template_is_valid_json_with_the_arm_schema() -> None:
    """The committed file parses and names the deployment template schema."""
    committed = json.loads((REPO / "deploy" / "azure" / "auditrelay.json").read_text())
    assert committed["$schema"].endswith("deploymentTemplate.json#")
