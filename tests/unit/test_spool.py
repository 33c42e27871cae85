"""The spool: durable, ordered, acknowledged, size-limited, and tolerant of a damaged tail."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from auditrelay.errors import SpoolError, SpoolFullError
from auditrelay.spool import FRAME, CorruptRegion, Position, Spool, SpoolRead, frame


def rows(first: int, count: int, width: int = 40) -> list[bytes]:
    """Distinct JSON rows, each ``width`` bytes or a bit more."""
    return [b'{"n":%d,"pad":"%s"}' % (n, b"x" * width) for n in range(first, first + count)]


def read_all(spool: Spool, budget: int = 1 << 20) -> Iterator[SpoolRead]:
    while (read := spool.read(budget)) is not None:
        yield read


def drain(spool: Spool) -> list[bytes]:
    """Reads and acknowledges everything the spool holds."""
    out: list[bytes] = []
    for read in read_all(spool):
        out.extend(read.rows)
        spool.acknowledge(read.end)
    return out


def fill(spool: Spool, batch: list[bytes]) -> tuple[int, SpoolFullError]:
    """Appends ``batch`` until the spool refuses; how many appends it took, and the refusal."""
    stored = 0
    while True:
        try:
            spool.append(batch)
        except SpoolFullError as error:
            return stored, error
        stored += 1


def segments(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("*.seg"))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_rows_come_back_in_order_across_segments(spool_dir: Path) -> None:
    """Appended rows are read back in order, over several segment files."""
    spool = Spool(spool_dir, limit_bytes=10 << 20, segment_bytes=4096)
    for first in range(0, 1000, 50):
        spool.append(rows(first, 50))
    assert 3 < len(segments(spool_dir))
    assert rows(0, 1000) == drain(spool)
    spool.close()


def test_a_restart_resends_everything_not_acknowledged(spool_dir: Path) -> None:
    """After close and reopen, reading starts at the acknowledged position: nothing is lost."""
    spool = Spool(spool_dir, limit_bytes=10 << 20, segment_bytes=2048)
    spool.append(rows(0, 100))
    first = spool.read(1000)
    assert first is not None
    spool.acknowledge(first.end)
    read_but_not_acknowledged = spool.read(1000)
    assert read_but_not_acknowledged is not None
    spool.close()

    reopened = Spool(spool_dir, limit_bytes=10 << 20, segment_bytes=2048)
    assert rows(len(first.rows), 100 - len(first.rows)) == drain(reopened)
    reopened.close()


def test_delivered_segments_are_deleted(spool_dir: Path) -> None:
    """Once everything is acknowledged, only the segment being written remains on disk."""
    spool = Spool(spool_dir, limit_bytes=10 << 20, segment_bytes=2048)
    for first in range(0, 500, 25):
        spool.append(rows(first, 25))
    drain(spool)
    assert 1 == len(segments(spool_dir))
    assert 0 == spool.pending_bytes
    spool.close()


def test_a_full_spool_refuses_appends_until_rows_are_delivered(spool_dir: Path) -> None:
    """Over the byte limit append raises SpoolFullError and stores nothing; delivery frees room."""
    spool = Spool(spool_dir, limit_bytes=64 << 10, segment_bytes=8 << 10)
    batch = rows(0, 100)
    stored, error = fill(spool, batch)
    assert "is full" in str(error)
    assert spool.used_bytes <= 64 << 10
    assert batch * stored == drain(spool)
    spool.append(batch)
    assert batch == drain(spool)
    spool.close()


def test_an_empty_spool_takes_one_chunk_larger_than_its_limit(spool_dir: Path) -> None:
    """A chunk bigger than spool_limit is not refused forever: an empty spool takes it alone."""
    spool = Spool(spool_dir, limit_bytes=4 << 10, segment_bytes=1 << 20)
    big = rows(0, 200)
    spool.append(big)
    with pytest.raises(SpoolFullError):
        spool.append(rows(200, 1))
    assert big == drain(spool)
    spool.close()


def test_a_spool_whose_rows_are_all_delivered_is_never_full(spool_dir: Path) -> None:
    """Delivered rows in the current segment do not count against the limit for long."""
    spool = Spool(spool_dir, limit_bytes=16 << 10, segment_bytes=1 << 20)
    for first in range(0, 2000, 50):
        spool.append(rows(first, 50))
        assert rows(first, 50) == drain(spool)
    spool.close()


def test_reads_are_bounded_whatever_the_backlog(spool_dir: Path) -> None:
    """A read returns at most max_bytes of rows, as close to it as whole rows allow, however
    much the spool holds; the row that would not fit comes first in the next read."""
    spool = Spool(spool_dir, limit_bytes=64 << 20, sync=False)
    for first in range(0, 100_000, 10_000):
        spool.append(rows(first, 10_000))
    read = spool.read(10_000)
    assert read is not None
    largest = max(len(row) for row in read.rows)
    assert 10_000 - largest < read.raw_bytes <= 10_000
    assert (rows(0, len(read.rows)), True) == (read.rows, read.full)
    following = spool.read(10)
    assert following is not None
    assert rows(len(read.rows), 1) == following.rows  # one row, larger than 10 bytes
    spool.close()


def test_a_read_counts_each_rows_overhead(spool_dir: Path) -> None:
    """row_overhead counts each row's separator in a request body, so that the rows' bytes
    plus one byte each stay within max_bytes."""
    spool = Spool(spool_dir, limit_bytes=64 << 20, sync=False)
    spool.append([b"x" * 99] * 100)
    read = spool.read(1_000, row_overhead=1)
    assert read is not None
    assert (10, 1_000, True) == (len(read.rows), read.raw_bytes, read.full)
    spool.close()


def test_a_large_row_is_read_whole(spool_dir: Path) -> None:
    """A row larger than the read block is returned whole, between small ones."""
    spool = Spool(spool_dir, limit_bytes=64 << 20)
    big = b'{"big":"' + b"y" * (3 << 20) + b'"}'
    spool.append([b'{"a":1}', big, b'{"b":2}'])
    assert [b'{"a":1}', big, b'{"b":2}'] == drain(spool)
    spool.close()


def crash_mid_append(spool_dir: Path, torn: bytes) -> None:
    """Leaves the newest segment as a crash during a write would: a partial frame at its end."""
    newest = spool_dir / segments(spool_dir)[-1]
    with open(newest, "ab") as segment:
        segment.write(torn)


def test_a_torn_tail_is_reported_and_skipped(spool_dir: Path) -> None:
    """A partial frame at the end of a segment (a crash mid-write) is skipped, reported, not fatal."""
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 10))
    spool.close()
    half_frame = frame(rows(10, 1))[:30]
    crash_mid_append(spool_dir, half_frame)

    damage: list[CorruptRegion] = []
    reopened = Spool(spool_dir, limit_bytes=10 << 20, on_corrupt=damage.append)
    reopened.append(rows(20, 5))
    assert rows(0, 10) + rows(20, 5) == drain(reopened)
    assert 1 == len(damage)
    assert ("torn frame", len(half_frame)) == (damage[0].reason, damage[0].skipped_bytes)
    reopened.close()


def test_a_torn_tail_alone_does_not_hold_the_spool(spool_dir: Path) -> None:
    """Once everything before a torn tail is delivered, passing the damage frees its segment:
    nothing stays pending and the damaged file is deleted."""
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 4))
    drain(spool)
    spool.close()
    crash_mid_append(spool_dir, frame(rows(4, 1))[:20])
    damaged = segments(spool_dir)[-1]
    reopened = Spool(spool_dir, limit_bytes=10 << 20, on_corrupt=lambda region: None)
    assert reopened.read(1 << 20) is None
    assert 0 == reopened.pending_bytes
    assert damaged not in segments(spool_dir)
    reopened.close()


def test_a_torn_frame_header_is_reported_and_skipped(spool_dir: Path) -> None:
    """Even a few bytes of a frame header at the end are recognised as a torn tail."""
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 3))
    spool.close()
    crash_mid_append(spool_dir, b"\x07\x00")
    damage: list[CorruptRegion] = []
    reopened = Spool(spool_dir, limit_bytes=10 << 20, on_corrupt=damage.append)
    assert rows(0, 3) == drain(reopened)
    assert ["torn frame header"] == [region.reason for region in damage]
    reopened.close()


def test_a_damaged_record_skips_the_rest_of_its_segment_only(spool_dir: Path) -> None:
    """A checksum mismatch is reported; rows before it and in later segments are still delivered."""
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 10))
    spool.close()
    first_segment = spool_dir / segments(spool_dir)[0]
    data = bytearray(first_segment.read_bytes())
    row_size = FRAME.size + len(rows(0, 1)[0])
    data[5 * row_size + FRAME.size + 3] ^= 0xFF  # flips a byte inside the sixth row
    first_segment.write_bytes(bytes(data))

    damage: list[CorruptRegion] = []
    reopened = Spool(spool_dir, limit_bytes=10 << 20, on_corrupt=damage.append)
    reopened.append(rows(100, 3))
    assert rows(0, 5) + rows(100, 3) == drain(reopened)
    assert [("checksum mismatch", 5 * row_size)] == [
        (region.reason, region.skipped_bytes) for region in damage
    ]
    reopened.close()


def test_a_segment_deleted_behind_the_spools_back_is_reported_and_skipped(spool_dir: Path) -> None:
    """A missing segment file (removed by hand) is reported like damage; later rows still come."""
    spool = Spool(spool_dir, limit_bytes=10 << 20, segment_bytes=1024)
    spool.append(rows(0, 30))
    spool.append(rows(30, 30))
    first = spool.read(10)
    assert first is not None
    spool.acknowledge(first.end)  # the cursor now points into the first segment
    spool.close()
    (spool_dir / segments(spool_dir)[0]).unlink()
    damage: list[CorruptRegion] = []
    reopened = Spool(spool_dir, limit_bytes=10 << 20, on_corrupt=damage.append)
    assert rows(30, 30) == drain(reopened)
    assert ["segment file missing"] == [region.reason for region in damage]
    reopened.close()


def test_an_unreadable_cursor_resends_from_the_oldest_row(spool_dir: Path) -> None:
    """A damaged cursor file costs duplicates, never loss."""
    spool = Spool(spool_dir, limit_bytes=10 << 20)
    spool.append(rows(0, 10))
    read = spool.read(100)
    assert read is not None
    spool.acknowledge(read.end)
    spool.close()
    (spool_dir / "cursor").write_text("{not json")
    reopened = Spool(spool_dir, limit_bytes=10 << 20)
    assert rows(0, 10) == drain(reopened)
    reopened.close()


def test_one_spool_directory_has_one_user(spool_dir: Path) -> None:
    """A second Spool on the same directory is refused while the first is open."""
    spool = Spool(spool_dir, limit_bytes=1 << 20)
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(spool_dir, limit_bytes=1 << 20)
    spool.close()
    Spool(spool_dir, limit_bytes=1 << 20).close()


def test_positions_and_oldest_time_follow_acknowledgements(spool_dir: Path) -> None:
    """The oldest pending time exists while rows wait and is gone once all are acknowledged."""
    spool = Spool(spool_dir, limit_bytes=1 << 20)
    assert spool.oldest_pending_time() is None
    end = spool.append(rows(0, 3))
    assert Position(end.segment, 3 * (FRAME.size + len(rows(0, 1)[0]))) == end
    assert spool.oldest_pending_time() is not None
    assert spool.append_time(Position(end.segment, 0)) is not None
    drain(spool)
    assert spool.oldest_pending_time() is None
    spool.close()


def test_interval_mode_syncs_on_request(spool_dir: Path) -> None:
    """With sync=False, append does not fsync; sync() flushes and rows read back the same."""
    spool = Spool(spool_dir, limit_bytes=1 << 20, sync=False)
    spool.append(rows(0, 5))
    spool.sync()
    spool.close()
    reopened = Spool(spool_dir, limit_bytes=1 << 20)
    assert rows(0, 5) == drain(reopened)
    reopened.close()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, so that the file system fills up for real (needs root)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=256k tmpfs {mount_point}") != 0:  # noqa: S605
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount_point
    finally:
        os.system(f"umount {mount_point}")  # noqa: S605


def test_a_full_disk_is_a_clear_spool_full_error_without_corruption(tiny_disk: Path) -> None:
    """ENOSPC raises SpoolFullError naming the disk; the failed rows are cut off, the rest is intact."""
    spool = Spool(tiny_disk / "spool", limit_bytes=64 << 20)
    batch = rows(0, 200, width=200)
    stored, error = fill(spool, batch)
    assert "no space left on the file system" in str(error)
    assert 0 < stored
    assert batch * stored == drain(spool)
    spool.append(batch)  # delivered rows make room again
    assert batch == drain(spool)
    spool.close()
