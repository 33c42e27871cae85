"""End to end: out_auditrelay.so driven the way Fluent Bit's Go proxy drives it, the real
``auditrelay serve`` process, the emulator.

This process plays Fluent Bit on CPU 0 (``auditrelay.devtools.flbproxy`` loads the plugin with ctypes and calls ``FLBPluginFlushCtx`` per chunk, retrying on FLB_RETRY) beside the
emulator; the sidecar process and all its threads are pinned to CPU 1. The clock stops when
the emulator holds every row the policy keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bench.emulator import RunningEmulator, free_port
from bench.emulator import emulator as emulator_at
from bench.results import Stopwatch, process_cpu_seconds

TAG = "kube.audit"


@dataclasses.dataclass
class EndToEndRun:
    """One corpus through plugin, sidecar and emulator."""

    chunks: int = 0
    chunk_bytes: int = 0
    retries: int = 0
    expected_rows: int = 0
    stored_rows: int = 0
    clock: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    sidecar_cpu_s: float = 0.0
    emulator_cpu_s: float = 0.0
    sidecar_peak_rss: int = 0
    flush_seconds: list[float] = dataclasses.field(default_factory=list)


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def pin_all_threads(pid: int, cpu: int) -> None:
    subprocess.run(
        ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True
    )


@contextlib.contextmanager
def plugin_and_sidecar(
    work: Path, sidecar_cpu: int | None, properties: dict[str, str]
) -> Iterator[tuple[Any, Any, int]]:
    """``auditrelay serve`` started and pinned, the plugin loaded and one [OUTPUT] instance
    initialised against it; yields (proxy, instance, sidecar pid)."""
    from auditrelay.devtools.flbproxy import FLUENT_BIT_4_2_8, GoProxy, build_plugin
    from auditrelay.devtools.sidecar import SidecarProcess

    sidecar = SidecarProcess.on_socket(
        work / "relay.sock",
        work / "sidecar",
        ["--metrics-address", f"127.0.0.1:{free_port()}"],
    )
    sidecar.start()
    try:
        assert sidecar.process is not None
        pid = sidecar.process.pid
        if sidecar_cpu is not None:
            pin_all_threads(pid, sidecar_cpu)
        proxy = GoProxy(build_plugin(), FLUENT_BIT_4_2_8)
        proxy.register()
        try:
            instance = proxy.init(
                {
                    "sidecar_address": sidecar.address,
                    "sidecar_wait": "30s",
                    "sidecar_timeout": "30s",
                    **properties,
                }
            )
            yield proxy, instance, pid
        finally:
            proxy.shutdown()
    finally:
        sidecar.stop()


def flush_all(
    proxy: Any, instance: Any, chunks: Iterable[bytes], result: EndToEndRun, workers: int = 1
) -> None:
    """Flushes each chunk until FLB_OK, pausing between retries as Fluent Bit's scheduler does.

    With ``workers`` > 1, that many threads flush at once, as Fluent Bit's output workers do.
    """
    from auditrelay.devtools.flbproxy import Result

    source = iter(chunks)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                chunk = next(source, None)
            if chunk is None:
                return
            started = time.perf_counter()
            retries = 0
            while proxy.flush(instance, chunk, TAG) is not Result.OK:
                retries += 1
                time.sleep(0.05)
            with lock:
                result.retries += retries
                result.flush_seconds.append(time.perf_counter() - started)
                result.chunks += 1
                result.chunk_bytes += len(chunk)

    if workers == 1:
        work()
        return
    threads = [threading.Thread(target=work, name=f"flb-worker-{n}") for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def wait_stored(emulator: RunningEmulator, expected_rows: int, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while emulator.count() < expected_rows:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{emulator.count()} of {expected_rows} rows stored")
        time.sleep(0.05)


def run(
    chunks: Iterable[bytes],
    emulator: RunningEmulator,
    work: Path,
    expected_rows: int,
    sidecar_cpu: int | None,
    properties: dict[str, str] | None = None,
    deadline_s: float = 900.0,
    workers: int = 1,
) -> EndToEndRun:
    """Starts the sidecar, flushes every chunk through the plugin, waits for every row."""
    result = EndToEndRun(expected_rows=expected_rows)
    pipeline = emulator.pipeline_properties(**(properties or {}))
    with plugin_and_sidecar(work, sidecar_cpu, pipeline) as (proxy, instance, pid):
        cpu_before = process_cpu_seconds(pid)
        emulator_before = process_cpu_seconds(emulator.process.pid)
        with result.clock.running():
            flush_all(proxy, instance, chunks, result, workers)
            wait_stored(emulator, expected_rows, deadline_s)
        result.sidecar_cpu_s = process_cpu_seconds(pid) - cpu_before
        result.emulator_cpu_s = process_cpu_seconds(emulator.process.pid) - emulator_before
        result.stored_rows = emulator.count()
        result.sidecar_peak_rss = peak_rss(pid)
    return result


@dataclasses.dataclass
class OutageRun:
    """A backlog through the real sidecar: flushed while the endpoint is down, then drained."""

    flushed: EndToEndRun
    rss_after_start: int = 0
    peak_rss_down: int = 0
    peak_rss_drain: int = 0
    drain_s: float = 0.0


def run_outage(
    chunks: Iterable[bytes],
    work: Path,
    expected_rows: int,
    sidecar_cpu: int | None,
    emulator_cpu: int | None,
    properties: dict[str, str] | None = None,
    deadline_s: float = 1800.0,
) -> OutageRun:
    """The endpoint is down while every chunk is flushed (the spool takes the backlog), then
    comes up; the sidecar's VmHWM is read after each phase."""
    port = free_port()
    state = work / "emulator"
    with emulator_at(state, cpu=emulator_cpu, port=port) as down:  # creates its CA, then stops
        pipeline = down.pipeline_properties(**{"spool_limit": "8G", **(properties or {})})
    result = OutageRun(EndToEndRun(expected_rows=expected_rows))
    with plugin_and_sidecar(work, sidecar_cpu, pipeline) as (proxy, instance, pid):
        result.rss_after_start = current_rss(pid)
        with result.flushed.clock.running():
            flush_all(proxy, instance, chunks, result.flushed)
        result.peak_rss_down = peak_rss(pid)
        with emulator_at(state, cpu=emulator_cpu, port=port) as up:
            started = time.perf_counter()
            wait_stored(up, expected_rows, deadline_s)
            result.drain_s = time.perf_counter() - started
            result.flushed.stored_rows = up.count()
        result.peak_rss_drain = peak_rss(pid)
    return result


def current_rss(pid: int) -> int:
    """VmRSS of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
