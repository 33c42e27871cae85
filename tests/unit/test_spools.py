"""The spools under state_dir/spool: pipeline identity, destination records, orphans, and the
`auditrelay spool` command that lists, drains and discards them (real spools on disk)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from auditrelay.cli import main
from auditrelay.config import PROPERTIES, PipelineSettings
from auditrelay.errors import SpoolError, SpoolFullError
from auditrelay.spool import Spool, in_use, summarize
from auditrelay.spools import (
    OrphanWatch,
    inspect,
    legacy_pipeline_id,
    move_pending,
    pipeline_id_for,
    record_owners,
    rename_unused,
    write_destination,
)

ENDPOINT = "https://my-dce.westeurope-1.ingest.monitor.azure.com"
DCR = "dcr-" + "a" * 32
BASE = {
    "endpoint": ENDPOINT,
    "dcr_id": DCR,
    "auth": "client_secret",
    "tenant_id": "t",
    "client_id": "c",
    "client_secret": "first",
}


def settings(instance: str = "auditrelay.0", **changes: str) -> PipelineSettings:
    return PipelineSettings.from_properties({**BASE, **changes}, instance)


def spool_with(directory: Path, rows: Sequence[bytes], delivered: int = 0) -> None:
    """A spool holding ``rows``, the first ``delivered`` of them acknowledged."""
    spool = Spool(directory, limit_bytes=1 << 30)
    try:
        ends = [spool.append([row]) for row in rows]
        if delivered:
            spool.acknowledge(ends[delivered - 1])
    finally:
        spool.close()


def pending_rows(directory: Path) -> list[bytes]:
    spool = Spool(directory, limit_bytes=1 << 30)
    try:
        rows: list[bytes] = []
        while (read := spool.read(1 << 20)) is not None:
            rows += read.rows
        return rows
    finally:
        spool.close()


class TestPipelineId:
    """The id is the instance and the destination, nothing else."""

    @pytest.mark.parametrize(
        "change",
        [
            {"client_secret": "rotated"},
            {"compression_level": "9", "batch_interval": "5s", "spool_limit": "2G"},
            {"stream": "Custom-KubeAudit_CL"},  # the default, written out
            {"endpoint": ENDPOINT + "/"},  # the same URL
            {"cluster_name": "prod", "max_concurrency": "8"},
        ],
    )
    def test_credentials_tuning_and_spelling_keep_the_id(self, change: dict[str, str]) -> None:
        """Rotating a secret, retuning or writing a default out keeps the pipeline's spool."""
        assert pipeline_id_for(settings()) == pipeline_id_for(settings(**change))

    @pytest.mark.parametrize(
        "change",
        [
            {"dcr_id": "dcr-" + "b" * 32},
            {"stream": "Custom-Other_CL"},
            {"endpoint": "https://other.westeurope-1.ingest.monitor.azure.com"},
        ],
    )
    def test_another_destination_is_another_pipeline(self, change: dict[str, str]) -> None:
        """Another endpoint, rule or stream is another pipeline with its own spool."""
        assert pipeline_id_for(settings()) != pipeline_id_for(settings(**change))

    def test_the_instance_is_part_of_the_id(self) -> None:
        """Two outputs to the same destination keep apart."""
        assert pipeline_id_for(settings("auditrelay.0")) != pipeline_id_for(
            settings("auditrelay.1")
        )

    def test_the_emulator_is_a_destination_of_its_own(self) -> None:
        """Without endpoint the pipeline delivers to the bundled emulator: an id of its own."""
        emulator = PipelineSettings.from_properties({}, "auditrelay.0")
        assert {"endpoint": None, "dcr_id": None, "stream": "Custom-KubeAudit_CL"} == (
            emulator.destination()
        )
        assert pipeline_id_for(emulator) != pipeline_id_for(settings())

    def test_the_destination_is_declared_in_the_property_table_and_holds_no_secret(
        self,
    ) -> None:
        """endpoint, dcr_id and stream are flagged as the destination; none is a secret."""
        flagged = [prop for prop in PROPERTIES if prop.destination]
        assert ["endpoint", "dcr_id", "stream"] == [prop.name for prop in flagged]
        assert not any(prop.secret for prop in flagged)

    def test_the_legacy_id_hashed_every_property(self) -> None:
        """The id of earlier versions changes with the secret; the new one does not."""
        before = legacy_pipeline_id("auditrelay.0", BASE)
        after = legacy_pipeline_id("auditrelay.0", {**BASE, "client_secret": "rotated"})
        assert before != after


