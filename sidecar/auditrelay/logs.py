"""structlog set-up, done once at the entry point: JSON lines in production, console on a terminal.

Modules log through ``structlog.get_logger()``; events are snake_case past-tense facts with
key-value context, one line per chunk or batch, never a record body or a secret.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import orjson
import structlog
import structlog.stdlib
import structlog.tracebacks

from auditrelay.config import LogFormat

LEVELS = ("debug", "info", "warning", "error", "critical")


# Tracebacks without local variables: locals hold record bodies and settings with secrets.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _orjson_text(event: object, **_: object) -> str:
    return orjson.dumps(event, default=str).decode()


def configure_logging(
    log_format: LogFormat = LogFormat.AUTO, level: str = "info", stream: TextIO | None = None
) -> None:
    """Configures structlog for the whole process; raises ValueError for an unknown level."""
    output = stream if stream is not None else sys.stdout
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of: {', '.join(LEVELS)}")
    console = log_format is LogFormat.CONSOLE or (log_format is LogFormat.AUTO and output.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
        if console
        else [_DICT_TRACEBACKS, structlog.processors.JSONRenderer(_orjson_text)]
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(output, numeric_level, shared, renderer)


def _route_stdlib_logging(
    output: TextIO,
    level: int,
    shared: list[structlog.typing.Processor],
    renderer: list[structlog.typing.Processor],
) -> None:
    """Libraries that log through the standard library (grpc, asyncio) come out the same way."""
    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    for existing in root.handlers[:]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
