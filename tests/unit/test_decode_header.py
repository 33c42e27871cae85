"""The header-only decode path (``model.JsonEvent``) against the whole parse it replaces.

Every event must come out of the header path with the policy's attributes, decision and row that
a whole parse of the same line gives: whatever the field order, duplicate keys, escapes or size;
and an event whose policy fields are not text is set aside, never shipped and never blocking
the good events of its chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from auditrelay.config import BUNDLED_POLICY
from auditrelay.decode import Reason, decode_chunk
from auditrelay.filter import PolicyFilter, request_attributes
from auditrelay.model import AuditEvent, JsonEvent
from auditrelay.policy import compile_policy, parse_policy
from auditrelay.stream import RowEncoder
from fixtures.chunks import (
    audit_event,
    audit_line,
    chunk,
    parsed_event,
    raw_log_event,
    sample_lines,
)

REPO = Path(__file__).resolve().parents[2]
REFERENCE_POLICIES = sorted((REPO / "tests" / "data" / "reference-policies").glob("*.yaml"))


def test_reference_policies_are_in_the_checkout() -> None:
    """The header path is compared under real clusters' policies, not only the bundled one."""
    assert len(REFERENCE_POLICIES) >= 5, "tests/data/reference-policies is missing its policies"


def _one(line: bytes) -> AuditEvent:
    decoded = decode_chunk(chunk([raw_log_event(line)]))
    assert ([], 1) == ([d.reason for d in decoded.dead_letters], len(decoded.events))
    return decoded.events[0]


def _row(encoder: RowEncoder, event: AuditEvent | None) -> dict[str, Any] | None:
    if event is None:
        return None
    row = orjson.loads(encoder.encode(event))
    row.pop("TimeGenerated")
    return row  # type: ignore[no-any-return]


def _shippable_sample_lines() -> list[bytes]:
    """The samples that are audit.k8s.io events (some old ones lack their apiVersion)."""
    return [line for line in sample_lines() if b'"apiVersion":"audit.k8s.io/v1' in line]


def test_sample_events_take_the_header_path() -> None:
    """The real events are decoded header-only and keep the API server's bytes; only an event
    with a top-level field the stream has no column for (kube-apiserver 1.35+ writes
    ``authenticationMetadata`` for constrained impersonation) takes the whole parse, whose row
    keeps that field in AdditionalFields."""
    lines = _shippable_sample_lines()
    events = decode_chunk(chunk(raw_log_event(line) for line in lines)).events
    columns = set(JsonEvent.__struct_fields__)
    outside_columns = [set(orjson.loads(line)) - columns for line in lines]

    assert 80 < len(lines)
    assert [not extra for extra in outside_columns] == [
        type(event.header) is JsonEvent for event in events
    ]
    assert any(outside_columns), "the real log should hold an event with a field beyond the columns"
    assert lines == [event.raw for event in events]
    encoder = RowEncoder("c", "id")
    for extra, event in zip(outside_columns, events, strict=True):
        if extra:
            assert extra == set(orjson.loads(encoder.encode(event))["AdditionalFields"])


@pytest.mark.parametrize(
    "policy", [BUNDLED_POLICY, *REFERENCE_POLICIES], ids=lambda path: Path(path).name
)
def test_header_path_rows_equal_whole_parse_rows(policy: Path) -> None:
    """Kept, lowered and dropped alike: the row from the header path is the row a whole parse
    of the line gives (the pre-msgspec path), for every real sample under every policy."""
    header_filter, whole_filter = PolicyFilter.from_file(policy), PolicyFilter.from_file(policy)
    encoder = RowEncoder("c", "id")
    lines = _shippable_sample_lines()
    events = decode_chunk(chunk(raw_log_event(line) for line in lines)).events

    different = [
        line[:120]
        for line, event in zip(lines, events, strict=True)
        if _row(encoder, header_filter.apply(event))
        != _row(encoder, whole_filter.apply(AuditEvent(orjson.loads(line), line)))
    ]

    assert [] == different
    assert header_filter.counts == whole_filter.counts


def test_lowered_event_is_rebuilt_without_parsing_its_bodies() -> None:
    """Lowered to Metadata: bodies and patch annotations go, the rest stays byte for byte."""
    body = b'{"kind":"Pod","spec":{"x":"\\u00e9 kept as written"}}'
    line = (
        b'{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"RequestResponse",'
        b'"auditID":"a-1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/d/pods",'
        b'"verb":"create","user":{"username":"alice","groups":["g"]},'
        b'"objectRef":{"resource":"pods","namespace":"d","apiVersion":"v1"},'
        b'"requestObject":' + body + b',"responseObject":' + body + b","
        b'"annotations":{"patch.webhook.admission.k8s.io/round_0_index_0":"{}","a":"b"}}'
    )
    event = _one(line)
    lowered = _lowered_to_metadata(event)

    assert lowered is not None
    assert lowered.raw is not None
    fields = orjson.loads(lowered.raw)
    assert "Metadata" == fields["level"]
    assert {"a": "b"} == fields["annotations"]
    assert "requestObject" not in fields
    assert "responseObject" not in fields
    assert {"resource": "pods", "namespace": "d", "apiVersion": "v1"} == fields["objectRef"]


def _lowered_to_metadata(event: AuditEvent) -> AuditEvent | None:
    text = "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n"
    return PolicyFilter(compile_policy(parse_policy(text))).apply(event)


