"""Backfill of existing audit log files through a pipeline (``auditrelay replay``).

Each file (plain, or gzip by its magic bytes) is read as the JSON lines kube-apiserver writes,
in batches (``checkpoint``). The pipeline is built by ``pipeline.PipelineBuilder``, as serve
builds its own; a batch goes through its stages as a Push does: every line is decoded as the
``log`` line of a Fluent Bit record is (``decode.decode_line``, no msgpack in between), the
pipeline's ``PolicyFilter`` drops or lowers the events, and the ``DeliverySink`` spools, batches
and delivers the rows. Lines that are not audit events are reported with their file and line
number, set aside in the pipeline's dead letters, and never stop the lines after them.

Resuming: after a batch is durable in the spool, the file's checkpoint is written. A later run to the same destination and state
directory opens the same spool (resending what it still holds) and goes on from each checkpoint,
so an interruption, even SIGKILL, loses nothing; at most the batch that was being spooled when
it struck is sent twice. A file whose identity changed (rotated, rewritten) is read from its
start; a completed file that has not grown is skipped.

State directory layout (per pipeline id, from the instance name and the destination)::

    replay/<pipeline_id>/spool/            the DeliverySink's spool
    replay/<pipeline_id>/deadletter/       lines that are not audit events, rows refused (400)
    replay/<pipeline_id>/checkpoints/      one JSON file per input file
    emulator/                              the bundled emulator, when no endpoint is set
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from auditrelay.checkpoint import (
    BATCH_BYTES,
    Checkpoint,
    CheckpointStore,
    LineBatch,
    identify,
    read_batches,
)
from auditrelay.config import PipelineSettings, SpoolSync
from auditrelay.decode import Reason, decode_line
from auditrelay.errors import ConfigError, PropertyProblem, SpoolFullError
from auditrelay.metrics import Metrics
from auditrelay.model import AuditEvent, DeadLetter, DeadLetterSink
from auditrelay.pipeline import Pipeline, PipelineBuilder, StateLayout, close_dead_letters
from auditrelay.sink import DeliverySink
from auditrelay.spools import legacy_pipeline_id, pipeline_id_for

SPOOL_FULL_PAUSE: Final = 0.1  # seconds between tries while delivery makes room in the spool
INSTANCE_NAME: Final = "replay"
SPOOL_SHARE: Final = 8  # a batch of lines is at most this fraction of spool_limit
MAX_INVALID_SHOWN: Final = 100

REASON_TEXT: Final = {
    Reason.LOG_NOT_JSON: "not JSON",
    Reason.JSON_NOT_OBJECT: "JSON, but not an object",
    Reason.NOT_AUDIT_EVENT: 'not an audit event (kind is not "Event")',
    Reason.UNSUPPORTED_API_VERSION: "apiVersion is not audit.k8s.io/v1 or v1beta1",
    Reason.MISSING_AUDIT_ID: "no auditID",
    Reason.MISSING_STAGE: "no stage",
    Reason.MISSING_LEVEL: "no level",
    Reason.NON_UTF8: "not valid UTF-8",
}


# --- one batch through decode and filter -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvalidLine:
    """A line that is not an audit event."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {REASON_TEXT.get(self.reason, self.reason)}"


@dataclass(slots=True)
class BatchOutcome:
    """What decode and the filter made of one batch."""

    kept: list[AuditEvent]
    events: int
    invalid: list[InvalidLine]
    letters: list[DeadLetter]
    blank: int


def process_batch(
    path: Path, batch: LineBatch, apply: Callable[[AuditEvent], AuditEvent | None]
) -> BatchOutcome:
    """Decodes each line as the ``log`` of a Fluent Bit record would be, and applies the filter
    to the events; a line that is not an audit event becomes a dead letter of its own."""
    kept: list[AuditEvent] = []
    invalid: list[InvalidLine] = []
    letters: list[DeadLetter] = []
    events = blank = 0
    for number, line in enumerate(batch.lines, start=batch.first_line):
        text = line.rstrip(b"\r\n")
        if not text.strip():
            blank += 1
            continue
        decoded = decode_line(text)
        if isinstance(decoded, str):
            invalid.append(InvalidLine(path, number, decoded))
            letters.append(DeadLetter(decoded, text, f"{path}:{number}"))
            continue
        events += 1
        lowered = apply(decoded)
        if lowered is not None:
            kept.append(lowered)
    return BatchOutcome(kept, events, invalid, letters, blank)


