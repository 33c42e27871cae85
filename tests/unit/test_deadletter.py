"""The dead-letter area: append-only JSON lines, payloads kept exactly, bounded in size."""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from auditrelay.deadletter import DeadLetterStore, payload_of, read_letters
from auditrelay.model import DeadLetter

MakeStore = Callable[..., DeadLetterStore]


@pytest.fixture(name="make_store")
def _make_store() -> Iterator[MakeStore]:
    stores: list[DeadLetterStore] = []

    def make(directory: Path, **limits: Any) -> DeadLetterStore:
        store = DeadLetterStore(directory, **limits)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_letters_are_written_as_json_lines_with_reason_and_tag(
    tmp_path: Path, make_store: MakeStore
) -> None:
    """Each letter is one line with its reason, tag, time and the payload as text."""
    store = make_store(tmp_path / "p1")

    store.put([DeadLetter("log_not_json", b"not json", "kube.audit")])
    store.close()

    (path,) = store.files()
    (letter,) = read_letters(path)
    assert ("log_not_json", "kube.audit", "not json") == (
        letter["reason"],
        letter["tag"],
        letter["payload_text"],
    )
    assert letter["time"].endswith("Z")


def test_binary_payload_is_kept_as_base64(tmp_path: Path, make_store: MakeStore) -> None:
    """A payload that is not UTF-8 (msgpack bytes) round-trips exactly through base64."""
    payload = b"\xdd\x00\x00\x00\x02\xff\xfe"
    store = make_store(tmp_path)

    store.put([DeadLetter("non_utf8", payload, "t")])

    (letter,) = read_letters(store.files()[0])
    assert "payload_text" not in letter
    assert payload == payload_of(letter)


def test_letters_append_to_the_same_file(tmp_path: Path, make_store: MakeStore) -> None:
    """Several puts append to the open file in order."""
    store = make_store(tmp_path)

    store.put([DeadLetter("a", b"1")])
    store.put([DeadLetter("b", b"2"), DeadLetter("c", b"3")])

    assert [["a", "b", "c"]] == [[x["reason"] for x in read_letters(p)] for p in store.files()]
    assert 3 == store.counts.letters_written


def test_nothing_is_written_for_no_letters(tmp_path: Path, make_store: MakeStore) -> None:
    """An empty put creates no file and no directory."""
    store = make_store(tmp_path / "p1")

    store.put([])

    assert not (tmp_path / "p1").exists()


def test_files_roll_over_at_the_file_limit(tmp_path: Path, make_store: MakeStore) -> None:
    """A file that reached max_file_bytes is closed; the next put starts a new one."""
    store = make_store(tmp_path, max_file_bytes=100, max_total_bytes=1 << 20)

    for index in range(3):
        store.put([DeadLetter("r", b"x" * 120 + str(index).encode())])

    files = store.files()
    assert 3 == len(files)
    assert [b"x" * 120 + b"0", b"x" * 120 + b"1", b"x" * 120 + b"2"] == [
        payload_of(letter) for path in files for letter in read_letters(path)
    ]


def test_oldest_files_are_removed_past_the_total_limit_and_counted(
    tmp_path: Path, make_store: MakeStore
) -> None:
    """A flood of bad records cannot fill the disk: the oldest files go, and that is counted."""
    store = make_store(tmp_path, max_file_bytes=100, max_total_bytes=450)

    for index in range(10):
        store.put([DeadLetter("r", f"{index:03d}".encode() + b"y" * 120)])

    kept = [payload_of(letter)[:3] for path in store.files() for letter in read_letters(path)]
    total = sum(path.stat().st_size for path in store.files())
    assert total <= 450
    assert [f"{index:03d}".encode() for index in range(10 - len(kept), 10)] == kept
    assert 10 - len(kept) == store.counts.files_removed
    assert store.counts.bytes_removed > 0


def test_files_are_not_readable_by_others(tmp_path: Path, make_store: MakeStore) -> None:
    """Dead letters may hold audit data: files are 0640, not world-readable."""
    store = make_store(tmp_path / "p1")

    store.put([DeadLetter("r", b"secret-ish")])

    mode = stat.S_IMODE(store.files()[0].stat().st_mode)
    assert 0 == mode & stat.S_IRWXO
