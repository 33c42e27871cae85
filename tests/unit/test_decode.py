"""Decoding Fluent Bit chunks: every event form, every timestamp, and every kind of bad record."""

from __future__ import annotations

import msgpack
import orjson
import pytest
from auditrelay.decode import ChunkStream, Reason, decode_chunk
from auditrelay.errors import DecodeError
from fixtures import chunks
from fixtures.chunks import (
    audit_event,
    audit_line,
    chunk,
    event_time,
    log_record,
    map32,
    parsed_event,
    raw_log_event,
    v2_event,
)


def audit_ids(data: bytes) -> list[str]:
    return [event.fields["auditID"] for event in decode_chunk(data).events]


class TestRealChunks:
    """Fluent Bit's flushes of a real kube-apiserver audit log, in both tail shapes (tests/data)."""

    def test_parsed_and_raw_log_chunks_give_the_same_events(self) -> None:
        """Both tail shapes of the same lines decode to the same audit events, one per line."""
        parsed = decode_chunk(chunks.tail_chunk(chunks.TAIL_CHUNK_PARSED), "kube.audit")
        raw_log = decode_chunk(chunks.tail_chunk(chunks.TAIL_CHUNK_RAW_LOG), "kube.audit")

        assert len(chunks.sample_lines()) == parsed.records_seen == raw_log.records_seen
        assert [e.fields for e in parsed.events] == [e.fields for e in raw_log.events]

    def test_every_record_of_an_api_server_log_is_an_audit_event(self) -> None:
        """Nothing kube-apiserver wrote is set aside: each record decodes to its line's event."""
        decoded = decode_chunk(chunks.tail_chunk(chunks.TAIL_CHUNK_PARSED), "kube.audit")

        assert [] == decoded.dead_letters
        assert [orjson.loads(line) for line in chunks.sample_lines()] == [
            event.fields for event in decoded.events
        ]

    def test_raw_log_events_keep_the_exact_line(self) -> None:
        """An event that came as a `log` line keeps the API server's bytes in raw."""
        decoded = decode_chunk(chunks.tail_chunk(chunks.TAIL_CHUNK_RAW_LOG))

        assert chunks.sample_lines() == [event.raw for event in decoded.events]

    def test_parsed_events_have_no_raw(self) -> None:
        """A record Fluent Bit parsed has no original line to keep."""
        decoded = decode_chunk(chunks.tail_chunk(chunks.TAIL_CHUNK_PARSED))

        assert {None} == {event.raw for event in decoded.events}


class TestEventForms:
    """Both event forms with every timestamp encoding Fluent Bit's decoder accepts."""

    @pytest.mark.parametrize(
        "timestamp",
        [
            chunks.event_time(1_795_000_000, 5),
            chunks.event_time_ext8(1_795_000_000, 5),
            chunks.int_time(1_795_000_000),
            chunks.float_time(1_795_000_000.25),
        ],
        ids=["eventtime-fixext8", "eventtime-ext8", "int", "float"],
    )
    @pytest.mark.parametrize("form", ["v2", "legacy"])
    def test_every_timestamp_in_both_forms(self, timestamp: bytes, form: str) -> None:
        """[[ts, meta], record] and [ts, record] decode with int, float and EventTime stamps."""
        body = map32(audit_event("a-1"))
        event = v2_event(timestamp, body) if form == "v2" else chunks.legacy_event(timestamp, body)

        decoded = decode_chunk(chunk([event]))

        assert [audit_event("a-1")] == [e.fields for e in decoded.events]
        assert [] == decoded.dead_letters

    def test_metadata_map_with_entries_is_accepted(self) -> None:
        """A v2 header with non-empty metadata still decodes."""
        event = v2_event(event_time(1, 0), map32(audit_event("m-1")), map32({"otlp": {"x": 1}}))

        assert ["m-1"] == audit_ids(event)

    def test_group_markers_are_skipped_not_counted(self) -> None:
        """Group start/end records (Fluent Bit 3.1+) are neither events nor dead letters."""
        data = chunk([chunks.group_start(), parsed_event(audit_id="g-1"), chunks.group_end()])

        decoded = decode_chunk(data)

        assert ["g-1"] == [e.fields["auditID"] for e in decoded.events]
        assert [] == decoded.dead_letters
        assert 1 == decoded.records_seen

    def test_raw_log_with_whitespace_keeps_its_bytes(self) -> None:
        """raw is the line as written, not a re-serialization."""
        line = (
            b'{ "kind": "Event", "apiVersion": "audit.k8s.io/v1beta1", "level": "None",'
            b' "auditID": "w-1", "stage": "RequestReceived" }'
        )

        (event,) = decode_chunk(raw_log_event(line)).events

        assert line == event.raw
        assert "w-1" == event.fields["auditID"]

    def test_log_record_with_extra_keys_uses_the_log_line(self) -> None:
        """tail's path_key adds a key beside `log`; the event still comes from the line."""
        body = map32({"log": audit_line(audit_id="p-1").decode(), "filename": "/var/log/audit.log"})

        assert ["p-1"] == audit_ids(v2_event(event_time(1, 0), body))

    def test_empty_chunk_has_nothing(self) -> None:
        """An empty chunk decodes to no events and no dead letters."""
        decoded = decode_chunk(b"")

        assert ([], [], 0) == (decoded.events, decoded.dead_letters, decoded.records_seen)

    def test_ten_megabyte_record_decodes(self) -> None:
        """A single 10 MB event (a big RequestResponse body) decodes, parsed or as a log line."""
        big = {"data": "x" * (10 << 20)}
        parsed = parsed_event(audit_id="big-1", requestObject=big)
        raw = raw_log_event(audit_line(audit_id="big-2", requestObject=big))

        decoded = decode_chunk(chunk([parsed, raw]))

        assert ["big-1", "big-2"] == [e.fields["auditID"] for e in decoded.events]
        assert 10 << 20 == len(decoded.events[1].fields["requestObject"]["data"])


