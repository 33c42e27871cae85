"""The soak's faults: a bounded schedule run against the real sidecar and the emulator.

Two threads while the input lasts:

* the killer SIGKILLs the sidecar every ``kill_every`` seconds (+-30 %) at a point it picks in
  turn: inside a Push (a flush in flight), in the middle of a delivery (the emulator has stored a
  request's rows and holds the answer back), while a thread of the sidecar is seen in
  ``fsync``/``fdatasync``/``write`` (the process is stopped and its threads' system calls read from
  /proc until one is caught there, for up to 2 s), or anywhere; then starts it again on the same
  state directory after a pause;
* the scheduler runs each fault kind in turn, one at a time, for ``fault_seconds`` (the refused
  endpoint for ``outage_seconds``): the endpoint refusing connections (emulator stopped), 429
  storms with and without Retry-After, 500 and 503, 413 from a lowered body limit, tokens
  expiring mid-stream, the spool limit reached (endpoint down until the sidecar says its spool is
  full), the state disk full (the tmpfs filled up with a ballast file), the token clock jumping
  ahead and behind.

When the input is done the faults stop, and the sidecar drains.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final

from auditrelay.emulator import (
    Emulator,
    EmulatorSettings,
    Fault,
    FaultKind,
    StoreMode,
    running_in_thread,
)
from harness.sidecar import Sidecar

from soak.engine import Engine

WRITE_SYSCALLS: Final = {"74": "fsync", "75": "fdatasync", "1": "write", "18": "pwrite64"}
TOKEN_LIFETIME_SECONDS: Final = 60.0
# Under the wire size of the soak's bodies (64 KiB uncompressed, ~7 KB gzip): a 413 for each
# until they are split; the largest row of the corpus (2.3 KB gzip) still fits.
LOWERED_BODY_LIMIT: Final = 5 * 1024
CLOCK_JUMP_SECONDS: Final = 2 * 3600.0
# How long the disk stays full at most, waiting for the sidecar to refuse a chunk for it: a
# restart under load (about 5 s) and the input paused for retries must fit in it.
DISK_FULL_WAIT_SECONDS: Final = 20.0
# The faults whose effects last longest (a bad token is kept until it expires) come first, so
# that the last ones of a cycle leave the drain little to wait for.
FAULT_KINDS: Final = (
    "token_clock_jump_ahead",
    "token_clock_jump_behind",
    "tokens_expired_mid_stream",
    "endpoint_refusing_connections",
    "spool_limit_reached",
    "state_disk_full",
    "413_lowered_limit",
    "429_with_retry_after",
    "429_without_retry_after",
    "500",
    "503",
)


class EmulatorHost:
    """The emulator in this process, restartable on the same port, state and keys."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = 0
        self._running: AbstractContextManager[Emulator] | None = None
        self._emulator: Emulator | None = None
        self.lock = threading.Lock()

    @property
    def emulator(self) -> Emulator:
        if self._emulator is None:
            raise RuntimeError("the emulator is stopped")
        return self._emulator

    @property
    def up(self) -> bool:
        return self._emulator is not None

    def start(self, **overrides: Any) -> Emulator:
        settings = EmulatorSettings(
            state_dir=self.state_dir,
            port=self.port,
            store_mode=StoreMode.IDS,
            token_lifetime=TOKEN_LIFETIME_SECONDS,
            **overrides,
        )
        self._running = running_in_thread(settings)
        self._emulator = self._running.__enter__()
        self.port = self._emulator.port
        return self._emulator

    def stop(self) -> None:
        running, self._running, self._emulator = self._running, None, None
        if running is not None:
            running.__exit__(None, None, None)

    def audit_id_counts(self) -> dict[str, int]:
        with self.lock:
            return self.emulator.store.audit_id_counts()


class SidecarKeeper:
    """The sidecar, killed and started again; records its peak RSS meanwhile."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.max_rss_bytes = 0
        self.max_rss_during = ""  # the fault under way when the peak was seen
        self.lock = threading.Lock()

    def pid(self) -> int | None:
        process = self.sidecar.process
        return process.pid if process is not None and process.poll() is None else None

    def sample_rss(self, during: str) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:") and int(line.split()[1]) * 1024 > self.max_rss_bytes:
                    self.max_rss_bytes = int(line.split()[1]) * 1024
                    self.max_rss_during = during

    def deferrals(self) -> int:
        """How many chunks the sidecar has answered RETRY_LATER for a full spool or disk, over
        all its restarts (its ``chunk_deferred`` log lines)."""
        return sum(1 for _ in self.sidecar.events("chunk_deferred"))

    def chunks_stored_once(self) -> int:
        """How many chunks came back after their answer was lost and were recognised (not
        stored again), over all the sidecar's restarts."""
        return sum(1 for _ in self.sidecar.events("chunk_already_stored"))