class TestMovePending:
    """Moving an orphan's rows to another spool: in order, nothing lost, nothing twice."""

    def test_pending_rows_move_in_order_and_the_orphan_is_removed(self, tmp_path: Path) -> None:
        """Delivered rows stay behind; pending ones move in order; the emptied orphan goes."""
        rows = [f"row-{n}".encode() for n in range(10)]
        spool_with(tmp_path / "orphan", rows, delivered=3)
        target = Spool(tmp_path / "target", limit_bytes=1 << 30)
        try:
            assert 7 == move_pending(tmp_path / "orphan", target.append)
        finally:
            target.close()
        assert rows[3:] == pending_rows(tmp_path / "target")
        assert not (tmp_path / "orphan").exists()

    def test_a_full_target_keeps_the_rest_in_the_orphan(self, tmp_path: Path) -> None:
        """The target refuses after the first batch: that batch is acknowledged in the orphan,
        the rest stays there, and a second move finishes without sending anything twice."""
        rows = [bytes([n]) * 1_000_000 for n in range(6)]  # several move batches
        spool_with(tmp_path / "orphan", rows)
        taken: list[bytes] = []

        def refuse_after_first(batch: Sequence[bytes]) -> None:
            if taken:
                raise SpoolFullError("target full")
            taken.extend(batch)

        with pytest.raises(SpoolFullError):
            move_pending(tmp_path / "orphan", refuse_after_first)
        left = pending_rows(tmp_path / "orphan")
        assert rows == taken + left
        assert 0 < len(taken) < len(rows)

        move_pending(tmp_path / "orphan", lambda batch: taken.extend(batch))
        assert rows == taken

    def test_a_spool_in_use_is_neither_moved_nor_renamed(self, tmp_path: Path) -> None:
        """Another holder of the lock (a running serve) keeps its spool."""
        spool_with(tmp_path / "busy", [b"row"])
        holder = Spool(tmp_path / "busy", limit_bytes=1 << 20)
        try:
            assert in_use(tmp_path / "busy")
            with pytest.raises(Exception, match="in use by another process"):
                move_pending(tmp_path / "busy", lambda batch: None)
            with pytest.raises(Exception, match="in use by another process"):
                rename_unused(tmp_path / "busy", tmp_path / "new")
        finally:
            holder.close()
        assert not in_use(tmp_path / "busy")
        assert rename_unused(tmp_path / "busy", tmp_path / "new")
        assert [b"row"] == pending_rows(tmp_path / "new")


