"""Building a pipeline: the stages one ``[OUTPUT]`` instance's settings call for.

``serve`` (``app``) and ``replay`` build their pipelines here, and differ only in where events
come from: serve decodes the plugin's chunks, replay reads audit log files. A pipeline is

- the audit-policy filter for its ``policy`` property (``filter.PolicyFilter``; a policy that
  cannot be used is a ``ConfigError`` naming ``policy``, its warnings logged once per file);
- its dead letters (``deadletter.DeadLetterStore``);
- a ``sink.DeliverySink``: its spool, delivering to its ``endpoint`` or, when it names none, to
  the bundled emulator (``embedded``), which the builder starts once, the first time a
  pipeline needs it.

Where each part keeps its state is the ``StateLayout``: serve keeps every pipeline's spool under
``<state_dir>/spool/<pipeline_id>/`` and its dead letters under
``<state_dir>/deadletter/<pipeline_id>/``; replay keeps both under
``<state_dir>/replay/<pipeline_id>/`` beside its checkpoints. The emulator's state is
``<state_dir>/emulator/`` for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import structlog

from auditrelay.config import PipelineSettings
from auditrelay.deadletter import DeadLetterStore
from auditrelay.embedded import EmbeddedEmulator
from auditrelay.errors import ConfigError, PolicyError, PropertyProblem
from auditrelay.filter import PolicyFilter
from auditrelay.metrics import Metrics, PipelineMetrics
from auditrelay.model import DeadLetterSink, EventFilter, EventSink
from auditrelay.sink import DeliverySink
from auditrelay.spools import write_destination

log = structlog.get_logger("auditrelay.pipeline")

FilterFactory = Callable[[PipelineSettings], EventFilter]
SinkFactory = Callable[[PipelineSettings, str], EventSink]
DeadLetterFactory = Callable[[PipelineSettings, str], DeadLetterSink]


@runtime_checkable
class Startable(Protocol):
    """A sink with background work: started when built, stopped (drained) at the end."""

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


@dataclass(frozen=True, slots=True)
class StateLayout:
    """Where a pipeline keeps its state below ``state_dir``: ``serve``'s layout, or, with
    ``group`` set, every pipeline's spool and dead letters under ``<group>/<pipeline_id>/``."""

    state_dir: Path
    group: str | None = None

    @classmethod
    def for_replay(cls, state_dir: Path) -> StateLayout:
        """replay's layout: ``replay/<pipeline_id>/{spool,deadletter,checkpoints}``."""
        return cls(state_dir, "replay")

    def pipeline_dir(self, pipeline_id: str) -> Path:
        """The directory of everything one pipeline keeps (replay's layout only)."""
        if self.group is None:
            raise ValueError("serve keeps a pipeline's state in several directories")
        return self.state_dir / self.group / pipeline_id

    @property
    def spool_root(self) -> Path:
        """Where serve's spools live: ``<state_dir>/spool``."""
        return self.state_dir / "spool"

    def spool(self, pipeline_id: str) -> Path:
        """The pipeline's spool directory."""
        if self.group is None:
            return self.spool_root / pipeline_id
        return self.pipeline_dir(pipeline_id) / "spool"

    def dead_letters(self, pipeline_id: str) -> Path:
        """The pipeline's dead-letter directory."""
        if self.group is None:
            return self.state_dir / "deadletter" / pipeline_id
        return self.pipeline_dir(pipeline_id) / "deadletter"

    @property
    def emulator(self) -> Path:
        """The bundled emulator's state directory."""
        return self.state_dir / "emulator"


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
    pushes: int = 0  # in flight; a rebuild waits for them to finish
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def delivery(self) -> DeliverySink:
        """The pipeline's DeliverySink (what every pipeline but a test's own has)."""
        if not isinstance(self.sink, DeliverySink):
            raise TypeError(f"pipeline {self.pipeline_id} has no DeliverySink")
        return self.sink


