"""What the emulator accepted, every attempt it saw, and its DCR error log, in SQLite.

One writer (the emulator's single store thread) commits one transaction per request, before
the request is answered, so a client that got its 204 finds its rows here. Readers (tests, the
``auditrelay emulator`` query commands, another process) open their own connections; WAL mode
lets them read while the emulator writes.

``StoreMode.IDS`` is for benchmarks: the emulator only scans each body for its auditIDs (no
JSON parsing, no column checks) and keeps those, without row text or index.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

DATABASE_NAME = "emulator.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    received REAL NOT NULL,
    dcr TEXT,
    stream TEXT,
    client_request_id TEXT,
    status INTEGER NOT NULL,
    error_code TEXT,
    wire_bytes INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,
    content_encoding TEXT,
    rows_stored INTEGER NOT NULL,
    rows_dropped INTEGER NOT NULL,
    fault TEXT
);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY,
    request INTEGER NOT NULL,
    dcr TEXT NOT NULL,
    stream TEXT NOT NULL,
    received REAL NOT NULL,
    audit_id TEXT,
    time_generated TEXT,
    row TEXT
);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    dcr TEXT NOT NULL,
    stream TEXT NOT NULL,
    client_request_id TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    row_index INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    tenant TEXT NOT NULL,
    client_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    method TEXT NOT NULL,
    status INTEGER NOT NULL,
    error TEXT
);
"""
_ROW_INDEX = "CREATE INDEX IF NOT EXISTS rows_audit_id ON rows (audit_id)"


