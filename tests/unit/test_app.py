"""The App: pipeline registry and the Push flow (decode, filter, sink, dead letters, counters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from auditrelay.app import App
from auditrelay.config import PipelineSettings, ServerSettings
from auditrelay.deadletter import payload_of, read_letters
from auditrelay.decode import Reason, decode_chunk
from auditrelay.errors import ConfigError, SpoolError, SpoolFullError
from auditrelay.filter import PolicyFilter
from auditrelay.metrics import Metrics
from auditrelay.model import AuditEvent, PushResult, PushStatus
from auditrelay.receive import PipelineNotFoundError
from auditrelay.sink import DeliverySink
from auditrelay.spool import Spool
from auditrelay.spools import legacy_pipeline_id, pipeline_id_for, read_record
from fixtures import chunks
from fixtures.chunks import audit_line, chunk, parsed_event, raw_log_event


class DropVerbFilter:
    """A real EventFilter: drops events of one verb, keeps the rest unchanged."""

    def __init__(self, verb: str) -> None:
        self.verb = verb

    def apply(self, event: AuditEvent) -> AuditEvent | None:
        return None if event.fields.get("verb") == self.verb else event


class RecordingSink:
    """An EventSink that keeps what it is given, for tests of the Push flow itself."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def append(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)


def recording_sink(_settings: PipelineSettings, _pipeline_id: str) -> RecordingSink:
    return RecordingSink()


class FailingSink:
    """An EventSink whose store is broken: every append raises."""

    def __init__(self, error: SpoolError) -> None:
        self.error = error

    async def append(self, events: Sequence[AuditEvent]) -> None:
        raise self.error


@pytest.fixture(name="settings")
def _settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(listen=f"unix://{tmp_path}/relay.sock", state_dir=tmp_path / "state")


MakeApp = Callable[..., App]


@pytest.fixture(name="make_app")
async def _make_app(settings: ServerSettings) -> AsyncIterator[MakeApp]:
    apps: list[App] = []

    def make(**factories: Any) -> App:
        factories.setdefault("sink_factory", recording_sink)
        app = App(settings, **factories)
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.aclose()


@pytest.fixture(name="app")
def _app(make_app: MakeApp) -> App:
    return make_app()


async def configured(app: App, **properties: str) -> str:
    return await app.configure(properties, "auditrelay.0", "test")


