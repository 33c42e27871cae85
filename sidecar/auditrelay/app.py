"""Wiring and lifecycle: pipelines, the Push flow, and the ``auditrelay serve`` process.

Push flow of one chunk (on a worker thread, so the event loop keeps answering health checks
and other pushes while a multi-megabyte chunk is decoded)::

    decode -> EventFilter.apply per event -> dead letters to the DeadLetterSink
           -> EventSink.append(kept events) (on the loop) -> PushResult

A chunk that is not msgpack at all is set aside whole and ACCEPTED: retrying cannot help, and
REJECTED (FLB_ERROR) would make Fluent Bit drop it without a trace. The sink raising
``SpoolError`` (``SpoolFullError`` when full) becomes RETRY_LATER in ``receive``.

The filter and the durable sink are plugged in by factories. Until the real ones are wired in,
``KeepEveryEventFilter`` and ``MemoryBufferSink`` stand in: the first keeps every event, the
second holds accepted events in memory (``MEMORY_BUFFER_BYTES`` of event JSON at most) and
answers SpoolFullError, hence RETRY_LATER, once full: nothing is lost, nothing is delivered.

``EventFilter.apply`` runs on the single decode thread (never concurrently with itself);
``EventSink.append`` runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

import orjson
import structlog

from auditrelay import __version__
from auditrelay.config import PROPERTY_BY_NAME, Owner, PipelineSettings, Property, ServerSettings
from auditrelay.deadletter import DeadLetterStore
from auditrelay.decode import Reason, decode_chunk
from auditrelay.errors import (
    ConfigError,
    DecodeError,
    PolicyError,
    PropertyProblem,
    SpoolError,
    SpoolFullError,
)
from auditrelay.model import (
    AuditEvent,
    DeadLetter,
    DeadLetterSink,
    EventFilter,
    EventSink,
    PushResult,
    PushStatus,
)
from auditrelay.receive import PipelineNotFoundError, RelayServer

log = structlog.get_logger("auditrelay.app")

FilterFactory = Callable[[PipelineSettings], EventFilter]
SinkFactory = Callable[[PipelineSettings, str], EventSink]
DeadLetterFactory = Callable[[PipelineSettings, str], DeadLetterSink]

SHUTDOWN_GRACE_SECONDS: Final = 10.0
# Event JSON held by the in-memory stand-in sink; the Python objects take several times that.
MEMORY_BUFFER_BYTES: Final = 64 << 20


# --- the stand-ins until the policy filter and the durable spool are wired in ------------------


class KeepEveryEventFilter:
    """An EventFilter that keeps every event unchanged (no audit policy applied)."""

    def __init__(self, settings: PipelineSettings | None = None) -> None:
        self.settings = settings

    def apply(self, event: AuditEvent) -> AuditEvent | None:
        """Returns the event as it is."""
        return event


class MemoryBufferSink:
    """An EventSink that holds events in memory, bounded in bytes; not durable across restarts.

    ``append`` raises SpoolFullError when the events would exceed ``limit_bytes``, so the reply
    contract (RETRY_LATER when the next stage is full) already holds. ``take`` empties it.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._events: deque[tuple[AuditEvent, int]] = deque()

    @classmethod
    def for_pipeline(cls, settings: PipelineSettings, pipeline_id: str) -> MemoryBufferSink:
        """The sink factory: bounded by spool_limit, and never more than MEMORY_BUFFER_BYTES."""
        return cls(min(settings.spool_limit, MEMORY_BUFFER_BYTES))

    async def append(self, events: Sequence[AuditEvent]) -> None:
        """Keeps all the events, or none of them when they do not fit."""
        sizes = [_size_of(event) for event in events]
        needed = sum(sizes)
        if self.used_bytes + needed > self.limit_bytes:
            raise SpoolFullError(
                f"memory buffer holds {self.used_bytes} of {self.limit_bytes} bytes; "
                f"{needed} more do not fit"
            )
        self._events.extend(zip(events, sizes, strict=True))
        self.used_bytes += needed

    def take(self) -> list[AuditEvent]:
        """Removes and returns every buffered event, oldest first."""
        taken = [event for event, _ in self._events]
        self._events.clear()
        self.used_bytes = 0
        return taken

    def __len__(self) -> int:
        return len(self._events)


def _size_of(event: AuditEvent) -> int:
    return len(event.raw) if event.raw is not None else len(orjson.dumps(event.fields))


@runtime_checkable
class Closable(Protocol):
    """A sink or filter with resources to release at shutdown (flush, close files, stop tasks)."""

    async def aclose(self) -> None:
        """Releases the resources; called once at shutdown."""


# --- counters (read by the metrics module) -----------------------------------------------------


@dataclass(slots=True)
class PipelineCounters:
    """Totals of one pipeline since start; plain integers, for metrics to read."""

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
    counters: PipelineCounters = field(default_factory=PipelineCounters)


