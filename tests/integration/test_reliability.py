"""Reliability of the whole path under failure: plugin -> sidecar -> Logs Ingestion.

Each test drives out_auditrelay.so exactly as Fluent Bit does (auditrelay.devtools.flbproxy), with chunks
built the way Fluent Bit writes them (v2 events with EventTime; raw ``log`` lines and parsed
records alternating) from real audit events given fresh auditIDs; ``auditrelay serve`` runs as
a subprocess; the emulator runs in this process, and faults are injected through its API. A
chunk answered FLB_RETRY is flushed again, as Fluent Bit's scheduler would (it never drops one);
FLB_ERROR would be a loss and fails the test.

Every test asserts that each auditID the bundled policy keeps (worked out here with the real
PolicyFilter) arrives at least once, and reports how many arrived more than once.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count, pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditrelay.config import BUNDLED_POLICY
from auditrelay.devtools.flbproxy import (
    GoProxy,
    Instance,
    Level,
    Result,
)
from auditrelay.emulator import (
    Emulator,
    EmulatorSettings,
    Fault,
    FaultKind,
    SizeLimits,
    running_in_thread,
)
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from auditrelay.stream import COLUMN_TYPES, STREAM_NAME
from fixtures.chunks import event_time, log_record, map32, sample_lines, v2_event
from fixtures.disks import tiny_tmpfs
from harness.emulator import emulator_destination
from harness.fluentbit import wait_for
from harness.sidecar import Sidecar

TAG = "kube.audit"
EVENTS_PER_CHUNK = 100
# Fluent Bit waits between retries of a chunk (its scheduler's backoff, 1 s or more); a shorter
# pause keeps the tests quick without flushing in a busy loop.
RETRY_PAUSE = 0.05

pytestmark = [
    pytest.mark.slow,
]


# --- chunks ---------------------------------------------------------------------------------


def _templates() -> list[dict[str, Any]]:
    templates = []
    for line in sample_lines():
        fields = orjson.loads(line)
        if fields.get("kind") == "Event" and fields.get("apiVersion") == "audit.k8s.io/v1":
            templates.append(fields)
    return templates


TEMPLATES = _templates()
POLICY = PolicyFilter.from_file(BUNDLED_POLICY)


@dataclass
class Chunk:
    """One Fluent Bit chunk and the auditIDs of it the policy keeps."""

    data: bytes
    kept: Counter[str]


class Chunks:
    """Makes chunks of fresh events, each auditID new, numbered across the test."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._numbers = count()
        self.sent: Counter[str] = Counter()  # kept auditIDs of every chunk handed out

    def make(self, events: int = EVENTS_PER_CHUNK) -> Chunk:
        now = datetime.now(UTC)
        stamp = now.isoformat(timespec="microseconds").replace("+00:00", "Z")
        seconds, nanos = int(now.timestamp()), now.microsecond * 1000
        parts: list[bytes] = []
        kept: Counter[str] = Counter()
        number = next(self._numbers)
        for index in range(events):
            fields = dict(TEMPLATES[(number * events + index) % len(TEMPLATES)])
            fields["auditID"] = f"{self.prefix}-{number:04d}-{index:04d}"
            fields["requestReceivedTimestamp"] = fields["stageTimestamp"] = stamp
            line = orjson.dumps(fields)
            record = log_record(line) if number % 2 == 0 else map32(fields)
            parts.append(v2_event(event_time(seconds, nanos), record))
            if POLICY.apply(AuditEvent(dict(fields), line)) is not None:
                kept[fields["auditID"]] += 1
        self.sent += kept
        return Chunk(b"".join(parts), kept)

    def many(self, chunks: int, events: int = EVENTS_PER_CHUNK) -> list[Chunk]:
        return [self.make(events) for _ in range(chunks)]


# --- Fluent Bit, the sidecar, the emulator --------------------------------------------------


