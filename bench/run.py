"""``python -m bench <benchmark>``: runs one benchmark, prints its figures with the command
that produced them, and saves them to ``bench/results/<benchmark>-<time>.json``.

Run from the repository root with ``PYTHONPATH=sidecar`` so that the package of this checkout
is measured. Pin with ``taskset -c 1`` where a benchmark says it measures one core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import corpus, sdk_baseline, stages
from bench.results import RESULTS_DIR, Result, process_cpu_seconds, recording

Command = Callable[[argparse.Namespace, Result], None]
COMMANDS: dict[str, tuple[str, Command, Callable[[argparse.ArgumentParser], None]]] = {}


def command(
    name: str, help_text: str, options: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Command], Command]:
    def register(function: Command) -> Command:
        COMMANDS[name] = (help_text, function, options)
        return function

    return register


def property_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def cpu_or_none(text: str) -> int | None:
    """A CPU number, or None for 'any'."""
    return None if text == "any" else int(text)


def corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=100_000, help="events in the corpus")
    parser.add_argument("--seed", type=int, default=1, help="seed of the resampling")
    parser.add_argument(
        "--rate", type=float, default=corpus.DEFAULT_RATE, help="events/s of the timestamps"
    )
    parser.add_argument("--corpora", type=Path, default=corpus.CORPORA_DIR, help="output folder")
    parser.add_argument("--samples", type=Path, default=corpus.SAMPLES, help="real audit log")
    parser.add_argument(
        "--chunk-bytes", type=int, default=corpus.FLB_CHUNK_MAX_BYTES, help="max flush size"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if present")


def built_corpus(args: argparse.Namespace) -> tuple[corpus.CorpusPaths, dict[str, Any]]:
    return corpus.build(
        args.events, args.seed, args.rate, args.corpora, args.samples, args.chunk_bytes, args.force
    )


@command("corpus", "build a corpus (audit.log + Fluent Bit chunks)", corpus_options)
def run_corpus(args: argparse.Namespace, result: Result) -> None:
    paths, manifest = built_corpus(args)
    mix = manifest["mix"]
    template_mix = manifest["template_mix"]
    result.details.update(manifest)
    result.details["files"] = {k: str(v) for k, v in vars(paths).items()}
    result.add("events", float(mix["events"]), "events")
    result.add("audit.log size", manifest["jsonl_bytes"] / 1e6, "MB")
    result.add(
        "mean event size",
        mix["size_bytes"]["mean"],
        "B",
        note=f"samples: {template_mix['size_bytes']['mean']} B",
    )
    for shape, stats in manifest["chunks"].items():
        result.add(
            f"{shape} chunks",
            stats["chunks"],
            "chunks",
            note=f"{stats['bytes'] / max(stats['chunks'], 1) / 1e6:.2f} MB each",
        )


def one_core_options(parser: argparse.ArgumentParser) -> None:
    corpus_options(parser)
    parser.add_argument(
        "--cpu", type=cpu_or_none, default=1, help="CPU this process runs on; 'any': unpinned"
    )


def sdk_options(parser: argparse.ArgumentParser) -> None:
    one_core_options(parser)
    parser.add_argument("--repeat", type=int, default=3, help="passes; the best is reported")


@command("sdk", "azure-monitor-ingestion upload() preparation on the corpus rows", sdk_options)
def run_sdk(args: argparse.Namespace, result: Result) -> None:
    paths, _ = built_corpus(args)
    rows = sdk_baseline.rows_from_lines(corpus.iter_lines(paths.jsonl))
    runs = [sdk_baseline.prepare(rows) for _ in range(args.repeat)]
    best = max(runs, key=lambda r: r.rows_per_s)
    result.details["runs"] = [
        {"wall_s": r.clock.wall, "cpu_s": r.clock.cpu, "requests": r.requests} for r in runs
    ]
    result.add(
        "SDK prepare (json.dumps+chunk+gzip6)",
        best.rows_per_s,
        "rows/s",
        note=f"best of {len(runs)}, wall clock",
    )
    result.add("SDK prepare per CPU second", best.rows_per_cpu_s, "rows/CPU-s")
    result.add("SDK requests", best.requests, "requests")
    result.add("SDK bytes on the wire", best.compressed_bytes / 1e6, "MB")


@command("stages", "floor cost per event of each step, both tail shapes", one_core_options)
def run_stages(args: argparse.Namespace, result: Result) -> None:
    paths, _ = built_corpus(args)
    raw_chunks = list(corpus.read_chunks(paths.raw_chunks))
    parsed_chunks = list(corpus.read_chunks(paths.parsed_chunks))
    costs = stages.measure(raw_chunks, parsed_chunks)
    with tempfile.TemporaryDirectory(prefix="auditrelay-bench-") as spool_dir:
        costs += stages.project_costs(raw_chunks, spool_dir)
    for cost in costs:
        result.add(
            cost.name, cost.us_per_event, "µs/event", note=f"{cost.events_per_s:,.0f} ev/CPU-s"
        )
    for codec, ratio in stages.compression_ratios(raw_chunks).items():
        result.add(f"compression ratio {codec}", ratio, "x")


def pipeline_options(parser: argparse.ArgumentParser) -> None:
    corpus_options(parser)
    parser.add_argument(
        "--cpu", type=cpu_or_none, default=1,
        help="CPU this process (the sidecar's work) runs on; 'any': leave as started",
    )  # fmt: skip
    parser.add_argument(
        "--shape", choices=["raw", "parsed"], default="raw",
        help="tail shape of the chunks: the JSON line in `log`, or json-parsed maps",
    )  # fmt: skip
    parser.add_argument(
        "--emulator-cpu", type=cpu_or_none, default=0, help="CPU of the emulator ('any': unpinned)"
    )
    parser.add_argument(
        "--check", action="store_true",
        help="store full rows and compare them with the policy applied offline",
    )  # fmt: skip
    parser.add_argument("--sdk", action="store_true", help="also run the SDK upload() baseline")
    parser.add_argument("--profile", action="store_true", help="sample every thread with py-spy")
    parser.add_argument("--work", type=Path, default=None, help="state folder (default: temp)")
    parser.add_argument(
        "--property", action="append", default=[], type=property_pair, metavar="KEY=VALUE",
        help="an [OUTPUT] property of the pipeline (repeatable), e.g. max_concurrency=1",
    )  # fmt: skip


def pipeline_command_options(parser: argparse.ArgumentParser) -> None:
    pipeline_options(parser)
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median is reported")
    parser.add_argument(
        "--limits", choices=["wire", "uncompressed", "both"], default="wire",
        help="the emulator's reading of the 1 MiB limit (emulator serve --limits); under "
        "uncompressed the pipeline learns it from one 413 and sends bodies under 1 MiB "
        "uncompressed; both: each repetition under each reading, back to back, compared",
    )  # fmt: skip


@command(
    "pipeline",
    "sidecar decode+filter+spool+batch+gzip+deliver on one core",
    pipeline_command_options,
)
def run_pipeline(args: argparse.Namespace, result: Result) -> None:
    from bench import pipeline

    paths, manifest = built_corpus(args)
    chunk_file = paths.raw_chunks if args.shape == "raw" else paths.parsed_chunks
    readings = ["wire", "uncompressed"] if args.limits == "both" else [args.limits]
    expected = None
    runs: dict[str, list[tuple[Any, int]]] = {reading: [] for reading in readings}
    with work_dir(args.work) as work:
        for repetition in range(args.repeat):
            for reading in readings:
                place = work / f"run-{repetition}-{reading}"
                last = repetition == args.repeat - 1 and reading == readings[-1]
                profile = args.profile and repetition == 0 and reading == readings[0]
                with emulator_process(args, place, full=args.check, limits=reading) as emu:
                    with profiling(profile, place, result, args.emulator_cpu):
                        run = asyncio.run(
                            pipeline.run_corpus(
                                corpus.read_chunks(chunk_file),
                                emu,
                                place / "sidecar",
                                properties=dict(args.property),
                            )
                        )
                    pipeline.count_accepted(run, emu)
                    runs[reading].append((run, emu.count()))
                    if last and (args.check or args.sdk):
                        # Only after every run: holding the expected rows would raise the runs'
                        # peak RSS (ru_maxrss is the process's peak so far).
                        from bench.expected import expected_rows

                        expected = expected_rows(corpus.iter_lines(paths.jsonl))
                    if last and expected is not None and args.check:
                        report_check(result, expected, emu)
    medians = {reading: median_run(found) for reading, found in runs.items()}
    run, stored = medians[readings[0]]
    result.details["run"] = pipeline.summary(run)
    result.details["repetitions"] = {
        reading: [
            {"events_per_s": r.events_per_s, "events_per_cpu_s": r.events_per_cpu_s}
            for r, _ in found
        ]
        for reading, found in runs.items()
    }
    report_pipeline(result, run, stored, manifest, args.repeat)
    if len(readings) > 1:
        report_readings(result, medians, args.repeat)
    if expected is not None and args.sdk:
        report_sdk_upload(args, result, expected, run)


def median_run(runs: list[tuple[Any, int]]) -> tuple[Any, int]:
    """The run with the median throughput, and what the emulator stored in it."""
    ordered = sorted(runs, key=lambda pair: pair[0].events_per_s)
    return ordered[len(ordered) // 2]


def report_readings(result: Result, medians: dict[str, tuple[Any, int]], repetitions: int) -> None:
    """Today's bodies (wire reading) against 1 MiB uncompressed ones, figure by figure."""
    runs = {reading: run for reading, (run, _) in medians.items()}
    result.details["readings"] = {reading: pipeline_summary(run) for reading, run in runs.items()}
    median = f"median of {repetitions} runs" if repetitions > 1 else "one run"
    for reading, (run, stored) in medians.items():
        label = f"[{reading}]"
        result.add(
            f"{label} kept / delivered / stored", run.events_kept, "events",
            note=f"delivered {run.events_delivered}, stored by the emulator {stored}",
        )  # fmt: skip
        result.add(f"{label} throughput", run.events_per_s, "events/s", note=median)
        result.add(
            f"{label} sidecar CPU per input event", 1e6 / run.events_per_cpu_s, "µs",
            note="process CPU time, all threads",
        )  # fmt: skip
        result.add(f"{label} requests accepted", run.requests, "requests")
        result.add(f"{label} requests refused 413", run.refused_too_large, "requests")
        result.add(f"{label} requests per second", run.requests / run.total.wall, "requests/s")
        result.add(f"{label} gzip bytes on the wire", run.sent_bytes / 1e6, "MB",
                   note="every request sent, the refused ones included")  # fmt: skip
        result.add(f"{label} gzip bytes per kept event", run.sent_bytes / run.events_kept, "B",
                   note="sent, the refused request included")  # fmt: skip
        result.add(f"{label} accepted gzip bytes per kept event",
                   run.accepted_wire_bytes / run.events_kept, "B")  # fmt: skip
        result.add(f"{label} accepted uncompressed bytes per kept event",
                   run.accepted_raw_bytes / run.events_kept, "B")  # fmt: skip
        result.add(f"{label} uncompressed bytes per request",
                   run.accepted_raw_bytes / max(1, run.requests) / 1e6, "MB")  # fmt: skip
        result.add(f"{label} kept events per request", run.events_kept / run.requests, "events")
        result.add(f"{label} uncompressed bound at the end", run.raw_limit_bytes, "bytes")
    wire, capped = runs.get("wire"), runs.get("uncompressed")
    if wire is not None and capped is not None:
        result.add("uncompressed / wire: throughput", capped.events_per_s / wire.events_per_s, "x")
        result.add(
            "uncompressed / wire: CPU per event", wire.events_per_cpu_s / capped.events_per_cpu_s,
            "x",
        )  # fmt: skip
        result.add("uncompressed / wire: requests", capped.requests / wire.requests, "x")
        result.add(
            "uncompressed / wire: bytes on the wire", capped.sent_bytes / wire.sent_bytes, "x"
        )