# --- totals and progress -----------------------------------------------------------------------


@dataclass(slots=True)
class Totals:
    """What one run did."""

    files: int = 0
    files_skipped: int = 0
    lines_read: int = 0
    events: int = 0
    kept: int = 0
    filtered: int = 0
    invalid: int = 0
    bytes_read: int = 0  # of the files on disk (compressed, for .gz)
    text_bytes: int = 0  # of the lines
    invalid_lines: list[InvalidLine] = field(default_factory=list)


class Progress:
    """A progress bar on a terminal, or a plain line every ``interval`` seconds otherwise."""

    def __init__(self, stream: TextIO, total_bytes: int, *, interval: float | None = None) -> None:
        self.stream = stream
        self.total_bytes = max(total_bytes, 1)
        self.is_terminal = stream.isatty()
        self.interval = interval if interval is not None else (0.1 if self.is_terminal else 5.0)
        self._last = 0.0
        self._width = 0
        self._shown = ""

    def update(self, line: str, fraction: float, *, force: bool = False) -> None:
        """Shows the state, at most once per interval unless forced."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.is_terminal:
            filled = int(30 * min(max(fraction, 0.0), 1.0))
            text = f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {line}"
            padding = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write(text + " " * padding)
        else:
            text = f"replay: {fraction:.0%} {line}\n"
            if text == self._shown:
                return
            self._shown = text
            self.stream.write(text)
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (an invalid line, a skipped file), above the bar."""
        if self.is_terminal and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        """Ends the bar's line."""
        if self.is_terminal and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How one ``auditrelay replay`` runs."""

    files: Sequence[Path]
    properties: Mapping[str, str]
    state_dir: Path
    deliver_timeout: float | None = None  # None: wait until everything is delivered
    progress_interval: float | None = None


@dataclass(slots=True)
class ReplayResult:
    """The outcome the command reports."""

    totals: Totals
    delivered: int
    refused: int
    sent_bytes: int
    spooled_bytes: int
    undelivered_bytes: int
    endpoint: str
    stream: str
    interrupted: bool
    emulator_dir: Path | None


def check_inputs(files: Sequence[Path]) -> None:
    """Raises ConfigError naming every input that is not a readable file."""
    problems = [
        PropertyProblem("AUDIT_LOG", str(path), "a readable audit log file (plain or .gz)")
        for path in files
        if not path.is_file() or not os.access(path, os.R_OK)
    ]
    if problems:
        raise ConfigError(problems)


class Replay:
    """One run: the pipeline, the files, the checkpoints."""

    def __init__(
        self, options: ReplayOptions, stop: asyncio.Event, progress_stream: TextIO
    ) -> None:
        check_inputs(options.files)
        self.options = options
        self.stop = stop
        self.settings = PipelineSettings.from_properties(options.properties, INSTANCE_NAME)
        self.pipeline_id = pipeline_id_for(self.settings)
        self.metrics = Metrics()
        self.builder = PipelineBuilder(StateLayout.for_replay(options.state_dir), self.metrics)
        self.builder.build_filter(self.settings)  # a bad policy is bad input before any work
        self.base = self.builder.layout.pipeline_dir(self.pipeline_id)
        legacy = self.builder.layout.pipeline_dir(
            legacy_pipeline_id(INSTANCE_NAME, options.properties)
        )
        if legacy.is_dir() and not self.base.exists():
            legacy.rename(self.base)  # a run of an earlier version, named by every property
        self.totals = Totals()
        self.progress = Progress(
            progress_stream,
            sum(path.stat().st_size for path in options.files),
            interval=options.progress_interval,
        )
        # A batch is spooled whole: a small spool gets small batches, so one always fits.
        self.batch_bytes = max(1, min(BATCH_BYTES, self.settings.spool_limit // SPOOL_SHARE))
        self._done_bytes = 0  # of the files finished or skipped
        self._pipeline: Pipeline | None = None

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline (while running)."""
        if self._pipeline is None:
            raise RuntimeError("replay: the pipeline is not started")
        return self._pipeline

    @property
    def sink(self) -> DeliverySink:
        """The pipeline's sink (while running)."""
        return self.pipeline.delivery()

    def _sample(self, name: str) -> int:
        value = self.metrics.registry.get_sample_value(name, {"pipeline": self.pipeline_id})
        return int(value or 0)

    async def run(self) -> ReplayResult:
        """Replays every file, waits for delivery, and says what happened."""
        checkpoints = CheckpointStore(self.base / "checkpoints")
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.builder.aclose)
            self._pipeline = pipeline = await self.builder.build(self.settings, self.pipeline_id)
            stack.callback(close_dead_letters, pipeline.dead_letters)
            sink = self.sink
            delivered_all = False
            try:
                for path in self.options.files:
                    if self.stop.is_set():
                        break
                    await self._replay_file(path, checkpoints, pipeline.dead_letters)
                delivered_all = not self.stop.is_set() and await self._wait_delivered()
            finally:
                undelivered = sink.spool.pending_bytes
                endpoint = self.builder.endpoint(self.settings)
                self.progress.done()
                await sink.stop(drain_seconds=0.0 if delivered_all else 1.0)
        return ReplayResult(
            totals=self.totals,
            delivered=self._sample("auditrelay_events_delivered_total"),
            refused=self._sample("auditrelay_events_dead_lettered_total"),
            sent_bytes=self._sample("auditrelay_compressed_bytes_total"),
            spooled_bytes=self._sample("auditrelay_spooled_bytes_total"),
            undelivered_bytes=0 if delivered_all else undelivered,
            endpoint=endpoint,
            stream=self.settings.stream,
            interrupted=self.stop.is_set(),
            emulator_dir=self.builder.layout.emulator if self.settings.uses_emulator else None,
        )

    async def _replay_file(
        self, path: Path, checkpoints: CheckpointStore, dead_letters: DeadLetterSink
    ) -> None:
        identity = await asyncio.to_thread(identify, path)
        checkpoint = await asyncio.to_thread(checkpoints.load, path, identity)
        self.totals.files += 1
        if checkpoint is not None and checkpoint.complete and checkpoint.identity == identity:
            self.totals.files_skipped += 1
            self._done_bytes += identity.size
            self.progress.message(f"{path}: already replayed ({checkpoint.line:,} lines); skipped")
            return
        offset, line = (checkpoint.offset, checkpoint.line) if checkpoint else (0, 0)
        if offset:
            self.progress.message(f"{path}: resuming after line {line:,}")
        batches = read_batches(path, offset, line, self.batch_bytes)
        try:
            while True:
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    break
                outcome = await asyncio.to_thread(
                    process_batch, path, batch, self.pipeline.event_filter.apply
                )
                if outcome.letters:
                    await asyncio.to_thread(dead_letters.put, outcome.letters)
                if not await self._append(outcome.kept):
                    return  # stopped: the checkpoint stays before this batch
                offset, line = batch.end_offset, batch.end_line
                if self.settings.spool_sync is SpoolSync.INTERVAL:
                    await asyncio.to_thread(self.sink.spool.sync)  # the checkpoint must not lead
                await asyncio.to_thread(checkpoints.save, path, Checkpoint(identity, offset, line))
                self._count(batch, outcome)
                self._show(batch.raw_position)
                if self.stop.is_set():
                    return
        finally:
            batches.close()
        self._done_bytes += identity.size
        await asyncio.to_thread(checkpoints.save, path, Checkpoint(identity, offset, line, True))

    def _count(self, batch: LineBatch, outcome: BatchOutcome) -> None:
        totals = self.totals
        totals.lines_read += len(batch.lines)
        totals.text_bytes += sum(len(line) for line in batch.lines)
        totals.events += outcome.events
        totals.kept += len(outcome.kept)
        totals.filtered += outcome.events - len(outcome.kept)
        totals.invalid += len(outcome.invalid)
        for invalid in outcome.invalid:
            shown = len(totals.invalid_lines)
            if shown < MAX_INVALID_SHOWN:
                totals.invalid_lines.append(invalid)
                self.progress.message(f"invalid line {invalid}")
            elif shown == MAX_INVALID_SHOWN:
                totals.invalid_lines.append(invalid)
                self.progress.message("more invalid lines: only their count is reported")

    async def _append(self, events: list[AuditEvent]) -> bool:
        """Spools the events, waiting while the spool is full; False when stopped meanwhile."""
        if not events:
            return True
        while not self.stop.is_set():
            try:
                await self.sink.append(events)
            except SpoolFullError as error:
                if self.sink.spool.pending_bytes == 0:  # nothing to deliver will make room
                    raise self._cannot_fit(len(events), error) from None
                self._show_waiting("spool full: waiting for delivery to make room")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), SPOOL_FULL_PAUSE)
                continue
            return True
        return False

    def _cannot_fit(self, rows: int, error: SpoolFullError) -> ConfigError:
        limit = self.settings.spool_limit
        return ConfigError(
            [
                PropertyProblem(
                    "spool_limit", str(limit), f"room for {rows} rows even when empty: {error}"
                )
            ]
        )

    def _status(self) -> str:
        totals = self.totals
        return (
            f"{_human_bytes(totals.bytes_read)} of {_human_bytes(self.progress.total_bytes)}"
            f"  lines {totals.lines_read:,}  kept {totals.kept:,}  filtered {totals.filtered:,}"
            f"  invalid {totals.invalid:,}"
            f"  delivered {self._sample('auditrelay_events_delivered_total'):,}"
        )

    def _fraction(self) -> float:
        return self.totals.bytes_read / self.progress.total_bytes

    def _show(self, position: int) -> None:
        self.totals.bytes_read = self._done_bytes + position
        self.progress.update(self._status(), self._fraction())

    def _show_waiting(self, why: str) -> None:
        problems = self.sink.problems()
        shown = f"{why} ({problems[0]})" if problems else why
        self.progress.update(f"{self._status()}  {shown}", self._fraction())

    async def _wait_delivered(self) -> bool:
        """Waits until the spool is empty; False on timeout or stop."""
        self.totals.bytes_read = self._done_bytes
        timeout = self.options.deliver_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.sink.spool.pending_bytes > 0:
            if self.stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                return False
            pending = _human_bytes(self.sink.spool.pending_bytes)
            self._show_waiting(f"delivering: {pending} of rows left")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.05)
        self.progress.update(self._status(), 1.0, force=True)
        return True