@dataclass
class FluentBit:
    """One [OUTPUT] instance of the plugin; flushes chunks as Fluent Bit's engine does."""

    proxy: GoProxy
    instance: Instance
    results: Counter[Result] = field(default_factory=Counter)

    def flush(self, chunk: Chunk) -> Result:
        """One flush; FLB_ERROR (Fluent Bit would drop the chunk) fails the test."""
        result = self.proxy.flush(self.instance, chunk.data, TAG)
        self.results[result] += 1
        assert result is not Result.ERROR, self.proxy.lines()[-3:]
        return result

    def send(self, chunk: Chunk, within: float = 60.0) -> int:
        """Flushes the chunk until FLB_OK, as Fluent Bit retries; returns the retries it took."""
        deadline = time.monotonic() + within
        retries = 0
        while self.flush(chunk) is Result.RETRY:
            retries += 1
            if time.monotonic() > deadline:
                last = self.proxy.lines()[-1:]
                raise AssertionError(f"chunk still retried after {within}s: {last}")
            time.sleep(RETRY_PAUSE)
        return retries

    def send_all(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self.send(chunk)


def emulator_settings(state_dir: Path, **overrides: Any) -> EmulatorSettings:
    return EmulatorSettings(
        state_dir=state_dir, streams={STREAM_NAME: dict(COLUMN_TYPES)}, **overrides
    )


@contextmanager
def emulator_running(state_dir: Path, **overrides: Any) -> Iterator[Emulator]:
    with running_in_thread(emulator_settings(state_dir, **overrides)) as emulator:
        yield emulator


@pytest.fixture
def emulator(workdir: Path) -> Iterator[Emulator]:
    with emulator_running(workdir / "emulator") as running:
        yield running


@pytest.fixture
def make_sidecar(workdir: Path) -> Iterator[Callable[..., Sidecar]]:
    made: list[Sidecar] = []

    def make(*extra_args: str) -> Sidecar:
        sidecar = Sidecar.on_socket(workdir / "relay.sock", workdir / "relay", extra_args)
        made.append(sidecar)
        sidecar.start()
        return sidecar

    yield make
    for sidecar in made:
        sidecar.stop()


def fluent_bit(
    proxy: GoProxy, sidecar: Sidecar, emulator: Emulator, **properties: str
) -> FluentBit:
    """The [OUTPUT] section: the sidecar's socket, and a pipeline delivering to the emulator."""
    section = {
        "sidecar_address": sidecar.address,
        "sidecar_wait": "20s",
        **emulator_destination(emulator),
        "cluster_name": "reliability",
        "batch_interval": "50ms",
        "request_timeout": "10s",
        **properties,
    }
    return FluentBit(proxy, proxy.init(section, log_level=Level.INFO))


# --- what arrived ---------------------------------------------------------------------------


def missing(emulator: Emulator, sent: Counter[str]) -> dict[str, int]:
    stored = emulator.store.audit_id_counts()
    return {audit_id: n for audit_id, n in sent.items() if stored.get(audit_id, 0) < n}


def assert_all_arrive(emulator: Emulator, sent: Counter[str], within: float = 60.0) -> int:
    """Waits until every kept auditID is stored at least as often as sent; returns duplicates."""
    assert sent, "the policy kept nothing: the test would prove nothing"
    deadline = time.monotonic() + within
    while missing(emulator, sent):
        if time.monotonic() > deadline:
            gone = missing(emulator, sent)
            raise AssertionError(f"{len(gone)} auditIDs never arrived, e.g. {sorted(gone)[:5]}")
        time.sleep(0.05)
    stored = Counter(emulator.store.audit_id_counts())
    duplicates = sum((stored - sent)[audit_id] for audit_id in sent)
    print(f"{sum(sent.values())} kept events sent, all arrived; {duplicates} duplicates")
    return duplicates


def statuses(emulator: Emulator) -> list[int]:
    return [request.status for request in emulator.store.requests()]


def readyz(sidecar: Sidecar) -> int:
    """The HTTP status of the sidecar's /readyz."""
    [started] = sidecar.events("server_started")[-1:]
    try:
        with urllib.request.urlopen(f"{started['metrics']}/readyz", timeout=5) as reply:  # noqa: S310
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# --- the tests ------------------------------------------------------------------------------


def test_a_sidecar_killed_mid_stream(
    emulator: Emulator, make_sidecar: Callable[..., Sidecar], proxy: GoProxy
) -> None:
    """SIGKILL while the spool holds undelivered rows (the endpoint answers after 1 s): the
    flushes during the outage get FLB_RETRY; after a restart on the same state directory the
    spool is sent again and the retried chunks are accepted; nothing accepted is lost."""
    sidecar = make_sidecar()
    flb = fluent_bit(proxy, sidecar, emulator)
    chunks = Chunks("killed")
    emulator.add_fault(Fault(FaultKind.SLOW, delay=1.0))
    flb.send_all(chunks.many(10))
    wait_for(lambda: len(emulator.store.requests()) >= 1, 30, "delivery under way")
    flb.send(chunks.make())  # durable in the spool; its rows cannot be confirmed within 1 s
    sidecar.kill()

    during_outage = chunks.make()
    assert Result.RETRY == flb.flush(during_outage)
    emulator.clear_faults()
    sidecar.start()
    flb.send(during_outage)
    flb.send_all(chunks.many(10))

    assert_all_arrive(emulator, chunks.sent)
    assert 1 <= flb.results[Result.RETRY]
    first_run, second_run = sidecar.events("pipeline_started")
    assert 0 == first_run["backlog_bytes"]
    assert 0 < second_run["backlog_bytes"]  # rows the killed process had not delivered


def test_an_endpoint_down_then_back(
    workdir: Path, make_sidecar: Callable[..., Sidecar], proxy: GoProxy
) -> None:
    """Connection refused: chunks are still accepted into the spool, /readyz turns 503 after
    not_ready_after, and everything arrives once the endpoint listens again."""
    state = workdir / "emulator"
    sidecar = make_sidecar()
    chunks = Chunks("outage")
    with emulator_running(state) as first:
        port, endpoint_ca = first.port, first.ca_file
        flb = fluent_bit(proxy, sidecar, first, not_ready_after="300ms")
        flb.send_all(chunks.many(5))
        wait_for(lambda: not missing(first, chunks.sent), 30, "the rows before the outage")
    flb.send_all(chunks.many(10))
    assert 0 == flb.results[Result.RETRY]
    wait_for(lambda: readyz(sidecar) == 503, 30, "/readyz to report the outage")
    with emulator_running(state, port=port) as second:
        assert endpoint_ca == second.ca_file
        assert_all_arrive(second, chunks.sent)
        wait_for(lambda: readyz(sidecar) == 200, 30, "/readyz to recover")


def test_a_burst_of_429_with_retry_after(
    emulator: Emulator, make_sidecar: Callable[..., Sidecar], proxy: GoProxy
) -> None:
    """Four 429s with Retry-After: 1 in a row: each is waited out before the next request, and
    every row arrives."""
    flb = fluent_bit(proxy, make_sidecar(), emulator, max_concurrency="1")
    chunks = Chunks("throttled")
    flb.send_all(chunks.many(2))
    wait_for(lambda: not missing(emulator, chunks.sent), 30, "the rows before the burst")
    emulator.add_fault(Fault(FaultKind.STATUS, status=429, retry_after=1.0, count=4))
    flb.send_all(chunks.many(8))

    assert_all_arrive(emulator, chunks.sent)
    requests = emulator.store.requests()
    assert 4 == [request.status for request in requests].count(429)
    after_429 = [
        later.received - earlier.received
        for earlier, later in pairwise(requests)
        if earlier.status == 429
    ]
    assert all(gap >= 0.9 for gap in after_429), after_429


def test_a_413_from_a_lowered_limit(
    workdir: Path, make_sidecar: Callable[..., Sidecar], proxy: GoProxy
) -> None:
    """The endpoint's body limit lowered to 10,000 bytes: bodies answered 413 are split until
    they fit, and every row arrives."""
    with emulator_running(workdir / "emulator", max_body_bytes=10_000) as emulator:
        flb = fluent_bit(proxy, make_sidecar(), emulator, batch_interval="500ms")
        chunks = Chunks("split")
        flb.send_all(chunks.many(6, events=200))

        assert_all_arrive(emulator, chunks.sent)
        assert 413 in statuses(emulator)
        accepted = [r.wire_bytes for r in emulator.store.requests() if r.status == 204]
        assert all(size <= 10_000 for size in accepted), accepted


def metric_samples(sidecar: Sidecar, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric on the sidecar's /metrics: labels and value."""
    [started] = sidecar.events("server_started")[-1:]
    with urllib.request.urlopen(f"{started['metrics']}/metrics", timeout=5) as reply:  # noqa: S310
        text = reply.read().decode()
    samples = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) + 1 :].partition("} ")
            pairs = (pair.split("=", 1) for pair in labels.split(",") if pair)
            samples.append(({key: quoted.strip('"') for key, quoted in pairs}, float(value)))
    return samples


