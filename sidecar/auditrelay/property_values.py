"""Parsers of property values: each returns the parsed value or raises ValueError(expected).

The ``expected`` text is what a configuration error shows after the property and the value
(``batch_interval: got 'soon', expected a duration such as 500ms, 5s, 2m or 1h``). Durations
take ``ms``, ``s``, ``m``, ``h``; sizes binary ``k``, ``M``, ``G``.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNIT = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_DCR_ID = re.compile(r"^dcr-[0-9a-f]{32}$")
_STREAM = re.compile(r"^Custom-[A-Za-z][A-Za-z0-9_]{0,44}$")


def parse_duration(text: str) -> float:
    """'500ms', '5s', '2m', '1h' or plain seconds, to seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("a duration such as 500ms, 5s, 2m or 1h")
    return float(match.group(1)) * _DURATION_UNIT[(match.group(2) or "s").lower()]


def parse_size(text: str) -> int:
    """'1048576', '512k', '64M', '2G' (binary units), to bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("a size such as 512k, 64M or 2G")
    return int(match.group(1)) * _SIZE_UNIT[(match.group(2) or "")[:1].lower()]


def parse_bool(text: str) -> bool:
    """Fluent Bit's boolean spellings."""
    lowered = text.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ValueError("on or off")


def choice(enum_type: type[enum.Enum]) -> Callable[[str], Any]:
    """A parser of one of the enum's values (case-insensitive)."""

    def parse(text: str) -> Any:
        try:
            return enum_type(text.strip().lower())
        except ValueError:
            allowed = ", ".join(str(member.value) for member in enum_type)
            raise ValueError(f"one of: {allowed}") from None

    return parse


def int_range(low: int, high: int) -> Callable[[str], int]:
    """A parser of an integer from low to high."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value

    return parse


def positive(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """``parse``, refusing zero and negative values (``what``: the noun in the error)."""

    def parse_positive(text: str) -> Any:
        value = parse(text)
        if value <= 0:
            raise ValueError(f"a positive {what}")
        return value

    return parse_positive


def size_range(low: int, high: int) -> Callable[[str], int]:
    """A parser of a size from low to high bytes."""

    def parse(text: str) -> int:
        expected = f"a size from {_size_text(low)} to {_size_text(high)}, such as 1M"
        try:
            value = parse_size(text)
        except ValueError:
            raise ValueError(expected) from None
        if not low <= value <= high:
            raise ValueError(expected)
        return value

    return parse


def _size_text(size: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_https_url(text: str) -> str:
    """An https URL with a host, returned without a trailing slash."""
    parts = urlsplit(text.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(
            "an https:// URL such as https://my-dce.westeurope-1.ingest.monitor.azure.com"
        )
    return text.strip().rstrip("/")


def parse_dcr_id(text: str) -> str:
    """A data collection rule's immutable id."""
    if not _DCR_ID.match(text.strip()):
        raise ValueError("the rule's immutable id: dcr- followed by 32 hex digits")
    return text.strip()


def parse_stream(text: str) -> str:
    """A custom stream name of the data collection rule."""
    if not _STREAM.match(text.strip()):
        raise ValueError(
            "a custom stream name: Custom- followed by a letter and up to 44 letters, digits or _"
        )
    return text.strip()


def parse_readable_file(text: str) -> Path:
    """A path to a file this process can read."""
    path = Path(text.strip())
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError("a path to a readable file")
    return path


def parse_text(text: str) -> str:
    """Any non-empty text."""
    if not text.strip():
        raise ValueError("a non-empty value")
    return text.strip()


def parse_sidecar_address(text: str) -> str:
    """unix:///absolute/path or host:port."""
    value = text.strip()
    if value.startswith("unix://"):
        if not value[len("unix://") :].startswith("/"):
            raise ValueError("unix:///absolute/path.sock or host:port")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("unix:///absolute/path.sock or host:port")
    return value
