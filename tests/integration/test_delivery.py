"""A pipeline's sink against the emulator: real spool files, the real SDK, real HTTPS and tokens.

Every test checks that each auditID sent arrives at least once, counts duplicates where a
failure can cause them, and that no row was dropped for not matching the declared stream.

The main scenarios run under both readings of the service's 1 MiB limit (``SizeLimits``): the
bytes on the wire, and also the uncompressed bytes. They send bodies over 1 MiB uncompressed,
so under the second reading the pipeline pays exactly one 413 to learn it, under the first none.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import structlog
from auditrelay.config import PipelineSettings
from auditrelay.emulator import (
    Emulator,
    EmulatorSettings,
    Fault,
    FaultKind,
    SizeLimits,
)
from auditrelay.errors import SpoolFullError
from auditrelay.metrics import Metrics
from auditrelay.model import AuditEvent, DeadLetter, EventSink
from auditrelay.sink import DeliverySink
from auditrelay.stream import COLUMN_TYPES, STREAM_NAME
from fixtures.certs import app_registration_certificate
from fixtures.chunks import sample_lines
from fixtures.disks import tiny_tmpfs
from harness.emulator import emulator_destination

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"
# Kinds of DCR error-log entries for rows the table did not take as sent.
DROPPED_OR_CHANGED = {
    "RecordNotObject",
    "UndeclaredColumn",
    "ColumnTypeMismatch",
    "TimeGeneratedMissing",
    "FieldTruncated",
    "BodyNotArray",
}


class Letters:
    """The dead-letter sink: keeps what it is given."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def put(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)


def sample_events() -> list[AuditEvent]:
    """The real samples as the decoder hands them over: fields plus the API server's text."""
    return [AuditEvent(orjson.loads(line), line) for line in sample_lines()]


def fresh_events(count: int, prefix: str) -> list[AuditEvent]:
    """Real sample events with new auditIDs and current timestamps, as a live cluster writes."""
    templates = [orjson.loads(line) for line in sample_lines()]
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    events = []
    for index in range(count):
        fields = dict(templates[index % len(templates)])
        fields["auditID"] = f"{prefix}-{index:06d}"
        for name in ("stageTimestamp", "requestReceivedTimestamp", "timestamp"):
            if name in fields:
                fields[name] = now
        events.append(AuditEvent(fields, orjson.dumps(fields)))
    return events


def ids(events: Sequence[AuditEvent]) -> Counter[str]:
    return Counter(str(event.fields["auditID"]) for event in events)


def emulator_settings(state_dir: Path, **overrides: Any) -> EmulatorSettings:
    return EmulatorSettings(
        state_dir=state_dir, streams={STREAM_NAME: dict(COLUMN_TYPES)}, **overrides
    )


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    async with Emulator(emulator_settings(tmp_path / "emulator")) as running:
        yield running


MIB = 1_048_576


@pytest.fixture(params=list(SizeLimits), ids=[limits.value for limits in SizeLimits])
async def either_emulator(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Emulator]:
    """The emulator under one reading of the 1 MiB limit: wire bytes, or uncompressed too."""
    limits: SizeLimits = request.param
    settings = emulator_settings(tmp_path / "emulator", max_raw_bytes=limits.max_raw_bytes)
    async with Emulator(settings) as running:
        yield running


def counts_uncompressed(emulator: Emulator) -> bool:
    return emulator.settings.max_raw_bytes == SizeLimits.UNCOMPRESSED.max_raw_bytes


def assert_size_refusals(emulator: Emulator, pipeline_lives: int = 1) -> None:
    """One 413 per pipeline life under the uncompressed reading, none under the wire reading;
    bodies over 1 MiB uncompressed were sent (else the scenario would test nothing) and, under
    the uncompressed reading, every accepted body was under it."""
    requests = emulator.store.requests()
    refused = [r for r in requests if r.status == 413]
    accepted_raw = [r.raw_bytes for r in requests if r.status == 204]
    if counts_uncompressed(emulator):
        assert pipeline_lives == len(refused)
        assert all(r.wire_bytes < MIB for r in refused)
        assert max(accepted_raw) <= MIB
    else:
        assert [] == refused
        assert max(accepted_raw) > MIB


