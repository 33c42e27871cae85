"""One pipeline's way from accepted events to the workspace: rows, spool, batches, delivery.

``DeliverySink`` is the ``model.EventSink`` that ``app`` hands filtered events to. ``append``
encodes the events into rows (``stream``), writes them to the spool and returns once they are
durable, or raises ``SpoolFullError`` (answer RETRY_LATER). In the background a pump reads rows
from the spool in order, packs them into gzip bodies (``batch``) when a body is full or
``batch_interval`` has passed, and delivers up to ``max_concurrency`` bodies at once
(``deliver``). Spool positions are acknowledged only when every earlier body is delivered too,
so a crash at any moment resends, never loses (at-least-once). Bodies are bounded by wire size
and by uncompressed size (``max_request_raw_bytes``); when the endpoint shows that it counts
uncompressed bytes, ``request_limits.RequestLimits`` lowers the latter and the builder follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from auditrelay.batch import BatchBuilder, Body
from auditrelay.config import PipelineSettings, SpoolSync
from auditrelay.deliver import (
    Attempt,
    Backoff,
    CredentialFactory,
    Deliverer,
    DeliveryHealth,
    Destination,
    IngestionClient,
    Outcome,
    Payload,
    credential_factory_for,
)
from auditrelay.errors import SpoolError, SpoolFullError
from auditrelay.metrics import PipelineMetrics
from auditrelay.model import AuditEvent, DeadLetter, DeadLetterSink
from auditrelay.request_limits import RawLimitEvidence, RequestLimits
from auditrelay.spool import Spool
from auditrelay.spool_segments import CorruptRegion, Position
from auditrelay.spool_state import chunk_id
from auditrelay.stream import RowEncoder

log = structlog.get_logger(__name__)

DEFAULT_DRAIN_SECONDS: Final = 10.0


@dataclass(slots=True)
class _InFlight:
    """A dispatched batch: where its rows end in the spool, and whether it is settled."""

    start: Position
    end: Position
    rows: int
    done: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class DeliverySink:
    """The ``EventSink`` of one pipeline, with the background delivery that empties its spool."""

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        directory: Path,
        metrics: PipelineMetrics,
        dead_letters: DeadLetterSink,
        destination: Destination | None = None,
        credential_factory: CredentialFactory | None = None,
        builder: BatchBuilder | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.instance_name
        self.directory = directory
        self.metrics = metrics
        self.health = DeliveryHealth()
        self._dead_letters = dead_letters
        self._destination = destination or Destination.from_settings(settings)
        self._credential_factory = credential_factory or credential_factory_for(settings)
        self._builder = builder or BatchBuilder(
            settings.compression_level, max_raw_bytes=settings.max_request_raw_bytes
        )
        self.limits = RequestLimits(
            self._builder.max_raw_bytes, wire_bytes=self._builder.max_body_bytes
        )
        self._backoff = backoff or Backoff()
        self._encoder = RowEncoder(settings.cluster_name, settings.cluster_id)
        self._spool: Spool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: IngestionClient | None = None
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[int, _InFlight] = {}
        self._next_ticket = 0
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._truncated_seen = 0

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def spool(self) -> Spool:
        """The pipeline's spool (after ``start``)."""
        if self._spool is None:
            raise RuntimeError(f"pipeline {self.name}: sink not started")
        return self._spool

    async def start(self) -> None:
        """Opens the spool (resending what it still holds) and starts delivering."""
        self._loop = asyncio.get_running_loop()
        self._spool = await asyncio.to_thread(
            Spool,
            self.directory,
            limit_bytes=self.settings.spool_limit,
            sync=self.settings.spool_sync is SpoolSync.ALWAYS,
            on_corrupt=self._on_corrupt,
        )
        try:
            client = await self._open_client()
        except BaseException:
            # Release the spool (and its lock) so that a corrected Configure can open it again.
            await asyncio.to_thread(self._spool.close)
            self._spool = None
            raise
        self._client = client
        self._deliverer = Deliverer(
            self._client,
            self._split,
            limits=self.limits,
            on_raw_limit=self._lower_raw_limit,
            health=self.health,
            backoff=self._backoff,
            observe=self._observe,
        )
        self._export_gauges(self._spool)
        self._tasks.append(asyncio.create_task(self._pump_forever(), name=f"{self.name}-pump"))
        if self.settings.spool_sync is SpoolSync.INTERVAL:
            self._tasks.append(asyncio.create_task(self._sync_timer(), name=f"{self.name}-sync"))
        log.info(
            "pipeline_started",
            pipeline=self.name,
            endpoint=self._destination.endpoint,
            stream=self._destination.stream,
            backlog_bytes=self._spool.pending_bytes,
        )

    async def _open_client(self) -> IngestionClient:
        client = IngestionClient(
            self._destination,
            self._credential_factory,
            request_timeout=self.settings.request_timeout,
            on_connection=self.metrics.connections_opened.inc,
        )
        await client.open()
        return client

    async def stop(self, drain_seconds: float = DEFAULT_DRAIN_SECONDS) -> None:
        """Delivers what the spool holds for up to ``drain_seconds``, then stops; the rest waits
        in the spool for the next start."""
        if self._spool is None:
            return
        self._draining = True
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_seconds):
                while True:
                    self._progress.clear()  # before the check, so no acknowledgement is missed
                    if self._spool.pending_bytes == 0:
                        break
                    await self._progress.wait()
        tasks = self._tasks + [t.task for t in self._inflight.values() if t.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.close()
        pending = self._spool.pending_bytes
        await asyncio.to_thread(self._spool.close)
        self._spool = None
        log.info("pipeline_stopped", pipeline=self.name, undelivered_bytes=pending)

    # --- state for /readyz and /metrics ---------------------------------------------------------

    def problems(self) -> list[str]:
        """Why this pipeline is not ready; empty when it is."""
        if self._spool is None:
            return [f"pipeline {self.name}: not started"]
        problem = self.health.problem(self.settings.not_ready_after)
        return [f"pipeline {self.name}: {problem}"] if problem else []

    @property
    def last_delivery_time(self) -> float | None:
        """Unix time of the last successful request, None before the first."""
        return self.health.last_success

    def _export_gauges(self, spool: Spool) -> None:
        metrics = self.metrics
        metrics.spool_bytes.set_function(lambda: spool.used_bytes)
        metrics.spool_pending_bytes.set_function(lambda: spool.pending_bytes)
        metrics.spool_oldest_age.set_function(lambda: _age(spool.oldest_pending_time()))
        metrics.last_delivery.set_function(lambda: self.health.last_success or 0.0)
        metrics.ready.set_function(lambda: 0.0 if self.problems() else 1.0)
        metrics.request_raw_bytes_limit.set_function(lambda: self._builder.max_raw_bytes)

    # --- accepting events -----------------------------------------------------------------------

    async def append(self, events: Sequence[AuditEvent]) -> None:
        """Stores the events' rows durably; raises SpoolFullError when the spool is full."""
        writer = self.rows()
        for event in events:
            writer.add(event)
        await asyncio.to_thread(writer.commit)

    def rows(self, tag: str = "", chunk: bytes | None = None) -> _RowWriter:
        """A ``model.RowWriter`` for one chunk: encode on any one thread, commit there too.
        Given the chunk, its rows are stored once however often it is sent."""
        return _RowWriter(self, None if chunk is None else chunk_id(tag, chunk))

    def _already_stored(self, chunk: bytes) -> bool:
        if not self.spool.holds_chunk(chunk):
            return False
        self.metrics.chunks_duplicate.inc()
        log.info("chunk_already_stored", pipeline=self.name, note="sent again; stored once")
        return True

    def _commit(
        self, rows: list[bytes], letters: list[DeadLetter], chunk: bytes | None = None
    ) -> None:
        """The blocking half of an append, on the caller's thread."""
        truncated = self._encoder.stats.fields_truncated
        if truncated != self._truncated_seen:
            self.metrics.fields_truncated.inc(truncated - self._truncated_seen)
            self._truncated_seen = truncated
        if rows:
            try:
                self.spool.append(rows, chunk=chunk)
            except SpoolFullError:
                self.metrics.spool_full.inc()
                raise
        # After the rows: a chunk that did not fit comes back whole; its letters go once.
        if letters:
            self._dead_letters.put(letters)
        if not rows:
            return
        self.metrics.events_spooled.inc(len(rows))
        self.metrics.spooled_bytes.inc(sum(map(len, rows)))
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._wakeup.set)

    def adopt(self, rows: Sequence[bytes]) -> None:
        """Stores rows moved from an orphaned spool (blocking, any thread) and wakes the pump."""
        self.spool.append(rows)
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._wakeup.set)

    # --- the pump: spool -> bodies -> in-flight requests ----------------------------------------

    async def _pump_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self._pump()
            except (
                Exception
            ) as error:  # delivery must outlive any surprise; the spool keeps the rows
                failures += 1
                log.exception("pump_failed", pipeline=self.name, error=str(error))
                self.health.failed(Attempt(Outcome.RETRY, "error", f"pump failed: {error}"))
                await self._restart_from_acknowledged()
                await asyncio.sleep(self._backoff.delay(failures))

    async def _restart_from_acknowledged(self) -> None:
        """Drops what is in flight and reads again from the acknowledged position, so that no
        row read before the failure can be skipped by a later acknowledgement."""
        tasks = [ticket.task for ticket in self._inflight.values() if ticket.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()  # the cancelled tasks gave their slots back while finishing
        await asyncio.to_thread(self.spool.rewind)

    async def _pump(self) -> None:
        spool = self.spool
        rows: list[bytes] = []
        size = 1  # the body's uncompressed bytes: "[", then each row with its "," or "]"
        full = False  # the next row would take the body over its target
        start = end = spool.acknowledged
        first_at: float | None = None
        while True:
            self._wakeup.clear()  # before reading, so an append after the read wakes us up
            target = self._builder.target_raw_bytes
            if size < target and not full:
                read = await asyncio.to_thread(spool.read, target - size, row_overhead=1)
                if read is not None:
                    if not rows:
                        start, first_at = read.start, time.monotonic()
                    rows.extend(read.rows)
                    size += read.raw_bytes
                    full = read.full
                    end = read.end
                    continue
            waited = 0.0 if first_at is None else time.monotonic() - first_at
            if rows and (
                full or size >= target or waited >= self.settings.batch_interval or self._draining
            ):
                await self._dispatch(rows, start, end)
                rows, size, full, first_at = [], 1, False, None
                continue
            timeout = None if first_at is None else self.settings.batch_interval - waited
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def _dispatch(self, rows: list[bytes], start: Position, end: Position) -> None:
        bodies = await asyncio.to_thread(self._builder.pack, rows)
        for body in bodies:
            self.metrics.uncompressed_bytes.inc(body.raw_bytes)
            self.metrics.compressed_bytes.inc(len(body.data))
        await self._slots.acquire()
        ticket = _InFlight(start=start, end=end, rows=len(rows))
        number = self._next_ticket
        self._next_ticket += 1
        self._inflight[number] = ticket
        ticket.task = asyncio.create_task(self._deliver(number, ticket, bodies))

    async def _deliver(self, number: int, ticket: _InFlight, bodies: list[Body]) -> None:
        try:
            failures = 0
            while bodies:
                try:
                    await self._deliver_body(bodies[0])
                except Exception as error:  # e.g. the dead-letter sink failed: try the body again
                    failures += 1
                    log.exception("batch_failed", pipeline=self.name, error=str(error))
                    await asyncio.sleep(self._backoff.delay(failures))
                    continue
                bodies = bodies[1:]
            ticket.done = True
            appended = self.spool.append_time(ticket.start)
            if appended is not None:
                self.metrics.delivery_latency.observe(max(0.0, time.time() - appended))
        finally:
            self._slots.release()
        await self._acknowledge_settled(number, ticket)

    async def _deliver_body(self, body: Body) -> None:
        report = await self._deliverer.deliver(body)
        self.metrics.events_delivered.inc(report.delivered_rows)
        if report.refused:
            letters = [DeadLetter(message, row, self.name) for row, message in report.refused]
            await asyncio.to_thread(self._dead_letters.put, letters)
            self.metrics.events_dead_lettered.inc(len(letters))
            log.warning(
                "rows_refused",
                pipeline=self.name,
                rows=len(letters),
                reason=report.refused[0][1],
            )
        log.info(
            "batch_delivered",
            pipeline=self.name,
            rows=report.delivered_rows,
            refused=len(report.refused),
            raw_bytes=body.raw_bytes,
            gzip_bytes=len(body.data),
            requests=report.requests,
            retries=report.retries,
        )

    async def _acknowledge_settled(self, number: int, ticket: _InFlight) -> None:
        """Moves the cursor over every settled batch in order; a batch settled while an earlier
        one is outstanding is recorded as delivered ahead, so a restart does not resend it."""
        settled: Position | None = None
        while self._inflight:
            first = next(iter(self._inflight))
            if not self._inflight[first].done:
                break
            settled = self._inflight.pop(first).end
        try:
            if settled is not None:
                await asyncio.to_thread(self.spool.acknowledge, settled)
            if number in self._inflight:
                await asyncio.to_thread(self.spool.acknowledge_ahead, ticket.start, ticket.end)
        finally:
            self._progress.set()

    def _lower_raw_limit(self, evidence: RawLimitEvidence) -> None:
        """The endpoint counts uncompressed bytes: every body from now on stays under the new
        bound (bodies already packed are packed again by the deliverer)."""
        self._builder.max_raw_bytes = evidence.raw_limit
        log.warning(
            "request_raw_limit_lowered",
            pipeline=self.name,
            raw_limit=evidence.raw_limit,
            wire_bytes=evidence.wire_bytes,
            raw_bytes=evidence.raw_bytes,
            wire_limit=self.limits.wire_bytes,
            status=evidence.status,
            error=evidence.message,
            note="a 413 for a body under the wire limit: the endpoint counts uncompressed bytes",
        )

    async def _split(self, payload: Payload) -> Sequence[Payload]:
        return await asyncio.to_thread(self._builder.split, payload.rows)

    def _observe(self, attempt: Attempt, body_bytes: int, seconds: float) -> None:
        metrics = self.metrics
        metrics.request(attempt.status).inc()
        metrics.sent_bytes.inc(body_bytes)
        metrics.request_duration.observe(seconds)
        if attempt.outcome in (Outcome.RETRY, Outcome.BLOCKED):
            metrics.retries.inc()
            log.warning(
                "delivery_failed",
                pipeline=self.name,
                status=attempt.status,
                error=attempt.message,
                retry_after=attempt.retry_after,
            )
        elif attempt.outcome in (Outcome.TOO_LARGE, Outcome.REFUSED):
            log.info("body_split", pipeline=self.name, status=attempt.status, error=attempt.message)

    # --- housekeeping ---------------------------------------------------------------------------

    async def _sync_timer(self) -> None:
        while True:
            await asyncio.sleep(self.settings.spool_sync_interval)
            try:
                await asyncio.to_thread(self.spool.sync)
            except SpoolError as error:
                log.exception("spool_sync_failed", pipeline=self.name, error=str(error))

    def _on_corrupt(self, region: CorruptRegion) -> None:
        self.metrics.spool_corrupt_bytes.inc(region.skipped_bytes)


class _RowWriter:
    """The rows of one chunk for a ``DeliverySink`` (``model.RowWriter``)."""

    __slots__ = ("_chunk", "_encode", "_letters", "_rows", "_sink")

    def __init__(self, sink: DeliverySink, chunk: bytes | None) -> None:
        self._sink = sink
        self._chunk = chunk
        self._encode = sink._encoder.encode
        self._rows: list[bytes] = []
        self._letters: list[DeadLetter] = []

    def add(self, event: AuditEvent) -> None:
        """Encodes the event's row now; a failure becomes a dead letter, never fails the chunk."""
        try:
            self._rows.append(self._encode(event))
        except Exception as error:  # one odd event must not fail the chunk
            payload = event.raw if event.raw is not None else repr(event.fields).encode()
            reason = f"row encoding failed: {error}"
            self._letters.append(DeadLetter(reason, payload, self._sink.name))

    def already_stored(self) -> bool:
        """Whether the spool holds this chunk's rows already (counted as a duplicate)."""
        return self._chunk is not None and self._sink._already_stored(self._chunk)

    def commit(self) -> None:
        """Sets the failures aside, then stores the rows durably (blocking)."""
        self._sink._commit(self._rows, self._letters, self._chunk)


def _age(since: float | None) -> float:
    return 0.0 if since is None else max(0.0, time.time() - since)
