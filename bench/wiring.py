"""The policy filter and the delivery sink plugged into ``app.App``, as the serve process does."""

from __future__ import annotations

from typing import Any

from auditrelay.config import BUNDLED_POLICY, PipelineSettings, ServerSettings
from auditrelay.deadletter import DeadLetterStore
from auditrelay.filter import PolicyFilter
from auditrelay.metrics import Metrics
from auditrelay.model import DeadLetterSink, EventFilter, EventSink
from auditrelay.sink import DeliverySink


class Factories:
    """Builds each pipeline's filter, sink and dead-letter store; starts and stops the sinks."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.sinks: dict[str, DeliverySink] = {}
        self.letters: dict[str, DeadLetterStore] = {}

    def app_arguments(self) -> dict[str, Any]:
        return {
            "filter_factory": self.event_filter,
            "sink_factory": self.sink,
            "deadletter_factory": self.dead_letters,
        }

    def event_filter(self, settings: PipelineSettings) -> EventFilter:
        return PolicyFilter.from_file(settings.policy or BUNDLED_POLICY)

    def dead_letters(self, settings: PipelineSettings, pipeline_id: str) -> DeadLetterSink:
        if pipeline_id not in self.letters:
            directory = self.settings.state_dir / "deadletter" / pipeline_id
            self.letters[pipeline_id] = DeadLetterStore(directory)
        return self.letters[pipeline_id]

    def sink(self, settings: PipelineSettings, pipeline_id: str) -> EventSink:
        sink = DeliverySink(
            settings,
            directory=self.settings.state_dir / "spool" / pipeline_id,
            metrics=self.metrics.pipeline(pipeline_id),
            dead_letters=self.dead_letters(settings, pipeline_id),
        )
        self.sinks[pipeline_id] = sink
        return sink

    async def start(self, pipeline_id: str) -> None:
        """Starts the pipeline's sink, unless configuring it already did."""
        sink = self.sinks[pipeline_id]
        try:
            sink.spool  # noqa: B018 - raises RuntimeError while the sink is not started
        except RuntimeError:
            await sink.start()

    async def stop(self) -> None:
        for sink in self.sinks.values():
            await sink.stop()

    def value(self, name: str, pipeline_id: str, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, {"pipeline": pipeline_id, **labels})
        return sample or 0.0