def pipeline(emulator: Emulator, **properties: str) -> PipelineSettings:
    """Pipeline settings that reach the emulator with the real ClientSecretCredential."""
    base = {
        **emulator_destination(emulator),
        "cluster_name": "kind-test",
        "cluster_id": "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Kubernetes/connectedClusters/kind",
        "batch_interval": "50ms",
        "request_timeout": "10s",
    }
    return PipelineSettings.from_properties(base | properties)


@asynccontextmanager
async def running_sink(
    settings: PipelineSettings,
    directory: Path,
    *,
    metrics: Metrics | None = None,
    letters: Letters | None = None,
    drain: float = 10.0,
) -> AsyncIterator[DeliverySink]:
    sink = DeliverySink(
        settings,
        directory=directory,
        metrics=(metrics or Metrics()).pipeline(settings.instance_name),
        dead_letters=letters or Letters(),
    )
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop(drain)


async def append_in_chunks(
    sink: DeliverySink, events: Sequence[AuditEvent], size: int = 500
) -> None:
    for start in range(0, len(events), size):
        await sink.append(events[start : start + size])


def assert_every_row_matched_the_stream(emulator: Emulator) -> None:
    dropped = [entry for entry in emulator.store.errors() if entry.kind in DROPPED_OR_CHANGED]
    assert [] == dropped


def assert_all_arrived(emulator: Emulator, sent: Counter[str]) -> Counter[str]:
    """Every auditID sent is stored at least as often as it was sent; returns the extra copies."""
    stored = Counter(emulator.store.audit_id_counts())
    missing = {audit_id: n for audit_id, n in sent.items() if stored[audit_id] < n}
    assert {} == missing
    return stored - sent


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def statuses(emulator: Emulator) -> list[int]:
    return [request.status for request in emulator.store.requests()]


# --- the plain path -------------------------------------------------------------------------


@pytest.mark.parametrize("keep_raw", [True, False], ids=["spliced", "reserialized"])
async def test_every_real_sample_arrives_as_a_declared_row(
    emulator: Emulator, tmp_path: Path, keep_raw: bool
) -> None:
    """Every event of the real audit log arrives once, gzip'd, with the cluster columns, and the emulator,
    checking them against the stream declaration, drops or changes none of them; whether the
    row was spliced into the API server's text or serialized from the fields."""
    metrics = Metrics()
    events = [AuditEvent(e.fields, e.raw if keep_raw else None) for e in sample_events()]
    async with running_sink(pipeline(emulator), tmp_path / "spool", metrics=metrics) as sink:
        await append_in_chunks(sink, events, size=40)
        await emulator.wait_for_rows(len(events), within=30)
        await wait_for(lambda: sink.last_delivery_time is not None, 10, "the 204 to arrive")
        assert [] == sink.problems()
    assert {} == +assert_all_arrived(emulator, ids(events))
    assert_every_row_matched_the_stream(emulator)
    assert {"gzip"} == {request.content_encoding for request in emulator.store.requests()}
    stored = emulator.store.rows(audit_id=str(events[-1].fields["auditID"]))[0].row
    assert stored is not None
    assert ("kind-test", events[-1].fields["level"]) == (stored["Cluster_Name"], stored["level"])
    sample = metrics.registry.get_sample_value
    delivered = sample("auditrelay_events_delivered_total", {"pipeline": "auditrelay.0"})
    spooled = sample("auditrelay_events_spooled_total", {"pipeline": "auditrelay.0"})
    assert (len(events), len(events)) == (delivered, spooled)


