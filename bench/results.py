"""Figures, the command that produced them, the machine they were taken on, and where they go."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Figure:
    """One measured number."""

    name: str
    value: float
    unit: str
    goal: str = ""
    note: str = ""

    def line(self) -> str:
        value = f"{self.value:,.0f}" if abs(self.value) >= 100 else f"{self.value:,.3g}"
        goal = f"  (goal: {self.goal})" if self.goal else ""
        note = f"  [{self.note}]" if self.note else ""
        return f"  {self.name:<44} {value:>14} {self.unit}{goal}{note}"


@dataclasses.dataclass
class Result:
    """What one benchmark measured, with everything needed to reproduce it."""

    benchmark: str
    command: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    machine: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: str = ""
    finished: str = ""

    def add(self, name: str, value: float, unit: str, goal: str = "", note: str = "") -> Figure:
        figure = Figure(name, value, unit, goal, note)
        self.figures.append(figure)
        return figure

    def render(self) -> str:
        lines = [f"== {self.benchmark}", f"  command: {self.command}"]
        lines += [f.line() for f in self.figures]
        load = self.machine.get("loadavg_before", "?")
        lines.append(f"  machine: {self.machine.get('nproc', '?')} CPUs, load before {load}")
        return "\n".join(lines)

    def save(self, directory: Path = RESULTS_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = self.started.replace(":", "").replace("-", "")
        path = directory / f"{self.benchmark}-{stamp}.json"
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")
        return path


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def current_command() -> str:
    """The command line that runs this process again, with its CPU pinning, PYTHONPATH and any
    glibc malloc tuning (``MALLOC_*``, inherited by the sidecar processes it starts)."""
    words = [
        f"{name}={value}"
        for name, value in sorted(os.environ.items())
        if name == "PYTHONPATH" or name.startswith("MALLOC_")
    ]
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < (os.cpu_count() or 1):
        words += ["taskset", "-c", ",".join(map(str, allowed))]
    words += ["python", "-m", "bench", *sys.argv[1:]]
    return shlex.join(words)


def machine() -> dict[str, Any]:
    """nproc, the CPU model, the load, and the affinity of this process."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "CPU max MHz", "L2", "L3")
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "lscpu": [line for line in lscpu.splitlines() if line.startswith(keep)],
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


@contextmanager
def recording(benchmark: str, directory: Path = RESULTS_DIR) -> Iterator[Result]:
    """Times a benchmark run, then prints and saves its figures."""
    result = Result(benchmark, current_command(), machine=machine(), started=utc_now())
    yield result
    result.finished = utc_now()
    result.machine["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    path = result.save(directory)
    print(result.render())
    print(f"  saved: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


@dataclasses.dataclass
class Stopwatch:
    """Wall and CPU time of this process over a block."""

    wall: float = 0.0
    cpu: float = 0.0

    @contextmanager
    def running(self) -> Iterator[Stopwatch]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))
