"""The emulator's SQLite store: rows, attempts, the DCR error log and token requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from auditrelay.emulator.store import (
    ErrorEntry,
    RequestRecord,
    Store,
    StoreMode,
    TokenRecord,
)


def attempt(status: int = 204, rows: int = 0, request_id: str = "req-1") -> RequestRecord:
    return RequestRecord(
        received=1000.0,
        dcr="dcr-1",
        stream="Custom-T_CL",
        client_request_id=request_id,
        status=status,
        error_code=None,
        wire_bytes=120,
        raw_bytes=400,
        content_encoding="gzip",
        rows_stored=rows,
        rows_dropped=0,
        fault=None,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.in_directory(tmp_path)
    opened.open_for_writing()
    yield opened
    opened.close()


def test_rows_of_one_request_are_stored_and_found_by_audit_id(store: Store) -> None:
    """Stored rows come back by auditID, with their request, rule, stream and JSON."""
    rows = [
        ("a-1", "2026-05-01T00:00:00Z", orjson.dumps({"auditID": "a-1", "n": 1})),
        ("a-2", "2026-05-01T00:00:01Z", orjson.dumps({"auditID": "a-2", "n": 2})),
    ]
    request = store.record(attempt(rows=2), rows)

    found = store.rows(audit_id="a-2")

    assert 2 == store.count()
    assert [(request, "dcr-1", "Custom-T_CL", {"auditID": "a-2", "n": 2})] == [
        (row.request, row.dcr, row.stream, row.row) for row in found
    ]


def test_count_filters_by_rule_and_stream(store: Store) -> None:
    """count() narrows to one rule and stream when asked."""
    store.record(attempt(rows=1), [("a-1", None, b"{}")])

    assert (1, 1, 0) == (
        store.count(dcr="dcr-1"),
        store.count(stream="Custom-T_CL"),
        store.count(stream="Custom-Other_CL"),
    )


def test_duplicates_show_in_audit_id_counts(store: Store) -> None:
    """The same auditID stored twice (a retried request) counts 2."""
    store.record(attempt(rows=2), [("a-1", None, b"{}"), ("a-2", None, b"{}")])
    store.record(attempt(rows=1, request_id="req-2"), [("a-1", None, b"{}")])

    assert {"a-1": 2, "a-2": 1} == store.audit_id_counts()


def test_attempts_and_error_log_are_kept_in_order(store: Store) -> None:
    """Every attempt and every error-log entry is kept, oldest first."""
    error = ErrorEntry(1000.0, "dcr-1", "Custom-T_CL", "req-2", "UndeclaredColumn", "m", 3)
    store.record(attempt(status=429, request_id="req-1"))
    store.record(attempt(status=204, request_id="req-2"), [], [error])

    assert [("req-1", 429), ("req-2", 204)] == [
        (record.client_request_id, record.status) for record in store.requests()
    ]
    assert [("UndeclaredColumn", 3, "req-2")] == [
        (entry.kind, entry.row_index, entry.client_request_id) for entry in store.errors()
    ]
    assert 1 == len(store.requests(limit=1))


def test_token_requests_are_recorded(store: Store) -> None:
    """Token requests are logged with method and outcome, never a secret."""
    store.record_token(TokenRecord(1.0, "t", "c", "s/.default", "client_secret", 200, None))

    assert [("c", "client_secret", 200)] == [
        (token.client_id, token.method, token.status) for token in store.token_requests()
    ]


def test_ids_mode_keeps_no_row_text(tmp_path: Path) -> None:
    """In ids mode only the auditID is kept."""
    store = Store.in_directory(tmp_path, StoreMode.IDS)
    store.open_for_writing()
    store.record(attempt(rows=1), [("a-1", None, None)])
    store.close()

    assert [("a-1", None)] == [(row.audit_id, row.row) for row in store.rows()]


def test_a_store_never_written_reads_as_empty(tmp_path: Path) -> None:
    """Queries against a directory without a database answer empty, not an error."""
    store = Store.in_directory(tmp_path / "nothing")

    assert (0, [], [], {}) == (store.count(), store.rows(), store.errors(), store.audit_id_counts())


def test_readers_see_rows_while_the_writer_is_open(store: Store) -> None:
    """Another connection (another process) reads committed rows while the emulator writes."""
    store.record(attempt(rows=1), [("a-1", None, b"{}")])
    reader = Store(store.path)

    assert 1 == reader.count()


def test_a_store_named_by_a_relative_path_can_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auditrelay emulator rows --state-dir .state/x` works: readers need an absolute path."""
    monkeypatch.chdir(tmp_path)
    writer = Store.in_directory(Path("state"))
    Path("state").mkdir()
    writer.open_for_writing()
    writer.record(attempt(rows=1), [("a-1", None, orjson.dumps({"auditID": "a-1"}))])
    writer.close()

    assert [{"auditID": "a-1"}] == [row.row for row in Store.in_directory(Path("state")).rows()]