class PipelineBuilder:
    """Builds pipelines in one state layout, sharing one metrics registry and one emulator.

    Tests may plug in their own filter, sink and dead-letter factories.
    """

    def __init__(
        self,
        layout: StateLayout,
        metrics: Metrics,
        *,
        filter_factory: FilterFactory | None = None,
        sink_factory: SinkFactory | None = None,
        deadletter_factory: DeadLetterFactory | None = None,
    ) -> None:
        self.layout = layout
        self.metrics = metrics
        self.filter_factory = filter_factory or self._policy_filter
        self.sink_factory = sink_factory
        self.deadletter_factory = deadletter_factory or self._deadletter_store
        self.emulator = EmbeddedEmulator(layout.emulator)
        self._policies_logged: set[Path] = set()

    @property
    def custom_sinks(self) -> bool:
        """Whether a test's sink factory replaces the spool and delivery."""
        return self.sink_factory is not None

    async def build(self, settings: PipelineSettings, pipeline_id: str) -> Pipeline:
        """Every stage of a pipeline, its sink started."""
        event_filter = self.build_filter(settings)
        dead_letters = self.deadletter_factory(settings, pipeline_id)
        metrics = self.metrics.pipeline(pipeline_id)
        sink = await self.start_sink(settings, pipeline_id, metrics, dead_letters)
        return Pipeline(pipeline_id, settings, event_filter, sink, dead_letters, metrics)

    def build_filter(self, settings: PipelineSettings) -> EventFilter:
        """The pipeline's filter; a policy file that cannot be used is the `policy` property's fault."""
        try:
            return self.filter_factory(settings)
        except PolicyError as error:
            problem = PropertyProblem("policy", str(settings.policy), f"an audit policy: {error}")
            raise ConfigError([problem]) from error

    async def start_sink(
        self,
        settings: PipelineSettings,
        pipeline_id: str,
        metrics: PipelineMetrics,
        dead_letters: DeadLetterSink,
    ) -> EventSink:
        """The pipeline's sink, started: to its endpoint, or to the bundled emulator."""
        sink: EventSink
        if self.sink_factory is not None:
            sink = self.sink_factory(settings, pipeline_id)
        else:
            sink = await self._delivery_sink(settings, pipeline_id, metrics, dead_letters)
        if isinstance(sink, Startable):
            await sink.start()
        return sink

    async def _delivery_sink(
        self,
        settings: PipelineSettings,
        pipeline_id: str,
        metrics: PipelineMetrics,
        dead_letters: DeadLetterSink,
    ) -> DeliverySink:
        directory = self.layout.spool(pipeline_id)
        write_destination(directory, pipeline_id, settings)
        if settings.uses_emulator:
            # Starting the emulator takes seconds on a busy machine, longer than the plugin's
            # Configure deadline: a cancelled Configure must not cancel the start, so that the
            # plugin's next Configure finds it started instead of starting it over.
            await asyncio.shield(self.emulator.ensure_started())
            return await self.emulator.sink_for(
                settings, directory=directory, metrics=metrics, dead_letters=dead_letters
            )
        return DeliverySink(
            settings, directory=directory, metrics=metrics, dead_letters=dead_letters
        )

    def endpoint(self, settings: PipelineSettings) -> str:
        """Where the pipeline's rows go: its endpoint, or the running emulator's."""
        if not settings.uses_emulator:
            return str(settings.endpoint)
        running = self.emulator.running
        return running.endpoint if running is not None else ""

    def _deadletter_store(self, settings: PipelineSettings, pipeline_id: str) -> DeadLetterSink:
        return DeadLetterStore(self.layout.dead_letters(pipeline_id))

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

    async def aclose(self) -> None:
        """Stops the emulator if a pipeline started it."""
        await self.emulator.stop()


async def stop_sink(sink: EventSink, drain_seconds: float = 0.0) -> None:
    """Stops a sink's delivery (after up to ``drain_seconds`` of it) and releases it."""
    if isinstance(sink, Startable):
        await sink.stop(drain_seconds)
    if isinstance(sink, Closable):
        await sink.aclose()


def close_dead_letters(dead_letters: DeadLetterSink) -> None:
    """Closes a pipeline's dead letters when they hold open files."""
    close = getattr(dead_letters, "close", None)
    if callable(close):
        close()
