"""Per-stage cost of the delivery path on a real audit log: encode, spool, batch.

    python bench/delivery_stages.py [--events 60000] [--spool-dir /var/tmp/bench-spool]

Encode and batch rates are CPU time on one core (``time.process_time``); spool rates are wall
time, since waiting for fsync is what they measure. Events are those of tests/data/audit.log (a
real kube-apiserver log, see tests/data/README.md), cycled with a fresh auditID each (the API
server's JSON text kept as ``raw``, as the decoder hands it over). Numbers are best of three;
the machine is shared, so read them as orders of magnitude and ratios.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))

from auditrelay.batch import BatchBuilder, Codec
from auditrelay.model import AuditEvent
from auditrelay.spool import Spool
from auditrelay.stream import RowEncoder

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "audit.log"
CHUNK_EVENTS = 1000  # about one Fluent Bit chunk of 2 MB


def load_events(count: int) -> list[AuditEvent]:
    lines = [line for line in SAMPLES.read_bytes().splitlines() if line.strip()]
    templates = [orjson.loads(line) for line in lines]
    events = []
    for index in range(count):
        fields = dict(templates[index % len(templates)])
        fields["auditID"] = f"{index:08d}-0000-4000-8000-{index:012d}"
        events.append(AuditEvent(fields, orjson.dumps(fields)))
    return events


def best_of(
    runs: int, work: Callable[[], object], clock: Callable[[], float] = time.process_time
) -> float:
    """Shortest of ``runs`` runs. CPU time by default: the cost on one core, whatever else runs
    on the machine; wall time where waiting on the disk is the point."""
    best = float("inf")
    for _ in range(runs):
        started = clock()
        work()
        best = min(best, clock() - started)
    return best


def bench_encode(events: list[AuditEvent]) -> list[bytes]:
    encoder = RowEncoder("bench-cluster", "/subscriptions/0/resourceGroups/rg/clusters/bench")
    plain = [AuditEvent(event.fields) for event in events]
    spliced = best_of(3, lambda: [encoder.encode(event) for event in events])
    rebuilt = best_of(3, lambda: [encoder.encode(event) for event in plain])
    print(f"encode  raw splice     {len(events) / spliced:>10,.0f} rows/s")
    print(f"encode  re-serialize   {len(events) / rebuilt:>10,.0f} rows/s")
    return [encoder.encode(event) for event in events]


def bench_spool(rows: list[bytes], directory: Path) -> None:
    chunks = [rows[start : start + CHUNK_EVENTS] for start in range(0, len(rows), CHUNK_EVENTS)]
    megabytes = sum(len(row) for row in rows) / 1e6
    for sync in (True, False):
        shutil.rmtree(directory, ignore_errors=True)
        spool = Spool(directory, limit_bytes=8 << 30, sync=sync)
        wall, cpu = time.perf_counter(), time.process_time()
        for chunk in chunks:
            spool.append(chunk)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        mode = "fsync per chunk" if sync else "no fsync       "
        print(
            f"spool   append {mode} {len(rows) / wall:>10,.0f} rows/s  "
            f"{megabytes / wall:>7.1f} MB/s wall; CPU {cpu / len(rows) * 1e6:.2f} us/row  "
            f"({len(chunks)} appends of {CHUNK_EVENTS} rows)"
        )
        started = time.perf_counter()
        read_rows = 0
        while (read := spool.read(8 << 20)) is not None:
            read_rows += len(read.rows)
        seconds = time.perf_counter() - started
        print(
            f"spool   read                {read_rows / seconds:>10,.0f} rows/s  {megabytes / seconds:>7.1f} MB/s"
        )
        spool.close()
    shutil.rmtree(directory, ignore_errors=True)


def bench_batch(rows: list[bytes]) -> None:
    for codec in ("isal", "zlib"):
        for level in (1, 6):
            builder = BatchBuilder(level, codec=codec_name(codec))  # isal 6 means ISA-L's best, 3
            bodies = builder.pack(rows)  # warms up the ratio estimate
            seconds = best_of(3, partial(builder.pack, rows))
            raw = sum(body.raw_bytes for body in bodies)
            wire = sum(len(body.data) for body in bodies)
            print(
                f"batch   {codec} level {level}     {len(rows) / seconds:>10,.0f} rows/s  "
                f"ratio {raw / wire:4.1f}  {len(bodies)} bodies"
            )


def codec_name(name: str) -> Codec:
    return "isal" if name == "isal" else "zlib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--spool-dir", type=Path, default=None)
    args = parser.parse_args()
    events = load_events(args.events)
    mean = sum(len(event.raw or b"") for event in events) / len(events)
    print(f"{len(events):,} events, mean {mean:,.0f} bytes of JSON each")
    rows = bench_encode(events)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        bench_spool(rows, args.spool_dir or Path(scratch) / "spool")
    bench_batch(rows)


if __name__ == "__main__":
    main()
