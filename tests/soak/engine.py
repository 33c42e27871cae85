"""Fluent Bit's side of the soak: one ``[OUTPUT] auditrelay`` instance with ``workers`` > 1, flushed
the way Fluent Bit's engine flushes it.

Each worker thread takes a chunk, calls ``FLBPluginFlushCtx`` through ``auditrelay.devtools.flbproxy`` and
acts on the answer as Fluent Bit does: FLB_OK forgets the chunk; FLB_RETRY keeps it and flushes it
again after a backoff, in whatever order the retries fall due, interleaved with new chunks;
FLB_ERROR would drop it (the soak counts that as a loss). Like Fluent Bit when its buffer is full,
the input pauses while ``max_chunks_up`` chunks wait for a retry. New chunks come at ``rate`` events per
second, as from an audit log being written. The backoff is Fluent Bit's
shape (exponential, random) on a shorter scale, 0.1 s up to 2 s instead of 5 s up to 2000 s, so
that a soak of a million events ends in minutes.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from auditrelay.devtools.flbproxy import GoProxy, Instance, Result

from soak.events import Chunk

TAG = "kube.audit"
RETRY_BASE_SECONDS = 0.1
RETRY_CAP_SECONDS = 2.0


@dataclass
class _Retry:
    due: float
    chunk: Chunk
    attempts: int


@dataclass
class EngineStats:
    """What the engine did."""

    flushes: int = 0
    retries: int = 0
    chunks_done: int = 0
    events_done: int = 0
    errors: list[int] = field(default_factory=list)  # chunk numbers answered FLB_ERROR
    most_retries_of_one_chunk: int = 0
    retried_kept_ids: set[str] = field(default_factory=set)  # of chunks answered FLB_RETRY


class Engine:
    """Flushes the chunks of ``source`` with ``workers`` threads until every one is done."""

    def __init__(
        self,
        proxy: GoProxy,
        instance: Instance,
        source: Iterator[Chunk],
        *,
        workers: int,
        max_chunks_up: int,
        rate: float,
        seed: int,
    ) -> None:
        self.proxy = proxy
        self.instance = instance
        self.workers = workers
        self.max_chunks_up = max_chunks_up
        self.stats = EngineStats()
        self._source = source
        self._source_done = False
        self._retries: list[_Retry] = []
        self._lock = threading.Condition()
        self._in_flight = 0
        self._random = random.Random(seed)  # noqa: S311 -- scheduling, not secrets
        self._threads: list[threading.Thread] = []
        self._rate = rate  # events per second the input is read at (an audit log written live)
        self._started = time.monotonic()
        self._events_read = 0

    # -- what the chaos side watches --

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._source_done and not self._retries and self._in_flight == 0

    @property
    def input_done(self) -> bool:
        """Every chunk of the source has been flushed at least once."""
        with self._lock:
            return self._source_done

    def wait_for_a_flush_in_flight(self, within: float) -> bool:
        """True once a flush is under way (the sidecar is then inside a Push)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight > 0, within)

    # -- running --

    def start(self) -> None:
        self._started = time.monotonic()
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"flb-worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float) -> bool:
        """Waits for the workers; False if they are still busy after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        while (task := self._next()) is not None:
            chunk, attempts = task
            result = self.proxy.flush(self.instance, chunk.data, TAG)
            self._settle(chunk, attempts, result)

    def _next(self) -> tuple[Chunk, int] | None:
        """A due retry (any of them), else a new chunk, else wait; None when all is done."""
        with self._lock:
            while True:
                now = time.monotonic()
                due = [retry for retry in self._retries if retry.due <= now]
                if due:
                    retry = self._random.choice(due)
                    self._retries.remove(retry)
                    self._in_flight += 1
                    self._lock.notify_all()
                    return retry.chunk, retry.attempts
                readable = now >= self._started + self._events_read / self._rate
                if readable and not self._source_done and len(self._retries) < self.max_chunks_up:
                    chunk = next(self._source, None)
                    if chunk is not None:
                        self._events_read += chunk.events
                        self._in_flight += 1
                        self._lock.notify_all()
                        return chunk, 0
                    self._source_done = True
                if self._source_done and not self._retries and self._in_flight == 0:
                    self._lock.notify_all()
                    return None
                soonest = min((retry.due for retry in self._retries), default=now + 0.1)
                self._lock.wait(max(0.01, min(0.1, soonest - now)))

    def _settle(self, chunk: Chunk, attempts: int, result: Result) -> None:
        with self._lock:
            self._in_flight -= 1
            self.stats.flushes += 1
            if result is Result.OK:
                self.stats.chunks_done += 1
                self.stats.events_done += chunk.events
            elif result is Result.RETRY:
                self.stats.retries += 1
                if attempts == 0:
                    self.stats.retried_kept_ids.update(chunk.kept_ids)
                attempts += 1
                self.stats.most_retries_of_one_chunk = max(
                    self.stats.most_retries_of_one_chunk, attempts
                )
                ceiling = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**attempts)
                delay = self._random.uniform(RETRY_BASE_SECONDS, ceiling)
                self._retries.append(_Retry(time.monotonic() + delay, chunk, attempts))
            else:
                self.stats.errors.append(chunk.number)
            self._lock.notify_all()