def pipeline_summary(run: Any) -> dict[str, Any]:
    from bench import pipeline

    return pipeline.summary(run)


def report_pipeline(
    result: Result, run: Any, stored: int, manifest: dict[str, Any], repetitions: int = 1
) -> None:
    if run.events_received != manifest["events"]:
        raise SystemExit(
            f"the sidecar received {run.events_received} of the corpus's {manifest['events']} "
            "events: a figure over a different count would mislead"
        )
    pinned = cpu_note()
    result.add(
        "sidecar throughput (input events)",
        run.events_per_s,
        "events/s",
        goal=">= 100,000",
        note=f"wall clock, {pinned}"
        + (f", median of {repetitions} runs" if repetitions > 1 else ""),
    )
    result.add(
        "sidecar throughput per CPU second",
        run.events_per_cpu_s,
        "events/CPU-s",
        note="process CPU time, all threads",
    )
    result.add("sidecar input rate", run.input_mb_per_s, "MB/s", note="Fluent Bit chunk bytes")
    result.add(
        "Push accept rate (until last ACCEPTED)", run.events_received / run.accept.wall, "events/s"
    )
    result.add("rows delivered per second", run.events_delivered / run.total.wall, "rows/s")
    result.add(
        "events in / kept / delivered",
        run.events_received,
        "events",
        note=f"kept {run.events_kept}, delivered {run.events_delivered}, "
        f"stored by the emulator {stored}",
    )
    result.add(
        "emulator busy",
        run.emulator_cpu_s / run.total.wall * 100,
        "% of its core",
        note="the wall-clock figures are the sidecar's while this stays well below 100 %",
    )
    result.add("RETRY_LATER answers", run.retry_later, "pushes")
    result.add("bytes sent uncompressed", run.uncompressed_bytes / 1e6, "MB")
    result.add("bytes sent gzip", run.compressed_bytes / 1e6, "MB", note=f"{run.requests} requests")
    result.add(
        "peak RSS of the process",
        run.peak_rss_bytes / 2**20,
        "MiB",
        note="sidecar and the bench driver in one process",
    )


