"""The sidecar's Push flow in this process: decode, filter, spool, batch, gzip, deliver.

``Sidecar`` wires ``app.App`` with the policy filter and the delivery sink exactly as the
``serve`` process does, without the gRPC transport, so that one process pinned to one core
holds all of the sidecar's work and a profiler sees all of it. Chunks are pushed one after
another, as Fluent Bit flushes them to one output; the figures stop when the emulator has
acknowledged every kept event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib
import resource
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from auditrelay.app import App
from auditrelay.config import ServerSettings
from auditrelay.errors import SpoolError
from auditrelay.model import PushStatus

from bench.emulator import RunningEmulator
from bench.results import Stopwatch, process_cpu_seconds

TAG = "kube.audit"
INSTANCE = "auditrelay.0"


@dataclasses.dataclass
class PipelineRun:
    """What one pass of the corpus through the sidecar did and cost."""

    chunks: int = 0
    chunk_bytes: int = 0
    events_received: int = 0
    events_kept: int = 0
    events_delivered: int = 0
    retry_later: int = 0
    uncompressed_bytes: int = 0
    compressed_bytes: int = 0
    sent_bytes: int = 0  # every request's body, the refused and retried ones included
    accepted_wire_bytes: int = 0  # the bodies the emulator answered 204, as it received them
    accepted_raw_bytes: int = 0  # the same bodies decompressed
    requests: int = 0
    refused_too_large: int = 0  # 413 answers
    raw_limit_bytes: int = 0  # the pipeline's uncompressed bound at the end
    accept: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    total: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    peak_rss_bytes: int = 0
    emulator_cpu_s: float = 0.0
    push_latencies: list[float] = dataclasses.field(default_factory=list)
    push_started: list[float] = dataclasses.field(default_factory=list)  # time.time() per chunk

    @property
    def events_per_s(self) -> float:
        return self.events_received / self.total.wall if self.total.wall else 0.0

    @property
    def events_per_cpu_s(self) -> float:
        return self.events_received / self.total.cpu if self.total.cpu else 0.0

    @property
    def input_mb_per_s(self) -> float:
        return self.chunk_bytes / 1e6 / self.total.wall if self.total.wall else 0.0


def collect_garbage_like_serve() -> None:
    """The garbage-collector settings ``auditrelay serve`` runs with, when it sets any."""
    try:
        serve = importlib.import_module("auditrelay.cli.serve")
    except ImportError:
        return
    thresholds = getattr(serve, "GC_THRESHOLDS", None)
    if thresholds is not None:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*thresholds)


class Sidecar:
    """One sidecar pipeline inside this process, wired by ``app.App`` as ``serve`` wires it
    (the policy filter and the delivery sink), without the gRPC transport."""

    def __init__(self, state_dir: Path, properties: dict[str, str]) -> None:
        collect_garbage_like_serve()
        self.settings = ServerSettings(state_dir=state_dir)
        self.properties = properties
        self.app = App(self.settings)
        self.pipeline_id = ""

    async def start(self) -> None:
        """Configures the pipeline, which builds and starts its sink."""
        self.pipeline_id = await self.app.configure(self.properties, INSTANCE, "bench")

    def value(self, name: str, **labels: str) -> float:
        """One sample of the sidecar's metrics for this pipeline."""
        registry = self.app.metrics.registry
        sample = registry.get_sample_value(name, {"pipeline": self.pipeline_id, **labels})
        return sample or 0.0

    async def push(self, chunk: bytes, retry_pause: float = 0.05) -> tuple[int, int]:
        """Pushes one chunk until ACCEPTED, as Fluent Bit retries it; returns the RETRY_LATER
        answers and the events the chunk held."""
        retries = 0
        while True:
            try:
                result = await self.app.push(self.pipeline_id, TAG, chunk)
            except SpoolError:
                retries += 1
                await asyncio.sleep(retry_pause)
                continue
            if result.status is not PushStatus.ACCEPTED:
                raise RuntimeError(f"chunk not accepted: {result}")
            return retries, result.events_received

    def delivered(self) -> int:
        return int(self.value("auditrelay_events_delivered_total"))

    def spooled(self) -> int:
        return int(self.value("auditrelay_events_spooled_total"))

    async def wait_delivered(self, expected: int) -> None:
        """Returns once ``expected`` events are delivered (bound it with asyncio.timeout)."""
        # The sink exposes its progress as metrics only; poll them, bounded by the caller.
        while self.delivered() < expected:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    def figures(self, run: PipelineRun) -> None:
        counters = self.app.pipelines[self.pipeline_id].counters
        run.events_received = counters.events_received
        run.events_kept = counters.events_accepted
        run.events_delivered = self.delivered()
        value = self.value
        run.uncompressed_bytes = int(value("auditrelay_uncompressed_bytes_total"))
        run.compressed_bytes = int(value("auditrelay_compressed_bytes_total"))
        run.sent_bytes = int(value("auditrelay_sent_bytes_total"))
        run.requests = int(
            value("auditrelay_requests_total", status="204")
            + value("auditrelay_requests_total", status="200")
        )
        run.refused_too_large = int(value("auditrelay_requests_total", status="413"))
        run.raw_limit_bytes = int(value("auditrelay_request_raw_bytes_limit"))

    async def aclose(self) -> None:
        await self.app.aclose()


def peak_rss_bytes() -> int:
    """The peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def push_all(
    sidecar: Sidecar, chunks: Iterable[bytes], run: PipelineRun, pace: float | None = None
) -> None:
    """Pushes the chunks one after another, as Fluent Bit flushes one output; with ``pace``
    (events/s) each chunk waits for its turn so that the input rate is steady."""
    begin = time.perf_counter()
    events_before = 0
    with run.accept.running():
        for chunk in chunks:
            if pace is not None:
                delay = begin + events_before / pace - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            run.push_started.append(time.time())
            started = time.perf_counter()
            retries, events = await sidecar.push(chunk)
            run.push_latencies.append(time.perf_counter() - started)
            run.retry_later += retries
            run.chunks += 1
            run.chunk_bytes += len(chunk)
            events_before += events


async def run_corpus(
    chunks: Iterable[bytes],
    emulator: RunningEmulator,
    state_dir: Path,
    deadline_s: float = 600.0,
    properties: dict[str, str] | None = None,
    pace: float | None = None,
) -> PipelineRun:
    """Pushes every chunk and waits until the emulator holds every kept event."""
    sidecar = Sidecar(state_dir, {**emulator.pipeline_properties(), **(properties or {})})
    await sidecar.start()
    run = PipelineRun()
    emulator_before = process_cpu_seconds(emulator.process.pid)
    try:
        with run.total.running():
            await push_all(sidecar, chunks, run, pace)
            async with asyncio.timeout(deadline_s):
                await sidecar.wait_delivered(sidecar.spooled())
        run.emulator_cpu_s = process_cpu_seconds(emulator.process.pid) - emulator_before
        sidecar.figures(run)
    finally:
        await sidecar.aclose()
    run.peak_rss_bytes = peak_rss_bytes()
    return run


def count_accepted(run: PipelineRun, emulator: RunningEmulator) -> None:
    """The wire and uncompressed bytes of the requests the emulator accepted."""
    accepted = [request for request in emulator.store().requests() if request.status == 204]
    run.accepted_wire_bytes = sum(request.wire_bytes for request in accepted)
    run.accepted_raw_bytes = sum(request.raw_bytes for request in accepted)


def quantile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank quantile."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary(run: PipelineRun) -> dict[str, Any]:
    return {
        key: value
        for key, value in dataclasses.asdict(run).items()
        if key not in {"push_latencies", "push_started"}
    }
