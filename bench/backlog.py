"""Memory of the sidecar while a large backlog builds up (endpoint down) and drains (up again).

The spool holds the backlog on disk; the resident set must not grow with it. A sampler thread
reads this process's RSS from /proc every 100 ms, so the peak of each phase is known.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.emulator import emulator, free_port
from bench.pipeline import PipelineRun, Sidecar, push_all
from bench.results import Stopwatch

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """The current resident set of this process."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


class RssSampler:
    """The peak RSS since the last ``mark``, sampled on a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def mark(self) -> int:
        """Returns the peak so far and starts a new phase."""
        peak = max(self.peak, rss_bytes())
        self.peak = rss_bytes()
        return peak

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


@dataclasses.dataclass
class BacklogRun:
    """The two phases: spooling with the endpoint down, draining once it is up."""

    events: int = 0
    kept: int = 0
    delivered: int = 0
    baseline_rss: int = 0
    peak_rss_down: int = 0
    peak_rss_drain: int = 0
    spool_bytes: int = 0
    first_delivery_s: float = 0.0  # from the endpoint's return to the first delivered row
    down: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    drain: Stopwatch = dataclasses.field(default_factory=Stopwatch)


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def run_backlog(
    chunks: Iterable[bytes],
    work: Path,
    emulator_cpu: int | None,
    spool_limit: str = "8G",
    properties: dict[str, str] | None = None,
    deadline_s: float = 3600.0,
) -> BacklogRun:
    """Spools every chunk with no endpoint listening, then starts the emulator and drains."""
    port = free_port()
    state = work / "emulator"
    with emulator(state, cpu=emulator_cpu, port=port) as emu:  # creates its CA, then stops
        pipeline_properties = emu.pipeline_properties(spool_limit=spool_limit, **(properties or {}))
    result = BacklogRun()
    sidecar = Sidecar(work / "sidecar", pipeline_properties)
    with RssSampler().running() as sampler:
        await sidecar.start()
        result.baseline_rss = sampler.mark()
        run = PipelineRun()
        try:
            with result.down.running():
                await push_all(sidecar, chunks, run)
            result.peak_rss_down = sampler.mark()
            result.events = sidecar.app.pipelines[sidecar.pipeline_id].counters.events_received
            result.kept = sidecar.spooled()
            result.spool_bytes = _directory_bytes(work / "sidecar" / "spool")
            with emulator(state, cpu=emulator_cpu, port=port), result.drain.running():
                back = time.perf_counter()
                async with asyncio.timeout(deadline_s):
                    await sidecar.wait_delivered(1)
                    result.first_delivery_s = time.perf_counter() - back
                    await sidecar.wait_delivered(result.kept)
                result.delivered = sidecar.delivered()
            result.peak_rss_drain = sampler.mark()
        finally:
            await sidecar.aclose()
    return result
