"""Delivery logic: what each failure means, backoff, readiness, 413 split and 400 bisect.

The HTTP side (the real SDK against the emulator) is in tests/integration/test_delivery.py;
here a scripted sender stands at the transport boundary so every branch can be driven exactly.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Sequence
from email.utils import formatdate
from pathlib import Path

import orjson
import pytest
from auditrelay.batch import BatchBuilder
from auditrelay.config import PipelineSettings
from auditrelay.deliver import (
    Attempt,
    Backoff,
    Deliverer,
    DeliveryHealth,
    Destination,
    Outcome,
    Payload,
    build_credential,
    classify,
    retry_after_seconds,
    tls_context,
)
from auditrelay.errors import ConfigError
from auditrelay.request_limits import RawLimitEvidence, RequestLimits, SizeReading
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity.aio import (
    CertificateCredential,
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)
from fixtures.certs import app_registration_certificate
from multidict import CIMultiDict

DCR = "dcr-0123456789abcdef0123456789abcdef"


class ScriptedSender:
    """Answers like the service would: 413 over a size, 400 when a body holds a bad row, or a
    scripted sequence of transient failures first."""

    def __init__(
        self,
        *,
        max_body: int = 1 << 30,
        max_raw: int = 1 << 30,
        failures: Sequence[Attempt] = (),
    ) -> None:
        self.max_body = max_body
        self.max_raw = max_raw
        self.failures = list(failures)
        self.bodies: list[bytes] = []
        self.delivered: list[bytes] = []

    async def send(self, body: bytes) -> Attempt:
        self.bodies.append(body)
        await asyncio.sleep(0)  # a request takes time: other deliveries may go meanwhile
        if self.failures:
            return self.failures.pop(0)
        raw = gzip.decompress(body)
        if len(body) > self.max_body or len(raw) > self.max_raw:
            return Attempt(Outcome.TOO_LARGE, "413", "HTTP 413 ContentLengthLimitExceeded")
        rows = orjson.loads(raw)
        if any(row.get("bad") for row in rows):
            return Attempt(Outcome.REFUSED, "400", "HTTP 400 InvalidJson: bad row")
        self.delivered.extend(orjson.dumps(row) for row in rows)
        return Attempt(Outcome.DELIVERED, "204")


class Sleeps:
    """Records the waits the deliverer asks for instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def rows(count: int, bad: Sequence[int] = ()) -> list[bytes]:
    return [
        orjson.dumps({"n": n, "pad": "x" * 200, **({"bad": True} if n in bad else {})})
        for n in range(count)
    ]


def deliverer(sender: ScriptedSender, sleeps: Sleeps, builder: BatchBuilder) -> Deliverer:
    async def split(payload: Payload) -> Sequence[Payload]:
        return builder.split(payload.rows)

    return Deliverer(sender, split, sleep=sleeps, backoff=Backoff(base=1.0, cap=8.0))


