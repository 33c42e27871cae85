"""The chaos soak: the real control plane's audit mix through the plugin, the sidecar and the
emulator while the sidecar is killed and the endpoint fails in every way it can (see chaos.py).

    python3 tests/soak/run.py --events 1000000          # make soak SOAK_EVENTS=1000000

Fluent Bit's side is ``out_auditrelay.so`` driven through ``auditrelay.devtools.flbproxy`` with ``workers``
flush threads and Fluent Bit's retries (engine.py); the sidecar is ``auditrelay serve`` in its own
process with its state directory on a small tmpfs; the emulator runs in this process. When the
input is done, the faults stop and everything must arrive within ``--drain-seconds``.

It then checks what a user relies on, and exits 1 when one does not hold: every auditID the policy
keeps is in the emulator's store at least once; duplicates are at most 1 % of them; nothing the
policy drops is stored, nor anything that was never sent; no chunk was answered FLB_ERROR; every
fault kind was injected; the sidecar's RSS stayed under 150 MB; the run ended within its bound.
The figures are printed (``--output json`` for one JSON object). Exit code 2: bad arguments or
missing inputs (the plugin cannot be built, no corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO_ROOT / "sidecar"), str(REPO_ROOT / "tests"), str(REPO_ROOT)]

from auditrelay.devtools.flbproxy import FLUENT_BIT_5_1_1, GoProxy, Level, build_plugin  # noqa: E402
from controlplane.build import BuildError  # noqa: E402
from harness.sidecar import Sidecar  # noqa: E402

from soak.chaos import FAULT_KINDS, Chaos, EmulatorHost, SidecarKeeper  # noqa: E402
from soak.engine import Engine  # noqa: E402
from soak.events import EventSource, controlplane_corpus, load_templates  # noqa: E402

MAX_RSS_BYTES: Final = 150 * 1024 * 1024
MAX_DUPLICATE_SHARE: Final = 0.01
MAX_RATE: Final = 3000.0
LAST_LOG: Final = REPO_ROOT / "tests" / "soak" / ".cache" / "last-sidecar.log"
TENANT: Final = "72f988bf-0000-0000-0000-00000000abcd"
CLIENT: Final = "0a1b2c3d-0000-0000-0000-00000000abcd"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The chaos soak.")
    add = parser.add_argument
    add("--events", type=int, default=1_000_000, help="events to send")
    add("--seed", type=int, default=1)
    add("--corpus", type=Path, help="corpus.jsonl of a control-plane corpus (default: built once)")
    add("--workers", type=int, default=2, help="Fluent Bit workers (flush threads)")
    add("--kill-every", type=float, default=10.0, help="seconds between SIGKILLs of the sidecar")
    add("--fault-seconds", type=float, default=8.0, help="how long each fault lasts")
    add("--outage-seconds", type=float, default=60.0, help="how long the endpoint refuses")
    add("--drain-seconds", type=float, default=300.0, help="bound on the drain after the input")
    add("--max-seconds", type=float, default=3600.0, help="bound on the whole run")
    add("--rate", type=float, default=0.0, help="events/s (default: one fault cycle or more)")
    add("--disk-size", default="64m", help="size of the sidecar's state tmpfs")
    add("--spool-limit", default="16M", help="the pipeline's spool_limit")
    add(
        "--max-request-raw-bytes",
        default="64K",
        help="the pipeline's max_request_raw_bytes: what one lost answer duplicates at most",
    )
    add(
        "--max-duplicate-share",
        type=float,
        default=MAX_DUPLICATE_SHARE,
        help="duplicates allowed, a share of the kept events (each kill may duplicate what is in "
        "flight, so a short run with as many kills needs more room)",
    )
    add("--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    if args.events < 1 or args.workers < 2:
        parser.error("--events must be at least 1 and --workers at least 2 (workers > 1)")
    return args


@contextlib.contextmanager
def _tmpfs(parent: Path, size: str) -> Iterator[Path]:
    mount_point = parent / "state"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        raise SystemExit(f"soak: cannot mount the state tmpfs (needs root): {mounted.stderr!r}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _section(sidecar: Sidecar, emulators: EmulatorHost, args: argparse.Namespace) -> dict[str, str]:
    emulator = emulators.emulator
    return {
        "sidecar_address": sidecar.address,
        "sidecar_wait": "60s",
        "sidecar_timeout": "5s",
        "endpoint": emulator.endpoint,
        "endpoint_ca": str(emulator.ca_file),
        "dcr_id": emulator.dcr_id,
        "auth": "client_secret",
        "authority_host": emulator.authority_host,
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": "emulator-accepts-any-secret",
        "cluster_name": "soak",
        "batch_interval": "100ms",
        "request_timeout": "10s",
        "spool_limit": args.spool_limit,
        # A request whose answer a kill cuts off is sent again (at-least-once: the service has
        # no idempotency key), so each kill may duplicate what is in flight. A kill every ~10 s
        # is far more than a real sidecar sees; small bodies keep that cost under 1 %.
        "max_request_raw_bytes": args.max_request_raw_bytes,
    }


def _rate_for(args: argparse.Namespace) -> float:
    """An input rate at which every fault kind runs at least once, and at most 3,000 events/s."""
    cycle = Chaos.cycle_seconds(args.fault_seconds, args.outage_seconds)
    return min(MAX_RATE, float(args.events) / cycle)


def _sample_rss(keeper: SidecarKeeper, chaos: Chaos, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        keeper.sample_rss(chaos.phase())


def _wait_for_delivery(emulators: EmulatorHost, kept: set[str], until: float) -> dict[str, int]:
    """The store's counts once every kept auditID is in it, or at ``until``."""
    while True:
        counts = emulators.audit_id_counts()
        if kept <= counts.keys() or time.monotonic() > until:
            return counts
        time.sleep(2.0)


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    plugin = build_plugin()
    jsonl = args.corpus or controlplane_corpus(seed=args.seed)
    templates = load_templates(jsonl, args.seed)
    source = EventSource(templates, args.events, args.seed)
    started = time.monotonic()
    bound = started + args.max_seconds
    emulators = EmulatorHost(workdir / "emulator")
    emulators.start()
    with _tmpfs(workdir, args.disk_size) as disk:
        sidecar = Sidecar.on_socket(workdir / "relay.sock", disk, ["--log-level", "info"])
        sidecar.log_path = workdir / "sidecar.log"
        sidecar.start()
        keeper = SidecarKeeper(sidecar)
        proxy = GoProxy(plugin, FLUENT_BIT_5_1_1)
        proxy.register()
        instance = proxy.init(_section(sidecar, emulators, args), log_level=Level.WARN)
        engine = Engine(
            proxy,
            instance,
            source.chunks(),
            workers=args.workers,
            max_chunks_up=64,
            rate=args.rate or _rate_for(args),
            seed=args.seed,
        )
        chaos = Chaos(
            engine,
            emulators,
            keeper,
            disk,
            kill_every=args.kill_every,
            fault_seconds=args.fault_seconds,
            outage_seconds=args.outage_seconds,
            seed=args.seed,
        )
        sampling = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(keeper, chaos, sampling), daemon=True)
        sampler.start()
        engine.start()
        chaos.start()
        while not engine.input_done and time.monotonic() < bound and chaos.failure is None:
            time.sleep(0.5)
        input_seconds = time.monotonic() - started
        chaos.stop()
        drain_until = min(bound, time.monotonic() + args.drain_seconds)
        flushed = engine.join(max(0.0, drain_until - time.monotonic()))
        counts = _wait_for_delivery(emulators, source.expected.kept, drain_until)
        sampling.set()
        sampler.join()
        elapsed = time.monotonic() - started
        with contextlib.suppress(Exception):
            sidecar.stop()
        LAST_LOG.parent.mkdir(parents=True, exist_ok=True)
        LAST_LOG.write_text(sidecar.log_text())
        if engine.finished:
            proxy.shutdown()
    emulators.stop()
    return _figures(
        args, source.expected, counts, engine, chaos, keeper, flushed, elapsed, input_seconds
    )


