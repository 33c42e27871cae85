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

Each pipeline gets the audit-policy filter (``filter.PolicyFilter`` for its ``policy``
property) and a ``sink.DeliverySink``: its spool under ``<state_dir>/spool/<pipeline_id>/``,
delivering to its ``endpoint``, or, when the pipeline names none, to the bundled emulator,
which then runs in this process (state under ``<state_dir>/emulator/``, started once, the
first time a pipeline needs it). Sinks start on Configure and, at shutdown, deliver what they
hold for up to ``drain_seconds`` before they stop; the rest waits in the spool.

``EventFilter.apply`` runs on the single decode thread (never concurrently with itself);
``EventSink.append`` runs on the event loop; a ``RowSink``'s ``RowWriter`` is filled and
committed on the decode thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import signal
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import orjson
import structlog

from auditrelay import __version__
from auditrelay.config import PROPERTY_BY_NAME, Owner, PipelineSettings, Property, ServerSettings
from auditrelay.deadletter import DeadLetterStore
from auditrelay.decode import ChunkStream, Reason
from auditrelay.deliver import Destination, secret_credential_factory
from auditrelay.emulator_process import EmulatorProcess
from auditrelay.errors import (
    ConfigError,
    DecodeError,
    PolicyError,
    PropertyProblem,
    SpoolError,
)
from auditrelay.filter import PolicyFilter
from auditrelay.metrics import HealthServer, Metrics, PipelineMetrics
from auditrelay.model import (
    AuditEvent,
    DeadLetter,
    DeadLetterSink,
    EventFilter,
    EventSink,
    PushResult,
    PushStatus,
    RowSink,
)
from auditrelay.receive import PipelineNotFoundError, RelayServer
from auditrelay.sink import DeliverySink

log = structlog.get_logger("auditrelay.app")

FilterFactory = Callable[[PipelineSettings], EventFilter]
SinkFactory = Callable[[PipelineSettings, str], EventSink]
DeadLetterFactory = Callable[[PipelineSettings, str], DeadLetterSink]

SHUTDOWN_GRACE_SECONDS: Final = 10.0
DRAIN_SECONDS: Final = 10.0
# The identity the embedded emulator's token endpoint sees; it accepts any client's secret.
EMULATOR_TENANT: Final = "auditrelay-embedded"
EMULATOR_CLIENT: Final = "auditrelay-sidecar"


@runtime_checkable
class Startable(Protocol):
    """A sink with background work: started on Configure, stopped (drained) at shutdown."""

    async def start(self) -> None:
        """Opens what the sink needs and starts its background work."""

    async def stop(self, drain_seconds: float) -> None:
        """Finishes what it can within ``drain_seconds``, then releases everything."""


@runtime_checkable
class Closable(Protocol):
    """A sink or filter with resources to release at shutdown (flush, close files, stop tasks)."""

    async def aclose(self) -> None:
        """Releases the resources; called once at shutdown."""


@runtime_checkable
class HasProblems(Protocol):
    """A sink that can say why it is not ready (what /readyz reports)."""

    def problems(self) -> list[str]:
        """Why the pipeline is not ready; empty when it is."""


# --- counters (also exported as Prometheus metrics) ---------------------------------------------


@dataclass(slots=True)
class PipelineCounters:
    """Totals of one pipeline since start, for tests and tools; /metrics has the same counts
    from ``App.metrics``, incremented alongside."""

    chunks_received: int = 0
    chunk_bytes_received: int = 0
    chunks_accepted: int = 0
    chunks_retry_later: int = 0
    chunks_not_msgpack: int = 0
    records_seen: int = 0
    events_received: int = 0
    events_accepted: int = 0
    events_filtered: int = 0
    events_invalid: int = 0
    invalid_by_reason: dict[str, int] = field(default_factory=dict)


# --- pipelines ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Pipeline:
    """One ``[OUTPUT]`` instance's stages."""

    pipeline_id: str
    settings: PipelineSettings
    event_filter: EventFilter
    sink: EventSink
    dead_letters: DeadLetterSink
    metrics: PipelineMetrics
    counters: PipelineCounters = field(default_factory=PipelineCounters)


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


_UNSAFE_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_PIPELINE_PROPERTY: Final = Property("unknown", Owner.PIPELINE, "")


