"""The soak's events: the real control plane's mix, resampled to any count, as Fluent Bit chunks.

The templates are what a real kube-apiserver wrote while ``bench/controlplane_corpus.py`` drove
the Defender scenario and a request mix through it (built once into ``tests/soak/.cache/``, or
given with ``--corpus``). ``bench.corpus`` turns them into as many events as asked, each with a
fresh auditID and its template's size and shape. Chunks alternate between the two record shapes
Fluent Bit's tail input writes (the raw line in ``log``; the json-parsed map), v2 events with
EventTime. Which auditIDs the bundled policy keeps or drops is worked out here, independently of
the sidecar, with the policy itself.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson
from auditrelay.config import BUNDLED_POLICY
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent

from bench import corpus

SOAK_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = SOAK_DIR.parents[1]
CACHE_DIR: Final = SOAK_DIR / ".cache"
CHUNK_BYTES: Final = 512 * 1024
CORPUS_REQUESTS: Final = 3000


@dataclass
class Expected:
    """What the policy makes of every event handed to the plugin."""

    kept: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)

    @property
    def events(self) -> int:
        return len(self.kept) + len(self.dropped)


@dataclass(frozen=True)
class Chunk:
    """One flush buffer and how many events it carries."""

    number: int
    data: bytes
    events: int
    kept_ids: tuple[str, ...]  # the auditIDs of it the policy keeps


def controlplane_corpus(requests: int = CORPUS_REQUESTS, seed: int = 1) -> Path:
    """The corpus.jsonl of a control-plane corpus, built once with the project's generator."""
    out = CACHE_DIR / f"controlplane-{requests}-seed{seed}"
    if not (out / "corpus.jsonl").is_file():
        from bench import controlplane_corpus  # needs the control plane (make controlplane)

        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        args = argparse.Namespace(
            out=out,
            requests=requests,
            clients=8,
            max_seconds=300.0,
            policy=None,
            max_size_mb=20,
            max_backups=1000,
            audit_mode="blocking",
            no_scenario=False,
            seed=seed,
        )
        controlplane_corpus.generate(args)
    return out / "corpus.jsonl"


def load_templates(jsonl: Path, seed: int) -> list[corpus.Template]:
    """Every audit event of a corpus file, compiled for resampling."""
    rng = random.Random(f"soak-templates-{seed}")  # noqa: S311 -- name pools, not secrets
    templates = [
        corpus.compile_template(line, jsonl.name, rng)
        for line in jsonl.read_bytes().splitlines()
        if line.strip() and b'"auditID"' in line
    ]
    if not templates:
        raise ValueError(f"{jsonl}: no audit events to build the soak from")
    return templates


class EventSource:
    """Makes ``count`` events into chunks on demand and records what the policy does with each."""

    def __init__(self, templates: list[corpus.Template], count: int, seed: int) -> None:
        self.expected = Expected()
        self.policy = PolicyFilter.from_file(BUNDLED_POLICY)
        self._events = corpus.generate(count, seed=seed, templates=templates)
        self._numbers = iter(range(1 << 62))

    def chunks(self) -> Iterator[Chunk]:
        """The chunks, built one at a time (a million events never sit in memory at once)."""
        records: list[bytes] = []
        kept: list[str] = []
        size = 0
        parsed = False
        for event in self._events:
            record = corpus.fluent_bit_record(event.line, event.read_time_ns, parsed)
            if records and size + len(record) > CHUNK_BYTES:
                yield self._chunk(records, kept)
                records, kept, size = [], [], 0
                parsed = not parsed  # the next chunk in the other shape
                record = corpus.fluent_bit_record(event.line, event.read_time_ns, parsed)
            records.append(record)
            size += len(record)
            if self._expect(event.line):
                kept.append(orjson.loads(event.line)["auditID"])
        if records:
            yield self._chunk(records, kept)

    def _chunk(self, records: list[bytes], kept: list[str]) -> Chunk:
        return Chunk(next(self._numbers), b"".join(records), len(records), tuple(kept))

    def _expect(self, line: bytes) -> bool:
        """Records what the policy does with the event; True when it keeps it."""
        fields = orjson.loads(line)
        audit_id = fields["auditID"]
        if self.policy.apply(AuditEvent(fields, line)) is None:
            self.expected.dropped.add(audit_id)
            return False
        self.expected.kept.add(audit_id)
        return True
