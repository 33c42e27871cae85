"""``python -m bench <benchmark>``: runs one benchmark, prints its figures with the command
that produced them, and saves them to ``bench/results/<benchmark>-<time>.json``.

Run from the repository root with ``PYTHONPATH=sidecar`` so that the package of this checkout
is measured. Pin with ``taskset -c 1`` where a benchmark says it measures one core.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import corpus, sdk_baseline, stages
from bench.results import RESULTS_DIR, Result, recording

Command = Callable[[argparse.Namespace, Result], None]
COMMANDS: dict[str, tuple[str, Command, Callable[[argparse.ArgumentParser], None]]] = {}


def command(
    name: str, help_text: str, options: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Command], Command]:
    def register(function: Command) -> Command:
        COMMANDS[name] = (help_text, function, options)
        return function

    return register


def corpus_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=100_000, help="events in the corpus")
    parser.add_argument("--seed", type=int, default=1, help="seed of the resampling")
    parser.add_argument(
        "--rate", type=float, default=corpus.DEFAULT_RATE, help="events/s of the timestamps"
    )
    parser.add_argument("--corpora", type=Path, default=corpus.CORPORA_DIR, help="output folder")
    parser.add_argument("--samples", type=Path, default=corpus.SAMPLES_DIR, help="real samples")
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


def sdk_options(parser: argparse.ArgumentParser) -> None:
    corpus_options(parser)
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


@command("stages", "floor cost per event of each step, both tail shapes", corpus_options)
def run_stages(args: argparse.Namespace, result: Result) -> None:
    paths, _ = built_corpus(args)
    raw_chunks = list(corpus.read_chunks(paths.raw_chunks))
    parsed_chunks = list(corpus.read_chunks(paths.parsed_chunks))
    for cost in stages.measure(raw_chunks, parsed_chunks):
        result.add(
            cost.name, cost.us_per_event, "µs/event", note=f"{cost.events_per_s:,.0f} ev/CPU-s"
        )
    for codec, ratio in stages.compression_ratios(raw_chunks).items():
        result.add(f"compression ratio {codec}", ratio, "x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--results", type=Path, default=RESULTS_DIR, help="where the JSON results go"
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, _, options) in COMMANDS.items():
        options(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    _, function, _ = COMMANDS[args.benchmark]
    with recording(args.benchmark, args.results) as result:
        function(args, result)
    return 0


def cpu_note() -> str:
    return f"pinned to CPU {sorted(os.sched_getaffinity(0))}"