def report_check(result: Result, expected: Any, emu: Any) -> None:
    from bench.expected import compare

    comparison = compare(expected, emu)
    result.details["check"] = {
        "expected": comparison.expected,
        "delivered_rows": comparison.delivered_rows,
        "duplicates": comparison.duplicates,
        "missing": comparison.missing[:20],
        "altered": comparison.altered[:20],
        "unexpected": comparison.unexpected[:20],
    }
    result.add(
        "kept events lost",
        len(comparison.missing),
        "events",
        goal="0",
        note=f"of {comparison.expected} the policy keeps",
    )
    result.add("kept events altered", len(comparison.altered), "events", goal="0")
    result.add("rows not kept by the policy", len(comparison.unexpected), "rows", goal="0")
    result.add("duplicate rows (at-least-once)", comparison.duplicates, "rows")
    if not comparison.ok:
        raise SystemExit(f"correctness check failed: {result.details['check']}")


def report_sdk_upload(args: argparse.Namespace, result: Result, expected: Any, run: Any) -> None:
    import orjson

    rows = [orjson.loads(row) for row in expected.rows.values()]
    with work_dir(None) as work, emulator_process(args, work, full=False) as emu:
        emulator_before = process_cpu_seconds(emu.process.pid)
        sdk_run = sdk_baseline.upload_to(rows, emu)
        emulator_busy = (
            process_cpu_seconds(emu.process.pid) - emulator_before
        ) / sdk_run.clock.wall
        stored = emu.count()
    if stored != len(rows):
        raise SystemExit(f"SDK baseline: {stored} of {len(rows)} rows stored")
    result.add(
        "SDK upload() of the same kept rows",
        sdk_run.rows_per_s,
        "rows/s",
        note=f"{sdk_run.requests} requests, sync client, {cpu_note()}",
    )
    result.add("emulator busy during the SDK run", emulator_busy * 100, "% of its core")
    result.add("SDK upload() per client CPU second", sdk_run.rows_per_cpu_s, "rows/CPU-s")
    sidecar_rows = run.events_delivered / run.total.wall
    result.add(
        "sidecar / SDK (delivered rows per second)",
        sidecar_rows / sdk_run.rows_per_s,
        "x",
        goal=">= 5",
    )
    result.add("sidecar input events/s / SDK rows/s", run.events_per_s / sdk_run.rows_per_s, "x")
    sidecar_rows_per_cpu = run.events_delivered / run.total.cpu
    result.add(
        "sidecar / SDK (delivered rows per CPU second)",
        sidecar_rows_per_cpu / sdk_run.rows_per_cpu_s,
        "x",
        goal=">= 5",
        note="steadier than the wall clock on a shared machine",
    )