def pipeline_id_for(instance_name: str, properties: Mapping[str, str]) -> str:
    """A stable id: the same instance with the same pipeline properties gets the same id, also
    after a restart of either side, so the pipeline's directories (dead letters, spool) are found
    again. The plugin's own properties (address, timeouts) do not change what the pipeline is.
    """
    relevant = {
        key.lower(): value
        for key, value in properties.items()
        if PROPERTY_BY_NAME.get(key.lower(), _PIPELINE_PROPERTY).owner is Owner.PIPELINE
    }
    canonical = orjson.dumps(
        {"instance": instance_name, "properties": relevant}, option=orjson.OPT_SORT_KEYS
    )
    digest = hashlib.sha256(canonical).hexdigest()[:16]
    name = _UNSAFE_ID_CHARS.sub("_", instance_name).strip("._") or "pipeline"
    return f"{name[:64]}-{digest}"


def deadletter_store_factory(server: ServerSettings) -> DeadLetterFactory:
    """Dead letters of a pipeline go under <state_dir>/deadletter/<pipeline_id>/."""

    def build(settings: PipelineSettings, pipeline_id: str) -> DeadLetterSink:
        return DeadLetterStore(server.state_dir / "deadletter" / pipeline_id)

    return build


class EmbeddedEmulator:
    """The bundled emulator as the destination of pipelines without an ``endpoint``.

    Runs in a process of its own (``embedded.EmulatorProcess``), started once, the first time
    a pipeline needs it, so that its work does not share this interpreter; its CA, token
    authority and a client secret of this process's own are what those pipelines use.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._emulator: EmulatorProcess | None = None
        self._lock = asyncio.Lock()
        self._secret = secrets.token_urlsafe(24)

    @property
    def running(self) -> EmulatorProcess | None:
        """The emulator once started."""
        return self._emulator

    async def ensure_started(self) -> EmulatorProcess:
        """The running emulator, started on the first call."""
        async with self._lock:
            if self._emulator is None:
                emulator = EmulatorProcess(self.state_dir)
                await emulator.start()
                self._emulator = emulator
            return self._emulator

    async def sink_for(
        self,
        settings: PipelineSettings,
        *,
        directory: Path,
        metrics: PipelineMetrics,
        dead_letters: DeadLetterSink,
    ) -> DeliverySink:
        """A DeliverySink that delivers to the emulator with a real client-secret credential."""
        emulator = await self.ensure_started()
        info = emulator.info
        destination = Destination(
            endpoint=info.endpoint,
            rule_id=info.dcr_id,
            stream=settings.stream,
            audience=info.audience,
            ca_file=info.ca_file,
        )
        credentials = secret_credential_factory(
            info.authority_host, EMULATOR_TENANT, EMULATOR_CLIENT, self._secret
        )
        log.info(
            "pipeline_delivers_to_emulator",
            pipeline=settings.instance_name,
            endpoint=info.endpoint,
            store=str(info.database),
            note="no endpoint is set: rows go to the bundled local emulator, not to Azure",
        )
        return DeliverySink(
            settings,
            directory=directory,
            metrics=metrics,
            dead_letters=dead_letters,
            destination=destination,
            credential_factory=credentials,
        )

    async def stop(self) -> None:
        """Stops the emulator if it runs."""
        if self._emulator is not None:
            await self._emulator.stop()
            self._emulator = None


class App:
    """The sidecar: a registry of pipelines and the Push flow; implements receive.RelayHandler.

    By default each pipeline gets ``PolicyFilter`` and a ``DeliverySink``; tests may plug in
    their own filter and sink factories.
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
        self.filter_factory = filter_factory or self._policy_filter
        self.sink_factory = sink_factory
        self.deadletter_factory = deadletter_factory or deadletter_store_factory(settings)
        self.metrics = metrics or Metrics()
        self.emulator = EmbeddedEmulator(settings.state_dir / "emulator")
        self.drain_seconds = drain_seconds
        self.pipelines: dict[str, Pipeline] = {}
        self._offload = offload
        # One thread: chunks are CPU-bound under the GIL; more threads would only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditrelay-decode")
        self._configure_lock = asyncio.Lock()
        self._policies_logged: set[Path] = set()

    # -- RelayHandler --

    async def configure(
        self, properties: Mapping[str, str], instance_name: str, plugin_version: str
    ) -> str:
        """Returns the pipeline for these properties, creating (and starting) it the first time."""
        pipeline_settings = PipelineSettings.from_properties(properties, instance_name)
        pipeline_id = pipeline_id_for(instance_name, properties)
        async with self._configure_lock:
            created = pipeline_id not in self.pipelines
            if created:
                self.pipelines[pipeline_id] = await self._build_pipeline(
                    pipeline_settings, pipeline_id
                )
        log.info(
            "pipeline_configured",
            pipeline_id=pipeline_id,
            instance_name=instance_name,
            plugin_version=plugin_version,
            created=created,
            properties=sorted(properties),
        )
        return pipeline_id

    async def _build_pipeline(self, settings: PipelineSettings, pipeline_id: str) -> Pipeline:
        event_filter = self._build_filter(settings)
        dead_letters = self.deadletter_factory(settings, pipeline_id)
        metrics = self.metrics.pipeline(pipeline_id)
        sink = await self._build_sink(settings, pipeline_id, metrics, dead_letters)
        if isinstance(sink, Startable):
            await sink.start()
        return Pipeline(pipeline_id, settings, event_filter, sink, dead_letters, metrics)

    def _build_filter(self, settings: PipelineSettings) -> EventFilter:
        """The pipeline's filter; a policy file that cannot be used is the `policy` property's fault."""
        try:
            return self.filter_factory(settings)
        except PolicyError as error:
            problem = PropertyProblem("policy", str(settings.policy), f"an audit policy: {error}")
            raise ConfigError([problem]) from error

    def _policy_filter(self, settings: PipelineSettings) -> PolicyFilter:
        """``PolicyFilter`` for the pipeline's policy; its warnings are logged once per file."""
        event_filter = PolicyFilter.from_file(settings.policy)
        warnings = event_filter.policy.policy.warnings
        if warnings and settings.policy not in self._policies_logged:
            self._policies_logged.add(settings.policy)
            log.warning(
                "policy_loaded_with_warnings", policy=str(settings.policy), warnings=warnings
            )
        return event_filter

    async def _build_sink(
        self,
        settings: PipelineSettings,
        pipeline_id: str,
        metrics: PipelineMetrics,
        dead_letters: DeadLetterSink,
    ) -> EventSink:
        if self.sink_factory is not None:
            return self.sink_factory(settings, pipeline_id)
        directory = self.settings.state_dir / "spool" / pipeline_id
        if settings.uses_emulator:
            return await self.emulator.sink_for(
                settings, directory=directory, metrics=metrics, dead_letters=dead_letters
            )
        return DeliverySink(
            settings, directory=directory, metrics=metrics, dead_letters=dead_letters
        )

    async def push(self, pipeline_id: str, tag: str, chunk: bytes) -> PushResult:
        """Decodes, filters and stores one chunk; raises PipelineNotFoundError or SpoolError."""
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline is None:
            raise PipelineNotFoundError(
                f"unknown pipeline {pipeline_id!r}: the sidecar restarted; configure again"
            )
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
        except SpoolError as error:
            counters.chunks_retry_later += 1
            log.warning(
                "chunk_deferred",
                pipeline_id=pipeline_id,
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
        """Why the sidecar is not ready (what /readyz answers): every pipeline's problems."""
        return [
            problem
            for pipeline in list(self.pipelines.values())
            if isinstance(pipeline.sink, HasProblems)
            for problem in pipeline.sink.problems()
        ]

    async def aclose(self) -> None:
        """Drains and stops every pipeline (together, within drain_seconds), then the emulator
        and the worker thread."""
        stops: list[Awaitable[None]] = []
        for pipeline in self.pipelines.values():
            if isinstance(pipeline.sink, Startable):
                stops.append(pipeline.sink.stop(self.drain_seconds))
            parts = (pipeline.event_filter, pipeline.sink)
            stops.extend(part.aclose() for part in parts if isinstance(part, Closable))
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("pipeline_stop_failed", error=str(result))
        for pipeline in self.pipelines.values():
            close = getattr(pipeline.dead_letters, "close", None)
            if callable(close):
                close()
        await self.emulator.stop()
        self._executor.shutdown(wait=True)


def _process_chunk(pipeline: Pipeline, tag: str, chunk: bytes) -> _Outcome:
    """Decode and filter (and, for a RowSink, encode and append), on the worker thread; dead
    letters are made durable here too."""
    stream = ChunkStream(chunk, tag)
    apply = pipeline.event_filter.apply
    sink = pipeline.sink
    writer = sink.rows() if isinstance(sink, RowSink) else None
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
    if letters:
        pipeline.dead_letters.put(letters)
    outcome = _Outcome(
        kept, accepted, received, received - accepted, letters, "", stream.records_seen
    )
    if writer is not None and accepted:
        try:
            writer.commit()
        except SpoolError as error:
            outcome.deferred = error
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
        await stop.wait()
        log.info("server_stopping", grace_seconds=grace)
        await server.stop(grace)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await server.stop(0)
        await app.aclose()
        await health.stop()
    log.info("server_stopped")


async def _start_health(health: HealthServer, address: str) -> None:
    try:
        await health.start()
    except OSError as error:
        problem = PropertyProblem("metrics_address", address, f"a free host:port ({error})")
        raise ConfigError([problem]) from error