BAD_RECORDS = {
    "record is an array": (
        v2_event(event_time(1, 0), msgpack.packb([1, 2, 3])),
        Reason.RECORD_NOT_MAP,
    ),
    "event without auditID": (parsed_event(auditID=None), Reason.MISSING_AUDIT_ID),
    "event with empty auditID": (parsed_event(audit_id=""), Reason.MISSING_AUDIT_ID),
    "raw line without auditID": (
        raw_log_event(audit_line(auditID=None)),
        Reason.MISSING_AUDIT_ID,
    ),
    "not an Event kind": (parsed_event(kind="EventList"), Reason.NOT_AUDIT_EVENT),
    "other apiVersion": (parsed_event(apiVersion="v1"), Reason.UNSUPPORTED_API_VERSION),
    "apiVersion is a list": (parsed_event(apiVersion=["x"]), Reason.UNSUPPORTED_API_VERSION),
    "no stage": (parsed_event(stage=None), Reason.MISSING_STAGE),
    "no level": (parsed_event(level=None), Reason.MISSING_LEVEL),
    "log is not JSON": (raw_log_event(b"I1126 14:00:00 not json"), Reason.LOG_NOT_JSON),
    "log is a JSON array": (raw_log_event(b"[1, 2]"), Reason.JSON_NOT_OBJECT),
    "log is a number": (
        v2_event(event_time(1, 0), map32({"log": 42})),
        Reason.LOG_NOT_STRING,
    ),
    "a plain map": (
        v2_event(event_time(1, 0), map32({"message": "hello"})),
        Reason.NOT_AUDIT_EVENT,
    ),
    "timestamp is a string": (
        v2_event(msgpack.packb("yesterday"), map32(audit_event())),
        Reason.BAD_TIMESTAMP,
    ),
    "ext of another type": (
        v2_event(b"\xd7\x05" + bytes(8), map32(audit_event())),
        Reason.BAD_TIMESTAMP,
    ),
    "header of three elements": (
        b"\x92\x93\x01\x80\x80" + map32(audit_event()),
        Reason.BAD_EVENT_HEADER,
    ),
    "event of three elements": (
        b"\x93\x01" + map32(audit_event()) + b"\x80",
        Reason.NOT_AN_EVENT,
    ),
}


