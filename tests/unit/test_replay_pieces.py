"""The pieces of ``auditrelay replay``: reading files in batches, checkpoints, line numbers of
bad lines, the progress display."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from auditrelay.checkpoint import Checkpoint, CheckpointStore, LineBatch, identify, read_batches
from auditrelay.config import BUNDLED_POLICY
from auditrelay.decode import Reason
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from auditrelay.replay import InvalidLine, Progress, process_batch
from fixtures.chunks import audit_line

LINES = [audit_line(audit_id=f"id-{index:03d}") + b"\n" for index in range(50)]


def keep_all(event: AuditEvent) -> AuditEvent | None:
    return event


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_batches_resume_after_an_offset(tmp_path: Path, compressed: bool) -> None:
    """From a checkpoint's offset and line count, reading goes on with the next line, numbered
    as in the file, and every batch says where it ends; plain and gzip alike."""
    data = b"".join(LINES)
    path = tmp_path / ("audit.log.gz" if compressed else "audit.log")
    path.write_bytes(gzip.compress(data) if compressed else data)
    offset = sum(len(line) for line in LINES[:20])

    batches = list(read_batches(path, offset, 20, max_bytes=len(LINES[0]) * 10))

    assert [21, 31, 41] == [batch.first_line for batch in batches]
    assert LINES[20:] == [line for batch in batches for line in batch.lines]
    assert (len(data), 50) == (batches[-1].end_offset, batches[-1].end_line)
    assert path.stat().st_size == batches[-1].raw_position


def test_a_checkpoint_is_found_only_for_the_same_file(tmp_path: Path) -> None:
    """A checkpoint applies to the file it was written for: not to a new file at the same path
    (rotation), nor to one whose first bytes changed; a damaged checkpoint reads as none."""
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(LINES))
    store = CheckpointStore(tmp_path / "checkpoints")
    identity = identify(path)
    store.save(path, Checkpoint(identity, 100, 1))
    assert Checkpoint(identity, 100, 1) == store.load(path, identify(path))

    with path.open("ab") as grown:
        grown.write(LINES[0])
    assert 100 == getattr(store.load(path, identify(path)), "offset", None)

    rotated = tmp_path / "audit.log.new"
    rotated.write_bytes(b"".join(LINES))
    os.replace(rotated, path)
    assert store.load(path, identify(path)) is None

    store.save(path, Checkpoint(identify(path), 100, 1))
    store.path_for(path).write_text("{not json")
    assert store.load(path, identify(path)) is None


def test_bad_lines_are_reported_with_their_numbers(tmp_path: Path) -> None:
    """Lines that are not audit events get their own line numbers, also when two are the same
    text; blank lines are skipped; the good lines around them are kept."""
    path = tmp_path / "audit.log"
    lines = [LINES[0], b"garbage\n", b"\n", LINES[1], b"garbage\n", b'{"kind":"Other"}\n']
    batch = LineBatch(lines, 11, 0, 16, 0)

    outcome = process_batch(path, batch, keep_all)

    assert [
        InvalidLine(path, 12, Reason.LOG_NOT_JSON),
        InvalidLine(path, 15, Reason.LOG_NOT_JSON),
        InvalidLine(path, 16, Reason.NOT_AUDIT_EVENT),
    ] == outcome.invalid
    assert [f"{path}:12", f"{path}:15", f"{path}:16"] == [letter.tag for letter in outcome.letters]
    assert [b"garbage", b"garbage", b'{"kind":"Other"}'] == [
        letter.payload for letter in outcome.letters
    ]
    assert (2, 1) == (outcome.events, outcome.blank)
    assert [LINES[0].rstrip(), LINES[1].rstrip()] == [event.raw for event in outcome.kept]
    assert f"{path}:12: not JSON" == str(outcome.invalid[0])


def test_the_policy_decides_what_is_kept(tmp_path: Path) -> None:
    """Each event passes through the pipeline's filter: what it drops is not kept."""
    dropped = audit_line(
        audit_id="watch", verb="watch", requestURI="/api/v1/pods?watch=true", objectRef=None
    )
    kept = audit_line(audit_id="exec")
    batch = LineBatch([dropped + b"\n", kept + b"\n"], 1, 0, 2, 0)

    outcome = process_batch(tmp_path / "a.log", batch, PolicyFilter.from_file(BUNDLED_POLICY).apply)

    assert (2, ["exec"]) == (outcome.events, [e.fields["auditID"] for e in outcome.kept])


def test_progress_is_a_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal the state is redrawn in place (carriage return, a bar, the percentage)."""
    controller, terminal = os.openpty()
    try:
        with os.fdopen(terminal, "w", closefd=False) as stream:
            progress = Progress(stream, 1000, interval=0.0)
            progress.update("lines 10", 0.5)
            progress.done()
        shown = os.read(controller, 4096).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert shown.startswith("\r[" + "#" * 15 + "." * 15 + "]  50% lines 10")


def test_progress_is_plain_lines_elsewhere(tmp_path: Path) -> None:
    """Not on a terminal: one line per update, the same state never twice in a row."""
    path = tmp_path / "progress.txt"
    with path.open("w") as stream:
        progress = Progress(stream, 1000, interval=0.0)
        progress.update("lines 10", 0.5)
        progress.update("lines 10", 0.5, force=True)
        progress.update("lines 20", 1.0)
    assert "replay: 50% lines 10\nreplay: 100% lines 20\n" == path.read_text()
