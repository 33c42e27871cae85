"""Where the sidecar's CPU time goes: py-spy samples of every thread, summarized.

Only samples of the thread holding the GIL are kept (``--gil``): on one pinned core several
threads are often runnable at once, and without it a thread waiting for the CPU (or the GIL)
would be counted as busy. Work in C that releases the GIL (fsync, some of the compression) is
left out; the CPU-second figures of the benchmark include it.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;... count``,
each frame ``function (file:line)``. The summary gives, per function, the share of samples in
which it is the innermost frame (self time), and per stage of the data path the share of samples
that pass through that stage's module (inclusive time).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")

# Inclusive buckets, checked innermost-first: the first module on the stack (from the leaf up)
# that names a bucket takes the sample.
STAGES = {
    "auditrelay/decode.py": "decode (chunk framing, msgspec header)",
    "auditrelay/model.py": "decode (chunk framing, msgspec header)",
    "auditrelay/filter.py": "filter (audit policy)",
    "auditrelay/policy/": "filter (audit policy)",
    "auditrelay/stream.py": "rows (stream.RowEncoder)",
    "auditrelay/spool.py": "spool (write, fsync, read)",
    "auditrelay/batch.py": "batch (join + gzip)",
    "auditrelay/deliver.py": "deliver (SDK, HTTPS)",
    "azure/": "deliver (SDK, HTTPS)",
    "aiohttp/": "deliver (SDK, HTTPS)",
    "auditrelay/deadletter.py": "dead letters",
    "auditrelay/sink.py": "sink (pump, bookkeeping)",
    "auditrelay/app.py": "app (push flow)",
    "auditrelay/receive.py": "receive (gRPC)",
    "grpc/": "receive (gRPC)",
    "structlog/": "logging",
    "asyncio/": "event loop",
    "concurrent/futures/": "threads (hand-off)",
    "threading.py": "threads (hand-off)",
}


@dataclass
class Profile:
    """Sample counts by innermost function and by stage."""

    samples: int
    by_function: Counter[str]
    by_stage: Counter[str]

    def top_functions(self, count: int = 15) -> list[tuple[str, float]]:
        return [(name, n / self.samples) for name, n in self.by_function.most_common(count)]

    def stages(self) -> list[tuple[str, float]]:
        return [(name, n / self.samples) for name, n in self.by_stage.most_common()]


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame)
        if match is None:
            frames.append((frame, ""))
        else:
            frames.append((match["function"], match["file"]))
    return frames


def _stage(frames: list[tuple[str, str]]) -> str:
    for _function, file in reversed(frames):
        for prefix, stage in STAGES.items():
            if prefix in file:
                return stage
    return "other"


def summarize(raw_path: Path) -> Profile:
    """Reads a py-spy raw (collapsed) file."""
    by_function: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        function, file = frames[-1]
        by_function[f"{function} ({file})"] += count
        by_stage[_stage(frames)] += count
        total += count
    return Profile(total, by_function, by_stage)


def py_spy() -> str | None:
    """The py-spy executable, when installed."""
    return shutil.which("py-spy")


def record(
    pid: int, output: Path, rate: int = 250, cpu: int | None = None
) -> subprocess.Popen[bytes]:
    """Starts sampling ``pid`` until it exits (or the recorder is stopped); the sampler runs on
    ``cpu``, away from the core it measures."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return subprocess.Popen(
        [*pinned, executable, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
         "--output", str(output), "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