@pytest.mark.parametrize("limits", list(SizeLimits), ids=[limits.value for limits in SizeLimits])
def test_two_pipelines_under_either_reading_of_the_size_limit(
    workdir: Path, make_sidecar: Callable[..., Sidecar], proxy: GoProxy, limits: SizeLimits
) -> None:
    """Two [OUTPUT] sections stream through the plugin and `auditrelay serve` to an endpoint
    that counts the bytes on the wire, or the uncompressed bytes too. Every kept event arrives
    exactly once. Under the uncompressed reading each pipeline pays one 413, logs
    request_raw_limit_lowered once with the evidence, and its gauge shows 1,048,576; under the
    wire reading there is no 413 although bodies over 1 MiB uncompressed were sent."""
    with emulator_running(workdir / "emulator", max_raw_bytes=limits.max_raw_bytes) as emulator:
        sidecar = make_sidecar()
        outputs = [
            fluent_bit(proxy, sidecar, emulator, cluster_name=f"c{n}", batch_interval="5s")
            for n in range(2)
        ]
        chunks = Chunks(f"reading-{limits.value}")
        for _ in range(8):
            for output in outputs:
                output.send(chunks.make(events=750))

        assert 0 == assert_all_arrive(emulator, chunks.sent)
        requests = emulator.store.requests()
        refused = [r.wire_bytes for r in requests if r.status == 413]
        largest_raw = max(r.raw_bytes for r in requests if r.status == 204)
        lowered = sidecar.events("request_raw_limit_lowered")
        gauge = [
            value for _, value in metric_samples(sidecar, "auditrelay_request_raw_bytes_limit")
        ]
        per_pipeline = sorted(
            value
            for labels, value in metric_samples(sidecar, "auditrelay_requests_total")
            if labels["status"] == "413"
        )
        if limits is SizeLimits.UNCOMPRESSED:
            assert 2 == len(refused)
            assert all(wire < 1_048_576 for wire in refused)
            assert largest_raw <= 1_048_576
            assert ["auditrelay.0", "auditrelay.1"] == sorted(line["pipeline"] for line in lowered)
            assert all(line["raw_bytes"] > 1_048_576 for line in lowered)
            assert [1_048_576] * 2 == [line["raw_limit"] for line in lowered]
            assert ([1_048_576.0] * 2, [1.0, 1.0]) == (gauge, per_pipeline)
        else:
            assert ([], [], [float(32 << 20)] * 2) == (refused, lowered, gauge)
            assert [] == per_pipeline
            assert largest_raw > 1_048_576