def summary_lines(result: ReplayResult) -> list[str]:
    """The final summary, for people."""
    totals = result.totals
    lines = [
        f"files:      {totals.files} ({totals.files_skipped} already replayed, skipped)",
        f"lines read: {totals.lines_read:,} ({_human_bytes(totals.text_bytes)} of text, "
        f"{_human_bytes(totals.bytes_read)} on disk)",
        f"events:     {totals.events:,}",
        f"filtered:   {totals.filtered:,} (dropped or lowered away by the audit policy)",
        f"invalid:    {totals.invalid:,} (not audit events; set aside)",
        f"kept:       {totals.kept:,}",
        f"delivered:  {result.delivered:,} rows to {result.endpoint} ({result.stream})",
        f"bytes:      {_human_bytes(result.spooled_bytes)} of rows, "
        f"{_human_bytes(result.sent_bytes)} sent gzip-compressed",
    ]
    if result.refused:
        lines.append(f"refused:    {result.refused:,} rows refused by the service (dead letters)")
    if result.undelivered_bytes:
        lines.append(
            f"pending:    {_human_bytes(result.undelivered_bytes)} of rows wait in the spool; "
            "run the same command again to deliver them"
        )
    if result.interrupted:
        lines.append("interrupted: run the same command again to continue where it stopped")
    if result.emulator_dir is not None:
        lines.append(
            f"emulator:   rows stored in {result.emulator_dir} "
            f"(auditrelay emulator count --state-dir {result.emulator_dir})"
        )
    return lines