class TestConfigure:
    """Configure returns a pipeline id; identical requests share one pipeline."""

    async def test_an_identity_azure_cannot_use_is_an_error_of_auth_every_time(
        self, make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Workload identity without its settings names `auth`, also when the plugin retries.

        The failed attempt must not keep the pipeline's spool locked: the retry meets the same
        configuration error, not "spool in use".
        """
        for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE"):
            monkeypatch.delenv(name, raising=False)
        app = make_app(sink_factory=None)
        properties = {
            "endpoint": "https://127.0.0.1:1",
            "dcr_id": "dcr-" + "0" * 32,
            "auth": "workload_identity",
        }
        for _attempt in range(2):
            with pytest.raises(ConfigError) as raised:
                await configured(app, **properties)
            assert ["auth"] == [problem.property for problem in raised.value.problems]

    async def test_identical_configure_returns_the_same_pipeline(self, app: App) -> None:
        """A plugin that configures again (after NOT_FOUND, or a hot reload) keeps its pipeline."""
        first = await configured(app, stream="Custom-A_CL")
        second = await configured(app, stream="Custom-A_CL")

        assert first == second
        assert [first] == list(app.pipelines)

    async def test_different_properties_get_a_different_pipeline(self, app: App) -> None:
        """Two outputs with different settings are two pipelines."""
        first = await configured(app, stream="Custom-A_CL")
        second = await configured(app, stream="Custom-B_CL")

        assert first != second
        assert {first, second} == set(app.pipelines)

    async def test_plugin_properties_do_not_change_the_pipeline(self, app: App) -> None:
        """Changing the plugin's timeout is the same pipeline (same spool, same dead letters)."""
        first = await configured(app, sidecar_timeout="2s")
        second = await configured(app, sidecar_timeout="5s")

        assert first == second

    async def test_a_restarted_sidecar_gives_the_same_id(self, make_app: MakeApp) -> None:
        """The id depends only on the instance and its properties, so it survives restarts."""
        before = await configured(make_app(), stream="Custom-A_CL")
        after = await configured(make_app(), stream="Custom-A_CL")

        assert before == after

    async def test_wrong_value_raises_config_error_naming_it(self, app: App) -> None:
        """A property with a wrong value is refused with the property, value and expectation."""
        with pytest.raises(ConfigError) as caught:
            await configured(app, compression_level="12")

        assert [("compression_level", "12", "an integer from 1 to 9")] == [
            (p.property, p.value, p.expected) for p in caught.value.problems
        ]
        assert {} == app.pipelines

    async def test_unusable_policy_file_names_the_policy_property(
        self, app: App, tmp_path: Path
    ) -> None:
        """A policy file that cannot be used makes Configure fail on `policy`, with the path."""
        policy = tmp_path / "policy.yaml"
        policy.write_text("apiVersion: audit.k8s.io/v1\nkind: NotAPolicy\nrules: []\n")

        with pytest.raises(ConfigError) as caught:
            await configured(app, policy=str(policy))

        assert [("policy", str(policy))] == [(p.property, p.value) for p in caught.value.problems]
        assert "Policy" in caught.value.problems[0].expected
        assert {} == app.pipelines

    async def test_pipelines_filter_with_their_audit_policy(self, app: App) -> None:
        """Without a policy property, a pipeline filters with the bundled audit policy."""
        pipeline_id = await configured(app)

        assert isinstance(app.pipelines[pipeline_id].event_filter, PolicyFilter)

    def test_pipeline_id_is_safe_as_a_directory_name(self) -> None:
        """Alias names with slashes or spaces cannot escape the state directory."""
        pipeline_id = pipeline_id_for(PipelineSettings.from_properties({}, "../../etc/my output"))

        assert "/" not in pipeline_id
        assert not pipeline_id.startswith(".")

    async def test_factories_receive_the_settings_and_id(self, make_app: MakeApp) -> None:
        """The integrator's factories get the parsed settings (and the id, for the sink)."""
        seen: list[tuple[str, str]] = []

        def filter_factory(pipeline: PipelineSettings) -> DropVerbFilter:
            seen.append(("filter", pipeline.stream))
            return DropVerbFilter("get")

        def sink_factory(pipeline: PipelineSettings, pipeline_id: str) -> RecordingSink:
            seen.append(("sink", pipeline_id))
            return RecordingSink()

        app = make_app(filter_factory=filter_factory, sink_factory=sink_factory)
        pipeline_id = await configured(app, stream="Custom-A_CL")

        assert [("filter", "Custom-A_CL"), ("sink", pipeline_id)] == seen


class TestPush:
    """The Push flow and its reply."""

    async def test_good_chunk_is_accepted_and_reaches_the_sink(self, app: App) -> None:
        """Every event of a good chunk is handed to the sink, in order, and counted."""
        pipeline_id = await configured(app)
        data = chunk([parsed_event(audit_id="a"), raw_log_event(audit_line(audit_id="b"))])

        result = await app.push(pipeline_id, "kube.audit", data)

        sink = app.pipelines[pipeline_id].sink
        assert isinstance(sink, RecordingSink)
        assert PushResult(PushStatus.ACCEPTED, 2, 2, 0, 0) == result
        assert ["a", "b"] == [event.fields["auditID"] for event in sink.events]

    @chunks.requires_real_chunks
    async def test_real_chunk_counts(self, app: App) -> None:
        """The real Fluent Bit buffer: of 82 events the bundled policy keeps 57 and drops 25; the
        39 records that are not audit events are set aside; all counted."""
        pipeline_id = await configured(app)

        result = await app.push(pipeline_id, "kube.audit", chunks.REAL_CHUNK_RAW_LOG.read_bytes())

        counters = app.counters()[pipeline_id]
        assert PushResult(PushStatus.ACCEPTED, 82, 57, 25, 39) == result
        assert (1, 1, 121, 57, 39) == (
            counters.chunks_received,
            counters.chunks_accepted,
            counters.records_seen,
            counters.events_accepted,
            counters.events_invalid,
        )
        assert {Reason.UNSUPPORTED_API_VERSION: 39} == counters.invalid_by_reason

    async def test_filter_drops_are_counted_as_filtered(self, make_app: MakeApp) -> None:
        """Events the filter drops are counted, not stored."""
        app = make_app(filter_factory=lambda _: DropVerbFilter("get"))
        pipeline_id = await configured(app)
        data = chunk([parsed_event(audit_id="a", verb="get"), parsed_event(audit_id="b")])

        result = await app.push(pipeline_id, "t", data)

        assert (2, 1, 1) == (
            result.events_received,
            result.events_accepted,
            result.events_filtered,
        )

    async def test_bad_records_go_to_the_dead_letter_area(
        self, app: App, settings: ServerSettings
    ) -> None:
        """Invalid records are stored under state_dir/deadletter/<pipeline>/ with their reason."""
        pipeline_id = await configured(app)
        data = chunk([parsed_event(audit_id="a"), raw_log_event(b"not json")])

        result = await app.push(pipeline_id, "kube.audit", data)

        directory = settings.state_dir / "deadletter" / pipeline_id
        letters = [x for path in sorted(directory.glob("*.jsonl")) for x in read_letters(path)]
        assert (1, 1) == (result.events_accepted, result.events_invalid)
        assert [(Reason.LOG_NOT_JSON, b"not json")] == [
            (x["reason"], payload_of(x)) for x in letters
        ]

    async def test_chunk_that_is_not_msgpack_is_set_aside_and_accepted(
        self, app: App, settings: ServerSettings
    ) -> None:
        """Retrying garbage cannot help: it is kept whole as a dead letter and acknowledged."""
        pipeline_id = await configured(app)

        result = await app.push(pipeline_id, "kube.audit", b"hello world")

        (path,) = (settings.state_dir / "deadletter" / pipeline_id).glob("*.jsonl")
        (letter,) = read_letters(path)
        assert (PushStatus.ACCEPTED, 0, 1) == (
            result.status,
            result.events_received,
            result.events_invalid,
        )
        assert "not msgpack" in result.message
        assert (Reason.NOT_MSGPACK, b"hello world") == (letter["reason"], payload_of(letter))
        assert 1 == app.counters()[pipeline_id].chunks_not_msgpack

    async def test_empty_chunk_is_accepted_with_no_events(self, app: App) -> None:
        """An empty chunk is fine: ACCEPTED, nothing received."""
        pipeline_id = await configured(app)

        result = await app.push(pipeline_id, "t", b"")

        assert PushResult(PushStatus.ACCEPTED) == result

    async def test_unknown_pipeline_raises_not_found(self, app: App) -> None:
        """A pipeline this process never configured (it restarted) is reported as such."""
        with pytest.raises(PipelineNotFoundError, match="configure again"):
            await app.push("auditrelay.0-0123456789abcdef", "t", b"")

    @pytest.mark.parametrize(
        "error", [SpoolFullError("full"), SpoolError("disk gone")], ids=["full", "broken"]
    )
    async def test_sink_failure_propagates_and_is_counted(
        self, make_app: MakeApp, error: SpoolError
    ) -> None:
        """When the sink cannot take the events, the error reaches receive (RETRY_LATER)."""
        app = make_app(sink_factory=lambda _s, _i: FailingSink(error))
        pipeline_id = await configured(app)

        with pytest.raises(type(error)):
            await app.push(pipeline_id, "t", parsed_event())

        assert (1, 0) == (
            app.counters()[pipeline_id].chunks_retry_later,
            app.counters()[pipeline_id].chunks_accepted,
        )

    async def test_decode_runs_in_place_without_offload(self, make_app: MakeApp) -> None:
        """offload=False (for measurements) gives the same result on the loop thread."""
        app = make_app(offload=False)
        pipeline_id = await configured(app)

        result = await app.push(pipeline_id, "t", chunk([parsed_event(), parsed_event()]))

        assert 2 == result.events_accepted


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


class TestDefaultPipeline:
    """Without factories: the policy filter, the durable spool and delivery; with no endpoint,
    to the bundled emulator in this process."""

    async def test_kept_events_reach_the_embedded_emulator(self, settings: ServerSettings) -> None:
        """A pipeline without endpoint spools under state_dir/spool/<id> and delivers what the
        policy kept to the emulator started under state_dir/emulator, once and for all
        pipelines; /metrics counts what came in."""
        metrics = Metrics()
        app = App(settings, metrics=metrics)
        try:
            pipeline_id = await configured(app, batch_interval="50ms")
            other = await configured(app, batch_interval="50ms", stream="Custom-Other_CL")
            data = chunks.REAL_CHUNK_RAW_LOG.read_bytes()
            result = await app.push(pipeline_id, "kube.audit", data)
            emulator = app.emulator.running
            assert emulator is not None
            await emulator.wait_for_rows(result.events_accepted, within=30)
            sink = app.pipelines[pipeline_id].sink
            assert isinstance(sink, DeliverySink)
            await wait_for(lambda: sink.spool.pending_bytes == 0, 10, "the acknowledgement")
            sample = metrics.registry.get_sample_value
            labels = {"pipeline": pipeline_id}
            assert (82.0, 25.0, 39.0, float(len(data)), 57.0) == (
                sample("auditrelay_events_received_total", labels),
                sample("auditrelay_events_filtered_total", labels),
                sample("auditrelay_events_invalid_total", labels),
                sample("auditrelay_received_bytes_total", labels),
                sample("auditrelay_events_delivered_total", labels),
            )
            assert [] == app.problems()
            assert (settings.state_dir / "emulator") == emulator.state_dir
            assert sink.directory == settings.state_dir / "spool" / pipeline_id
            assert other != pipeline_id
        finally:
            await app.aclose()
        kept = [
            event.fields["auditID"]
            for event in decode_chunk(data, "kube.audit").events
            if PolicyFilter.from_file(app.pipelines[pipeline_id].settings.policy).apply(event)
        ]
        assert sorted(kept) == sorted(str(row.audit_id) for row in emulator.store.rows())

    async def test_dcr_id_without_endpoint_is_ignored_and_said_so(
        self, settings: ServerSettings
    ) -> None:
        """The shipped output with only endpoint removed delivers to the emulator; the log line
        that says so names the dcr_id it ignores."""
        app = App(settings)
        try:
            with structlog.testing.capture_logs() as logs:
                pipeline_id = await configured(
                    app, dcr_id="dcr-" + "0" * 32, auth="workload_identity", batch_interval="10ms"
                )
                await app.push(pipeline_id, "t", chunk([parsed_event(audit_id="local")]))
            emulator = app.emulator.running
            assert emulator is not None
            await emulator.wait_for_rows(1, within=30)
            assert ["local"] == [row.audit_id for row in emulator.store.rows()]
            [line] = [entry for entry in logs if entry["event"] == "pipeline_delivers_to_emulator"]
            assert ["dcr_id"] == line["ignored"]
        finally:
            await app.aclose()

    async def test_shutdown_delivers_what_the_spool_holds(self, settings: ServerSettings) -> None:
        """Events accepted just before shutdown are delivered while the app drains its spools
        (a long batch_interval would otherwise hold them)."""
        app = App(settings)
        pipeline_id = await configured(app, batch_interval="1h")
        result = await app.push(pipeline_id, "t", chunk([parsed_event(audit_id="last")]))
        emulator = app.emulator.running
        assert emulator is not None
        store = emulator.store

        await app.aclose()

        assert 1 == result.events_accepted
        assert ["last"] == [row.audit_id for row in store.rows()]

    async def test_a_pipeline_that_cannot_deliver_is_reported_not_ready(
        self, settings: ServerSettings
    ) -> None:
        """A real endpoint that refuses connections makes the pipeline not ready once delivery
        has failed for not_ready_after; the events stay in the spool."""
        app = App(settings, drain_seconds=0)
        try:
            pipeline_id = await configured(
                app,
                endpoint="https://127.0.0.1:9",
                dcr_id="dcr-" + "0" * 32,
                auth="client_secret",
                authority_host="https://127.0.0.1:9",
                tenant_id="t",
                client_id="c",
                client_secret="s",
                batch_interval="10ms",
                not_ready_after="100ms",
            )
            await app.push(pipeline_id, "t", chunk([parsed_event(audit_id="held")]))
            await wait_for(lambda: bool(app.problems()), 30, "the pipeline to turn not ready")
            [problem] = app.problems()
            assert problem.startswith("pipeline auditrelay.0: delivery failing for ")
            assert app.emulator.running is None
        finally:
            await app.aclose()


class TestPipelineIdentity:
    """The spool belongs to the destination: other settings rebuild the pipeline on it."""

    # Delivery never succeeds, so the spool's content stays put.
    UNREACHABLE: ClassVar[dict[str, str]] = {
        "endpoint": "https://127.0.0.1:9",
        "dcr_id": "dcr-" + "c" * 32,
        "auth": "client_secret",
        "tenant_id": "t",
        "client_id": "c",
        "client_secret": "first",
        "authority_host": "https://127.0.0.1:9",
    }

    async def test_a_spool_under_the_earlier_id_is_renamed_and_kept(
        self, settings: ServerSettings
    ) -> None:
        """A spool an earlier version named by a hash of every property is renamed to the new
        id at the first Configure with those properties, with its rows and dead letters."""
        legacy = legacy_pipeline_id("auditrelay.0", self.UNREACHABLE)
        old = Spool(settings.state_dir / "spool" / legacy, limit_bytes=1 << 20)
        old.append([b'{"row": 1}'])
        old.close()
        (settings.state_dir / "deadletter" / legacy).mkdir(parents=True)
        app = App(settings, drain_seconds=0)
        try:
            pipeline_id = await configured(app, **self.UNREACHABLE)
            sink = app.pipelines[pipeline_id].sink
            assert isinstance(sink, DeliverySink)
            assert len(b'{"row": 1}') + 8 == sink.spool.pending_bytes
        finally:
            await app.aclose()
        assert not (settings.state_dir / "spool" / legacy).exists()
        assert (settings.state_dir / "deadletter" / pipeline_id).is_dir()
        record = read_record(settings.state_dir / "spool" / pipeline_id)
        assert record is not None
        assert pipeline_id == record["pipeline_id"]

    async def test_new_settings_for_the_same_destination_rebuild_on_the_same_spool(
        self, settings: ServerSettings, tmp_path: Path
    ) -> None:
        """A rotated secret keeps the id; the pipeline runs with the new settings on its spool,
        whose rows are still there; a policy that cannot be used leaves the pipeline as it was."""
        bad_policy = tmp_path / "policy.yaml"
        bad_policy.write_text("apiVersion: audit.k8s.io/v1\nkind: NotAPolicy\nrules: []\n")
        app = App(settings, drain_seconds=0)
        try:
            first = await configured(app, **self.UNREACHABLE)
            before = app.pipelines[first].sink
            assert isinstance(before, DeliverySink)
            before.spool.append([b'{"row": 1}'])
            second = await configured(app, **{**self.UNREACHABLE, "client_secret": "second"})
            after = app.pipelines[second].sink
            assert isinstance(after, DeliverySink)

            assert first == second
            assert after is not before
            assert "second" == app.pipelines[first].settings.client_secret
            assert 0 < after.spool.pending_bytes
            with pytest.raises(ConfigError):
                await configured(app, **{**self.UNREACHABLE, "policy": str(bad_policy)})
            assert after is app.pipelines[first].sink
        finally:
            await app.aclose()


class FlakySink:
    """An EventSink whose spool is full for the first ``refusals`` appends, then takes events."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.events: list[AuditEvent] = []

    async def append(self, events: Sequence[AuditEvent]) -> None:
        if self.refusals:
            self.refusals -= 1
            raise SpoolFullError("full")
        self.events.extend(events)


def dead_letters(settings: ServerSettings, pipeline_id: str) -> list[dict[str, Any]]:
    directory = settings.state_dir / "deadletter" / pipeline_id
    return [x for path in sorted(directory.glob("*.jsonl")) for x in read_letters(path)]


class TestDeadLettersOnce:
    """A chunk answered RETRY_LATER comes back whole; its bad records are set aside once."""

    async def test_a_retried_chunk_writes_its_dead_letters_once(
        self, make_app: MakeApp, settings: ServerSettings
    ) -> None:
        """Two refusals, then the retry is accepted: one dead letter, one copy of each event."""
        sink = FlakySink(refusals=2)
        app = make_app(sink_factory=lambda _s, _i: sink)
        pipeline_id = await configured(app)
        data = chunk([parsed_event(audit_id="a"), raw_log_event(b"not json")])

        for _ in range(2):
            with pytest.raises(SpoolFullError):
                await app.push(pipeline_id, "kube.audit", data)
        result = await app.push(pipeline_id, "kube.audit", data)

        assert (1, 1) == (result.events_accepted, result.events_invalid)
        assert ["a"] == [event.fields["auditID"] for event in sink.events]
        assert [b"not json"] == [payload_of(x) for x in dead_letters(settings, pipeline_id)]

    async def test_a_full_spool_writes_the_dead_letters_once_on_the_accepted_retry(
        self, settings: ServerSettings
    ) -> None:
        """The real DeliverySink with a full spool: the retried chunk's bad record is set
        aside once, when the chunk is finally stored."""
        app = App(settings, drain_seconds=0)
        try:
            pipeline_id = await configured(
                app, **TestPipelineIdentity.UNREACHABLE, spool_limit="1k"
            )
            sink = app.pipelines[pipeline_id].sink
            assert isinstance(sink, DeliverySink)
            await app.push(pipeline_id, "kube.audit", chunk([parsed_event(audit_id="first")]))
            good = [parsed_event(audit_id=f"e{n}") for n in range(4)]
            data = chunk([*good, raw_log_event(b"not json")])
            with pytest.raises(SpoolFullError):
                await app.push(pipeline_id, "kube.audit", data)
            sink.spool.acknowledge(sink.spool.write_position)  # as if delivered

            result = await app.push(pipeline_id, "kube.audit", data)
        finally:
            await app.aclose()
        assert (4, 1) == (result.events_accepted, result.events_invalid)
        assert [b"not json"] == [payload_of(x) for x in dead_letters(settings, pipeline_id)]