class TestOrphanWatch:
    """What serve reports about spools no pipeline owns."""

    def test_orphans_count_after_the_claim_window_and_only_with_rows(self, tmp_path: Path) -> None:
        """During `after` nothing is orphaned; then spools with pending rows that no pipeline
        owns are, with their destination; an empty or owned spool is not."""
        root = tmp_path / "spool"
        spool_with(root / "owned", [b"a"])
        spool_with(root / "stranded", [b"b", b"c"])
        spool_with(root / "empty", [b"d"], delivered=1)
        write_destination(root / "stranded", "stranded", settings())
        now = [0.0]
        watch = OrphanWatch(root, lambda: ["owned"], after=60, clock=lambda: now[0])

        assert [] == watch.orphans()
        now[0] = 61
        [orphan] = watch.orphans()

        assert "stranded" == orphan.pipeline_id
        assert summarize(root / "stranded").pending_bytes == orphan.pending_bytes
        [problem] = watch.problems()
        assert problem.startswith("spool stranded is orphaned: ")
        assert f"{ENDPOINT} rule {DCR} stream Custom-KubeAudit_CL" in problem
        assert "first" not in (root / "stranded" / "destination.json").read_text()


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["spool", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestSpoolCommand:
    """`auditrelay spool list|drain|discard` on a stopped serve's state directory."""

    @pytest.fixture
    def state(self, tmp_path: Path) -> Path:
        """A state directory: pipeline `new` owned by the last serve, `old` orphaned."""
        root = tmp_path / "spool"
        spool_with(root / "old", [b"o1", b"o2", b"o3"], delivered=1)
        write_destination(root / "old", "old", settings(dcr_id="dcr-" + "b" * 32))
        spool_with(root / "new", [b"n1"])
        write_destination(root / "new", "new", settings())
        record_owners(root, ["new"])
        return tmp_path

    def test_list_shows_every_spool_and_exits_1_for_an_orphan(
        self, state: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """JSON lists id, destination, pending bytes and events, owned or orphaned."""
        code, out, _ = run_cli(capsys, "list", "--state-dir", str(state), "--output", "json")

        assert 1 == code
        spools = {entry["pipeline_id"]: entry for entry in json.loads(out)["spools"]}
        assert ("orphaned", 2, "dcr-" + "b" * 32) == (
            spools["old"]["state"],
            spools["old"]["pending_events"],
            spools["old"]["destination"]["dcr_id"],
        )
        assert ("owned", 1) == (spools["new"]["state"], spools["new"]["pending_events"])

    def test_drain_with_serve_stopped_moves_the_rows(
        self, state: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The orphan's pending rows land behind the target's own, in order; the orphan goes."""
        code, out, _ = run_cli(
            capsys, "drain", "old", "--to-pipeline", "new", "--state-dir", str(state)
        )

        assert 0 == code, out
        assert "2 events moved to new" in out
        assert [b"n1", b"o2", b"o3"] == pending_rows(state / "spool" / "new")
        assert not (state / "spool" / "old").exists()
        assert 0 == run_cli(capsys, "list", "--state-dir", str(state))[0]

    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["drain", "old", "--to-pipeline", "typo"], "--to-pipeline: got 'typo'"),
            (["drain", "old", "--to-pipeline", "old"], "another pipeline than SPOOL"),
            (["drain", "new", "--to-pipeline", "old"], "SPOOL: got 'new', expected an orphaned"),
            (["drain", "../old", "--to-pipeline", "new"], "SPOOL: got '../old'"),
            (["discard", "old"], "--yes: got (not set), expected to confirm"),
        ],
    )
    def test_bad_requests_exit_2_and_change_nothing(
        self, state: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
    ) -> None:
        """Unknown or owned spools, a drain into itself, a discard without --yes: refused."""
        code, _, err = run_cli(capsys, *args, "--state-dir", str(state))

        assert 2 == code
        assert says in err
        assert [b"o2", b"o3"] == pending_rows(state / "spool" / "old")

    def test_discard_with_yes_deletes_the_orphan(
        self, state: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--yes deletes it and says how many undelivered events went."""
        code, out, _ = run_cli(capsys, "discard", "old", "--yes", "--state-dir", str(state))

        assert (0, "old: discarded 2 undelivered events\n") == (code, out)
        assert not (state / "spool" / "old").exists()
        assert "new" == inspect(state / "spool" / "new").pipeline_id

    def test_a_state_dir_without_spools_is_bad_input(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A mistyped --state-dir is named, exit 2."""
        code, _, err = run_cli(capsys, "list", "--state-dir", str(tmp_path / "typo"))

        assert 2 == code
        assert f"--state-dir: got '{tmp_path / 'typo'}'" in err


def test_an_unchanged_destination_is_not_written_again(tmp_path: Path) -> None:
    """A Configure after a restart rewrites nothing when the destination is the same, so a
    full state disk does not refuse it; a changed one is replaced."""
    spool = tmp_path / "spool-a"
    write_destination(spool, "a", settings())
    first = (spool / "destination.json").stat().st_ino
    write_destination(spool, "a", settings())
    assert first == (spool / "destination.json").stat().st_ino
    write_destination(spool, "a", settings(dcr_id="dcr-" + "b" * 32))
    assert first != (spool / "destination.json").stat().st_ino


def test_a_destination_that_cannot_be_written_is_a_spool_error(tmp_path: Path) -> None:
    (tmp_path / "in-the-way").write_text("a file where the spool directory should be")
    with pytest.raises(SpoolError, match=r"in-the-way: cannot write destination\.json"):
        write_destination(tmp_path / "in-the-way", "a", settings())
