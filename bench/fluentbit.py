"""A real Fluent Bit binary tailing the corpus file with the shipped configuration.

Two runs of the same file, one after the other: ``tail -> null`` (what Fluent Bit alone costs),
and ``tail -> auditrelay`` (out_auditrelay.so -> ``auditrelay serve`` -> the emulator in its own
process). Fluent Bit is given by path: the project installs none (docs/plugin.md says how it is
built). The configuration is ``fluent-bit/conf/fluent-bit.conf`` with only its paths, its HTTP
port and the pipeline's destination replaced. A run ends when Fluent Bit's null output has
processed every line, or when the emulator holds every row the policy keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.e2e import peak_rss, pin_all_threads
from bench.emulator import REPO, RunningEmulator, free_port
from bench.results import Stopwatch, process_cpu_seconds

SHIPPED_CONFIG = REPO / "fluent-bit" / "conf" / "fluent-bit.conf"
TAG = "kube.audit"
# chunkio's line for a filesystem chunk read while it is down (docs/plugin.md, Fluent Bit 5.1.1).
STORAGE_READ_ERROR = "[storage] cannot mmap/read chunk"


@dataclasses.dataclass
class FluentBitRun:
    """One pass of the corpus file through a Fluent Bit pipeline."""

    output: str
    events: int
    clock: Stopwatch = dataclasses.field(default_factory=Stopwatch)
    fluent_bit_cpu_s: float = 0.0
    fluent_bit_peak_rss: int = 0
    sidecar_cpu_s: float = 0.0
    sidecar_peak_rss: int = 0
    emulator_cpu_s: float = 0.0
    expected_rows: int = 0
    stored_rows: int = 0
    fluent_bit_errors: int = 0
    storage_read_errors: int = 0
    # The first error lines with the line before and after each, for the run's JSON record.
    error_context: list[str] = dataclasses.field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return self.events / self.clock.wall


def median_run(runs: list[FluentBitRun]) -> FluentBitRun:
    """The run with the median throughput (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run.events_per_second)[(len(runs) - 1) // 2]


def version(binary: Path) -> str:
    """What ``fluent-bit --version`` says of itself (first line)."""
    answer = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return answer.stdout.strip().splitlines()[0]


def configuration(
    log_file: Path, state: Path, http_port: int, output: dict[str, str] | None
) -> str:
    """The shipped classic configuration for this run; ``output`` None means ``null``."""
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^(?=\[)", text)
    kept: list[str] = []
    for section in sections:
        name = section.split("]", 1)[0].strip("[").strip().upper()
        if name == "SERVICE":
            section = _set(section, "Plugins_File", str(state / "plugins.conf"))
            section = _set(section, "storage.path", str(state / "flb-storage"))
            section = _set(section, "HTTP_Port", str(http_port))
            section = _set(section, "HTTP_Listen", "127.0.0.1")
            section = _set(section, "Grace", "5")
        elif name == "INPUT":
            section = _set(section, "Path", str(log_file))
            section = _set(section, "DB", str(state / "audit.db"))
        elif name == "OUTPUT":
            if output is None:
                section = f"[OUTPUT]\n    Name  null\n    Match {TAG}\n"
            else:
                for key, value in output.items():
                    section = _set(section, key, value)
        kept.append(section)
    return "".join(kept)


def _set(section: str, key: str, value: str) -> str:
    pattern = re.compile(rf"(?mi)^(\s*){re.escape(key)}\s+.*$")
    if pattern.search(section):
        return pattern.sub(lambda m: f"{m.group(1)}{key} {value}", section, count=1)
    return section.rstrip("\n") + f"\n    {key} {value}\n"


def count_errors(result: FluentBitRun, log: Path) -> None:
    """Counts Fluent Bit's ``[error]`` lines, and among them chunkio's storage read errors."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    at = [number for number, line in enumerate(lines) if "[error]" in line]
    result.fluent_bit_errors = len(at)
    result.storage_read_errors = sum(STORAGE_READ_ERROR in lines[number] for number in at)
    for number in at[:5]:
        result.error_context += lines[max(0, number - 1) : number + 2]


@contextlib.contextmanager
def fluent_bit(binary: Path, config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        process = subprocess.Popen([str(binary), "-c", str(config)], stdout=sink, stderr=sink)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def null_records(port: int) -> int:
    """Records Fluent Bit's null output has processed so far (its HTTP metrics)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/metrics", timeout=2) as r:
            metrics = json.loads(r.read())
    except OSError:
        return 0
    return sum(int(o.get("proc_records", 0)) for o in metrics.get("output", {}).values())


def _wait(
    condition: Callable[[], bool], process: subprocess.Popen[bytes], deadline_s: float, what: str
) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"fluent-bit exited with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {deadline_s:.0f} s")
        time.sleep(0.02)


def run_null(
    binary: Path, log_file: Path, events: int, work: Path, deadline_s: float
) -> FluentBitRun:
    """tail -> null until every line is processed."""
    state = work / "null"
    state.mkdir(parents=True)
    (state / "plugins.conf").write_text("[PLUGINS]\n", encoding="utf-8")
    port = free_port()
    config = state / "fluent-bit.conf"
    config.write_text(configuration(log_file, state, port, None), encoding="utf-8")
    result = FluentBitRun("null", events)
    with fluent_bit(binary, config, state / "fluent-bit.log") as process:
        with result.clock.running():
            _wait(lambda: null_records(port) >= events, process, deadline_s, "every line")
        result.fluent_bit_cpu_s = process_cpu_seconds(process.pid)
        result.fluent_bit_peak_rss = peak_rss(process.pid)
    count_errors(result, state / "fluent-bit.log")
    return result


@contextlib.contextmanager
def sidecar(work: Path, cpu: int | None) -> Iterator[tuple[str, int]]:
    """``auditrelay serve`` on a Unix socket (pinned to ``cpu``); yields (address, pid)."""
    from auditrelay.devtools.sidecar import SidecarProcess

    process = SidecarProcess.on_socket(
        work / "relay.sock",
        work / "sidecar",
        ["--metrics-address", f"127.0.0.1:{free_port()}"],
    )
    process.start()
    try:
        assert process.process is not None
        if cpu is not None:
            pin_all_threads(process.process.pid, cpu)
        yield process.address, process.process.pid
    finally:
        process.stop()


def run_auditrelay(
    binary: Path,
    log_file: Path,
    expected: tuple[int, int],
    emulator: RunningEmulator,
    plugin: Path,
    work: Path,
    sidecar_cpu: int | None,
    deadline_s: float,
) -> FluentBitRun:
    """tail -> auditrelay -> serve -> emulator until every kept row is stored; ``expected`` is
    (events in the file, rows the policy keeps)."""
    events, expected_rows = expected
    state = work / "auditrelay"
    state.mkdir(parents=True)
    (state / "plugins.conf").write_text(f"[PLUGINS]\n    Path {plugin}\n", encoding="utf-8")
    port = free_port()
    result = FluentBitRun("auditrelay", events, expected_rows=expected_rows)
    with sidecar(work, sidecar_cpu) as (address, sidecar_pid):
        output = {"sidecar_address": address, **emulator.pipeline_properties()}
        config = state / "fluent-bit.conf"
        config.write_text(configuration(log_file, state, port, output), encoding="utf-8")
        emulator_before = process_cpu_seconds(emulator.process.pid)
        sidecar_before = process_cpu_seconds(sidecar_pid)
        with fluent_bit(binary, config, state / "fluent-bit.log") as process:
            with result.clock.running():
                _wait(
                    lambda: emulator.count() >= expected_rows,
                    process,
                    deadline_s,
                    "every kept row stored",
                )
            result.fluent_bit_cpu_s = process_cpu_seconds(process.pid)
            result.fluent_bit_peak_rss = peak_rss(process.pid)
            result.sidecar_cpu_s = process_cpu_seconds(sidecar_pid) - sidecar_before
            result.sidecar_peak_rss = peak_rss(sidecar_pid)
            result.emulator_cpu_s = process_cpu_seconds(emulator.process.pid) - emulator_before
        result.stored_rows = emulator.count()
    count_errors(result, state / "fluent-bit.log")
    return result