class Chaos:
    """Runs the killer and the fault schedule until ``stop`` (the input is done)."""

    def __init__(
        self,
        engine: Engine,
        emulators: EmulatorHost,
        keeper: SidecarKeeper,
        disk: Path,
        *,
        kill_every: float,
        fault_seconds: float,
        outage_seconds: float,
        seed: int,
    ) -> None:
        self.engine = engine
        self.emulators = emulators
        self.keeper = keeper
        self.disk = disk
        self.kill_every = kill_every
        self.fault_seconds = fault_seconds
        self.outage_seconds = outage_seconds
        self.faults: Counter[str] = Counter()
        self.kills: Counter[str] = Counter()
        self.observed: Counter[str] = Counter()
        self.active = "none"  # the fault under way
        self.last_start = 0.0  # when the sidecar was last started again (monotonic)
        self._random = random.Random(seed)  # noqa: S311 -- chaos, not secrets
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.failure: BaseException | None = None

    def phase(self) -> str:
        """The fault under way, and whether the sidecar started again within the last 10 s."""
        restarted = time.monotonic() - self.last_start < 10.0
        return self.active + (", within 10 s of a restart" if restarted else "")

    @staticmethod
    def cycle_seconds(fault_seconds: float, outage_seconds: float) -> float:
        """How long one round of every fault kind takes at most (with the pauses between)."""
        kinds = len(FAULT_KINDS)
        return (
            kinds * 1.5 * fault_seconds
            + outage_seconds
            + max(outage_seconds, 4 * fault_seconds)
            + max(fault_seconds, DISK_FULL_WAIT_SECONDS)
            + 10
        )

    def start(self) -> None:
        for target, name in ((self._killer, "killer"), (self._schedule, "faults")):
            thread = threading.Thread(target=self._guarded(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as error:  # reported by the runner, which fails the soak
                traceback.print_exc()
                self.failure = error
                self._stop.set()

        return run

    def _pause(self, seconds: float) -> bool:
        """Waits; True when the chaos is to stop."""
        return self._stop.wait(seconds)

    # -- the killer --

    def _killer(self) -> None:
        points = [self._kill_mid_push, self._kill_mid_delivery, self._kill_in_a_write, self._kill]
        turn = 0
        while not self._pause(self.kill_every * self._random.uniform(0.7, 1.3)):
            with self.keeper.lock:
                where = points[turn % len(points)]()
                self.kills[where] += 1
                self._pause(self._random.uniform(0.2, 2.0))
                self.keeper.sidecar.start()
                self.last_start = time.monotonic()
            turn += 1

    def _kill(self) -> str:
        self.keeper.sidecar.kill()
        return "anywhere"

    def _kill_mid_push(self) -> str:
        if not self.engine.wait_for_a_flush_in_flight(5.0):
            return self._kill()
        time.sleep(self._random.uniform(0.0, 0.02))
        self.keeper.sidecar.kill()
        return "mid_push"

    def _kill_mid_delivery(self) -> str:
        with self.emulators.lock:
            if not self.emulators.up:
                return self._kill()
            emulator = self.emulators.emulator
            emulator.add_fault(Fault(FaultKind.TIMEOUT_AFTER_STORE, delay=0.5, count=1))
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self.emulators.up:
            if not any(f.kind is FaultKind.TIMEOUT_AFTER_STORE for f in emulator.faults.active()):
                time.sleep(0.15)  # the rows are being stored; the answer is held back 0.5 s
                self.keeper.sidecar.kill()
                return "mid_delivery"
            time.sleep(0.02)
        with self.emulators.lock:
            if self.emulators.up:
                emulator.clear_faults()
        return self._kill()

    def _kill_in_a_write(self) -> str:
        pid = self.keeper.pid()
        deadline = time.monotonic() + 2.0
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own meanwhile
            while pid is not None and time.monotonic() < deadline:
                os.kill(pid, signal.SIGSTOP)
                caught = _syscalls_of(pid) & WRITE_SYSCALLS.keys()
                if caught:
                    os.kill(pid, signal.SIGKILL)  # while stopped: it dies where it stood
                    self.keeper.sidecar.kill()
                    return "in_" + WRITE_SYSCALLS[min(caught, key=int)]
                os.kill(pid, signal.SIGCONT)
                time.sleep(self._random.uniform(0.0, 0.003))
        return self._kill()

    # -- the fault schedule --

    def _schedule(self) -> None:
        kinds: list[tuple[str, Callable[[], None]]] = [
            ("token_clock_jump_ahead", lambda: self._clock_jump(CLOCK_JUMP_SECONDS)),
            ("token_clock_jump_behind", lambda: self._clock_jump(-CLOCK_JUMP_SECONDS)),
            ("tokens_expired_mid_stream", self._tokens_expire),
            ("endpoint_refusing_connections", self._endpoint_down),
            ("spool_limit_reached", self._spool_full),
            ("state_disk_full", self._disk_full),
            ("413_lowered_limit", self._lowered_limit),
            ("429_with_retry_after", lambda: self._storm(Fault(FaultKind.STATUS, status=429, retry_after=1.0, probability=0.7))),
            ("429_without_retry_after", lambda: self._storm(Fault(FaultKind.STATUS, status=429, probability=0.7))),
            ("500", lambda: self._storm(Fault(FaultKind.STATUS, status=500, probability=0.5))),
            ("503", lambda: self._storm(Fault(FaultKind.STATUS, status=503, probability=0.5))),
        ]  # fmt: skip
        assert tuple(name for name, _ in kinds) == FAULT_KINDS
        turn = 0
        while not self._pause(self.fault_seconds / 2):
            name, inject = kinds[turn % len(kinds)]
            self.faults[name] += 1
            self.active = name
            inject()
            self.active = "none"
            turn += 1

    def _with_emulator(self, action: Callable[[Emulator], None]) -> None:
        with self.emulators.lock:
            if self.emulators.up:
                action(self.emulators.emulator)

    def _storm(self, fault: Fault) -> None:
        self._with_emulator(lambda emulator: emulator.add_fault(fault))
        self._pause(self.fault_seconds)
        self._with_emulator(lambda emulator: emulator.clear_faults())

    def _restart_emulator(self, **overrides: Any) -> None:
        with self.emulators.lock:
            self.emulators.stop()
            self.emulators.start(**overrides)

    def _endpoint_down(self) -> None:
        with self.emulators.lock:
            self.emulators.stop()
        self._pause(self.outage_seconds)
        with self.emulators.lock:
            self.emulators.start()

    def _lowered_limit(self) -> None:
        self._restart_emulator(max_body_bytes=LOWERED_BODY_LIMIT)
        self._pause(self.fault_seconds)
        self._restart_emulator()

    def _tokens_expire(self) -> None:
        self._with_emulator(lambda emulator: emulator.revoke_tokens())
        self._pause(self.fault_seconds)

    def _clock_jump(self, seconds: float) -> None:
        self._with_emulator(lambda emulator: emulator.jump_token_clock(seconds))
        self._pause(self.fault_seconds)
        self._with_emulator(lambda emulator: emulator.jump_token_clock(0.0))

    def _spool_full(self) -> None:
        """The endpoint answers 503 until the sidecar refuses chunks for a full spool."""
        before = self.keeper.deferrals()
        self._with_emulator(
            lambda emulator: emulator.add_fault(Fault(FaultKind.STATUS, status=503))
        )
        deadline = time.monotonic() + max(self.outage_seconds, 4 * self.fault_seconds)
        while not self._pause(1.0) and time.monotonic() < deadline:
            if self.keeper.deferrals() > before:
                self.observed["spool_limit_reached"] += 1
                self._pause(self.fault_seconds / 2)
                break
        self._with_emulator(lambda emulator: emulator.clear_faults())

    def _disk_full(self) -> None:
        """The state file system filled up, until the sidecar has refused a chunk for it."""
        before = self.keeper.deferrals()
        with ballast_file(self.disk / "ballast"):
            deadline = time.monotonic() + max(self.fault_seconds, DISK_FULL_WAIT_SECONDS)
            while not self._pause(0.5) and time.monotonic() < deadline:
                if self.keeper.deferrals() > before:
                    self.observed["state_disk_full"] += 1
                    break


@contextlib.contextmanager
def ballast_file(path: Path) -> Iterator[None]:
    """A file that takes all the space left on its file system, until the block ends."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (b"\0" * (1 << 20), b"\0" * 4096):
            with contextlib.suppress(OSError):  # ENOSPC: full at this block size
                while True:
                    os.write(descriptor, block)
        yield
    finally:
        os.close(descriptor)
        path.unlink(missing_ok=True)


def _syscalls_of(pid: int) -> set[str]:
    """The system call number each thread of a stopped process is in."""
    found = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found.add(Path(f"/proc/{pid}/task/{task}/syscall").read_text().split(" ", 1)[0])
    return found
