"""What fuzzing found, pinned in readable form (the inputs themselves are replayed from
``regressions/`` by test_fuzz.py)."""

from __future__ import annotations

import msgpack
import pytest
from auditrelay.decode import Reason, decode_chunk
from auditrelay.errors import PolicyError
from auditrelay.policy import parse_policy
from fixtures.chunks import event_time, int_time, parsed_event, raw_log_event, v2_event

GROUP_END = 0xFFFFFFFE


def _ids(chunk: bytes) -> list[str]:
    return [event.fields["auditID"] for event in decode_chunk(chunk).events]


def test_an_event_with_a_map_as_a_map_key_is_set_aside_alone() -> None:
    """msgpack cannot make a dict whose key is a map: that event was a TypeError that failed the
    whole Push (so Fluent Bit retried the chunk for ever); now it is one dead letter."""
    bad = v2_event(event_time(1_795_000_000), b"\x81\x81\xa1a\x01\x02")  # {{"a": 1}: 2}
    chunk = parsed_event(audit_id="a-1") + bad + raw_log_event() + parsed_event(audit_id="a-3")
    decoded = decode_chunk(chunk)
    assert ["a-1", "7c3c6a4e-5f0e-4a0c-9a47-1f2b3c4d5e6f", "a-3"] == _ids(chunk)
    assert [(Reason.UNHASHABLE_MAP_KEY, bad)] == [
        (letter.reason, letter.payload) for letter in decoded.dead_letters
    ]
    assert 4 == decoded.records_seen


def test_a_map_key_that_is_a_map_in_a_truncated_event_sets_the_rest_aside() -> None:
    bad = b"\xdd\x00\x00\x00\x03" + b"\x81\x81\xa1a\x01\x02"  # an array of 3, 1 given
    decoded = decode_chunk(parsed_event(audit_id="a-1") + bad)
    assert ["a-1"] == [event.fields["auditID"] for event in decoded.events]
    assert [Reason.TRUNCATED_MSGPACK] == [letter.reason for letter in decoded.dead_letters]


def test_a_group_marker_is_skipped_only_with_a_map_body() -> None:
    """A marker header whose body is not a map (here: the next event, read as its body because
    the marker's own body was missing) is set aside, not skipped without a trace."""
    marker_without_body = b"\xdd\x00\x00\x00\x02\xdd\x00\x00\x00\x02" + int_time(GROUP_END)
    marker_without_body += b"\xdf\x00\x00\x00\x00"
    chunk = parsed_event(audit_id="a-1") + marker_without_body + parsed_event(audit_id="a-2")
    decoded = decode_chunk(chunk)
    assert ["a-1"] == _ids(chunk)
    assert [Reason.RECORD_NOT_MAP] == [letter.reason for letter in decoded.dead_letters]
    assert parsed_event(audit_id="a-2") in decoded.dead_letters[0].payload
    real_marker = v2_event(int_time(GROUP_END), msgpack.packb({}))
    assert ["a-1", "a-2"] == _ids(
        parsed_event(audit_id="a-1") + real_marker + parsed_event(audit_id="a-2")
    )


@pytest.mark.parametrize("text", [b"\x00apiVersion: audit.k8s.io/v1", b"\xff\xfe\x00", b"\x07"])
def test_a_policy_with_a_character_yaml_refuses_first_is_a_policy_error(text: bytes) -> None:
    """The YAML reader checks the first characters when it is made, outside the parse: that
    error escaped as yaml.ReaderError instead of the PolicyError naming the file."""
    with pytest.raises(PolicyError, match=r"^policy\.yaml: not valid YAML: "):
        parse_policy(text, source="policy.yaml")
