"""What the spool remembers besides rows: batches delivered out of order, and the chunks it holds,
both surviving a restart (real spools on disk; a restart is close and reopen, or no close at
all, as after a SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from auditrelay.spool import Spool, SpoolRead
from auditrelay.spool_state import CHUNKS_FILE, CURSOR_FILE, ChunkLog, chunk_id


def rows(first: int, count: int) -> list[bytes]:
    return [b'{"n":%d,"pad":"%s"}' % (n, b"x" * 40) for n in range(first, first + count)]


def numbers(read_rows: list[bytes]) -> list[int]:
    return [json.loads(row)["n"] for row in read_rows]


def reads(spool: Spool, count: int, budget: int) -> list[SpoolRead]:
    out = []
    for _ in range(count):
        read = spool.read(budget)
        assert read is not None
        out.append(read)
    return out


def everything(spool: Spool) -> list[bytes]:
    out: list[bytes] = []
    while (read := spool.read(1 << 20)) is not None:
        out.extend(read.rows)
        spool.acknowledge(read.end)
    return out


def killed_after(work: Callable[[], object], result: Path) -> Any:
    """Runs ``work`` in a forked process that is SIGKILLed right after (nothing closed or
    flushed by it); returns what ``work`` returned, passed through ``result`` as JSON."""
    pid = os.fork()
    if pid == 0:  # the child: do the work, then die as the sidecar does under SIGKILL
        try:
            result.write_text(json.dumps(work()))
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert signal.SIGKILL == os.WTERMSIG(status)
    return json.loads(result.read_text())


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.mark.parametrize("segment_bytes", [1 << 20, 700])
def test_batches_delivered_out_of_order_are_not_sent_again_after_a_crash(
    spool_dir: Path, segment_bytes: int
) -> None:
    """Batches 2 and 4 are confirmed while 1 and 3 are still outstanding, then the process dies
    (no close): the next run sends 1 and 3 and the rest, never 2 or 4 again."""

    def deliver_two_of_four() -> list[list[int]]:
        spool = Spool(spool_dir, limit_bytes=10 << 20, segment_bytes=segment_bytes)
        for first in range(0, 100, 10):
            spool.append(rows(first, 10))
        batches = reads(spool, 4, 600)
        spool.acknowledge_ahead(batches[1].start, batches[1].end)
        spool.acknowledge_ahead(batches[3].start, batches[3].end)
        return [numbers(batch.rows) for batch in batches]

    first, second, third, fourth = killed_after(deliver_two_of_four, spool_dir.parent / "out")
    reopened = Spool(spool_dir, limit_bytes=10 << 20, segment_bytes=segment_bytes)
    resent = numbers(everything(reopened))
    assert sorted(set(range(100)) - set(second + fourth)) == resent
    assert first + third == resent[: len(first + third)]
    assert 0 == reopened.pending_bytes
    reopened.close()


def test_the_cursor_moves_over_batches_delivered_ahead_when_the_gap_closes(
    spool_dir: Path,
) -> None:
    """Once the outstanding batch is confirmed, the cursor takes in the batches confirmed
    ahead of it: nothing is pending and the cursor file no longer lists them."""
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 30))
    first, second, third = reads(spool, 3, 600)
    spool.acknowledge_ahead(third.start, third.end)
    spool.acknowledge_ahead(second.start, second.end)
    assert 2 == len(json.loads((spool_dir / CURSOR_FILE).read_text())["ahead"])
    assert 0 < spool.pending_bytes
    spool.acknowledge(first.end)
    assert 0 == spool.pending_bytes
    assert third.end == spool.acknowledged
    assert "ahead" not in json.loads((spool_dir / CURSOR_FILE).read_text())
    spool.close()


def test_a_range_confirmed_after_the_cursor_passed_it_changes_nothing(spool_dir: Path) -> None:
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 20))
    _, second = reads(spool, 2, 600)
    spool.acknowledge(second.end)
    spool.acknowledge_ahead(second.start, second.end)
    assert "ahead" not in json.loads((spool_dir / CURSOR_FILE).read_text())
    spool.close()


def test_a_cursor_file_of_an_earlier_version_is_read(spool_dir: Path) -> None:
    """A cursor without delivered ranges (as written before they existed) still works."""
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 20))
    first = spool.read(600)
    assert first is not None
    spool.close()
    (spool_dir / CURSOR_FILE).write_text(
        json.dumps({"segment": first.end.segment, "offset": first.end.offset})
    )
    reopened = Spool(spool_dir, limit_bytes=10 << 20)
    assert list(range(len(first.rows), 20)) == numbers(everything(reopened))
    reopened.close()


def test_a_chunk_appended_before_a_crash_is_recognised_after_it(spool_dir: Path) -> None:
    """The id of a chunk whose rows were appended survives the process; another chunk's, or the
    same bytes under another tag, does not match."""
    chunk = b"\x92\xd7\x00" + b"msgpack bytes of a chunk"

    def append_chunk() -> bool:
        spool = Spool(spool_dir, limit_bytes=10 << 20)
        spool.append(rows(0, 3), chunk=chunk_id("kube.audit", chunk))
        return spool.holds_chunk(chunk_id("kube.audit", chunk))

    assert killed_after(append_chunk, spool_dir.parent / "out")
    reopened = Spool(spool_dir, limit_bytes=10 << 20)
    assert reopened.holds_chunk(chunk_id("kube.audit", chunk))
    assert not reopened.holds_chunk(chunk_id("kube.audit", chunk + b"x"))
    assert not reopened.holds_chunk(chunk_id("other.tag", chunk))
    reopened.close()


def test_a_chunk_refused_for_a_full_spool_is_not_remembered(spool_dir: Path) -> None:
    """Only rows that were stored make their chunk known: a refused chunk must be taken when it
    comes back."""
    spool = Spool(spool_dir, limit_bytes=2000, segment_bytes=64 << 10)
    spool.append(rows(0, 20))
    with pytest.raises(Exception, match="full"):
        spool.append(rows(20, 20), chunk=chunk_id("t", b"refused"))
    assert not spool.holds_chunk(chunk_id("t", b"refused"))
    spool.close()


def test_the_chunk_log_stays_bounded_and_keeps_the_newest(tmp_path: Path) -> None:
    log = ChunkLog(tmp_path, capacity=8)
    ids = [chunk_id("t", b"%d" % n) for n in range(50)]
    for item in ids:
        log.remember(item)
    assert 8 == len(log)
    assert all(item in log for item in ids[-8:])
    assert ids[0] not in log
    assert (tmp_path / CHUNKS_FILE).stat().st_size <= 2 * 8 * len(ids[0])
    log.close()
    again = ChunkLog(tmp_path, capacity=8)
    assert all(item in again for item in ids[-8:])
    assert ids[-9] not in again


def test_a_torn_chunk_id_at_the_end_of_the_file_is_left_out(tmp_path: Path) -> None:
    log = ChunkLog(tmp_path)
    log.remember(chunk_id("t", b"whole"))
    log.close()
    with open(tmp_path / CHUNKS_FILE, "ab") as file:
        file.write(b"\x01\x02\x03")  # a write cut short
    again = ChunkLog(tmp_path)
    assert 1 == len(again)
    assert chunk_id("t", b"whole") in again
