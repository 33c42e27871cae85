"""Log set-up: JSON lines for collectors, and nothing secret in a traceback."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest
import structlog
from auditrelay.config import LogFormat
from auditrelay.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_event_level_and_time() -> None:
    """Each log call is one JSON object with the event, its level and a UTC timestamp."""
    stream = io.StringIO()
    configure_logging(LogFormat.JSON, "info", stream)

    structlog.get_logger().info("chunk_accepted", events_accepted=3)

    line = orjson.loads(stream.getvalue())
    assert ("chunk_accepted", "info", 3) == (line["event"], line["level"], line["events_accepted"])
    assert line["timestamp"].endswith("Z")


def test_level_filters_lower_events() -> None:
    """Below the configured level nothing is written."""
    stream = io.StringIO()
    configure_logging(LogFormat.JSON, "warning", stream)

    structlog.get_logger().info("chunk_accepted")

    assert "" == stream.getvalue()


def test_unknown_level_is_refused() -> None:
    """A misspelled level is an error, not silence."""
    with pytest.raises(ValueError, match="log level must be one of"):
        configure_logging(LogFormat.JSON, "verbose", io.StringIO())


@pytest.mark.parametrize("log_format", [LogFormat.JSON, LogFormat.CONSOLE])
def test_tracebacks_never_show_local_variables(log_format: LogFormat) -> None:
    """A traceback names the frames but not their locals, which may hold records or secrets."""
    stream = io.StringIO()
    configure_logging(log_format, "info", stream)

    def fail(client_secret: str) -> None:
        raise RuntimeError("delivery failed")

    secret = "-".join(["s3cr3t", "value"])  # built at run time: not in any source line shown
    try:
        fail(secret)
    except RuntimeError:
        structlog.get_logger().exception("push_failed")

    assert "delivery failed" in stream.getvalue()
    assert "s3cr3t-value" not in stream.getvalue()


def test_standard_library_logs_come_out_as_json_too() -> None:
    """grpc and asyncio log through logging; their lines are JSON with the logger's name."""
    stream = io.StringIO()
    configure_logging(LogFormat.JSON, "info", stream)

    logging.getLogger("grpc._cython.cygrpc").error("unexpected %s", "thing")

    line = orjson.loads(stream.getvalue())
    assert ("unexpected thing", "error", "grpc._cython.cygrpc") == (
        line["event"],
        line["level"],
        line["logger"],
    )