async def test_a_413_splits_until_every_body_fits() -> None:
    """Bodies over the endpoint's limit are halved until they pass; every row arrives once."""
    builder = BatchBuilder(1)
    all_rows = rows(400)
    [body] = builder.pack(all_rows)
    sender = ScriptedSender(max_body=len(body.data) // 5)
    report = await deliverer(sender, Sleeps(), builder).deliver(body)
    assert sorted(all_rows) == sorted(sender.delivered)
    assert (400, []) == (report.delivered_rows, report.refused)
    assert 8 <= report.requests


async def test_a_400_sets_aside_only_the_refused_rows() -> None:
    """Bisection isolates the rows the service refuses; all others are delivered."""
    builder = BatchBuilder(1)
    all_rows = rows(100, bad=(7, 64))
    [body] = builder.pack(all_rows)
    sender = ScriptedSender()
    report = await deliverer(sender, Sleeps(), builder).deliver(body)
    refused_rows = [row for row, _ in report.refused]
    assert [all_rows[7], all_rows[64]] == refused_rows
    assert {"HTTP 400 InvalidJson: bad row"} == {message for _, message in report.refused}
    assert sorted(set(all_rows) - set(refused_rows)) == sorted(sender.delivered)
    assert 98 == report.delivered_rows


MIB = 1_048_576


def wide_rows(count: int, prefix: str = "r") -> list[bytes]:
    """Rows of 1,000 bytes that compress well, so a body far over 1 MiB raw is small on the wire."""
    return [
        orjson.dumps({"id": f"{prefix}{n:06d}", "pad": "x" * (975 - len(prefix))})
        for n in range(count)
    ]


class Lowerings:
    """The deliverer's on_raw_limit: keeps each evidence and lowers the builder, as the sink does."""

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder
        self.seen: list[RawLimitEvidence] = []

    def __call__(self, evidence: RawLimitEvidence) -> None:
        self.seen.append(evidence)
        self.builder.max_raw_bytes = evidence.raw_limit


def adaptive(sender: ScriptedSender, builder: BatchBuilder) -> tuple[Deliverer, Lowerings]:
    async def split(payload: Payload) -> Sequence[Payload]:
        return builder.split(payload.rows)

    lowerings = Lowerings(builder)
    limits = RequestLimits(builder.max_raw_bytes, wire_bytes=MIB)
    return Deliverer(
        sender, split, limits=limits, on_raw_limit=lowerings, sleep=Sleeps()
    ), lowerings


def statuses(sender: ScriptedSender) -> list[str]:
    """413 or 204 per request the sender saw, by the same rule it answers with."""
    return ["413" if len(gzip.decompress(b)) > sender.max_raw else "204" for b in sender.bodies]


async def test_a_413_under_the_wire_limit_lowers_the_uncompressed_bound_once() -> None:
    """An endpoint that counts uncompressed bytes refuses the first body over 1 MiB raw (small
    on the wire): that one 413 is the whole cost. The bound drops to 1,048,576 once, with the
    evidence; the refused rows and a later body packed under the old bound go in bodies under
    it; every row is delivered exactly once."""
    builder = BatchBuilder(1)
    first, second = wide_rows(3_000, "a"), wide_rows(3_000, "b")
    [body_a] = builder.pack(first)
    [body_b] = builder.pack(second)  # packed before the bound is lowered
    sender = ScriptedSender(max_raw=MIB)
    deliverer_, lowerings = adaptive(sender, builder)
    report_a = await deliverer_.deliver(body_a)
    report_b = await deliverer_.deliver(body_b)
    assert sorted(first + second) == sorted(sender.delivered)
    assert (3_000, 3_000) == (report_a.delivered_rows, report_b.delivered_rows)
    assert ["413"] == [status for status in statuses(sender) if status == "413"]
    [evidence] = lowerings.seen
    assert (len(body_a.data), body_a.raw_bytes, "413", MIB) == (
        evidence.wire_bytes,
        evidence.raw_bytes,
        evidence.status,
        evidence.raw_limit,
    )
    assert evidence.wire_bytes < MIB < evidence.raw_bytes
    assert "ContentLengthLimitExceeded" in evidence.message
    assert (SizeReading.UNCOMPRESSED, MIB) == (deliverer_.limits.reading, builder.max_raw_bytes)
    assert 1 + 3 + 3 == report_a.requests + report_b.requests  # 3,000 rows fit in 3 bodies


async def test_concurrent_bodies_cost_one_413_in_all() -> None:
    """Four bodies over 1 MiB raw delivered at once: while the reading is unknown they go one
    at a time, so only the first is refused; the others are packed again before they are sent."""
    builder = BatchBuilder(1)
    batches = [wide_rows(2_000, prefix) for prefix in "abcd"]
    bodies = [builder.pack(rows_)[0] for rows_ in batches]
    sender = ScriptedSender(max_raw=MIB)
    deliverer_, lowerings = adaptive(sender, builder)
    reports = await asyncio.gather(*(deliverer_.deliver(body) for body in bodies))
    assert sorted(row for rows_ in batches for row in rows_) == sorted(sender.delivered)
    assert [2_000] * 4 == [report.delivered_rows for report in reports]
    assert 1 == statuses(sender).count("413")
    assert 1 == len(lowerings.seen)


async def test_a_204_for_a_body_over_1_mib_raw_settles_the_wire_reading() -> None:
    """An endpoint that counts wire bytes takes a body of 3 MB raw: no 413, nothing lowered,
    and bodies after it are no longer sent one at a time."""
    builder = BatchBuilder(1)
    [body] = builder.pack(wide_rows(3_000))
    sender = ScriptedSender(max_body=MIB)
    deliverer_, lowerings = adaptive(sender, builder)
    report = await deliverer_.deliver(body)
    assert (3_000, 1) == (report.delivered_rows, report.requests)
    assert [] == lowerings.seen
    assert SizeReading.WIRE == deliverer_.limits.reading
    assert not deliverer_.limits.needs_probe(body.raw_bytes)
    assert 32 << 20 == builder.max_raw_bytes


async def test_transient_failures_are_retried_with_retry_after_or_jittered_backoff() -> None:
    """429 with Retry-After waits exactly that; others wait a full-jitter backoff that grows."""
    failures = [
        Attempt(Outcome.RETRY, "429", "throttled", retry_after=7.0),
        Attempt(Outcome.RETRY, "503", "unavailable"),
        Attempt(Outcome.RETRY, "network", "refused"),
        Attempt(Outcome.RETRY, "timeout", "timed out"),
    ]
    builder = BatchBuilder(1)
    [body] = builder.pack(rows(3))
    sender, sleeps = ScriptedSender(failures=failures), Sleeps()
    report = await deliverer(sender, sleeps, builder).deliver(body)
    assert (3, 4, 5) == (report.delivered_rows, report.retries, report.requests)
    assert 7.0 == sleeps.waits[0]
    for wait, ceiling in zip(sleeps.waits[1:], (2.0, 4.0, 8.0), strict=True):
        assert 0.0 <= wait <= ceiling


async def test_health_turns_not_ready_after_the_set_time_and_recovers() -> None:
    """Transient failures make the pipeline not ready only once they last; success clears it."""
    health = DeliveryHealth()
    health.failed(Attempt(Outcome.RETRY, "503", "HTTP 503 ServiceUnavailable"))
    assert health.problem(not_ready_after=60.0) is None
    problem = health.problem(not_ready_after=0.0)
    assert problem is not None
    assert "HTTP 503 ServiceUnavailable" in problem
    health.succeeded()
    assert health.problem(not_ready_after=0.0) is None
    assert health.last_success is not None


async def test_auth_failures_make_the_pipeline_not_ready_at_once() -> None:
    """401/403 (BLOCKED) keep the rows and report not ready without waiting."""
    health = DeliveryHealth()
    health.failed(Attempt(Outcome.BLOCKED, "403", "HTTP 403 OperationFailed: no access"))
    problem = health.problem(not_ready_after=3600.0)
    assert problem is not None
    assert "OperationFailed" in problem


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling() -> None:
    """Each wait lies in [0, min(cap, base * 2**(n-1))]."""
    backoff = Backoff(base=0.5, cap=10.0)
    for failures, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (60, 10.0)):
        waits = [backoff.delay(failures) for _ in range(200)]
        assert all(0.0 <= wait <= ceiling for wait in waits)
        assert max(waits) > ceiling / 2  # jitter spreads over the whole range


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ms-retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "100000"}, 600.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After in seconds or milliseconds, capped at 10 minutes; nonsense is ignored."""
    assert expected == retry_after_seconds(CIMultiDict(headers))


def test_retry_after_as_an_http_date() -> None:
    """An HTTP date is turned into the seconds until then."""
    seconds = retry_after_seconds(CIMultiDict({"Retry-After": formatdate(time.time() + 30)}))
    assert seconds is not None
    assert 25 <= seconds <= 31


@pytest.mark.parametrize(
    ("error", "outcome", "status"),
    [
        (TimeoutError(), Outcome.RETRY, "timeout"),
        (ServiceRequestError("Cannot connect"), Outcome.RETRY, "network"),
        (ConnectionRefusedError(111, "refused"), Outcome.RETRY, "network"),
        (ClientAuthenticationError("token request failed"), Outcome.BLOCKED, "auth"),
    ],
)
def test_failures_without_an_answer(error: Exception, outcome: Outcome, status: str) -> None:
    """Network failures and timeouts are retried; a credential that cannot get a token blocks."""
    attempt = classify(error)
    assert (outcome, status) == (attempt.outcome, attempt.status)


def settings(tmp_path: Path, **properties: str) -> PipelineSettings:
    base = {"endpoint": "https://dce.example.com", "dcr_id": DCR}
    return PipelineSettings.from_properties(base | properties)


@pytest.mark.parametrize(
    ("auth", "extra", "expected"),
    [
        ("workload_identity", {"tenant_id": "t", "client_id": "c"}, WorkloadIdentityCredential),
        ("managed_identity", {}, ManagedIdentityCredential),
        (
            "client_secret",
            {"tenant_id": "t", "client_id": "c", "client_secret": "s"},
            ClientSecretCredential,
        ),
        ("default", {}, DefaultAzureCredential),
    ],
)
async def test_the_auth_property_selects_the_credential(
    tmp_path: Path, auth: str, extra: dict[str, str], expected: type
) -> None:
    """Each auth value builds the matching azure-identity credential."""
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.x.y")
    if auth == "workload_identity":
        extra = extra | {"federated_token_file": str(token_file)}
    credential = build_credential(settings(tmp_path, auth=auth, **extra), transport=None)
    try:
        assert isinstance(credential, expected)
    finally:
        await credential.close()


async def test_client_certificate_auth_reads_the_certificate(tmp_path: Path) -> None:
    """auth client_certificate builds a CertificateCredential from the PEM file."""
    pem = app_registration_certificate(tmp_path / "client.pem")
    properties = {"tenant_id": "t", "client_id": "c", "client_certificate": str(pem)}
    credential = build_credential(
        settings(tmp_path, auth="client_certificate", **properties),
        transport=None,
    )
    try:
        assert isinstance(credential, CertificateCredential)
    finally:
        await credential.close()


def test_sovereign_clouds_change_the_audience(tmp_path: Path) -> None:
    """cloud usgov sends tokens for the US Government audience."""
    destination = Destination.from_settings(settings(tmp_path, cloud="usgov"))
    assert "https://monitor.azure.us" == destination.audience


def test_without_endpoint_there_is_no_destination() -> None:
    """The emulator default needs app to name the destination; settings alone cannot."""
    with pytest.raises(ConfigError, match="endpoint"):
        Destination.from_settings(PipelineSettings.from_properties({}))


def test_the_tls_context_adds_the_endpoint_ca(tmp_path: Path) -> None:
    """endpoint_ca is trusted on top of the system store; a missing file is a clear error."""
    assert tls_context(None).verify_mode.name == "CERT_REQUIRED"
    with pytest.raises(FileNotFoundError):
        tls_context(tmp_path / "missing.pem")