def latency_options(parser: argparse.ArgumentParser) -> None:
    pipeline_options(parser)
    parser.add_argument("--pace", type=float, default=5_000.0, help="input events/s")


@command("latency", "Push -> emulator receipt p50/p99 at a steady input rate", latency_options)
def run_latency(args: argparse.Namespace, result: Result) -> None:
    from bench import latency, pipeline

    paths, _ = built_corpus(args)
    chunk_file = paths.raw_chunks if args.shape == "raw" else paths.parsed_chunks
    chunk_ids = latency.audit_ids_per_chunk(corpus.read_chunks(chunk_file))
    with work_dir(args.work) as work, emulator_process(args, work, full=False) as emu:
        run = asyncio.run(
            pipeline.run_corpus(
                corpus.read_chunks(chunk_file),
                emu,
                work / "sidecar",
                pace=args.pace,
                properties=dict(args.property),
            )
        )
        received = latency.received_times(emu)
    measured = latency.push_to_receipt(run, chunk_ids, received)
    result.details["run"] = pipeline.summary(run)
    achieved = run.events_received / run.accept.wall
    result.add("input rate achieved", achieved, "events/s", note=f"asked {args.pace:,.0f}")
    result.add("Push -> receipt p50", measured.quantile(0.5), "s")
    result.add("Push -> receipt p99", measured.quantile(0.99), "s", goal="<= 2")
    result.add("Push -> receipt max", measured.quantile(1.0), "s")
    result.add("Push -> ACCEPTED p50", pipeline.quantile(run.push_latencies, 0.5), "s")
    result.add("Push -> ACCEPTED p99", pipeline.quantile(run.push_latencies, 0.99), "s")
    result.add(
        "kept events timed",
        len(measured.seconds),
        "events",
        note=f"{measured.unmatched} stored rows without a matching push",
    )
    result.add("CPU used by the sidecar", run.total.cpu / run.total.wall * 100, "% of one core")


