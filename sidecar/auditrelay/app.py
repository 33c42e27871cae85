"""Wiring and lifecycle: pipelines, the Push flow, and the ``auditrelay serve`` process.

Push flow of one chunk (on a worker thread, so the event loop keeps answering health checks
and other pushes while a multi-megabyte chunk is decoded)::

    decode -> EventFilter.apply per event -> dead letters to the DeadLetterSink
           -> EventSink.append(kept events) (on the loop) -> PushResult

When the sink is a ``model.RowSink`` (``DeliverySink`` is), the whole chunk is one worker call:
each event is decoded, filtered and encoded to its row before the next is decoded (its fields
are freed at once), and the rows are appended to the spool on the same thread. One thread
hand-off per chunk instead of several, and never a whole chunk of decoded events in memory.

A chunk that is not msgpack at all is set aside whole and ACCEPTED: retrying cannot help, and
REJECTED (FLB_ERROR) would make Fluent Bit drop it without a trace. The sink raising
``SpoolError`` (``SpoolFullError`` when full) becomes RETRY_LATER in ``receive``.

Each pipeline is built by ``pipeline.PipelineBuilder`` (the same code ``replay`` builds its
pipeline with): the audit-policy filter, dead letters under ``<state_dir>/deadletter/``, and a
``sink.DeliverySink`` with its spool under ``<state_dir>/spool/<pipeline_id>/``, delivering to
its ``endpoint`` or to the bundled emulator. Sinks start on Configure and, at shutdown, deliver
what they hold for up to ``drain_seconds`` before they stop; the rest waits in the spool.

``EventFilter.apply`` runs on the single decode thread (never concurrently with itself);
``EventSink.append`` runs on the event loop; a ``RowSink``'s ``RowWriter`` is filled and
committed on the decode thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Final

import structlog

from auditrelay import __version__
from auditrelay.config import PipelineSettings, ServerSettings
from auditrelay.decode import ChunkStream, Reason
from auditrelay.embedded import EmbeddedEmulator
from auditrelay.errors import ConfigError, DecodeError, PropertyProblem, SpoolError
from auditrelay.metrics import HealthServer, Metrics
from auditrelay.model import AuditEvent, DeadLetter, EventSink, PushResult, PushStatus, RowSink
from auditrelay.pipeline import (
    Closable,
    DeadLetterFactory,
    FilterFactory,
    HasProblems,
    Pipeline,
    PipelineBuilder,
    PipelineCounters,
    SinkFactory,
    StateLayout,
    close_dead_letters,
    stop_sink,
)
from auditrelay.receive import PipelineNotFoundError, RelayServer
from auditrelay.sink import DeliverySink
from auditrelay.spools import (
    Appender,
    OrphanWatch,
    inventory,
    legacy_pipeline_id,
    pipeline_id_for,
    record_owners,
    rename_unused,
)

log = structlog.get_logger("auditrelay.app")

SHUTDOWN_GRACE_SECONDS: Final = 10.0
DRAIN_SECONDS: Final = 10.0
ORPHAN_CHECK_SECONDS: Final = 5.0


@dataclass(slots=True)
class _Outcome:
    """What the worker thread made of a chunk."""

    kept: list[AuditEvent]  # for a sink that is not a RowSink; a RowSink has them already
    accepted: int
    received: int
    filtered: int
    letters: list[DeadLetter]
    not_msgpack: str = ""
    records_seen: int = 0
    deferred: SpoolError | None = None  # the RowSink's append failed


class App:
    """The sidecar: a registry of pipelines and the Push flow; implements receive.RelayHandler.

    Pipelines are built by ``pipeline.PipelineBuilder`` in serve's state layout; tests may
    plug in their own filter, sink and dead-letter factories.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        filter_factory: FilterFactory | None = None,
        sink_factory: SinkFactory | None = None,
        deadletter_factory: DeadLetterFactory | None = None,
        metrics: Metrics | None = None,
        offload: bool = True,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.builder = PipelineBuilder(
            StateLayout(settings.state_dir),
            self.metrics,
            filter_factory=filter_factory,
            sink_factory=sink_factory,
            deadletter_factory=deadletter_factory,
        )
        self.drain_seconds = drain_seconds
        self.pipelines: dict[str, Pipeline] = {}
        self._offload = offload
        # One thread: chunks are CPU-bound under the GIL; more threads would only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditrelay-decode")
        self._configure_lock = asyncio.Lock()
        self._rebuilding: dict[str, asyncio.Event] = {}  # pushes to these wait
        self.orphans = OrphanWatch(
            self.spool_root,
            lambda: tuple(self.pipelines),
            after=settings.orphan_after,
            appender=self._appender,
        )
        self.orphans.bind(self.metrics)

    # -- RelayHandler --

    async def configure(
        self, properties: Mapping[str, str], instance_name: str, plugin_version: str
    ) -> str:
        """Returns the pipeline for these properties, creating (and starting) it the first time.

        The id is the instance and the destination. The same id with other settings (a rotated
        secret, new tuning, another policy) rebuilds the pipeline's filter and delivery with
        them; its spool, and the backlog in it, stay.
        """
        settings = PipelineSettings.from_properties(properties, instance_name)
        pipeline_id = pipeline_id_for(settings)
        async with self._configure_lock:
            current = self.pipelines.get(pipeline_id)
            changed: list[str] = []
            if current is None:
                self._adopt_legacy_directories(pipeline_id, instance_name, properties)
                self.pipelines[pipeline_id] = await self.builder.build(settings, pipeline_id)
                if not self.builder.custom_sinks:
                    record_owners(self.spool_root, self.pipelines)
            elif current.settings != settings:
                changed = _changed_settings(current.settings, settings)
                await self._rebuild(current, settings)
        log.info(
            "pipeline_configured",
            pipeline_id=pipeline_id,
            instance_name=instance_name,
            plugin_version=plugin_version,
            created=current is None,
            rebuilt_for=changed,
            properties=sorted(properties),
        )
        return pipeline_id

    def _appender(self, pipeline_id: str) -> Appender | None:
        """Where rows drained from an orphan go: the running pipeline's spool (any thread)."""
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline is None or pipeline_id in self._rebuilding:
            return None
        sink = pipeline.sink
        return sink.adopt if isinstance(sink, DeliverySink) else None

    @property
    def emulator(self) -> EmbeddedEmulator:
        """The bundled emulator of the pipelines that name no endpoint."""
        return self.builder.emulator

    @property
    def spool_root(self) -> Path:
        """Where the pipelines' spools live: ``<state_dir>/spool``."""
        return self.builder.layout.spool_root

    def _adopt_legacy_directories(
        self, pipeline_id: str, instance_name: str, properties: Mapping[str, str]
    ) -> None:
        """Renames the spool and dead letters an earlier version kept under the old id (a hash of
        every property) to the new id, when nothing uses them and the new id has none yet."""
        legacy = legacy_pipeline_id(instance_name, properties)
        if legacy == pipeline_id or self.builder.custom_sinks:
            return
        state = self.settings.state_dir
        try:
            renamed = rename_unused(self.spool_root / legacy, self.spool_root / pipeline_id)
        except SpoolError as error:
            log.warning(
                "spool_not_migrated", spool=legacy, pipeline_id=pipeline_id, error=str(error)
            )
            return
        if renamed:
            letters = state / "deadletter"
            if (letters / legacy).is_dir() and not (letters / pipeline_id).exists():
                os.rename(letters / legacy, letters / pipeline_id)
            log.info("spool_migrated", spool=legacy, pipeline_id=pipeline_id)

    async def _rebuild(self, pipeline: Pipeline, settings: PipelineSettings) -> None:
        """Gives a running pipeline new settings: new pushes wait, those in flight finish, the
        delivery stops (what it had in flight stays in the spool and is sent again), and the
        pipeline starts over on the same spool. If the new settings cannot start, the old ones
        are restored and the error is Configure's answer."""
        event_filter = self.builder.build_filter(
            settings
        )  # a bad policy fails before anything stops
        gate = asyncio.Event()
        self._rebuilding[pipeline.pipeline_id] = gate
        try:
            while pipeline.pushes:
                pipeline.settled.clear()
                await pipeline.settled.wait()
            await stop_sink(pipeline.sink)
            try:
                sink = await self._start_sink(settings, pipeline)
            except BaseException:
                try:
                    pipeline.sink = await self._start_sink(pipeline.settings, pipeline)
                except Exception:  # gone: the plugin's next push configures it afresh
                    del self.pipelines[pipeline.pipeline_id]
                raise
            if isinstance(pipeline.event_filter, Closable):
                await pipeline.event_filter.aclose()
            pipeline.settings, pipeline.event_filter, pipeline.sink = settings, event_filter, sink
        finally:
            del self._rebuilding[pipeline.pipeline_id]
            gate.set()

    async def _start_sink(self, settings: PipelineSettings, pipeline: Pipeline) -> EventSink:
        return await self.builder.start_sink(
            settings, pipeline.pipeline_id, pipeline.metrics, pipeline.dead_letters
        )

    async def push(self, pipeline_id: str, tag: str, chunk: bytes) -> PushResult:
        """Decodes, filters and stores one chunk; raises PipelineNotFoundError or SpoolError."""
        while (gate := self._rebuilding.get(pipeline_id)) is not None:
            await gate.wait()
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline is None:
            raise PipelineNotFoundError(
                f"unknown pipeline {pipeline_id!r}: the sidecar restarted; configure again"
            )
        pipeline.pushes += 1
        try:
            return await self._push(pipeline, tag, chunk)
        finally:
            pipeline.pushes -= 1
            if not pipeline.pushes:
                pipeline.settled.set()

    async def _push(self, pipeline: Pipeline, tag: str, chunk: bytes) -> PushResult:
        counters = pipeline.counters
        counters.chunks_received += 1
        counters.chunk_bytes_received += len(chunk)
        pipeline.metrics.received_bytes.inc(len(chunk))
        outcome = await self._process(pipeline, tag, chunk)
        try:
            if outcome.deferred is not None:
                raise outcome.deferred
            if outcome.kept:
                await pipeline.sink.append(outcome.kept)
                if outcome.letters:  # after the append, as _process_chunk does
                    await asyncio.to_thread(pipeline.dead_letters.put, outcome.letters)
        except SpoolError as error:
            counters.chunks_retry_later += 1
            log.warning(
                "chunk_deferred",
                pipeline_id=pipeline.pipeline_id,
                events=outcome.accepted,
                reason=str(error),
            )
            raise
        return self._accepted(pipeline, tag, len(chunk), outcome)

    # -- helpers --

    async def _process(self, pipeline: Pipeline, tag: str, chunk: bytes) -> _Outcome:
        if not self._offload:
            return _process_chunk(pipeline, tag, chunk)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _process_chunk, pipeline, tag, chunk)

    def _accepted(self, pipeline: Pipeline, tag: str, size: int, outcome: _Outcome) -> PushResult:
        counters = pipeline.counters
        invalid = len(outcome.letters)
        counters.chunks_accepted += 1
        counters.records_seen += outcome.records_seen
        counters.events_received += outcome.received
        counters.events_accepted += outcome.accepted
        counters.events_filtered += outcome.filtered
        counters.events_invalid += invalid
        metrics = pipeline.metrics
        metrics.events_received.inc(outcome.received)
        metrics.events_filtered.inc(outcome.filtered)
        metrics.events_invalid.inc(invalid)
        by_reason: dict[str, int] = {}
        for letter in outcome.letters:
            by_reason[letter.reason] = by_reason.get(letter.reason, 0) + 1
        for reason, count in by_reason.items():
            counters.invalid_by_reason[reason] = counters.invalid_by_reason.get(reason, 0) + count
        if outcome.not_msgpack:
            counters.chunks_not_msgpack += 1
        level = log.warning if invalid else log.debug
        level(
            "chunk_accepted",
            pipeline_id=pipeline.pipeline_id,
            tag=tag,
            bytes=size,
            events_received=outcome.received,
            events_accepted=outcome.accepted,
            events_filtered=outcome.filtered,
            events_invalid=invalid,
            invalid_reasons=by_reason,
        )
        message = (
            f"chunk is not msgpack; set aside whole: {outcome.not_msgpack}"
            if outcome.not_msgpack
            else ""
        )
        return PushResult(
            status=PushStatus.ACCEPTED,
            events_received=outcome.received,
            events_accepted=outcome.accepted,
            events_filtered=outcome.filtered,
            events_invalid=invalid,
            message=message,
        )

    def counters(self) -> dict[str, PipelineCounters]:
        """Counters per pipeline id."""
        return {pipeline_id: p.counters for pipeline_id, p in self.pipelines.items()}

    def problems(self) -> list[str]:
        """Why the sidecar is not ready (what /readyz answers): every pipeline's problems, and
        every spool with a backlog that no pipeline delivers."""
        return [
            problem
            for pipeline in list(self.pipelines.values())
            if isinstance(pipeline.sink, HasProblems)
            for problem in pipeline.sink.problems()
        ] + self.orphans.problems()

    async def aclose(self) -> None:
        """Drains and stops every pipeline (together, within drain_seconds), then the emulator
        and the worker thread."""
        stops: list[Awaitable[None]] = []
        for pipeline in self.pipelines.values():
            stops.append(stop_sink(pipeline.sink, self.drain_seconds))
            if isinstance(pipeline.event_filter, Closable):
                stops.append(pipeline.event_filter.aclose())
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("pipeline_stop_failed", error=str(result))
        for pipeline in self.pipelines.values():
            close_dead_letters(pipeline.dead_letters)
        await self.builder.aclose()
        self._executor.shutdown(wait=True)