def _figures(
    args: argparse.Namespace,
    expected: Any,
    counts: dict[str, int],
    engine: Engine,
    chaos: Chaos,
    keeper: SidecarKeeper,
    flushed: bool,
    elapsed: float,
    input_seconds: float,
) -> dict[str, Any]:
    kept: set[str] = expected.kept
    stored = counts.keys()
    missing = kept - stored
    duplicates = sum(counts[audit_id] - 1 for audit_id in kept & stored)
    # A chunk whose answer was lost (the sidecar killed after its append) comes back from
    # Fluent Bit whole: its events are spooled twice. Everything else is the delivery's doing.
    retried = engine.stats.retried_kept_ids
    resent = sum(counts[audit_id] - 1 for audit_id in retried & stored)
    dropped_stored = expected.dropped & stored
    unknown_stored = stored - kept - expected.dropped
    figures = {
        "events": expected.events,
        "kept": len(kept),
        "dropped_by_policy": len(expected.dropped),
        "stored_distinct": len(stored),
        "missing": len(missing),
        "duplicates": duplicates,
        "duplicate_share": round(duplicates / max(1, len(kept)), 5),
        "duplicates_of_chunks_sent_again": resent,
        "duplicates_of_deliveries": duplicates - resent,
        "chunks_sent_again_stored_once": keeper.chunks_stored_once(),
        "dropped_but_stored": len(dropped_stored),
        "stored_never_sent": len(unknown_stored),
        "flushes": engine.stats.flushes,
        "flb_retries": engine.stats.retries,
        "flb_errors": len(engine.stats.errors),
        "most_retries_of_one_chunk": engine.stats.most_retries_of_one_chunk,
        "faults_injected": dict(sorted(chaos.faults.items())),
        "faults_observed": dict(sorted(chaos.observed.items())),
        "sidecar_kills": dict(sorted(chaos.kills.items())),
        "max_rss_mib": round(keeper.max_rss_bytes / 1048576, 1),
        "max_rss_during": keeper.max_rss_during,
        "input_seconds": round(input_seconds, 1),
        "seconds": round(elapsed, 1),
        "command": "python3 tests/soak/run.py " + " ".join(_argv_of(args)),
    }
    problems = []
    if chaos.failure is not None:
        problems.append(f"the chaos failed: {chaos.failure!r}")
    if missing:
        problems.append(f"{len(missing)} kept auditIDs never arrived, e.g. {sorted(missing)[:3]}")
    if duplicates > args.max_duplicate_share * len(kept):
        problems.append(
            f"duplicates {duplicates} are more than {args.max_duplicate_share:.0%} of "
            f"{len(kept)} kept events"
        )
    if dropped_stored or unknown_stored:
        problems.append(f"stored what the policy drops ({len(dropped_stored)}) or never sent")
    if engine.stats.errors:
        problems.append(
            f"{len(engine.stats.errors)} chunks answered FLB_ERROR (Fluent Bit drops them)"
        )
    not_injected = set(FAULT_KINDS) - chaos.faults.keys()
    if not_injected or not chaos.kills:
        problems.append(f"faults never injected (the input was too short): {sorted(not_injected)}")
    not_seen = {"spool_limit_reached", "state_disk_full"} - chaos.observed.keys()
    if not_seen:
        problems.append(f"faults injected without the effect they are for: {sorted(not_seen)}")
    if keeper.max_rss_bytes >= MAX_RSS_BYTES:
        problems.append(f"the sidecar's RSS reached {figures['max_rss_mib']} MiB (limit 150 MB)")
    if not flushed or elapsed > args.max_seconds:
        problems.append(f"the run did not end within its bound ({args.max_seconds:.0f} s)")
    figures["problems"] = problems
    return figures