def backlog_options(parser: argparse.ArgumentParser) -> None:
    pipeline_options(parser)
    parser.set_defaults(events=1_000_000)
    parser.add_argument("--spool-limit", default="8G", help="spool_limit of the pipeline")


@command("backlog", "peak RSS while a backlog spools (endpoint down) and drains", backlog_options)
def run_backlog(args: argparse.Namespace, result: Result) -> None:
    from bench import backlog

    paths, _ = built_corpus(args)
    chunk_file = paths.raw_chunks if args.shape == "raw" else paths.parsed_chunks
    with work_dir(args.work) as work:
        run = asyncio.run(
            backlog.run_backlog(
                corpus.read_chunks(chunk_file),
                work,
                args.emulator_cpu,
                args.spool_limit,
                dict(args.property),
            )
        )
    result.details["run"] = dataclasses.asdict(run)
    mib = 2**20
    result.add(
        "events pushed while the endpoint is down",
        run.events,
        "events",
        note=f"{run.kept} kept and spooled",
    )
    result.add("spool on disk at the end of the outage", run.spool_bytes / mib, "MiB")
    result.add("RSS after start (baseline)", run.baseline_rss / mib, "MiB")
    result.add("peak RSS while spooling the backlog", run.peak_rss_down / mib, "MiB", goal="<= 150")
    result.add("peak RSS while draining", run.peak_rss_drain / mib, "MiB", goal="<= 150")
    result.add("spooling rate (endpoint down)", run.events / run.down.wall, "events/s")
    result.add(
        "drain time after the endpoint is back",
        run.drain.wall,
        "s",
        note=f"{run.delivered} delivered; first row after {run.first_delivery_s:.1f} s "
        "(the retry backoff, capped at 60 s)",
    )
    drain_rate = run.delivered / max(run.drain.wall - run.first_delivery_s, 1e-9)
    result.add("drain rate once delivering", drain_rate, "rows/s")


@command("cost", "bytes on the wire with audit_policy.yaml vs every event raw", corpus_options)
def run_cost(args: argparse.Namespace, result: Result) -> None:
    from bench import cost
    from bench.expected import expected_rows

    paths, _ = built_corpus(args)
    expected = expected_rows(corpus.iter_lines(paths.jsonl), keep_all_rows=True)
    kept = list(expected.rows.values())
    measured = {
        "audit_policy.yaml, sidecar": cost.pipeline_bytes(kept),
        "every event, sidecar": cost.pipeline_bytes(expected.every_row),
        "audit_policy.yaml, SDK upload()": cost.sdk_bytes(kept),
        "every event, SDK upload()": cost.sdk_bytes(expected.every_row),
    }
    result.details["wire"] = {k: dataclasses.asdict(v) for k, v in measured.items()}
    per = 100_000 / expected.events
    for name, wire in measured.items():
        result.add(f"{name}: rows", wire.rows * per, "per 100k events")
        result.add(
            f"{name}: uncompressed (billed)", wire.uncompressed * per / 1e6, "MB per 100k events"
        )
        result.add(
            f"{name}: gzip on the wire",
            wire.compressed * per / 1e6,
            "MB per 100k events",
            note=f"ratio {wire.ratio:.1f}, {wire.requests} requests",
        )
    policy, everything = measured["audit_policy.yaml, sidecar"], measured["every event, sidecar"]
    result.add(
        "billed bytes saved by the policy",
        100 * (1 - policy.uncompressed / everything.uncompressed),
        "%",
    )
    result.add(
        "GB/day billed at 1,000 events/s with the policy",
        policy.uncompressed / expected.events * 1000 * 86400 / 1e9,
        "GB/day",
    )
    result.add(
        "GB/day billed at 1,000 events/s, every event",
        everything.uncompressed / expected.events * 1000 * 86400 / 1e9,
        "GB/day",
    )


def e2e_options(parser: argparse.ArgumentParser) -> None:
    pipeline_options(parser)
    parser.set_defaults(cpu=0)  # this process plays Fluent Bit, beside the emulator
    parser.add_argument(
        "--workers", type=int, default=1, help="flushes in flight at once (Fluent Bit `workers`)"
    )
    parser.add_argument(
        "--sidecar-cpu", type=cpu_or_none, default=1, help="CPU of the sidecar ('any': unpinned)"
    )


