"""Every benchmark still runs, at a tiny size: correctness only, never timing."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from azure.monitor.ingestion import _helpers
from fixtures.chunks import TAIL_CHUNK_PARSED, TAIL_CHUNK_RAW_LOG, sample_lines, tail_chunk

from bench import corpus, sdk_baseline

REPO = Path(__file__).resolve().parents[2]


def run_bench(*args: str, results: Path) -> dict[str, object]:
    """Runs ``python -m bench`` like a developer would and returns the saved result."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "sidecar")}
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--results", str(results), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert 0 == completed.returncode, completed.stderr
    (saved,) = results.glob(f"{args[0]}-*.json")
    result: dict[str, object] = json.loads(saved.read_text())
    assert f" {args[0]} " in str(result["command"])
    return result


@pytest.mark.parametrize(
    ("capture", "parsed"), [(TAIL_CHUNK_RAW_LOG, False), (TAIL_CHUNK_PARSED, True)]
)
def test_chunks_are_packed_exactly_as_the_test_data_flushes(capture: Path, parsed: bool) -> None:
    """Given their read times, the corpus packs the audit log of tests/data into the very bytes
    of its Fluent Bit flushes (whose framing tests/unit/test_testdata.py checks), in both tail
    shapes: the corpora and the test data are packed alike."""
    real = tail_chunk(capture)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(real)
    read_times = []
    for (stamp, _metadata), _record in unpacker:
        seconds, nanoseconds = struct.unpack(">II", stamp.data)
        read_times.append(seconds * 1_000_000_000 + nanoseconds)
    rebuilt = b"".join(
        corpus.fluent_bit_record(line, at, parsed)
        for line, at in zip(sample_lines(), read_times, strict=True)
    )
    assert real == rebuilt


def test_corpus_is_reproducible_and_keeps_each_event_real_in_shape() -> None:
    """The same seed gives the same bytes; every copy is valid JSON of its template's size, with
    a fresh auditID and stage timestamps in write order."""
    templates = corpus.load_templates(seed=7)
    first = list(corpus.generate(600, seed=7, templates=templates))
    again = list(corpus.generate(600, seed=7, templates=corpus.load_templates(seed=7)))
    assert [e.line for e in first] == [e.line for e in again]
    audit_ids = set()
    previous = 0
    for event in first:
        fields = json.loads(event.line)
        template_fields = json.loads(event.template.line)
        assert event.template.size == len(event.line)
        assert template_fields["verb"] == fields["verb"]
        assert template_fields.get("objectRef", {}).get("resource") == fields.get(
            "objectRef", {}
        ).get("resource")
        audit_ids.add(fields["auditID"])
        stage = corpus.parse_timestamp_us(fields.get("stageTimestamp") or fields["timestamp"])
        assert stage // 1_000_000 >= previous // 1_000_000
        previous = stage
    assert len(first) == len(audit_ids)


def test_chunks_hold_every_event_and_stay_under_the_flush_size(tmp_path: Path) -> None:
    """Both chunk files of a built corpus decode to the audit.log's events, in order, in flushes
    no larger than Fluent Bit's 2,048,000-byte chunk limit."""
    paths, manifest = corpus.build(1_500, seed=3, directory=tmp_path, chunk_bytes=300_000)
    lines = list(corpus.iter_lines(paths.jsonl))
    assert 1_500 == len(lines) == manifest["mix"]["events"]
    for path, parsed in ((paths.raw_chunks, False), (paths.parsed_chunks, True)):
        records = []
        chunks = list(corpus.read_chunks(path))
        assert all(len(chunk) <= 300_000 for chunk in chunks)
        for chunk in chunks:
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(chunk)
            records += [record for _header, record in unpacker]
        expected = [json.loads(line) for line in lines]
        decoded = [r if parsed else json.loads(r["log"]) for r in records]
        assert expected == decoded


def test_corpus_command_reports_the_mix(tmp_path: Path) -> None:
    """``python -m bench corpus`` builds the files and reports counts and the size mix."""
    result = run_bench(
        "corpus", "--events", "400", "--corpora", str(tmp_path), results=tmp_path / "results"
    )
    details = result["details"]
    assert isinstance(details, dict)
    assert 400 == details["mix"]["events"]
    assert Path(details["files"]["jsonl"]).exists()


def test_sdk_preparation_sends_every_row_once(tmp_path: Path) -> None:
    """The SDK baseline gzips every row into ≤ 1 MiB JSON arrays, each row exactly once."""
    paths, _ = corpus.build(800, seed=5, directory=tmp_path)
    rows = sdk_baseline.rows_from_lines(corpus.iter_lines(paths.jsonl))
    sent = []
    for body, _chunk in _helpers._create_gzip_requests(list[Any](rows)):
        sent += json.loads(gzip.decompress(body))
    assert rows == sent
    run = sdk_baseline.prepare(rows)
    assert 800 == run.rows
    result = run_bench(
        "sdk",
        "--events",
        "800",
        "--seed",
        "5",
        "--repeat",
        "1",
        "--corpora",
        str(tmp_path),
        results=tmp_path / "results",
    )
    assert result["figures"]


