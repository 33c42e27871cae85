"""A real Fluent Bit with ``workers 0`` or ``workers 1`` on the auditrelay output: what a hung or
absent sidecar costs the engine, and how many hot reloads in a row it survives.

    python -m bench.fluent_bit_workers --fluent-bit /opt/fluent-bit-5.1.1/bin/fluent-bit

Fluent Bit runs the shipped fluent-bit/conf/fluent-bit.conf (local paths, no ``endpoint``: the
sidecar's emulator) plus a ``dummy`` input at 20 records/s into ``null``, which stands for every
other pipeline on the engine thread.

- stall: with the pipeline delivering, the sidecar is hung (SIGSTOP) or absent (SIGKILL); then
  10 bursts of 1,000 audit lines are appended, one a second. Reported: the seconds until tail has
  read all 10,000 lines, and the dummy records the engine got through in those 15 s (300 if
  nothing stalls it).
- reload: SIGHUP up to 20 times in a row while 100 lines/s are appended; reported: reloads done
  before Fluent Bit died, if it did, and its last log line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.emulator import REPO, free_port

CONF = REPO / "fluent-bit" / "conf"
DUMMY = """
[INPUT]
    Name  dummy
    Tag   other
    Rate  20

[OUTPUT]
    Name  null
    Match other
"""
BURSTS = 10
BURST_LINES = 1_000
WINDOW_SECONDS = 15.0
RELOADS = 20


def wait_until(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Sidecar:
    socket: Path
    state_dir: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from auditrelay.receive import wait_for_health

        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "auditrelay", "serve", "--listen", f"unix://{self.socket}",
            "--state-dir", str(self.state_dir), "--metrics-address", "127.0.0.1:0",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO / "sidecar")}
        with (self.state_dir / "sidecar.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            wait_for_health(channel, 30, alive=lambda: True, where=str(self.socket))

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()


@dataclass
class FluentBit:
    binary: str
    workdir: Path
    workers: int
    sidecar: Sidecar
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = free_port()
        self.audit_log = self.workdir / "audit.log"
        self.log_path = self.workdir / "fluent-bit.log"
        text = re.sub(r"(?m)^\s*endpoint\s+\S+\n", "", (CONF / "fluent-bit.conf").read_text())
        for old, new in {
            "/var/log/kubernetes/audit/audit.log": str(self.audit_log),
            "/var/fluent-bit/state/": f"{self.workdir}/state/",
            "unix:///run/auditrelay/relay.sock": f"unix://{self.sidecar.socket}",
            "/fluent-bit/etc/conf/plugins.conf": str(self.workdir / "plugins.conf"),
            "HTTP_Listen               127.0.0.1": f"HTTP_Listen 127.0.0.1\n    HTTP_Port {self.port}",
            "Grace                     30": "Grace 30\n    Hot_Reload On",
            "Workers                  1": f"Workers {self.workers}",
        }.items():
            assert old in text, old
            text = text.replace(old, new)
        (self.workdir / "fluent-bit.conf").write_text(text + DUMMY)
        plugin = REPO / "fluent-bit" / "out_auditrelay.so"
        (self.workdir / "plugins.conf").write_text(f"[PLUGINS]\n    Path {plugin}\n")
        self.audit_log.touch()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.workdir / "fluent-bit.conf")], stdout=log, stderr=log
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def append(self, lines: int) -> None:
        with self.audit_log.open("ab") as log:
            for _ in range(lines):
                audit_id = uuid.uuid4().hex.encode()
                log.write(b'{"kind":"Event","auditID":"%s","verb":"get"}\n' % audit_id)

    def records(self, name: str) -> int:
        """Records an input has read so far (Fluent Bit's /api/v1/metrics); -1 if unanswered."""
        url = f"http://127.0.0.1:{self.port}/api/v1/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return int(json.load(answer)["input"][name]["records"])
        except (OSError, KeyError, ValueError):
            return -1

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()


@contextmanager
def running(binary: str, workers: int) -> Iterator[FluentBit]:
    with tempfile.TemporaryDirectory(prefix="ar-fbw-") as directory:
        workdir = Path(directory)
        sidecar = Sidecar(workdir / "relay.sock", workdir / "sidecar")
        sidecar.start()
        fluent_bit = FluentBit(binary, workdir, workers, sidecar)
        try:
            fluent_bit.append(100)
            fluent_bit.start()
            started = wait_until(lambda: fluent_bit.records("tail.0") == 100, 60)
            assert started, fluent_bit.log_text()
            yield fluent_bit
        finally:
            fluent_bit.stop()
            sidecar.stop()


def stall(binary: str, workers: int, how: signal.Signals) -> str:
    with running(binary, workers) as fluent_bit:
        fluent_bit.sidecar.signal(how)
        dummy_before = fluent_bit.records("dummy.1")
        started = time.monotonic()
        for burst in range(BURSTS):
            fluent_bit.append(BURST_LINES)
            time.sleep(max(0.0, started + burst + 1 - time.monotonic()))
        wanted = 100 + BURSTS * BURST_LINES
        caught_up = wait_until(
            lambda: fluent_bit.records("tail.0") >= wanted,
            WINDOW_SECONDS - (time.monotonic() - started),
        )
        read_in = time.monotonic() - started if caught_up else None
        time.sleep(max(0.0, started + WINDOW_SECONDS - time.monotonic()))
        dummy = fluent_bit.records("dummy.1") - dummy_before
        read = fluent_bit.records("tail.0") - 100
    window = f"{WINDOW_SECONDS:.0f} s"
    shown = f"{read_in:.1f} s" if read_in is not None else f"not in {window} ({read} read)"
    sidecar = "hung" if how == signal.SIGSTOP else "absent"
    return (
        f"workers {workers}, sidecar {sidecar}: 10,000 lines read in {shown}; "
        f"dummy records in {window}: {dummy} of 300"
    )


def reloads(binary: str, workers: int) -> str:
    with running(binary, workers) as fluent_bit:
        done = 0
        for attempt in range(1, RELOADS + 1):
            fluent_bit.append(100)
            assert fluent_bit.process is not None
            fluent_bit.process.send_signal(signal.SIGHUP)

            def reloaded_or_dead(wanted: int = attempt) -> bool:
                reloaded = fluent_bit.log_text().count("successful reload done") >= wanted
                return reloaded or not fluent_bit.alive()

            ok = wait_until(reloaded_or_dead, 30)
            time.sleep(1.0)  # a second of load after each reload: the crash comes from a timer
            if not ok or not fluent_bit.alive():
                break
            done = attempt
        if fluent_bit.alive():
            return f"workers {workers}: {done} of {RELOADS} reloads, alive"
        crash = [line for line in fluent_bit.log_text().splitlines() if "caught signal" in line]
        return f"workers {workers}: died after {done} of {RELOADS} reloads: {' | '.join(crash)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fluent-bit", required=True)
    parser.add_argument("--only", choices=["stall", "reload"])
    args = parser.parse_args()
    version = subprocess.run(
        [args.fluent_bit, "--version"], capture_output=True, text=True, check=True
    ).stdout
    print(version.splitlines()[0])
    if args.only != "reload":
        for workers in (0, 1):
            for how in (signal.SIGSTOP, signal.SIGKILL):
                print(stall(args.fluent_bit, workers, how), flush=True)
    if args.only != "stall":
        for workers in (1, 0):
            print(reloads(args.fluent_bit, workers), flush=True)


if __name__ == "__main__":
    main()