@command(
    "e2e", "out_auditrelay.so (Fluent Bit's Go proxy) -> auditrelay serve -> emulator", e2e_options
)
def run_e2e(args: argparse.Namespace, result: Result) -> None:
    from bench import e2e
    from bench.expected import expected_rows

    paths, _ = built_corpus(args)
    chunk_file = paths.raw_chunks if args.shape == "raw" else paths.parsed_chunks
    expected = expected_rows(corpus.iter_lines(paths.jsonl))
    # A short folder: a Unix socket path must stay under 108 bytes.
    with (
        tempfile.TemporaryDirectory(prefix="ar-bench-") as short,
        emulator_process(args, Path(short), full=args.check) as emu,
    ):
        run = e2e.run(
            corpus.read_chunks(chunk_file), emu, Path(short), len(expected.rows), args.sidecar_cpu,
            dict(args.property), workers=args.workers,
        )  # fmt: skip
        if args.check:
            report_check(result, expected, emu)
    result.details["run"] = {
        k: v for k, v in dataclasses.asdict(run).items() if k != "flush_seconds"
    }
    from bench.pipeline import quantile

    result.add(
        "end-to-end throughput (input events)",
        expected.events / run.clock.wall,
        "events/s",
        note=f"{args.shape} chunks, sidecar on CPU {args.sidecar_cpu}, {args.workers} worker(s)",
    )
    result.add("end-to-end input rate", run.chunk_bytes / 1e6 / run.clock.wall, "MB/s")
    result.add(
        "sidecar CPU per event",
        run.sidecar_cpu_s / expected.events * 1e6,
        "µs",
        note=f"{expected.events / run.sidecar_cpu_s:,.0f} events per sidecar CPU-s",
    )
    result.add("flush (FLBPluginFlushCtx) p50", quantile(run.flush_seconds, 0.5), "s")
    result.add("flush p99", quantile(run.flush_seconds, 0.99), "s")
    result.add("FLB_RETRY answers", run.retries, "flushes")
    result.add(
        "rows stored / expected", run.stored_rows, "rows", note=f"expected {run.expected_rows}"
    )
    result.add("sidecar peak RSS (VmHWM)", run.sidecar_peak_rss / 2**20, "MiB", goal="<= 150")
    result.add("emulator busy", run.emulator_cpu_s / run.clock.wall * 100, "% of its core")


def e2e_backlog_options(parser: argparse.ArgumentParser) -> None:
    e2e_options(parser)
    parser.set_defaults(events=1_000_000)


@command(
    "e2e-backlog",
    "peak RSS of auditrelay serve itself: a backlog flushed through the plugin while the "
    "endpoint is down, then drained",
    e2e_backlog_options,
)
def run_e2e_backlog(args: argparse.Namespace, result: Result) -> None:
    from bench import e2e
    from bench.expected import expected_rows

    paths, _ = built_corpus(args)
    chunk_file = paths.raw_chunks if args.shape == "raw" else paths.parsed_chunks
    kept = len(expected_rows(corpus.iter_lines(paths.jsonl)).rows)
    with tempfile.TemporaryDirectory(prefix="ar-bench-") as short:
        run = e2e.run_outage(
            corpus.read_chunks(chunk_file), Path(short), kept, args.sidecar_cpu,
            args.emulator_cpu, dict(args.property),
        )  # fmt: skip
    flushed = run.flushed
    result.details["run"] = {
        "rss_after_start": run.rss_after_start,
        "peak_rss_down": run.peak_rss_down,
        "peak_rss_drain": run.peak_rss_drain,
        "drain_s": run.drain_s,
        "chunks": flushed.chunks,
        "retries": flushed.retries,
        "expected_rows": kept,
        "stored_rows": flushed.stored_rows,
    }
    mib = 2**20
    result.add(
        "events flushed while the endpoint is down",
        args.events,
        "events",
        note=f"{flushed.chunks} chunks, {flushed.retries} FLB_RETRY",
    )
    result.add("serve RSS after start", run.rss_after_start / mib, "MiB")
    result.add(
        "serve peak RSS (VmHWM) after the outage", run.peak_rss_down / mib, "MiB", goal="<= 150"
    )
    result.add(
        "serve peak RSS (VmHWM) after draining", run.peak_rss_drain / mib, "MiB", goal="<= 150"
    )
    result.add("flush rate while down", args.events / flushed.clock.wall, "events/s")
    result.add("drain time", run.drain_s, "s", note=f"{flushed.stored_rows} of {kept} rows stored")


def executable(text: str) -> Path:
    """A path to an executable file (a Fluent Bit binary)."""
    path = Path(text)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise argparse.ArgumentTypeError(f"{text}: not an executable file")
    return path


