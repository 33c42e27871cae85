"""One ingestion body on the store thread: gunzip, strict JSON, the rule's row checks.

``BodyReader.read`` turns the bytes of one accepted request into the rows the table keeps and
the entries of the DCR error log; ``Attempt`` is what the request log records of the request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import isal.isal_zlib
import orjson

from auditrelay.emulator.responses import RefusedError, too_large_message
from auditrelay.emulator.schema import RowChecker, StreamDeclaration
from auditrelay.emulator.settings import MAX_ERRORS_PER_REQUEST, BodyMode, EmulatorSettings
from auditrelay.emulator.store import ErrorEntry, PreparedRow, RequestRecord, StoreMode

# isal's stub declares its error as an instance; it is the exception class the inflater raises.
_GZIP_ERROR = cast("type[Exception]", isal.isal_zlib.IsalError)


@dataclass(slots=True)
class Answer:
    """The outcome of the store thread's work on one body."""

    status: int
    code: str | None = None
    message: str = ""


@dataclass(slots=True)
class Attempt:
    """One ingestion request as the request log records it."""

    received: float
    dcr: str
    stream: str
    client_request_id: str | None
    wire_bytes: int
    content_encoding: str | None
    raw_bytes: int = 0
    status: int = 0
    error_code: str | None = None
    rows_stored: int = 0
    rows_dropped: int = 0
    fault: str | None = None

    def record(self) -> RequestRecord:
        """The request log's entry."""
        return RequestRecord(
            received=self.received,
            dcr=self.dcr,
            stream=self.stream,
            client_request_id=self.client_request_id,
            status=self.status,
            error_code=self.error_code,
            wire_bytes=self.wire_bytes,
            raw_bytes=self.raw_bytes,
            content_encoding=self.content_encoding,
            rows_stored=self.rows_stored,
            rows_dropped=self.rows_dropped,
            fault=self.fault,
        )

    def error(self, kind: str, message: str, row_index: int | None = None) -> ErrorEntry:
        """An entry of the DCR error log about this request."""
        return ErrorEntry(
            time=self.received,
            dcr=self.dcr,
            stream=self.stream,
            client_request_id=self.client_request_id,
            kind=kind,
            message=message,
            row_index=row_index,
        )


Outcome = tuple[Answer, list[PreparedRow], list[ErrorEntry]]


def gunzip(body: bytes, limit: int) -> bytes:
    """The decompressed body (several gzip members allowed); raises RefusedError."""
    parts: list[bytes] = []
    size = 0
    rest = body
    while rest:
        inflater = isal.isal_zlib.decompressobj(wbits=31)
        try:
            part = inflater.decompress(rest, limit - size + 1)
        except _GZIP_ERROR as error:
            raise RefusedError(
                400, "InvalidContentEncoding", f"The gzip body is corrupt: {error}"
            ) from None
        size += len(part)
        if size > limit:
            raise RefusedError(
                413,
                "ContentLengthLimitExceeded",
                f"Maximum allowed decompressed content length: {limit} bytes.",
            )
        if not inflater.eof:
            raise RefusedError(400, "InvalidContentEncoding", "The gzip body is truncated.")
        parts.append(part)
        rest = inflater.unused_data
    return b"".join(parts)


def _audit_id_scanner(column: str) -> Callable[[bytes], list[bytes]]:
    """Finds every ``"<column>": "<value>"`` in a body without parsing it (StoreMode.IDS)."""
    pattern = re.compile(rb'"' + re.escape(column.encode()) + rb'"\s*:\s*"([^"\\]*)"')
    return pattern.findall


class BodyReader:
    """Reads bodies for the streams of one rule: built once, used on the store thread."""

    def __init__(
        self, settings: EmulatorSettings, declarations: Mapping[str, StreamDeclaration]
    ) -> None:
        self.settings = settings
        self.checkers = {
            name: RowChecker(declaration, fill_time_generated=settings.fill_time_generated)
            for name, declaration in declarations.items()
        }
        self._id_scanners = {
            name: _audit_id_scanner(declaration.audit_id_column)
            for name, declaration in declarations.items()
            if settings.store_mode is StoreMode.IDS and declaration.audit_id_column
        }

    def read(self, attempt: Attempt, body: bytes) -> Outcome:
        """The answer, the rows to store and the error-log entries; raises RefusedError."""
        raw = self._decompressed(attempt, body)
        attempt.raw_bytes = len(raw)
        checker = self.checkers[attempt.stream]
        scanner = self._id_scanners.get(attempt.stream)
        if scanner is not None:
            if raw.lstrip()[:1] != b"[":
                return self._not_an_array(attempt)
            return Answer(204), [(found.decode(), None, None) for found in scanner(raw)], []
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise RefusedError(400, "InvalidJson", f"The body is not valid JSON: {error}") from None
        if not isinstance(document, list):
            return self._not_an_array(attempt)
        checked = checker.check(document, datetime.fromtimestamp(attempt.received, UTC))
        attempt.rows_dropped = len(document) - len(checked.rows)
        errors = [
            attempt.error(problem.kind, problem.message, problem.index)
            for problem in checked.problems[:MAX_ERRORS_PER_REQUEST]
        ]
        if len(checked.problems) > MAX_ERRORS_PER_REQUEST:
            errors.append(
                attempt.error(
                    "MoreProblems",
                    f"{len(checked.problems) - MAX_ERRORS_PER_REQUEST} more problems in this "
                    "request",
                )
            )
        return Answer(204), self._prepare(checker, checked.rows), errors

    def _decompressed(self, attempt: Attempt, body: bytes) -> bytes:
        if (attempt.content_encoding or "").strip().lower() == "gzip":
            return gunzip(body, self.settings.max_raw_bytes)
        if len(body) > self.settings.max_raw_bytes:
            raise RefusedError(
                413,
                "ContentLengthLimitExceeded",
                too_large_message(self.settings.max_raw_bytes, len(body)),
            )
        return body

    def _not_an_array(self, attempt: Attempt) -> Outcome:
        if self.settings.body_mode is BodyMode.STRICT:
            raise RefusedError(400, "InvalidPayload", "The body must be a JSON array of objects.")
        entry = attempt.error("BodyNotArray", "The body is not a JSON array; nothing was stored.")
        attempt.rows_dropped = 1
        return Answer(204), [], [entry]

    def _prepare(self, checker: RowChecker, rows: list[dict[str, Any]]) -> list[PreparedRow]:
        audit_column = checker.declaration.audit_id_column
        full = self.settings.store_mode is StoreMode.FULL
        prepared: list[PreparedRow] = []
        for row in rows:
            audit_id = row.get(audit_column) if audit_column else None
            prepared.append(
                (
                    None if audit_id is None else str(audit_id),
                    row.get("TimeGenerated") if full else None,
                    orjson.dumps(row) if full else None,
                )
            )
        return prepared