def test_managed_fields_spelled_with_escapes_are_still_removed() -> None:
    """A key written with \\u escapes is the same key: omitManagedFields finds it."""
    body = b'{"metadata":{"name":"p","\\u006danagedFields":[{"manager":"m"}]}}'
    line = audit_line(level="RequestResponse").replace(
        b'"stageTimestamp"', b'"requestObject":' + body + b',"stageTimestamp"'
    )
    event = _one(line)
    text = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitManagedFields: true\nrules:\n"
    text += "- level: RequestResponse\n"

    kept = PolicyFilter(compile_policy(parse_policy(text))).apply(event)

    assert kept is not None
    assert kept is not event
    assert {"metadata": {"name": "p"}} == kept.fields["requestObject"]


def test_unusual_field_order_decodes_the_same() -> None:
    """Bodies first, header last, objectRef keys reversed: the same attributes."""
    fields = audit_event()
    reordered = dict(reversed(list(fields.items())))
    reordered["objectRef"] = dict(reversed(list(fields["objectRef"].items())))
    line = orjson.dumps(reordered)

    assert request_attributes(fields) == request_attributes(_one(line))
    assert line == _one(line).raw


def test_duplicate_keys_the_last_one_wins() -> None:
    """As in kube-apiserver's JSON decoding and orjson: the last of duplicate keys counts."""
    line = audit_line(verb="get").replace(b'"verb":"get"', b'"verb":"get","verb":"delete"')
    line = line.replace(b'"username":"alice"', b'"username":"alice","username":"mallory"')
    whole = orjson.loads(line)

    attributes = request_attributes(_one(line))

    assert ("delete", "mallory") == (attributes.verb, attributes.user)
    assert request_attributes(whole) == attributes


def test_unicode_escapes_in_policy_fields_are_decoded() -> None:
    """Escaped text is the text it spells, for every field the policy reads."""
    line = audit_line().replace(b'"create"', b'"\\u0063reate"')
    line = line.replace(b'"alice"', b'"\\u0061lice"').replace(b'"default"', b'"d\\u0065fault"')
    line = line.replace(b'"pods"', b'"\\u0070ods"')

    attributes = request_attributes(_one(line))

    assert ("create", "alice", "default", "pods") == (
        attributes.verb,
        attributes.user,
        attributes.namespace,
        attributes.resource,
    )
    assert request_attributes(orjson.loads(line)) == attributes


WRONG_TYPES = {
    "verb is a number": {"verb": 5},
    "requestURI is a number": {"requestURI": 7},
    "username is a number": {"user": {"username": 1, "groups": ["g"]}},
    "a group is a number": {"user": {"username": "u", "groups": ["g", 2]}},
    "groups is a map": {"user": {"username": "u", "groups": {"g": 1}}},
    "user is a string": {"user": "alice"},
    "namespace is a number": {"objectRef": {"resource": "pods", "namespace": 3}},
    "resource is a list": {"objectRef": {"resource": ["pods"]}},
    "objectRef is a string": {"objectRef": "pods"},
}


@pytest.mark.parametrize("fields", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
@pytest.mark.parametrize("shape", ["raw", "parsed"])
def test_numbers_where_text_is_expected_are_set_aside(shape: str, fields: dict[str, Any]) -> None:
    """Counted and set aside as wrong_field_type, between good events that still pass."""
    if shape == "raw":
        bad = raw_log_event(audit_line(audit_id="bad", **fields))
        good = [raw_log_event(audit_line(audit_id=name)) for name in ("before", "after")]
    else:
        bad = parsed_event(audit_id="bad", **fields)
        good = [parsed_event(audit_id=name) for name in ("before", "after")]

    decoded = decode_chunk(chunk([good[0], bad, good[1]]))

    assert ["before", "after"] == [event.header.auditID for event in decoded.events]
    assert ([Reason.WRONG_FIELD_TYPE], 3) == (
        [letter.reason for letter in decoded.dead_letters],
        decoded.records_seen,
    )


def test_null_reads_as_absent() -> None:
    """null in a field the policy reads is no error: it reads as absent (a whole parse)."""
    event = _one(audit_line(verb=None).replace(b'"kind"', b'"verb":null,"kind"'))

    assert "" == request_attributes(event).verb
    assert None is event.fields["verb"]


def test_unknown_top_level_field_goes_to_additional_fields() -> None:
    """A field that is not a column takes the careful way and lands in AdditionalFields."""
    event = _one(audit_line(extraField={"k": 1}))
    row = orjson.loads(RowEncoder("c", "id").encode(event))

    assert {"extraField": {"k": 1}} == row["AdditionalFields"]


def test_lines_over_one_megabyte() -> None:
    """A 3 MB line is decoded header-only; its row is cut to size, the event is kept."""
    big = {"kind": "ConfigMap", "data": {"blob": "x" * (3 << 20)}}
    line = audit_line(level="RequestResponse", requestObject=big)
    event = _one(line)

    assert (JsonEvent, line) == (type(event.header), event.raw)
    row = RowEncoder("c", "id").encode(event)
    assert len(row) < 1_000_000
    assert orjson.loads(row)["requestObject"]["auditrelayTruncated"] is True


def test_integers_beyond_64_bits_in_a_body() -> None:
    """orjson refuses them; the header path keeps the line, the row keeps the number."""
    line = audit_line(level="Request").replace(
        b'"stageTimestamp"',
        b'"requestObject":{"n":123456789012345678901234567890},"stageTimestamp"',
    )
    event = _one(line)

    assert line == event.raw
    assert b"123456789012345678901234567890" in RowEncoder("c", "id").encode(event)