def fluent_bit_options(parser: argparse.ArgumentParser) -> None:
    corpus_options(parser)
    parser.add_argument(
        "--fluent-bit", type=executable, action="append", required=True, metavar="PATH",
        help="a Fluent Bit binary (repeat for several versions); none is installed by the project",
    )  # fmt: skip
    parser.add_argument(
        "--sidecar-cpu", type=cpu_or_none, default=1, help="CPU of the sidecar ('any': unpinned)"
    )
    parser.add_argument(
        "--emulator-cpu", type=cpu_or_none, default=0, help="CPU of the emulator ('any': unpinned)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median is reported")


@command(
    "fluent-bit",
    "a real Fluent Bit: tail -> null, then tail -> auditrelay -> serve -> emulator",
    fluent_bit_options,
)
def run_fluent_bit(args: argparse.Namespace, result: Result) -> None:
    from auditrelay.devtools.flbproxy import build_plugin

    from bench import fluentbit
    from bench.expected import expected_rows

    paths, _ = built_corpus(args)
    expected = expected_rows(corpus.iter_lines(paths.jsonl))
    plugin = build_plugin()
    for binary in args.fluent_bit:
        name = fluentbit.version(binary)
        result.details.setdefault("fluent_bit", {})[str(binary)] = name
        nulls: list[fluentbit.FluentBitRun] = []
        relays: list[fluentbit.FluentBitRun] = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="ar-flb-") as short:
                work = Path(short)
                nulls.append(fluentbit.run_null(binary, paths.jsonl, expected.events, work, 900.0))
                with emulator_process(args, work, full=False) as emu:
                    relays.append(
                        fluentbit.run_auditrelay(
                            binary, paths.jsonl, (expected.events, len(expected.rows)), emu,
                            plugin, work, args.sidecar_cpu, 900.0,
                        )
                    )  # fmt: skip
        null, relay = fluentbit.median_run(nulls), fluentbit.median_run(relays)
        result.details.setdefault("runs", []).extend(
            dataclasses.asdict(run) | {"binary": str(binary)} for run in nulls + relays
        )
        result.add(f"{name}: tail -> null", null.events_per_second, "events/s",
                   note=f"Fluent Bit {null.fluent_bit_cpu_s:.1f} CPU-s, "
                   f"{null.fluent_bit_peak_rss / 2**20:.0f} MiB peak RSS")  # fmt: skip
        result.add(f"{name}: tail -> auditrelay", relay.events_per_second, "events/s",
                   note=f"Fluent Bit {relay.fluent_bit_cpu_s:.1f} CPU-s, "
                   f"{relay.fluent_bit_peak_rss / 2**20:.0f} MiB peak RSS")  # fmt: skip
        result.add(f"{name}: auditrelay / null", relay.events_per_second / null.events_per_second,
                   "x", goal=">= 0.9", note=f"median of {args.repeat}, same file, same run")  # fmt: skip
        result.add(f"{name}: sidecar CPU per event", relay.sidecar_cpu_s / relay.events * 1e6,
                   "µs", note=f"peak RSS {relay.sidecar_peak_rss / 2**20:.0f} MiB")  # fmt: skip
        result.add(f"{name}: emulator CPU", relay.emulator_cpu_s, "s")
        result.add(f"{name}: rows stored / kept", relay.stored_rows, "rows",
                   note=f"kept by the policy: {relay.expected_rows}")  # fmt: skip
        result.add(f"{name}: Fluent Bit [error] lines", relay.fluent_bit_errors, "lines",
                   note=f"{relay.storage_read_errors} of them '{fluentbit.STORAGE_READ_ERROR}'; "
                   f"tail -> null: {null.fluent_bit_errors}")  # fmt: skip


def suite_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=100_000, help="stages, cost, latency")
    parser.add_argument(
        "--throughput-events", type=int, default=300_000,
        help="pipeline and e2e (long enough that the last batch interval does not count)",
    )  # fmt: skip
    parser.add_argument("--backlog-events", type=int, default=1_000_000, help="backlog corpus")
    parser.add_argument("--skip", nargs="*", default=[], help="benchmarks to leave out")
    parser.add_argument(
        "--fluent-bit", type=executable, action="append", default=[], metavar="PATH",
        help="also run `fluent-bit` with these binaries (the suite skips it without one)",
    )  # fmt: skip


