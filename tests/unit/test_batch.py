"""Request bodies: the rows as a JSON array, gzip'd, under the per-call limit, nothing re-encoded."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import orjson
import pytest
from auditrelay.batch import MAX_BODY_BYTES, BatchBuilder, Body, Codec, codec_for

SAMPLES = sorted(Path("/work/shared/data/audit-samples").glob("*.jsonl"))


def sample_rows() -> list[bytes]:
    return [line for path in SAMPLES for line in path.read_bytes().splitlines()]


def noisy_rows(count: int) -> list[bytes]:
    """Rows that compress poorly, so that small limits are reached quickly."""
    noise = [hashlib.shake_256(b"%d" % n).hexdigest(300).encode() for n in range(count)]
    return [b'{"n":%d,"r":"%s"}' % (n, noise[n]) for n in range(count)]


def rows_of(bodies: list[Body]) -> list[bytes]:
    return [row for body in bodies for row in body.rows]


@pytest.mark.parametrize("codec", ["isal", "zlib"])
def test_a_body_is_the_gzip_of_the_json_array_of_its_rows(codec: Codec) -> None:
    """The body decompresses to `[row,row,...]` with the rows' bytes unchanged."""
    rows = sample_rows()
    [body] = BatchBuilder(1, codec=codec).pack(rows)
    raw = gzip.decompress(body.data)
    assert b"[" + b",".join(rows) + b"]" == raw
    assert [orjson.loads(row) for row in rows] == orjson.loads(raw)
    assert len(raw) == body.raw_bytes


def test_bodies_stay_under_the_limit_and_keep_every_row_in_order() -> None:
    """With a small limit, rows spread over many bodies, each under it, none lost or reordered."""
    rows = noisy_rows(2000)
    builder = BatchBuilder(1, max_body_bytes=40_000)
    bodies = builder.pack(rows)
    assert 10 < len(bodies)
    assert all(len(body.data) <= 40_000 for body in bodies)
    assert rows == rows_of(bodies)


def test_a_row_larger_than_the_limit_is_sent_alone() -> None:
    """A row that cannot fit is not split (rows are atomic); it goes in its own body."""
    big = noisy_rows(200)
    huge = b'{"h":"' + b"".join(row[10:] for row in big).replace(b'"', b"") + b'"}'
    bodies = BatchBuilder(1, max_body_bytes=20_000).pack([b'{"a":1}', huge, b'{"b":2}'])
    assert [huge] in [list(body.rows) for body in bodies]
    assert [b'{"a":1}', huge, b'{"b":2}'] == rows_of(bodies)


def test_the_raw_cap_limits_uncompressed_size_too() -> None:
    """max_raw_bytes bounds the uncompressed bytes of a body (for a service that counts those)."""
    rows = sample_rows() * 10
    bodies = BatchBuilder(1, max_raw_bytes=100_000).pack(rows)
    assert all(body.raw_bytes <= 100_000 for body in bodies)
    assert rows == rows_of(bodies)


def test_the_target_follows_the_compression_ratio_seen() -> None:
    """After compressible bodies the builder gathers more raw bytes per body, up to the limit."""
    builder = BatchBuilder(1)
    before = builder.target_raw_bytes
    for _ in range(5):
        builder.pack(sample_rows() * 20)
    assert before < builder.target_raw_bytes <= 32 << 20
    assert int(MAX_BODY_BYTES * 0.85 * 4) == before


def test_split_halves_the_rows() -> None:
    """split gives bodies for the first and second half, in order."""
    rows = sample_rows()
    halves = BatchBuilder(1).split(rows)
    assert [rows[:60], rows[60:]] == [list(body.rows) for body in halves]


@pytest.mark.parametrize(
    ("level", "expected"), [(1, "isal"), (3, "isal"), (4, "zlib"), (6, "zlib"), (9, "zlib")]
)
def test_fast_levels_use_isal_and_the_others_zlib(level: int, expected: Codec) -> None:
    """compression_level 1-3 uses ISA-L; 4-9 use zlib, whose ratio ISA-L cannot reach."""
    assert expected == codec_for(level)
    assert expected == BatchBuilder(level).codec


def test_higher_levels_compress_smaller() -> None:
    """Level 6 (zlib) gives a smaller body than level 1 (ISA-L) for the same rows."""
    rows = sample_rows() * 5
    [fast] = BatchBuilder(1).pack(rows)
    [small] = BatchBuilder(6).pack(rows)
    assert len(small.data) < len(fast.data)
    assert gzip.decompress(small.data) == gzip.decompress(fast.data)


def test_levels_outside_one_to_nine_are_refused() -> None:
    """A level the property parser would never give is a programming error."""
    with pytest.raises(ValueError, match="1 to 9"):
        BatchBuilder(0)


def test_nothing_to_pack_is_no_body() -> None:
    """No rows, no request."""
    assert [] == BatchBuilder(1).pack([])


def test_the_uncompressed_bound_is_exact_so_a_body_fills_it() -> None:
    """A body's raw_bytes is the length of its JSON array, and a body fills the uncompressed
    bound to the byte: rows of 99 bytes take 100 each ("," or "]"), plus "[", so a bound of
    1,001 bytes holds exactly ten of them, with no split and no short body."""
    rows = [b'{"n":%05d,"p":"%s"}' % (n, b"x" * 81) for n in range(100)]
    assert {99} == {len(row) for row in rows}
    bodies = BatchBuilder(1, max_raw_bytes=1_001).pack(rows)
    assert [1_001] * 10 == [body.raw_bytes for body in bodies]
    assert [len(gzip.decompress(body.data)) for body in bodies] == [b.raw_bytes for b in bodies]
    assert rows == rows_of(bodies)


def test_split_packs_again_under_a_lowered_bound() -> None:
    """Rows packed under a large bound, split after the bound was lowered, come back as few
    bodies as the new bound allows (not halves of halves), each under it, in order."""
    rows = [b'{"n":%05d,"p":"%s"}' % (n, b"x" * 981) for n in range(3_000)]  # 1,000 B each
    builder = BatchBuilder(1)
    [body] = builder.pack(rows)
    assert 3_000_000 < body.raw_bytes
    builder.max_raw_bytes = 1_048_576
    bodies = builder.split(body.rows)
    assert all(part.raw_bytes <= 1_048_576 for part in bodies)
    assert 3 == len(bodies)  # 1,047 rows fit in 1,048,576 bytes; 3,000 rows need three bodies
    assert rows == rows_of(bodies)