async def test_the_sink_is_the_event_sink_app_expects(emulator: Emulator, tmp_path: Path) -> None:
    """DeliverySink satisfies model.EventSink (checked by mypy here) and works with interval sync."""
    settings = pipeline(emulator, spool_sync="interval", spool_sync_interval="50ms")
    events = fresh_events(300, "interval")
    async with running_sink(settings, tmp_path / "spool") as sink:
        as_protocol: EventSink = sink
        await as_protocol.append(events)
        await emulator.wait_for_rows(len(events), within=30)
    assert {} == +assert_all_arrived(emulator, ids(events))


async def test_a_stream_of_events_arrives_in_full_with_concurrent_requests(
    either_emulator: Emulator, tmp_path: Path
) -> None:
    """Thousands of events over several concurrent requests all arrive, none twice, under
    either reading of the size limit. Under the uncompressed one, the first body refused is
    the only 413: the pipeline logs the evidence once, its gauge shows the lowered bound, and
    what was in flight goes in bodies under 1 MiB uncompressed. The first request is slow, so
    that other bodies are ready to go while its answer is awaited."""
    emulator = either_emulator
    emulator.add_fault(Fault(FaultKind.SLOW, delay=1.0, count=1))
    metrics = Metrics()
    events = fresh_events(6000, "bulk")
    settings = pipeline(emulator, max_concurrency="4", compression_level="6")
    with structlog.testing.capture_logs() as logs:
        async with running_sink(settings, tmp_path / "spool", metrics=metrics) as sink:
            await append_in_chunks(sink, events)
            await emulator.wait_for_rows(len(events), within=60)
    assert {} == +assert_all_arrived(emulator, ids(events))
    assert_every_row_matched_the_stream(emulator)
    assert_size_refusals(emulator)
    lowered = [line for line in logs if line["event"] == "request_raw_limit_lowered"]
    limit = metrics.registry.get_sample_value(
        "auditrelay_request_raw_bytes_limit", {"pipeline": "auditrelay.0"}
    )
    if counts_uncompressed(emulator):
        [line] = lowered
        [refused] = [r for r in emulator.store.requests() if r.status == 413]
        assert (refused.wire_bytes, "413", MIB) == (
            line["wire_bytes"],
            line["status"],
            line["raw_limit"],
        )
        assert line["raw_bytes"] > MIB
        assert MIB == limit
    else:
        assert ([], 32 << 20) == (lowered, limit)


async def test_bodies_fill_the_uncompressed_bound(tmp_path: Path) -> None:
    """With max_request_raw_bytes 1M against the uncompressed reading, the pump gathers rows
    up to the bound itself: no 413, and every body but the last holds 1 MiB uncompressed
    less than one row (rows here are under 5 KB), so the reading costs as few requests as
    it can."""
    settings = emulator_settings(
        tmp_path / "emulator", max_raw_bytes=SizeLimits.UNCOMPRESSED.max_raw_bytes
    )
    async with Emulator(settings) as emulator:
        events = fresh_events(3000, "fill")
        properties = {"max_request_raw_bytes": "1M", "batch_interval": "5s"}
        async with running_sink(pipeline(emulator, **properties), tmp_path / "spool") as sink:
            await sink.append(events)
            await wait_for(lambda: emulator.store.count() > len(events) // 2, 60, "the full bodies")
        requests = emulator.store.requests()
        assert {} == +assert_all_arrived(emulator, ids(events))
    assert {204} == {r.status for r in requests}
    assert all(MIB - 5_000 < r.raw_bytes <= MIB for r in requests[:-1]), requests
    assert 4 <= len(requests)


async def test_requests_reuse_one_connection(emulator: Emulator, tmp_path: Path) -> None:
    """Token and ingestion requests share one session and TLS context: batch after batch goes
    over the connection opened first, not a new handshake per request."""
    metrics = Metrics()
    events = fresh_events(500, "reuse")
    settings = pipeline(emulator, max_concurrency="1")
    async with running_sink(settings, tmp_path / "spool", metrics=metrics) as sink:
        for start in range(0, 500, 100):
            await sink.append(events[start : start + 100])
            await emulator.wait_for_rows(start + 100, within=30)
    assert 5 <= len(emulator.store.requests())
    assert 1.0 == metrics.registry.get_sample_value(
        "auditrelay_connections_opened_total", {"pipeline": "auditrelay.0"}
    )


def service_account_token(path: Path) -> Path:
    """A projected service-account token as the kubelet writes it for workload identity."""
    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:logging:fluent-bit",
        "aud": ["api://AzureADTokenExchange"],
        "exp": int(time.time()) + 3600,
        "iat": int(time.time()),
    }
    path.write_text(jwt.encode(claims, "cluster-signing-key-of-32-bytes-at-least!"))
    return path


