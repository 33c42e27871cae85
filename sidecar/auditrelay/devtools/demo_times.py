"""The demo's audit log replayed as live: event times moved forward so the newest is now."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import orjson

_TIME_FIELDS: Final = ("requestReceivedTimestamp", "stageTimestamp", "timestamp")
_RFC3339: Final = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")
_SECONDS_FORMAT: Final = "%Y-%m-%dT%H:%M:%S"


def as_if_now(lines: Sequence[bytes], now: datetime) -> tuple[bytes, ...]:
    """The lines with every event's time fields moved forward by one whole number of seconds, so
    that the newest event happened at ``now``: a recorded attack replayed as a live one.

    The workspace replaces a TimeGenerated more than two days old with the time of receipt, and
    the detections look back from the newest row (an hour, or a baseline of 14 days); replayed
    with their recorded times, events of a few hours ago would read as the baseline and raise
    nothing. Only top-level time fields change, and only their date and time of day, so each
    line keeps its length and its fraction of a second.
    """
    times = [_event_times(line) for line in lines]
    newest = max((moment for found in times for _, moment in found), default=None)
    if newest is None or newest >= now:
        return tuple(lines)
    shift = timedelta(seconds=math.floor((now - newest).total_seconds()))
    return tuple(_shifted(line, found, shift) for line, found in zip(lines, times, strict=True))


def _event_times(line: bytes) -> list[tuple[bytes, datetime]]:
    """The event's top-level time fields as (the ``"field":"date time`` text, its time)."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return []
    if type(event) is not dict:
        return []
    found: list[tuple[bytes, datetime]] = []
    for name in _TIME_FIELDS:
        value = event.get(name)
        match = _RFC3339.fullmatch(value) if type(value) is str else None
        if match is not None:
            moment = datetime.strptime(match[1], _SECONDS_FORMAT).replace(tzinfo=UTC)
            found.append((f'"{name}":"{match[1]}'.encode(), moment))
    return found


def _shifted(line: bytes, found: list[tuple[bytes, datetime]], shift: timedelta) -> bytes:
    for text, moment in found:
        name = text.split(b":", 1)[0]
        later = (moment + shift).strftime(_SECONDS_FORMAT).encode()
        line = line.replace(text, name + b':"' + later, 1)
    return line
