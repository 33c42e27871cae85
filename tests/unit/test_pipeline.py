"""Building a pipeline, the same for serve and replay: where its state lives, its stages, and a
policy that cannot be used named as the `policy` property's fault."""

from __future__ import annotations

from pathlib import Path

import pytest
from auditrelay.config import PipelineSettings
from auditrelay.deadletter import DeadLetterStore
from auditrelay.errors import ConfigError
from auditrelay.filter import PolicyFilter
from auditrelay.metrics import Metrics
from auditrelay.pipeline import PipelineBuilder, StateLayout, close_dead_letters
from auditrelay.sink import DeliverySink
from auditrelay.spools import pipeline_id_for


def test_serve_and_replay_layouts() -> None:
    """serve keeps spools and dead letters in one directory each; replay keeps each pipeline's
    under replay/<pipeline_id>/; both run the emulator in <state_dir>/emulator."""
    serve, replay = StateLayout(Path("/s")), StateLayout.for_replay(Path("/s"))

    assert (Path("/s/spool/p"), Path("/s/deadletter/p"), Path("/s/emulator")) == (
        serve.spool("p"),
        serve.dead_letters("p"),
        serve.emulator,
    )
    assert (Path("/s/replay/p/spool"), Path("/s/replay/p/deadletter"), Path("/s/emulator")) == (
        replay.spool("p"),
        replay.dead_letters("p"),
        replay.emulator,
    )


async def test_a_pipeline_to_an_endpoint_has_every_stage(tmp_path: Path) -> None:
    """The policy filter, dead letters in the layout, and a started DeliverySink on the spool
    directory, which records the destination beside its segments."""
    settings = PipelineSettings.from_properties(
        {
            "endpoint": "https://dce.example.test",
            "dcr_id": "dcr-00000000000000000000000000000000",
            "auth": "client_secret",
            "tenant_id": "t",
            "client_id": "c",
            "client_secret": "s",
        }
    )
    pipeline_id = pipeline_id_for(settings)
    builder = PipelineBuilder(StateLayout.for_replay(tmp_path), Metrics())

    pipeline = await builder.build(settings, pipeline_id)
    try:
        sink = pipeline.delivery()
        assert isinstance(pipeline.event_filter, PolicyFilter)
        assert isinstance(pipeline.dead_letters, DeadLetterStore)
        assert tmp_path / "replay" / pipeline_id / "deadletter" == pipeline.dead_letters.directory
        assert isinstance(sink, DeliverySink)
        assert (tmp_path / "replay" / pipeline_id / "spool" / "destination.json").is_file()
        assert "https://dce.example.test" == builder.endpoint(settings)
    finally:
        await sink.stop(0.0)
        close_dead_letters(pipeline.dead_letters)
        await builder.aclose()
    assert builder.emulator.running is None  # an endpoint: the emulator never started


def test_an_unusable_policy_is_the_policy_propertys_fault(tmp_path: Path) -> None:
    """A policy file that is not a policy is refused as bad input naming `policy` and the file."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("kind: NotAPolicy\n")
    settings = PipelineSettings.from_properties({"policy": str(policy)})
    builder = PipelineBuilder(StateLayout(tmp_path), Metrics())

    with pytest.raises(ConfigError) as raised:
        builder.build_filter(settings)

    assert f"policy: got '{policy}', expected an audit policy" in str(raised.value)