def _changed_settings(old: PipelineSettings, new: PipelineSettings) -> list[str]:
    """The names (never the values) of the settings that differ."""
    return [item.name for item in fields(old) if getattr(old, item.name) != getattr(new, item.name)]


def _process_chunk(pipeline: Pipeline, tag: str, chunk: bytes) -> _Outcome:
    """Decode and filter (and, for a RowSink, encode and append), on the worker thread; dead
    letters are made durable here too, once the kept rows are stored: a chunk answered
    RETRY_LATER comes back whole, and its letters must be written once, not per attempt."""
    stream = ChunkStream(chunk, tag)
    apply = pipeline.event_filter.apply
    sink = pipeline.sink
    writer = sink.rows(tag, chunk) if isinstance(sink, RowSink) else None
    if writer is not None and writer.already_stored():
        return _Outcome([], 0, 0, 0, [])  # sent again after its answer was lost: stored once
    kept: list[AuditEvent] = []
    received = accepted = 0
    add = kept.append if writer is None else writer.add
    try:
        for event in stream:
            received += 1
            lowered = apply(event)
            if lowered is not None:
                accepted += 1
                add(lowered)
    except DecodeError as error:  # raised before any event: the chunk is not msgpack at all
        letters = [DeadLetter(Reason.NOT_MSGPACK, chunk, tag)]
        pipeline.dead_letters.put(letters)
        return _Outcome([], 0, 0, 0, letters, not_msgpack=str(error), records_seen=1)
    letters = stream.dead_letters
    outcome = _Outcome(
        kept, accepted, received, received - accepted, letters, "", stream.records_seen
    )
    if writer is not None and accepted:
        try:
            writer.commit()
        except SpoolError as error:
            outcome.deferred = error
            return outcome
    if letters and not kept:  # kept events (not a RowSink) are appended, then letters, in push
        pipeline.dead_letters.put(letters)
    return outcome