class StoreMode(enum.Enum):
    """How much of each accepted row is kept."""

    FULL = "full"  # the row as the table would hold it, indexed by auditID
    IDS = "ids"  # only the auditIDs found by scanning the body, unchecked: for benchmarks


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One attempt the ingestion endpoint saw, whatever its outcome."""

    received: float
    dcr: str | None
    stream: str | None
    client_request_id: str | None
    status: int  # 0: the connection was dropped without an answer
    error_code: str | None
    wire_bytes: int
    raw_bytes: int
    content_encoding: str | None
    rows_stored: int
    rows_dropped: int
    fault: str | None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    """One entry of the DCR error log: a row or body the service dropped or changed."""

    time: float
    dcr: str
    stream: str
    client_request_id: str | None
    kind: str
    message: str
    row_index: int | None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One row as the workspace table would hold it."""

    id: int
    request: int
    dcr: str
    stream: str
    received: float
    audit_id: str | None
    time_generated: str | None
    row: dict[str, Any] | None  # None in StoreMode.IDS


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One request to the token endpoint (no secret or assertion is kept)."""

    time: float
    tenant: str
    client_id: str
    scope: str
    method: str
    status: int
    error: str | None
    id: int | None = None


# (audit_id, time_generated, row JSON or None)
PreparedRow = tuple[str | None, str | None, bytes | None]


class Store:
    """The emulator's SQLite database in ``state_dir``."""

    def __init__(self, path: Path, mode: StoreMode = StoreMode.FULL) -> None:
        self.path = path.absolute()  # readers open it by file: URI, which must be absolute
        self.mode = mode
        self._writer: sqlite3.Connection | None = None

    @classmethod
    def in_directory(cls, state_dir: Path, mode: StoreMode = StoreMode.FULL) -> Store:
        """The store of an emulator state directory."""
        return cls(state_dir / DATABASE_NAME, mode)

    # --- writing (the emulator's store thread only) --------------------------------------

    def open_for_writing(self) -> None:
        """Creates the tables if needed; later writes go through this connection."""
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_SCHEMA)
        if self.mode is StoreMode.FULL:
            connection.execute(_ROW_INDEX)
        self._writer = connection

    def close(self) -> None:
        """Closes the writing connection."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _connection(self) -> sqlite3.Connection:
        if self._writer is None:
            raise RuntimeError("the store is not open for writing")
        return self._writer

    def record(
        self,
        request: RequestRecord,
        rows: Sequence[PreparedRow] = (),
        errors: Iterable[ErrorEntry] = (),
    ) -> int:
        """Stores one attempt, its accepted rows and its error-log entries in one transaction."""
        connection = self._connection()
        connection.execute("BEGIN")
        try:
            cursor = connection.execute(
                "INSERT INTO requests (received, dcr, stream, client_request_id, status, "
                "error_code, wire_bytes, raw_bytes, content_encoding, rows_stored, rows_dropped, "
                "fault) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.received,
                    request.dcr,
                    request.stream,
                    request.client_request_id,
                    request.status,
                    request.error_code,
                    request.wire_bytes,
                    request.raw_bytes,
                    request.content_encoding,
                    request.rows_stored,
                    request.rows_dropped,
                    request.fault,
                ),
            )
            request_id = int(cursor.lastrowid or 0)
            if rows:
                connection.executemany(
                    "INSERT INTO rows (request, dcr, stream, received, audit_id, time_generated, "
                    "row) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (request_id, request.dcr, request.stream, request.received, *row)
                        for row in rows
                    ],
                )
            connection.executemany(
                "INSERT INTO errors (time, dcr, stream, client_request_id, kind, message, "
                "row_index) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (e.time, e.dcr, e.stream, e.client_request_id, e.kind, e.message, e.row_index)
                    for e in errors
                ],
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return request_id

    def record_token(self, token: TokenRecord) -> None:
        """Stores one token request."""
        self._connection().execute(
            "INSERT INTO tokens (time, tenant, client_id, scope, method, status, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                token.time,
                token.tenant,
                token.client_id,
                token.scope,
                token.method,
                token.status,
                token.error,
            ),
        )

    # --- reading (any thread, any process) ------------------------------------------------

    def _read(self, query: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if not self.path.is_file():
            return []
        connection = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True)
        try:
            return connection.execute(query, parameters).fetchall()
        finally:
            connection.close()

    def count(self, dcr: str | None = None, stream: str | None = None) -> int:
        """How many rows were accepted, optionally for one rule and stream."""
        query, parameters = _filtered("SELECT count(*) FROM rows", dcr, stream)
        result = self._read(query, parameters)
        return int(result[0][0]) if result else 0

    def rows(self, audit_id: str | None = None, limit: int | None = None) -> list[StoredRow]:
        """Accepted rows in arrival order, optionally only those with one auditID."""
        query = "SELECT id, request, dcr, stream, received, audit_id, time_generated, row FROM rows"
        parameters: list[Any] = []
        if audit_id is not None:
            query += " WHERE audit_id = ?"
            parameters.append(audit_id)
        query += " ORDER BY id"
        if limit is not None:
            query += " LIMIT ?"
            parameters.append(limit)
        return [_stored_row(*found) for found in self._read(query, parameters)]

    def audit_id_counts(self) -> dict[str, int]:
        """How many times each auditID arrived (more than once means a duplicate)."""
        query = "SELECT audit_id, count(*) FROM rows WHERE audit_id IS NOT NULL GROUP BY audit_id"
        return {audit_id: int(count) for audit_id, count in self._read(query)}

    def errors(self, limit: int | None = None) -> list[ErrorEntry]:
        """The DCR error log, oldest first."""
        query = (
            "SELECT time, dcr, stream, client_request_id, kind, message, row_index, id "
            "FROM errors ORDER BY id"
        )
        return [ErrorEntry(*found) for found in self._read(*_limited(query, limit))]

    def requests(self, limit: int | None = None) -> list[RequestRecord]:
        """Every attempt seen by the ingestion endpoint, oldest first."""
        query = (
            "SELECT received, dcr, stream, client_request_id, status, error_code, wire_bytes, "
            "raw_bytes, content_encoding, rows_stored, rows_dropped, fault, id "
            "FROM requests ORDER BY id"
        )
        return [RequestRecord(*found) for found in self._read(*_limited(query, limit))]

    def token_requests(self) -> list[TokenRecord]:
        """Every request to the token endpoint, oldest first."""
        query = "SELECT time, tenant, client_id, scope, method, status, error, id FROM tokens"
        return [TokenRecord(*found) for found in self._read(query + " ORDER BY id")]


def _stored_row(
    id: int,
    request: int,
    dcr: str,
    stream: str,
    received: float,
    audit_id: str | None,
    time_generated: str | None,
    row: bytes | str | None,
) -> StoredRow:
    parsed = orjson.loads(row) if row is not None else None
    return StoredRow(id, request, dcr, stream, received, audit_id, time_generated, parsed)


def _filtered(query: str, dcr: str | None, stream: str | None) -> tuple[str, list[Any]]:
    conditions, parameters = [], []
    if dcr is not None:
        conditions.append("dcr = ?")
        parameters.append(dcr)
    if stream is not None:
        conditions.append("stream = ?")
        parameters.append(stream)
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    return query, parameters


def _limited(query: str, limit: int | None) -> tuple[str, list[Any]]:
    if limit is None:
        return query, []
    return query + " LIMIT ?", [limit]