class TestBadRecords:
    """Each bad record becomes a dead letter with its reason; its neighbours get through."""

    @pytest.mark.parametrize(("bad", "reason"), BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
    def test_bad_record_is_set_aside_between_good_ones(self, bad: bytes, reason: str) -> None:
        """The good records before and after a bad one are decoded; the bad one is a letter."""
        data = chunk(
            [parsed_event(audit_id="before"), bad, raw_log_event(audit_line(audit_id="after"))]
        )

        decoded = decode_chunk(data, "kube.audit")

        assert ["before", "after"] == [e.fields["auditID"] for e in decoded.events]
        assert [reason] == [letter.reason for letter in decoded.dead_letters]
        assert 3 == decoded.records_seen

    @pytest.mark.parametrize(("bad", "reason"), BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
    def test_bad_first_record_does_not_condemn_the_chunk(self, bad: bytes, reason: str) -> None:
        """A well-framed but bad first event is one letter; the events after it get through."""
        decoded = decode_chunk(chunk([bad, parsed_event(audit_id="after")]))

        assert ["after"] == [e.fields["auditID"] for e in decoded.events]
        assert [reason] == [letter.reason for letter in decoded.dead_letters]

    def test_letter_of_a_map_record_holds_the_event_bytes(self) -> None:
        """A bad msgpack record is kept as its exact event bytes."""
        bad = parsed_event(auditID=None)

        (letter,) = decode_chunk(chunk([parsed_event(), bad])).dead_letters

        assert bad == letter.payload

    def test_letter_of_a_log_record_holds_the_line(self) -> None:
        """A bad log line is kept as the line itself, readable in the dead-letter file."""
        (letter,) = decode_chunk(raw_log_event(b"not json at all")).dead_letters

        assert b"not json at all" == letter.payload


class TestNonUtf8:
    """Strings that are not UTF-8 are set aside per record; the rest of the chunk decodes."""

    def test_non_utf8_log_line(self) -> None:
        """A log line with invalid bytes is a non_utf8 letter keeping the event's bytes."""
        bad_line = b'{"kind":"Event","user":"\xff\xfe"}'
        bad = v2_event(event_time(1, 0), log_record(bad_line))
        data = chunk(
            [raw_log_event(audit_line(audit_id="ok-1")), bad, parsed_event(audit_id="ok-2")]
        )

        decoded = decode_chunk(data)

        assert ["ok-1", "ok-2"] == [e.fields["auditID"] for e in decoded.events]
        assert [(Reason.NON_UTF8, bad)] == [(d.reason, d.payload) for d in decoded.dead_letters]

    def test_non_utf8_value_in_parsed_record(self) -> None:
        """A parsed record with an invalid string anywhere is a non_utf8 letter."""
        body = (
            b"\x82"  # fixmap, 2 entries
            + b"\xa4kind\xa5Event"  # "kind": "Event"
            + b"\xa4user"  # "user":
            + chunks.raw_str(b"b\xc3\x28b")  # an invalid 2-byte sequence
        )
        bad = v2_event(event_time(1, 0), body)

        decoded = decode_chunk(chunk([parsed_event(audit_id="ok-1"), bad]))

        assert ["ok-1"] == [e.fields["auditID"] for e in decoded.events]
        assert [Reason.NON_UTF8] == [d.reason for d in decoded.dead_letters]


class TestBrokenStreams:
    """Truncated or invalid msgpack: keep what decoded, set aside the rest."""

    def test_truncated_tail_keeps_the_complete_events(self) -> None:
        """A chunk cut inside its last event: the events before it decode, the tail is a letter."""
        last = parsed_event(audit_id="cut")
        data = chunk([parsed_event(audit_id="a"), parsed_event(audit_id="b"), last[:-10]])

        decoded = decode_chunk(data)

        assert ["a", "b"] == [e.fields["auditID"] for e in decoded.events]
        assert [(Reason.TRUNCATED_MSGPACK, last[:-10])] == [
            (d.reason, d.payload) for d in decoded.dead_letters
        ]

    def test_invalid_byte_after_good_events(self) -> None:
        """0xc1 (never used in msgpack) after good events: those stay, the rest is a letter."""
        tail = b"\xc1" + parsed_event(audit_id="lost")
        data = chunk([parsed_event(audit_id="a"), tail])

        decoded = decode_chunk(data)

        assert ["a"] == [e.fields["auditID"] for e in decoded.events]
        assert [(Reason.MALFORMED_MSGPACK, tail)] == [
            (d.reason, d.payload) for d in decoded.dead_letters
        ]

    def test_top_level_value_that_is_not_an_array_ends_the_stream(self) -> None:
        """Fluent Bit writes only arrays: after a stray value the rest is one letter, not one
        letter per byte of whatever follows."""
        tail = b"\x2a" + b"some text that msgpack reads as many small integers"
        data = chunk([parsed_event(audit_id="a"), tail])

        decoded = decode_chunk(data)

        assert ["a"] == [e.fields["auditID"] for e in decoded.events]
        assert [(Reason.MALFORMED_MSGPACK, tail)] == [
            (d.reason, d.payload) for d in decoded.dead_letters
        ]

    @pytest.mark.parametrize(
        "data",
        [
            b"\xc1\x00\x01",
            b"hello world",
            audit_line(),
            parsed_event()[:20],
        ],
        ids=["invalid-byte", "text", "json-line", "truncated-first-event"],
    )
    def test_chunk_that_is_not_msgpack_raises(self, data: bytes) -> None:
        """A chunk that does not start with a Fluent Bit event is refused whole."""
        with pytest.raises(
            DecodeError, match=r"not msgpack|does not start with a Fluent Bit event"
        ):
            decode_chunk(data)


class TestStreaming:
    """A chunk's events come one at a time, so each can be filtered and freed before the next."""

    def test_each_event_is_decoded_when_it_is_asked_for(self) -> None:
        """Taking the first event of a chunk has read only the first record."""
        data = chunk([raw_log_event(audit_line(audit_id=f"id-{n}")) for n in range(3)])
        stream = ChunkStream(data, "kube.audit")
        events = iter(stream)

        first = next(events)

        assert ("id-0", 1) == (first.fields["auditID"], stream.records_seen)
        assert ["id-1", "id-2"] == [event.fields["auditID"] for event in events]
        assert 3 == stream.records_seen

    def test_non_utf8_text_midway_yields_every_good_event_once(self) -> None:
        """Decoding resumes carefully after the last good event: nothing twice, nothing lost."""
        bad = v2_event(event_time(1, 0), log_record(b'{"kind":"Event","user":"\xff"}'))
        data = chunk(
            [
                raw_log_event(audit_line(audit_id="ok-1")),
                parsed_event(audit_id="ok-2"),
                bad,
                raw_log_event(audit_line(audit_id="ok-3")),
            ]
        )
        stream = ChunkStream(data)

        ids = [event.fields["auditID"] for event in stream]

        assert ["ok-1", "ok-2", "ok-3"] == ids
        assert ([Reason.NON_UTF8], 4) == (
            [letter.reason for letter in stream.dead_letters],
            stream.records_seen,
        )