@dataclass(slots=True)
class _Outcome:
    """What the worker thread made of a chunk."""

    kept: list[AuditEvent]
    received: int
    filtered: int
    letters: list[DeadLetter]
    not_msgpack: str = ""
    records_seen: int = 0


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


class App:
    """The sidecar: a registry of pipelines and the Push flow; implements receive.RelayHandler."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        filter_factory: FilterFactory = KeepEveryEventFilter,
        sink_factory: SinkFactory = MemoryBufferSink.for_pipeline,
        deadletter_factory: DeadLetterFactory | None = None,
        offload: bool = True,
    ) -> None:
        self.settings = settings
        self.filter_factory = filter_factory
        self.sink_factory = sink_factory
        self.deadletter_factory = deadletter_factory or deadletter_store_factory(settings)
        self.pipelines: dict[str, Pipeline] = {}
        self._offload = offload
        # One thread: chunks are CPU-bound under the GIL; more threads would only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditrelay-decode")
        self._configure_lock = asyncio.Lock()

    # -- RelayHandler --

    async def configure(
        self, properties: Mapping[str, str], instance_name: str, plugin_version: str
    ) -> str:
        """Returns the pipeline for these properties, creating it the first time."""
        pipeline_settings = PipelineSettings.from_properties(properties, instance_name)
        pipeline_id = pipeline_id_for(instance_name, properties)
        async with self._configure_lock:
            if pipeline_id not in self.pipelines:
                self.pipelines[pipeline_id] = Pipeline(
                    pipeline_id=pipeline_id,
                    settings=pipeline_settings,
                    event_filter=self._build_filter(pipeline_settings),
                    sink=self.sink_factory(pipeline_settings, pipeline_id),
                    dead_letters=self.deadletter_factory(pipeline_settings, pipeline_id),
                )
                created = True
            else:
                created = False
        log.info(
            "pipeline_configured",
            pipeline_id=pipeline_id,
            instance_name=instance_name,
            plugin_version=plugin_version,
            created=created,
            properties=sorted(properties),
        )
        return pipeline_id

    def _build_filter(self, settings: PipelineSettings) -> EventFilter:
        """The pipeline's filter; a policy file that cannot be used is the `policy` property's fault."""
        try:
            return self.filter_factory(settings)
        except PolicyError as error:
            problem = PropertyProblem("policy", str(settings.policy), f"an audit policy: {error}")
            raise ConfigError([problem]) from error

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
        outcome = await self._process(pipeline, tag, chunk)
        try:
            if outcome.kept:
                await pipeline.sink.append(outcome.kept)
        except SpoolError:
            counters.chunks_retry_later += 1
            log.warning("chunk_deferred", pipeline_id=pipeline_id, events=len(outcome.kept))
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
        counters.events_accepted += len(outcome.kept)
        counters.events_filtered += outcome.filtered
        counters.events_invalid += invalid
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
            events_accepted=len(outcome.kept),
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
            events_accepted=len(outcome.kept),
            events_filtered=outcome.filtered,
            events_invalid=invalid,
            message=message,
        )

    def counters(self) -> dict[str, PipelineCounters]:
        """Counters per pipeline id (the metrics module reads these)."""
        return {pipeline_id: p.counters for pipeline_id, p in self.pipelines.items()}

    async def aclose(self) -> None:
        """Releases every pipeline's resources and the worker thread."""
        for pipeline in self.pipelines.values():
            for part in (pipeline.event_filter, pipeline.sink):
                if isinstance(part, Closable):
                    await part.aclose()
            close = getattr(pipeline.dead_letters, "close", None)
            if callable(close):
                close()
        self._executor.shutdown(wait=True)


def _process_chunk(pipeline: Pipeline, tag: str, chunk: bytes) -> _Outcome:
    """Decode and filter, on the worker thread; dead letters are made durable here too."""
    try:
        decoded = decode_chunk(chunk, tag)
    except DecodeError as error:
        letters = [DeadLetter(Reason.NOT_MSGPACK, chunk, tag)]
        pipeline.dead_letters.put(letters)
        return _Outcome([], 0, 0, letters, not_msgpack=str(error), records_seen=1)
    apply = pipeline.event_filter.apply
    kept = [lowered for event in decoded.events if (lowered := apply(event)) is not None]
    if decoded.dead_letters:
        pipeline.dead_letters.put(decoded.dead_letters)
    received = len(decoded.events)
    return _Outcome(
        kept, received, received - len(kept), decoded.dead_letters, "", decoded.records_seen
    )


# --- the serve process -------------------------------------------------------------------------


async def serve(
    settings: ServerSettings,
    app: App | None = None,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[str], None] | None = None,
    grace: float = SHUTDOWN_GRACE_SECONDS,
) -> None:
    """Runs the sidecar until SIGTERM/SIGINT (or ``stop`` is set), then shuts down gracefully."""
    app = app or App(settings)
    stop = stop or asyncio.Event()
    server = RelayServer(settings, app)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        address = await server.start()
        log.info("server_started", listen=address, version=__version__, pid=os.getpid())
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
    log.info("server_stopped")