@pytest.mark.parametrize("auth", ["workload_identity", "client_certificate"])
async def test_other_identities_get_tokens_and_deliver(
    emulator: Emulator, tmp_path: Path, auth: str
) -> None:
    """The real WorkloadIdentityCredential (projected token) and CertificateCredential get
    tokens from the emulator's Entra; the rows arrive."""
    if auth == "workload_identity":
        extra = {"federated_token_file": str(service_account_token(tmp_path / "sa-token"))}
    else:
        extra = {"client_certificate": str(app_registration_certificate(tmp_path / "client.pem"))}
    settings = pipeline(emulator, auth=auth, **extra)
    events = fresh_events(50, auth)
    async with running_sink(settings, tmp_path / "spool") as sink:
        await sink.append(events)
        await emulator.wait_for_rows(len(events), within=30)
    methods = {grant.method for grant in emulator.store.token_requests()}
    assert {"federated" if auth == "workload_identity" else "client_certificate"} == methods
    assert {} == +assert_all_arrived(emulator, ids(events))


async def test_a_token_for_the_wrong_cloud_is_refused_and_kept(
    emulator: Emulator, tmp_path: Path
) -> None:
    """cloud usgov asks for a token for https://monitor.azure.us: the public endpoint answers 401
    InvalidAudience, the pipeline is not ready at once, and the rows stay in the spool."""
    settings = pipeline(emulator, cloud="usgov")
    async with running_sink(settings, tmp_path / "spool", drain=0.1) as sink:
        await sink.append(fresh_events(10, "usgov"))
        await wait_for(lambda: bool(sink.problems()), 30, "not ready")
        assert "InvalidAudience" in sink.problems()[0]
        assert 0 < sink.spool.pending_bytes
    assert 0 == emulator.store.count()


async def test_a_later_batch_delivered_first_does_not_move_the_cursor_past_an_earlier_one(
    emulator: Emulator, tmp_path: Path
) -> None:
    """With two requests in flight, the spool position is acknowledged only once every earlier
    batch is delivered too, so a crash at that moment resends the slow batch (at-least-once)."""
    emulator.add_fault(Fault(FaultKind.SLOW, delay=3.0, count=1))
    metrics = Metrics()
    child = metrics.registry.get_sample_value
    labels = {"pipeline": "auditrelay.0"}
    first, second = fresh_events(100, "slow"), fresh_events(100, "fast")
    settings = pipeline(emulator, max_concurrency="2")
    async with running_sink(settings, tmp_path / "spool", metrics=metrics) as sink:
        before = sink.spool.acknowledged
        await sink.append(first)
        await wait_for(
            lambda: (child("auditrelay_compressed_bytes_total", labels) or 0) > 0, 10, "dispatch"
        )
        await sink.append(second)
        await wait_for(
            lambda: child("auditrelay_events_delivered_total", labels) == 100, 10, "fast batch"
        )
        assert [] == [row.audit_id for row in emulator.store.rows() if "slow" in str(row.audit_id)]
        assert before == sink.spool.acknowledged
        await wait_for(lambda: sink.spool.pending_bytes == 0, 30, "both batches acknowledged")
    assert {} == +assert_all_arrived(emulator, ids(first) + ids(second))