# --- the serve process -------------------------------------------------------------------------


async def serve(
    settings: ServerSettings,
    app: App | None = None,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[str], None] | None = None,
    grace: float = SHUTDOWN_GRACE_SECONDS,
) -> None:
    """Runs the sidecar until SIGTERM/SIGINT (or ``stop`` is set), then shuts down gracefully:
    stops taking chunks, drains the pipelines' spools for a while, stops the health server."""
    app = app or App(settings)
    stop = stop or asyncio.Event()
    server = RelayServer(settings, app)
    health = HealthServer(app.metrics, app.problems, settings.metrics_address)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await _start_health(health, settings.metrics_address)
        address = await server.start()
        log.info(
            "server_started",
            listen=address,
            metrics=health.url,
            version=__version__,
            pid=os.getpid(),
        )
        if started is not None:
            started(address)
        watcher = asyncio.create_task(_watch_orphans(app), name="orphaned-spools")
        await stop.wait()
        watcher.cancel()
        log.info("server_stopping", grace_seconds=grace)
        await server.stop(grace)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await server.stop(0)
        await app.aclose()
        await health.stop()
    log.info("server_stopped")


async def _watch_orphans(app: App) -> None:
    """Logs spools no pipeline owns (``spool_orphaned``) once they count as orphaned, and again
    whenever the set changes; /metrics and /readyz ask for themselves."""
    found = await asyncio.to_thread(inventory, app.spool_root)
    if found:
        log.info(
            "spools_found",
            spools={info.pipeline_id: info.pending_bytes for info in found},
            note=f"a spool no pipeline claims within {app.settings.orphan_after:g}s is orphaned",
        )
    while True:
        await asyncio.sleep(ORPHAN_CHECK_SECONDS)
        try:
            await asyncio.to_thread(app.orphans.check)
        except OSError as error:
            log.warning("spool_check_failed", error=str(error))


async def _start_health(health: HealthServer, address: str) -> None:
    try:
        await health.start()
    except OSError as error:
        problem = PropertyProblem("metrics_address", address, f"a free host:port ({error})")
        raise ConfigError([problem]) from error
