"""The demo's Fluent Bit side: audit log lines as the chunks Fluent Bit's tail input makes."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
from auditrelay.cli.demo import BUNDLED_LOGS, fluent_bit_chunks, read_audit_logs, tail_record
from auditrelay.decode import decode_chunk
from auditrelay.errors import ConfigError
from fixtures.chunks import audit_line


def test_a_tail_record_is_a_v2_event_with_event_time_and_the_line_in_log() -> None:
    """[[EventTime, {}], {"log": line}]: EventTime as ext type 0, the line as a str of its bytes."""
    line = audit_line(auditID="one")

    header, record = msgpack.unpackb(tail_record(line, 1_795_000_000.25), raw=True)

    timestamp, metadata = header
    assert (0, (1_795_000_000).to_bytes(4, "big") + (250_000_000).to_bytes(4, "big")) == (
        timestamp.code,
        timestamp.data,
    )
    assert ({}, {b"log": line}) == (metadata, record)


@pytest.mark.parametrize("size", [10, 200, 70_000], ids=["fixstr", "str8", "str32"])
def test_the_sidecar_decodes_the_lines_unchanged(size: int) -> None:
    """Every line comes back from the sidecar's decoder as the same event with the same bytes,
    whatever the size of its str header."""
    lines = [audit_line(auditID="x" * size), audit_line(auditID="y")]

    [chunk] = fluent_bit_chunks(lines)
    decoded = decode_chunk(chunk, "kube.audit")

    assert lines == [event.raw for event in decoded.events]
    assert [] == decoded.dead_letters


def test_chunks_stay_under_the_limit() -> None:
    """Lines are cut into chunks of at most the limit, and none is lost or reordered."""
    lines = [audit_line(auditID=f"id-{index}") for index in range(50)]
    limit = 4 * len(tail_record(lines[0], 0.0))

    chunks = list(fluent_bit_chunks(lines, limit))

    assert all(len(chunk) <= limit for chunk in chunks)
    assert lines == [event.raw for c in chunks for event in decode_chunk(c, "t").events]


def test_bundled_logs_are_read_whole() -> None:
    """The bundled real logs: 37 + 1 + 29 events, blank lines skipped."""
    audit_log = read_audit_logs(BUNDLED_LOGS)

    assert 67 == len(audit_log.lines)


def test_an_unreadable_audit_log_names_the_file(tmp_path: Path) -> None:
    """A missing file or a broken .gz is a ConfigError naming --audit-log and the path."""
    broken = tmp_path / "audit.log.gz"
    broken.write_bytes(b"not gzip")

    with pytest.raises(ConfigError) as caught:
        read_audit_logs([broken])

    [problem] = caught.value.problems
    assert ("--audit-log", str(broken)) == (problem.property, problem.value)