# --- failures the sidecar must ride out -----------------------------------------------------


async def test_a_413_from_a_lowered_limit_splits_requests(tmp_path: Path) -> None:
    """With the endpoint's limit lowered, 413 answers split bodies until all rows fit."""
    async with Emulator(
        emulator_settings(tmp_path / "emulator", max_body_bytes=30_000)
    ) as emulator:
        events = fresh_events(2000, "split")
        async with running_sink(pipeline(emulator), tmp_path / "spool") as sink:
            await append_in_chunks(sink, events, size=2000)
            await emulator.wait_for_rows(len(events), within=60)
        assert {} == +assert_all_arrived(emulator, ids(events))
        assert 413 in statuses(emulator)
        assert all(r.wire_bytes <= 30_000 for r in emulator.store.requests() if r.status == 204)
        assert_every_row_matched_the_stream(emulator)


async def test_a_400_sets_aside_only_the_refused_row(
    either_emulator: Emulator, tmp_path: Path
) -> None:
    """A row the service refuses (invalid JSON from a decoder that accepted NaN) is bisected out
    and dead-lettered with the service's message; all other rows arrive, once each, under
    either reading of the size limit (under the uncompressed one a 413 comes first)."""
    emulator = either_emulator
    events = fresh_events(3000, "bisect")
    bad_raw = b'{"auditID":"bad-one","annotations":NaN}'
    bad = AuditEvent({"auditID": "bad-one", "annotations": float("nan")}, bad_raw)
    letters = Letters()
    async with running_sink(pipeline(emulator), tmp_path / "spool", letters=letters) as sink:
        await sink.append([*events[:750], bad, *events[750:]])
        await emulator.wait_for_rows(len(events), within=30)
        await wait_for(lambda: bool(letters.letters), 30, "the dead letter")
    assert {} == +assert_all_arrived(emulator, ids(events))
    [letter] = letters.letters
    assert letter.payload.startswith(bad_raw[:-1])
    assert "HTTP 400 InvalidJson" in letter.reason
    assert 0 == emulator.store.audit_id_counts().get("bad-one", 0)
    assert_size_refusals(emulator)


