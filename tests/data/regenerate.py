"""Regenerate tests/data: a real kube-apiserver audit log and the Fluent Bit flushes of it.

1. Starts the test control plane (tests/controlplane: etcd, kube-apiserver, controller manager
   and scheduler of the pinned Kubernetes release; build it first with ``make controlplane``)
   with ``recording-policy.yaml``, runs the Defender scenario and its noise
   (tests/controlplane/scenario.py), stops it, and copies the audit log kube-apiserver wrote,
   unchanged, to ``audit.log``.
2. Packs that log, line by line, into the flush buffers Fluent Bit's ``tail`` input hands an
   output, in both shapes (bench/corpus.py ``fluent_bit_record``): the line in ``log`` (no
   parser) and the ``json``-parsed map. Each record is stamped as read 2 ms after its
   ``stageTimestamp``, never earlier than the record before it (tail reads in file order).
3. Writes ``manifest.json``: the Kubernetes version, the policy, counts and sizes.

Run ``python3 tests/data/regenerate.py`` (``make testdata``). The files are replaced only when
every step succeeded and the whole set stays under ``MAX_TOTAL_BYTES``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from controlplane import scenario  # noqa: E402
from controlplane.build import BuildError, cached_binaries, kubernetes_version  # noqa: E402
from controlplane.cluster import AuditSettings, running  # noqa: E402
from fixtures.chunks import (  # noqa: E402
    AUDIT_LOG,
    DATA_DIR,
    MANIFEST,
    RECORDING_POLICY,
    TAIL_CHUNK_PARSED,
    TAIL_CHUNK_RAW_LOG,
)

from bench.corpus import (  # noqa: E402
    FLB_CHUNK_MAX_BYTES,
    READ_DELAY_US,
    fluent_bit_record,
    parse_timestamp_us,
)

MAX_TOTAL_BYTES = 2_000_000
FLUENT_BIT_FORMAT = (
    "Fluent Bit 4.2.8 tail input: v2 events [[EventTime, {}], record], no outer array, "
    "32-bit array and map headers on the event and record level"
)


def record_audit_log(target: Path, workdir: Path) -> scenario.ScenarioRun:
    """Runs the scenario against a fresh control plane; copies its audit log to ``target``."""
    binaries = cached_binaries()
    with running(binaries, workdir, AuditSettings(policy=RECORDING_POLICY)) as plane:
        outcome = scenario.run(plane, binaries.kubectl)
    files = plane.audit_files()
    if len(files) != 1:
        raise SystemExit(f"expected one audit file, kube-apiserver wrote {files}")
    shutil.copyfile(files[0], target)
    return outcome


def read_times_ns(lines: list[bytes]) -> list[int]:
    """When tail would have read each line: after its stage, in file order."""
    times: list[int] = []
    previous = 0
    for line in lines:
        stage = json.loads(line)["stageTimestamp"]
        at = (parse_timestamp_us(stage) + READ_DELAY_US) * 1000
        previous = max(previous, at)
        times.append(previous)
    return times


def flush_buffer(lines: list[bytes], times: list[int], parsed: bool) -> bytes:
    """One flush of every line; the log must fit in one Fluent Bit chunk."""
    buffer = b"".join(
        fluent_bit_record(line, at, parsed) for line, at in zip(lines, times, strict=True)
    )
    if len(buffer) > FLB_CHUNK_MAX_BYTES:
        raise SystemExit(
            f"the audit log packs into {len(buffer):,} bytes, more than one Fluent Bit chunk "
            f"({FLB_CHUNK_MAX_BYTES:,}); make recording-policy.yaml record less"
        )
    return buffer


def manifest(lines: list[bytes], sizes: dict[str, int]) -> dict[str, Any]:
    events = [json.loads(line) for line in lines]
    return {
        "kubernetes": kubernetes_version(),
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "policy": RECORDING_POLICY.name,
        "scenario": "tests/controlplane/scenario.py: build_steps and noise_steps",
        "events": len(events),
        "levels": dict(Counter(e["level"] for e in events).most_common()),
        "stages": dict(Counter(e["stage"] for e in events).most_common()),
        "fluent_bit_format": FLUENT_BIT_FORMAT,
        "read_delay_us": READ_DELAY_US,
        "bytes": sizes,
    }


def regenerate(out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="auditrelay-testdata-") as scratch:
        staging = Path(scratch) / "out"
        staging.mkdir()
        log = staging / AUDIT_LOG.name
        record_audit_log(log, Path(scratch) / "plane")
        lines = [line for line in log.read_bytes().splitlines() if line.strip()]
        times = read_times_ns(lines)
        (staging / TAIL_CHUNK_RAW_LOG.name).write_bytes(flush_buffer(lines, times, parsed=False))
        (staging / TAIL_CHUNK_PARSED.name).write_bytes(flush_buffer(lines, times, parsed=True))
        sizes = {path.name: path.stat().st_size for path in sorted(staging.iterdir())}
        if sum(sizes.values()) > MAX_TOTAL_BYTES:
            raise SystemExit(f"test data of {sum(sizes.values()):,} bytes is too large: {sizes}")
        written = manifest(lines, sizes)
        (staging / MANIFEST.name).write_text(json.dumps(written, indent=2) + "\n")
        for path in staging.iterdir():
            shutil.copyfile(path, out / path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="directory to write into")
    args = parser.parse_args(argv)
    try:
        written = regenerate(args.out)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