# (benchmark, corpus size: small | large | backlog, arguments, environment)
SUITE: tuple[tuple[str, str, list[str], dict[str, str]], ...] = (
    ("corpus", "small", [], {}),
    ("corpus", "large", [], {}),
    ("corpus", "backlog", [], {}),
    ("stages", "small", [], {}),
    ("cost", "small", [], {}),
    ("sdk", "small", ["--repeat", "3"], {}),
    ("pipeline", "large", ["--shape", "raw", "--sdk", "--repeat", "3"], {}),
    ("pipeline", "large", ["--shape", "parsed", "--repeat", "3"], {}),
    ("pipeline", "small", ["--shape", "raw", "--check"], {}),
    ("pipeline", "small", ["--shape", "raw", "--profile"], {}),
    ("pipeline", "small", ["--shape", "parsed", "--profile"], {}),
    ("latency", "small", ["--shape", "raw", "--pace", "5000"], {}),
    ("e2e", "large", ["--shape", "raw"], {}),
    ("e2e", "large", ["--shape", "parsed"], {}),
    ("e2e", "large", ["--shape", "raw"], {"MALLOC_ARENA_MAX": "1"}),
    ("backlog", "backlog", ["--shape", "raw"], {}),
    ("e2e-backlog", "backlog", ["--shape", "raw"], {}),
    ("e2e-backlog", "backlog", ["--shape", "raw"], {"MALLOC_ARENA_MAX": "1"}),
)


@command("all", "every benchmark, each in its own process, in one go", suite_options)
def run_all(args: argparse.Namespace, result: Result) -> None:
    sizes = {"small": args.events, "large": args.throughput_events, "backlog": args.backlog_events}
    for name, size, extra, environment in SUITE:
        if name in args.skip:
            continue
        argv = [sys.executable, "-m", "bench", "--results", str(args.results), name,
                "--events", str(sizes[size]), *extra]  # fmt: skip
        shown_env = " ".join(f"{k}={v}" for k, v in environment.items())
        print("$", shown_env, " ".join(argv[1:]), flush=True)
        completed = subprocess.run(argv, check=False, env={**os.environ, **environment})
        result.details.setdefault("runs", []).append(
            {"argv": argv[1:], "env": environment, "returncode": completed.returncode}
        )
        result.add(
            f"{shown_env} {name} {sizes[size]} {' '.join(extra)}".strip(),
            completed.returncode,
            "exit code",
        )
    if args.fluent_bit and "fluent-bit" not in args.skip:
        argv = [sys.executable, "-m", "bench", "--results", str(args.results), "fluent-bit",
                "--events", str(args.throughput_events)]  # fmt: skip
        for binary in args.fluent_bit:
            argv += ["--fluent-bit", str(binary)]
        print("$", " ".join(argv[1:]), flush=True)
        completed = subprocess.run(argv, check=False)
        result.add(f"fluent-bit {args.throughput_events}", completed.returncode, "exit code")


def report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="source", type=Path, default=RESULTS_DIR, help="folder of saved results"
    )
    parser.add_argument(
        "--sections", action="store_true",
        help="print every measured section of BENCHMARKS.md, not just the goals table",
    )  # fmt: skip


@command("report", "the goals table (markdown) from the latest saved results", report_options)
def run_report(args: argparse.Namespace, result: Result) -> None:
    from bench import report

    text = report.table(args.source)
    result.details["table"] = text
    if args.sections:
        for name, section in report.sections(args.source).items():
            print(f"<!-- {name} -->\n{section}\n")
    else:
        print(text)


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="auditrelay-bench-") as temporary:
        yield Path(temporary)


@contextlib.contextmanager
def emulator_process(
    args: argparse.Namespace, work: Path, full: bool, limits: str = "wire"
) -> Iterator[Any]:
    from bench.emulator import emulator

    name = "emulator-full" if full else "emulator"
    store = "full" if full else "ids"
    with emulator(work / name, cpu=args.emulator_cpu, store=store, limits=limits) as emu:
        yield emu


@contextlib.contextmanager
def profiling(enabled: bool, work: Path, result: Result, cpu: int | None = None) -> Iterator[None]:
    if not enabled:
        yield
        return
    from bench import profile

    output = work / "py-spy.txt"
    recorder = profile.record(os.getpid(), output, cpu=cpu)
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
    summary = profile.summarize(output)
    result.details["profile"] = {
        "samples": summary.samples,
        "stages": summary.stages(),
        "functions": summary.top_functions(25),
    }
    for name, share in summary.stages():
        result.add(f"profile: {name}", share * 100, "% of samples")
    for name, share in summary.top_functions(12):
        result.add(f"profile self: {name[:60]}", share * 100, "% of samples")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--results", type=Path, default=RESULTS_DIR, help="where the JSON results go"
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, _, options) in COMMANDS.items():
        options(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    args.results = args.results.resolve()
    _, function, _ = COMMANDS[args.benchmark]
    if getattr(args, "cpu", None) is not None and args.cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {args.cpu})
    with recording(args.benchmark, args.results) as result:
        function(args, result)
    return 0


def cpu_note() -> str:
    return f"pinned to CPU {sorted(os.sched_getaffinity(0))}"