def _argv_of(args: argparse.Namespace) -> list[str]:
    shown = [f"--events {args.events}", f"--seed {args.seed}", f"--workers {args.workers}"]
    shown += [f"--kill-every {args.kill_every:g}", f"--fault-seconds {args.fault_seconds:g}"]
    shown += [f"--outage-seconds {args.outage_seconds:g}", f"--spool-limit {args.spool_limit}"]
    shown += [f"--max-request-raw-bytes {args.max_request_raw_bytes}"]
    shown += [f"--max-duplicate-share {args.max_duplicate_share:g}"]
    return shown


def _print(figures: dict[str, Any], output: str) -> None:
    if output == "json":
        print(json.dumps(figures, indent=2))
        return
    for key, value in figures.items():
        if key != "problems":
            print(f"  {key:28} {value}")
    for problem in figures["problems"]:
        print(f"  FAILED: {problem}")
    print("soak: " + ("FAILED" if figures["problems"] else "passed"))


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.corpus is not None and not args.corpus.is_file():
        print(f"soak: --corpus {args.corpus}: no such file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ar-soak-") as directory:
        try:
            figures = soak(args, Path(directory))
        except BuildError as error:  # no control plane to build the corpus with
            print(f"soak: cannot build the control-plane corpus: {error}", file=sys.stderr)
            return 2
    _print(figures, args.output)
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