def figures(result: dict[str, object]) -> dict[str, float]:
    """The saved figures by name."""
    saved = result["figures"]
    assert isinstance(saved, list)
    return {figure["name"]: figure["value"] for figure in saved}


TINY = ("--events", "300", "--emulator-cpu", "any", "--cpu", "any")


def test_stages_command_measures_every_step(tmp_path: Path) -> None:
    """``python -m bench stages`` times each building block on both tail shapes."""
    result = run_bench("stages", *TINY[:2], "--corpora", str(tmp_path), results=tmp_path / "r")
    measured = figures(result)
    assert 0 < measured["orjson.loads of the log line"]
    assert 0 < measured["compression ratio isal-1"]


def test_pipeline_delivers_every_kept_event_unaltered(tmp_path: Path) -> None:
    """The pipeline benchmark's own correctness check finds no kept event lost or altered, and
    the SDK baseline stores the same rows."""
    result = run_bench(
        "pipeline", *TINY, "--check", "--sdk", "--corpora", str(tmp_path), results=tmp_path / "r"
    )
    measured = figures(result)
    assert 0 == measured["kept events lost"]
    assert 0 == measured["kept events altered"]
    assert 0 == measured["rows not kept by the policy"]
    assert 300 == measured["events in / kept / delivered"]


def test_pipeline_takes_json_parsed_chunks_too(tmp_path: Path) -> None:
    """The other tail shape (records parsed into maps) goes through the same check."""
    result = run_bench(
        "pipeline", *TINY, "--shape", "parsed", "--check", "--corpora", str(tmp_path),
        results=tmp_path / "r",
    )  # fmt: skip
    assert 0 == figures(result)["kept events lost"]


def test_pipeline_compares_both_readings_of_the_size_limit(tmp_path: Path) -> None:
    """--limits both runs the corpus under the wire reading and under the uncompressed one:
    the second costs exactly one 413 and ends with the 1 MiB bound, the first none, and the
    check after the last run finds every kept event once."""
    result = run_bench(
        "pipeline", "--events", "6000", "--emulator-cpu", "any", "--cpu", "any",
        "--limits", "both", "--check", "--corpora", str(tmp_path), results=tmp_path / "r",
    )  # fmt: skip
    measured = figures(result)
    assert (0, 0) == (measured["kept events lost"], measured["duplicate rows (at-least-once)"])
    assert (0, 1) == (
        measured["[wire] requests refused 413"],
        measured["[uncompressed] requests refused 413"],
    )
    assert (32 << 20, 1 << 20) == (
        measured["[wire] uncompressed bound at the end"],
        measured["[uncompressed] uncompressed bound at the end"],
    )
    assert measured["[wire] uncompressed bytes per request"] > 1.048576
    assert measured["[uncompressed] uncompressed bytes per request"] <= 1.048576


def test_latency_times_every_kept_event(tmp_path: Path) -> None:
    """Every row the emulator stored is paired with the push that carried it."""
    result = run_bench(
        "latency", *TINY, "--pace", "3000", "--corpora", str(tmp_path), results=tmp_path / "r"
    )
    details = result["details"]
    assert isinstance(details, dict)
    assert details["run"]["events_kept"] == figures(result)["kept events timed"]


def test_backlog_spools_while_down_and_drains_when_up(tmp_path: Path) -> None:
    """With the endpoint down everything is spooled; once it is up everything is delivered."""
    result = run_bench("backlog", *TINY, "--corpora", str(tmp_path), results=tmp_path / "r")
    details = result["details"]
    assert isinstance(details, dict)
    assert 300 == details["run"]["events"]
    assert details["run"]["kept"] == details["run"]["delivered"]


def test_cost_compares_the_policy_with_every_event(tmp_path: Path) -> None:
    """The cost benchmark counts every event without the policy and fewer bytes with it."""
    result = run_bench("cost", *TINY[:2], "--corpora", str(tmp_path), results=tmp_path / "r")
    details = result["details"]
    assert isinstance(details, dict)
    wire = details["wire"]
    assert 300 == wire["every event, sidecar"]["rows"]
    assert (
        wire["audit_policy.yaml, sidecar"]["uncompressed"]
        < wire["every event, sidecar"]["uncompressed"]
    )


@pytest.mark.slow
def test_end_to_end_through_the_plugin_stores_every_kept_row(tmp_path: Path) -> None:
    """Chunks flushed through out_auditrelay.so reach the emulator: every kept row, unaltered."""
    result = run_bench(
        "e2e", *TINY, "--sidecar-cpu", "any", "--check", "--corpora", str(tmp_path),
        results=tmp_path / "r",
    )  # fmt: skip
    details = result["details"]
    assert isinstance(details, dict)
    assert details["run"]["expected_rows"] == details["run"]["stored_rows"]
    assert 0 == figures(result)["kept events lost"]
    assert 0 == figures(result)["kept events altered"]