async def test_throttling_with_retry_after_is_honoured(emulator: Emulator, tmp_path: Path) -> None:
    """A burst of 429s with Retry-After: 1 is waited out (at least 1 s apart), then all arrive."""
    emulator.add_fault(Fault(FaultKind.STATUS, status=429, retry_after=1.0, count=3))
    events = fresh_events(200, "throttled")
    async with running_sink(pipeline(emulator), tmp_path / "spool") as sink:
        await sink.append(events)
        await emulator.wait_for_rows(len(events), within=30)
    requests = emulator.store.requests()
    assert [429, 429, 429, 204] == [r.status for r in requests]
    gaps = [later.received - earlier.received for earlier, later in itertools.pairwise(requests)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    assert {} == +assert_all_arrived(emulator, ids(events))


async def test_throttling_without_retry_after_and_server_errors_are_retried(
    either_emulator: Emulator, tmp_path: Path
) -> None:
    """429 without Retry-After, 408, 500, 502, 503 and 504, which the SDK would not all retry,
    are retried by the sidecar with backoff until the rows arrive, once each, under either
    reading of the size limit: a failed probe teaches nothing, the first answer that counts
    does."""
    emulator = either_emulator
    for status in (429, 408, 500, 502, 503, 504):
        emulator.add_fault(Fault(FaultKind.STATUS, status=status, count=1))
    metrics = Metrics()
    events = fresh_events(1000, "errors")
    async with running_sink(pipeline(emulator), tmp_path / "spool", metrics=metrics) as sink:
        await sink.append(events)
        await emulator.wait_for_rows(len(events), within=60)
    after_faults = [413, 204, 204] if counts_uncompressed(emulator) else [204]
    assert [429, 408, 500, 502, 503, 504, *after_faults] == statuses(emulator)
    assert_size_refusals(emulator)
    assert 6.0 == metrics.registry.get_sample_value(
        "auditrelay_retries_total", {"pipeline": "auditrelay.0"}
    )
    assert {} == +assert_all_arrived(emulator, ids(events))


async def test_an_endpoint_that_is_down_then_back(tmp_path: Path) -> None:
    """Connection refused: rows wait in the spool, /readyz turns not ready after not_ready_after,
    and everything arrives once the endpoint listens again on the same address."""
    state = tmp_path / "emulator"
    first = Emulator(emulator_settings(state))
    await first.start()
    port = first.port
    settings = pipeline(first, not_ready_after="200ms")
    events = fresh_events(500, "outage")
    async with running_sink(settings, tmp_path / "spool") as sink:
        await sink.append(events[:100])
        await first.wait_for_rows(100, within=30)
        await first.stop()
        await sink.append(events[100:])
        await wait_for(lambda: bool(sink.problems()), 30, "not ready while the endpoint is down")
        assert "ServiceRequestError" in sink.problems()[0] or "network" in sink.problems()[0]
        async with Emulator(emulator_settings(state, port=port)) as second:
            await wait_for(lambda: second.store.count() >= 500, 60, "all rows after the outage")
            await wait_for(lambda: not sink.problems(), 30, "ready again")
            assert {} == +assert_all_arrived(second, ids(events))


async def test_a_token_expiring_mid_stream_is_renewed(tmp_path: Path) -> None:
    """Tokens that live 2 s expire during the stream; the credential fetches new ones, requests
    refused with an expired token are retried, and every row arrives."""
    async with Emulator(emulator_settings(tmp_path / "emulator", token_lifetime=2.0)) as emulator:
        events = fresh_events(600, "expiry")
        async with running_sink(pipeline(emulator), tmp_path / "spool") as sink:
            for start in range(0, 600, 100):
                await sink.append(events[start : start + 100])
                await emulator.wait_for_rows(start + 100, within=30)
                await asyncio.sleep(0.8)  # the stream's pace: the token outlives a few batches only
        assert 2 <= len(emulator.store.token_requests())
        assert {} == +assert_all_arrived(emulator, ids(events))


async def test_a_revoked_token_makes_the_pipeline_not_ready_then_recovers(tmp_path: Path) -> None:
    """401 keeps the rows and reports not ready at once; after renewal all rows arrive."""
    async with Emulator(emulator_settings(tmp_path / "emulator", token_lifetime=3.0)) as emulator:
        events = fresh_events(200, "revoked")
        async with running_sink(pipeline(emulator), tmp_path / "spool") as sink:
            await sink.append(events[:100])
            await emulator.wait_for_rows(100, within=30)
            emulator.revoke_tokens()
            await sink.append(events[100:])
            await wait_for(lambda: bool(sink.problems()), 30, "not ready after a 401")
            assert "401" in sink.problems()[0]
            await emulator.wait_for_rows(200, within=30)
            await wait_for(lambda: not sink.problems(), 30, "ready again")
        assert 401 in statuses(emulator)
        assert {} == +assert_all_arrived(emulator, ids(events))


async def test_a_timeout_after_the_rows_were_stored_resends_them(tmp_path: Path) -> None:
    """When the answer is lost after the service stored the rows, they are sent again:
    duplicates, never loss (the workspace has no de-duplication)."""
    async with Emulator(emulator_settings(tmp_path / "emulator")) as emulator:
        emulator.add_fault(Fault(FaultKind.TIMEOUT_AFTER_STORE, delay=3.0, count=1))
        events = fresh_events(100, "lost-answer")
        async with running_sink(
            pipeline(emulator, request_timeout="1s"), tmp_path / "spool"
        ) as sink:
            await sink.append(events)
            await emulator.wait_for_rows(200, within=30)
        duplicates = assert_all_arrived(emulator, ids(events))
        assert 100 == sum(duplicates.values())


# --- the spool across restarts and limits ---------------------------------------------------


async def test_rows_not_delivered_before_a_stop_are_sent_after_restart(
    either_emulator: Emulator, tmp_path: Path
) -> None:
    """Rows still in the spool when the sink stops (endpoint failing) arrive after a restart,
    once each, under either reading of the size limit; the restarted pipeline learns the
    reading again (a new life: one 413 under the uncompressed reading)."""
    emulator = either_emulator
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    events = fresh_events(1200, "restart")
    async with running_sink(pipeline(emulator), tmp_path / "spool", drain=0.2) as sink:
        await sink.append(events)
        await emulator.wait_for_requests(1, within=10)
    assert 0 == emulator.store.count()
    emulator.clear_faults()
    async with running_sink(pipeline(emulator), tmp_path / "spool") as sink:
        await emulator.wait_for_rows(len(events), within=30)
    assert {} == +assert_all_arrived(emulator, ids(events))
    assert_size_refusals(emulator)


def tear_newest_segment(directory: Path) -> None:
    """Leaves the newest segment as a crash mid-write would: a frame header cut short."""
    newest = sorted(directory.glob("*.seg"))[-1]
    with open(newest, "ab") as segment:
        segment.write(b"\x00\x10\x00\x00\x12\x34")


async def test_a_torn_spool_tail_is_skipped_and_the_rest_delivered(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A crash mid-write leaves a partial record: it is reported, skipped, and all complete
    rows still arrive."""
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    events = fresh_events(300, "torn")
    async with running_sink(pipeline(emulator), tmp_path / "spool", drain=0.1) as sink:
        await sink.append(events)
    tear_newest_segment(tmp_path / "spool")
    emulator.clear_faults()
    metrics = Metrics()
    async with running_sink(pipeline(emulator), tmp_path / "spool", metrics=metrics) as sink:
        await emulator.wait_for_rows(len(events), within=30)
    assert {} == +assert_all_arrived(emulator, ids(events))
    assert 6.0 == metrics.registry.get_sample_value(
        "auditrelay_spool_corrupt_bytes_total", {"pipeline": "auditrelay.0"}
    )


async def fill(
    sink: DeliverySink, chunks: Sequence[Sequence[AuditEvent]]
) -> tuple[list[AuditEvent], SpoolFullError]:
    """Appends chunks until the sink refuses one: the events accepted, and the refusal."""
    accepted: list[AuditEvent] = []
    for chunk in chunks:
        try:
            await sink.append(chunk)
        except SpoolFullError as error:
            return accepted, error
        accepted.extend(chunk)
    raise AssertionError("the spool never filled up")


async def test_a_full_spool_refuses_then_accepts_again(emulator: Emulator, tmp_path: Path) -> None:
    """With delivery blocked the spool fills and append raises SpoolFullError (Fluent Bit is asked
    to retry); once delivery resumes, room returns and every accepted event arrives."""
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    events = fresh_events(3000, "full")
    async with running_sink(pipeline(emulator, spool_limit="256k"), tmp_path / "spool") as sink:
        chunks = [events[start : start + 50] for start in range(0, len(events), 50)]
        accepted, error = await fill(sink, chunks)
        assert "is full" in str(error)
        assert 0 < len(accepted) < len(events)
        emulator.clear_faults()
        await emulator.wait_for_rows(len(accepted), within=30)
        await wait_for(lambda: sink.spool.pending_bytes == 0, 30, "the acknowledgements")
        retried = chunks[len(accepted) // 50]
        await sink.append(retried)  # what Fluent Bit's retry of the refused chunk does
        accepted.extend(retried)
        await emulator.wait_for_rows(len(accepted), within=30)
    assert {} == +assert_all_arrived(emulator, ids(accepted))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs for the spool, so the file system really fills up (needs root)."""
    with tiny_tmpfs(tmp_path) as mount_point:
        yield mount_point


async def test_a_full_disk_refuses_clearly_and_loses_nothing(
    emulator: Emulator, tmp_path: Path, tiny_disk: Path
) -> None:
    """ENOSPC on the spool's disk raises SpoolFullError naming the disk; nothing accepted is
    damaged or lost, and appends succeed again once delivered rows free the disk."""
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    events = fresh_events(3000, "disk")
    async with running_sink(pipeline(emulator), tiny_disk / "spool") as sink:
        chunks = [events[start : start + 50] for start in range(0, len(events), 50)]
        accepted, error = await fill(sink, chunks)
        assert "no space left on the file system" in str(error)
        emulator.clear_faults()
        await emulator.wait_for_rows(len(accepted), within=30)
        await wait_for(lambda: sink.spool.pending_bytes == 0, 30, "the acknowledgements")
        retried = chunks[len(accepted) // 50]
        await sink.append(retried)
        accepted.extend(retried)
        await emulator.wait_for_rows(len(accepted), within=30)
    assert {} == +assert_all_arrived(emulator, ids(accepted))
    assert_every_row_matched_the_stream(emulator)


# --- a crash --------------------------------------------------------------------------------

APPENDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import orjson
    from auditrelay.config import PipelineSettings
    from auditrelay.metrics import Metrics
    from auditrelay.model import AuditEvent
    from auditrelay.sink import DeliverySink

    class Letters:
        def put(self, letters):
            pass

    async def main():
        settings = PipelineSettings.from_properties(orjson.loads(sys.argv[1]))
        sink = DeliverySink(settings, directory=Path(sys.argv[2]),
                            metrics=Metrics().pipeline("crash"), dead_letters=Letters())
        await sink.start()
        index = 0
        while True:
            batch = []
            for _ in range(50):
                fields = {"kind": "Event", "auditID": f"crash-{index:07d}", "verb": "get"}
                batch.append(AuditEvent(fields, orjson.dumps(fields)))
                index += 1
            await sink.append(batch)
            print(batch[-1].fields["auditID"], flush=True)  # durable: acknowledged to Fluent Bit

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_a_sidecar_killed_mid_stream_loses_nothing_it_accepted(
    emulator: Emulator, tmp_path: Path
) -> None:
    """SIGKILL while appending and delivering: after a restart on the same spool every event
    whose append had returned arrives at least once; duplicates are counted."""
    settings = pipeline(emulator)
    properties = {
        **emulator_destination(emulator),
        "batch_interval": "20ms",
    }
    environment = dict(os.environ, PYTHONPATH=str(SIDECAR))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        APPENDER,
        orjson.dumps(properties).decode(),
        str(tmp_path / "spool"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=environment,
    )
    assert process.stdout is not None
    last_durable = ""
    while emulator.store.count() < 2000:
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        if line.startswith("crash-"):  # other lines are the child's log
            last_durable = line.strip()
    process.send_signal(signal.SIGKILL)
    for line in (await process.stdout.read()).decode().splitlines():
        if line.startswith("crash-"):  # printed before the kill: those appends had returned
            last_durable = line.strip()
    await process.wait()
    accepted_through = int(last_durable.removeprefix("crash-"))
    async with running_sink(settings, tmp_path / "spool"):
        await wait_for(
            lambda: (
                emulator.store.count() >= accepted_through + 1
                and all(
                    f"crash-{index:07d}" in emulator.store.audit_id_counts()
                    for index in (0, accepted_through // 2, accepted_through)
                )
            ),
            60,
            "every accepted event after the restart",
        )
    sent = Counter(f"crash-{index:07d}" for index in range(accepted_through + 1))
    extra = assert_all_arrived(emulator, sent)
    duplicates = sum(extra[audit_id] for audit_id in sent)
    print(f"accepted {accepted_through + 1} events before SIGKILL, {duplicates} duplicates")
