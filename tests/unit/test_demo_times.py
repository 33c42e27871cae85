"""The demo replays a recorded audit log as a live one: the newest event happens now."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from auditrelay.devtools.demo_times import as_if_now

NOW = datetime(2026, 12, 3, 4, 0, 0, 500000, tzinfo=UTC)
RECENT = (
    b'{"kind":"Event","apiVersion":"audit.k8s.io/v1","auditID":"a","stage":"ResponseComplete",'
    b'"requestReceivedTimestamp":"2026-12-02T23:33:06.816991Z",'
    b'"stageTimestamp":"2026-12-02T23:33:06.820172Z",'
    b'"requestObject":{"stageTimestamp":"2026-12-02T23:33:06.816991Z"}}'
)
OLD = (
    b'{"kind":"Event","apiVersion":"audit.k8s.io/v1beta1","auditID":"b",'
    b'"metadata":{"creationTimestamp":"2017-09-11T19:55:05Z"},"timestamp":"2017-09-11T19:55:05Z"}'
)


def test_the_newest_event_happens_now_and_the_others_keep_their_distance() -> None:
    recent, old = (orjson.loads(line) for line in as_if_now([RECENT, OLD], NOW))

    assert recent["stageTimestamp"] == "2026-12-03T04:00:00.820172Z"
    assert recent["requestReceivedTimestamp"] == "2026-12-03T04:00:00.816991Z"
    assert old["timestamp"] == "2017-09-12T00:21:59Z"


def test_only_the_events_own_time_fields_move_and_lines_keep_their_length() -> None:
    moved = as_if_now([RECENT, OLD], NOW)

    assert [len(line) for line in moved] == [len(RECENT), len(OLD)]
    recent, old = (orjson.loads(line) for line in moved)
    assert recent["requestObject"] == {"stageTimestamp": "2026-12-02T23:33:06.816991Z"}
    assert old["metadata"] == {"creationTimestamp": "2017-09-11T19:55:05Z"}


def test_lines_without_times_or_newer_than_now_are_sent_as_recorded() -> None:
    lines = [b"not json", b'{"kind":"Event"}', RECENT]

    assert as_if_now(lines, datetime(2026, 12, 1, tzinfo=UTC)) == tuple(lines)
    assert as_if_now(lines[:2], NOW) == tuple(lines[:2])