def test_a_token_expiring_mid_stream(
    workdir: Path, make_sidecar: Callable[..., Sidecar], proxy: GoProxy
) -> None:
    """Tokens that live 3 s: the stream goes on until a second token has been issued, and two
    more chunks after that; every row arrives."""
    with emulator_running(workdir / "emulator", token_lifetime=3.0) as emulator:
        flb = fluent_bit(proxy, make_sidecar(), emulator)
        chunks = Chunks("expiry")
        deadline = time.monotonic() + 60
        while len(emulator.store.token_requests()) < 2:
            assert time.monotonic() < deadline, "no second token within 60 s"
            flb.send(chunks.make(events=20))
            wait_for(lambda: not missing(emulator, chunks.sent), 30, "the chunk's rows")
        flb.send_all(chunks.many(2, events=20))

        assert_all_arrive(emulator, chunks.sent)
        tokens = emulator.store.token_requests()
        assert 2 <= len(tokens)


def fill_until_retry(flb: FluentBit, chunks: Chunks, most: int = 400) -> Chunk:
    """Flushes new chunks until one is answered FLB_RETRY; returns that chunk."""
    for _ in range(most):
        chunk = chunks.make()
        if flb.flush(chunk) is Result.RETRY:
            return chunk
    raise AssertionError(f"no FLB_RETRY after {most} chunks")


def test_a_full_spool_is_a_retry_and_loses_nothing(
    emulator: Emulator, make_sidecar: Callable[..., Sidecar], proxy: GoProxy
) -> None:
    """Delivery failing (503) and a 1 MiB spool: the spool fills, Fluent Bit sees FLB_RETRY for
    the chunk that does not fit; once the endpoint recovers, that chunk is accepted on retry and
    every row arrives."""
    flb = fluent_bit(proxy, make_sidecar(), emulator, spool_limit="1M")
    chunks = Chunks("full")
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    refused = fill_until_retry(flb, chunks)
    [line] = [text for text in proxy.lines(Level.WARN) if "chunk retried" in text][:1]
    assert "RETRY_LATER: spool: " in line
    assert 0 == emulator.store.count()

    emulator.clear_faults()
    flb.send(refused)
    flb.send_all(chunks.many(3))

    assert_all_arrive(emulator, chunks.sent)


@pytest.fixture
def tiny_disk(workdir: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: the sidecar's state directory on a disk that really fills up."""
    with tiny_tmpfs(workdir) as mount_point:
        yield mount_point


def test_a_full_disk_is_a_retry_with_a_clear_error(
    emulator: Emulator, tiny_disk: Path, make_sidecar: Callable[..., Sidecar], proxy: GoProxy
) -> None:
    """The spool's disk full (ENOSPC) while delivery fails: the flush gets FLB_RETRY with an error
    naming the full disk; nothing is damaged (no skipped spool bytes), and once rows are
    delivered the space returns and the retried chunk and every other row arrive."""
    sidecar = make_sidecar("--state-dir", str(tiny_disk))
    flb = fluent_bit(proxy, sidecar, emulator)
    chunks = Chunks("disk")
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    refused = fill_until_retry(flb, chunks)
    [line] = [text for text in proxy.lines(Level.WARN) if "chunk retried" in text][:1]
    assert "no space left on the file system of spool" in line

    emulator.clear_faults()
    flb.send(refused)
    flb.send_all(chunks.many(3))

    assert_all_arrive(emulator, chunks.sent)
    assert [] == sidecar.events("spool_damage_skipped")
    assert sidecar.events("chunk_deferred")
