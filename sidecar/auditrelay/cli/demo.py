"""``auditrelay demo``: the whole path on one machine, with no Azure account.

It starts the sidecar (``auditrelay serve`` as a subprocess on a Unix socket, through
``auditrelay.devtools.sidecar``, the launcher the tests use; with no ``endpoint`` its pipeline
delivers to the bundled emulator), awaits it through grpc.health.v1, loads
``out_auditrelay.so`` and drives it the way Fluent Bit's Go proxy does
(``auditrelay.devtools.flbproxy``). It sends a real audit log as Fluent Bit's tail input
would (v2 events with EventTime, each line in ``log``, in chunks of at most 2 MiB; event times
moved forward so that the newest happened now, unless ``--recorded-times``), waits until
the sidecar's /metrics show every kept event delivered, stops everything, and prints what
arrived: events in, filtered out, delivered, bytes before and after the policy and on the wire,
and a few rows from the emulator's store. The state (spool, emulator store, sidecar log) stays
in ``--state-dir`` for ``auditrelay emulator rows --state-dir DIR/sidecar/emulator``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

from auditrelay.cli import EXIT_FINDING, EXIT_OK, add_output_option, print_json, read_audit_log
from auditrelay.config import parse_duration
from auditrelay.detections import BUNDLED_RULES, load_rules
from auditrelay.devtools.demo_times import as_if_now
from auditrelay.devtools.flbproxy import PLUGIN_PATH, GoProxy, InitError, Level, Result
from auditrelay.devtools.sidecar import SidecarError, SidecarProcess
from auditrelay.emulator import Store, StoredRow
from auditrelay.errors import ConfigError, PropertyProblem

DATA_DIR: Final = Path(__file__).resolve().parents[1] / "data"
BUNDLED_LOGS: Final = (
    DATA_DIR / "audit2rbac-demo.jsonl",
    DATA_DIR / "kube-audit-log-tool-single-event.jsonl",
    DATA_DIR / "controlplane-attacks.jsonl",  # so the demo shows alerts (data/SOURCES.md)
)
TAG: Final = "kube.audit"
CHUNK_BYTES: Final = 2 << 20  # Fluent Bit's chunks are about 2 MiB at most
MARKER: Final = ".auditrelay-demo"
FLUSH_ATTEMPTS: Final = 8
SETTLE_POLL_SECONDS: Final = 0.1
# The [OUTPUT] section the demo's plugin instance gets, as an operator would write it.
OUTPUT_SECTION: Final = {
    "sidecar_wait": "60s",
    "sidecar_timeout": "10s",
    "cluster_name": "demo",
    "cluster_id": "auditrelay-demo",
    "batch_interval": "200ms",
}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `demo`."""
    help_text = "send a real audit log through plugin, sidecar and emulator, and show what arrived"
    parser = subparsers.add_parser(
        "demo", help=help_text, description=help_text[0].upper() + help_text[1:]
    )
    parser.add_argument(
        "--audit-log",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="audit log files (JSON lines, plain or .gz); default: the bundled real logs",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".state/demo"),
        help="where the sidecar keeps spool, emulator store and log; emptied first "
        "(default: .state/demo)",
    )
    parser.add_argument(
        "--plugin",
        type=Path,
        default=Path(os.environ.get("AUDITRELAY_PLUGIN", str(PLUGIN_PATH))),
        help=f"out_auditrelay.so (env AUDITRELAY_PLUGIN; default: {PLUGIN_PATH})",
    )
    parser.add_argument(
        "--recorded-times",
        action="store_true",
        help="send the events with their recorded times (default: moved forward so that the "
        "newest happened now, as a live attack; the detections look back from the newest row)",
    )
    parser.add_argument("--rows", type=int, default=5, help="stored rows to show (default: 5)")
    parser.add_argument(
        "--timeout",
        type=parse_duration,
        default=120.0,
        help="how long delivery may take to settle (default: 120s)",
    )
    parser.add_argument("--summary-json", type=Path, help="also write the summary here as JSON")
    add_output_option(parser)
    parser.set_defaults(run=run)


# --- the audit log as Fluent Bit's tail input hands it to an output ---------------------------


@dataclass(frozen=True, slots=True)
class AuditLog:
    """The lines read from the operator's (or the bundled) audit log files."""

    files: tuple[Path, ...]
    lines: tuple[bytes, ...]

    @property
    def bytes(self) -> int:
        """Bytes of the lines, without their newlines."""
        return sum(len(line) for line in self.lines)


def read_audit_logs(paths: Sequence[Path]) -> AuditLog:
    """Every non-empty line of the files, in order; ``.gz`` files are decompressed."""
    lines: list[bytes] = []
    for path in paths:
        data = read_audit_log("--audit-log", path)
        lines += [line for line in data.splitlines() if line.strip()]
    return AuditLog(tuple(paths), tuple(lines))


def _str_header(size: int) -> bytes:
    if size < 32:
        return bytes([0xA0 | size])
    if size < 1 << 8:
        return b"\xd9" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xda" + size.to_bytes(2, "big")
    return b"\xdb" + size.to_bytes(4, "big")


def tail_record(line: bytes, at: float) -> bytes:
    """One event as Fluent Bit's tail input (no parser) stores it, in the v2 form:
    ``[[EventTime, {}], {"log": line}]``, the line as a msgpack str of its exact bytes."""
    seconds = int(at)
    nanoseconds = int((at - seconds) * 1e9)
    event_time = b"\xd7\x00" + seconds.to_bytes(4, "big") + nanoseconds.to_bytes(4, "big")
    return b"\x92\x92" + event_time + b"\x80\x81\xa3log" + _str_header(len(line)) + line


def fluent_bit_chunks(lines: Sequence[bytes], limit: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The lines as Fluent Bit chunks: concatenated events, each chunk at most ``limit`` bytes
    (a single larger event makes a chunk of its own)."""
    chunk = bytearray()
    for line in lines:
        event = tail_record(line, time.time())
        if chunk and len(chunk) + len(event) > limit:
            yield bytes(chunk)
            chunk.clear()
        chunk += event
    if chunk:
        yield bytes(chunk)


class DemoError(RuntimeError):
    """A part of the demo did not do what it should."""


# --- what the sidecar reports ------------------------------------------------------------------


def read_metrics(url: str) -> dict[str, float]:
    """Every sample of the sidecar's /metrics, summed over labels, by sample name."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our loopback URL
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def settled(metrics: dict[str, float], events_sent: int) -> bool:
    """Every event sent was received, and every kept one delivered or set aside."""

    def value(name: str) -> float:
        return metrics.get(f"auditrelay_{name}", 0.0)

    received = value("events_received_total") + value("events_invalid_total")
    done = value("events_delivered_total") + value("events_dead_lettered_total")
    return (
        received >= events_sent
        and done >= value("events_spooled_total")
        and value("spool_pending_bytes") == 0
    )


def wait_until_settled(sidecar: SidecarProcess, events_sent: int, within: float) -> None:
    """Polls /metrics until delivery has settled; DemoError after ``within`` seconds."""
    url = sidecar.metrics_url()
    deadline = time.monotonic() + within
    while not settled(read_metrics(url), events_sent):
        if time.monotonic() > deadline:
            raise DemoError(f"delivery did not settle within {within:g}s:\n{sidecar.log_text()}")
        if not sidecar.alive():
            raise DemoError(f"the sidecar exited:\n{sidecar.log_text()}")
        time.sleep(SETTLE_POLL_SECONDS)


# --- the run -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Summary:
    """What the demo sent and what arrived."""

    audit_log_files: list[str]
    audit_log_lines: int
    audit_log_bytes: int
    chunks_flushed: int
    flush_retries: int
    chunk_bytes_in: int
    events_in: int
    events_not_audit: int
    events_filtered: int
    events_kept: int
    events_delivered: int
    events_dead_lettered: int
    row_bytes_after_policy: int
    wire_bytes: int
    requests: int
    stored_rows: int
    stored_audit_ids: int
    state_dir: str
    emulator_store: str

    @property
    def bytes_saved(self) -> int:
        """Audit log bytes that never went on the wire."""
        return self.audit_log_bytes - self.wire_bytes


def prepare_state_dir(state_dir: Path) -> Path:
    """An empty demo directory: created, or emptied when a previous demo made it."""
    state_dir = state_dir.resolve()
    if state_dir.exists() and any(state_dir.iterdir()):
        if not (state_dir / MARKER).is_file():
            raise ConfigError(
                [PropertyProblem("--state-dir", str(state_dir), "an empty or a demo directory")]
            )
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / MARKER).write_text("made by auditrelay demo; emptied by the next run\n")
    return state_dir


def flush_all(proxy: GoProxy, section: dict[str, str], chunks: Sequence[bytes]) -> int:
    """Flushes every chunk through the plugin, retrying as Fluent Bit's scheduler would;
    returns the number of retries."""
    proxy.register()
    try:
        instance = proxy.init(section, log_level=Level.INFO)
    except InitError as error:
        proxy.unregister()
        raise DemoError(f"{error}: {[line.text for line in error.log]}") from error
    retries = 0
    try:
        for chunk in chunks:
            for attempt in range(1, FLUSH_ATTEMPTS + 1):
                result = proxy.flush(instance, chunk, TAG)
                if result is Result.OK:
                    break
                if result is Result.ERROR or attempt == FLUSH_ATTEMPTS:
                    raise DemoError(f"the plugin answered {result.name}: {proxy.lines()}")
                retries += 1
                time.sleep(min(8.0, 0.5 * 2**attempt))  # Fluent Bit's retry back-off
    finally:
        proxy.shutdown()
    return retries


def run_demo(
    audit_log: AuditLog, state_dir: Path, plugin: Path, timeout: float
) -> tuple[Summary, list[StoredRow]]:
    """Runs the whole path and returns the summary and the stored rows."""
    if not plugin.is_file():
        raise ConfigError(
            [PropertyProblem("--plugin", str(plugin), "the built plugin: run `make plugin`")]
        )
    state_dir = prepare_state_dir(state_dir)
    chunks = list(fluent_bit_chunks(audit_log.lines))
    # A Unix socket path must stay under 108 bytes: the socket lives in a short temp directory.
    with tempfile.TemporaryDirectory(prefix="auditrelay-demo-") as socket_dir:
        sidecar = SidecarProcess.on_socket(Path(socket_dir) / "relay.sock", state_dir / "sidecar")
        try:
            sidecar.start()
            section = {"sidecar_address": sidecar.address, **OUTPUT_SECTION}
            retries = flush_all(GoProxy(plugin), section, chunks)
            wait_until_settled(sidecar, len(audit_log.lines), timeout)
            metrics = read_metrics(sidecar.metrics_url())
        finally:
            code = sidecar.stop()
        if code != 0:
            raise DemoError(f"the sidecar exited with {code}:\n{sidecar.log_text()}")
    store = Store.in_directory(state_dir / "sidecar" / "emulator")
    return _summary(audit_log, chunks, retries, metrics, store, state_dir), store.rows()


def _summary(
    audit_log: AuditLog,
    chunks: Sequence[bytes],
    retries: int,
    metrics: dict[str, float],
    store: Store,
    state_dir: Path,
) -> Summary:
    def count(name: str) -> int:
        return int(metrics.get(f"auditrelay_{name}", 0.0))

    return Summary(
        audit_log_files=[str(path) for path in audit_log.files],
        audit_log_lines=len(audit_log.lines),
        audit_log_bytes=audit_log.bytes,
        chunks_flushed=len(chunks),
        flush_retries=retries,
        chunk_bytes_in=count("received_bytes_total"),
        events_in=count("events_received_total"),
        events_not_audit=count("events_invalid_total"),
        events_filtered=count("events_filtered_total"),
        events_kept=count("events_spooled_total"),
        events_delivered=count("events_delivered_total"),
        events_dead_lettered=count("events_dead_lettered_total"),
        row_bytes_after_policy=count("uncompressed_bytes_total"),
        wire_bytes=count("sent_bytes_total"),
        requests=count("requests_total"),
        stored_rows=store.count(),
        stored_audit_ids=len(store.audit_id_counts()),
        state_dir=str(state_dir),
        emulator_store=str(store.path),
    )


# --- the report --------------------------------------------------------------------------------


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "-"


def report(summary: Summary, rows: Sequence[StoredRow], shown: int) -> str:
    """The summary as the operator reads it."""
    s = summary
    files = ", ".join(Path(name).name for name in s.audit_log_files)
    lines = [
        f"auditrelay demo: {s.audit_log_lines} audit log lines ({files})",
        f"  -> out_auditrelay.so: {s.chunks_flushed} Fluent Bit chunk(s), "
        f"{s.chunk_bytes_in:,} bytes, {s.flush_retries} retries",
        "  -> sidecar (audit policy, spool, gzip) -> bundled Logs Ingestion emulator over HTTPS",
        "",
        f"  events in               {s.events_in:>10,}",
        f"  not audit events        {s.events_not_audit:>10,}   (set aside in dead letters)",
        f"  filtered out by policy  {s.events_filtered:>10,}   "
        f"({_percent(s.events_filtered, s.events_in)} of events in)",
        f"  kept                    {s.events_kept:>10,}",
        f"  delivered               {s.events_delivered:>10,}   "
        f"({s.stored_rows} rows, {s.stored_audit_ids} auditIDs in the store; "
        f"{s.requests} request(s))",
        "",
        f"  bytes before the policy {s.audit_log_bytes:>10,}   (the audit log's JSON)",
        f"  bytes after the policy  {s.row_bytes_after_policy:>10,}   (rows sent, before gzip)",
        f"  bytes on the wire       {s.wire_bytes:>10,}   (gzip)",
        f"  bytes saved             {s.bytes_saved:>10,}   "
        f"({_percent(s.bytes_saved, s.audit_log_bytes)})",
        "",
        f"  {min(shown, len(rows))} of {len(rows)} stored rows:",
    ]
    lines += [f"    {_row_line(row)}" for row in varied_rows(rows, shown)]
    lines += [
        "",
        f"  emulator store: {s.emulator_store}",
        f"  all rows:       auditrelay emulator rows --state-dir {Path(s.emulator_store).parent}"
        f" --limit {len(rows)}",
    ]
    return "\n".join(lines)


def varied_rows(rows: Sequence[StoredRow], count: int) -> list[StoredRow]:
    """Up to ``count`` rows, one per kind of request (verb, target, answer) first."""
    seen: set[str] = set()
    first_of_kind: list[StoredRow] = []
    others: list[StoredRow] = []
    for row in rows:
        kind = _row_line(row).split("  ", 1)[1]
        (others if kind in seen else first_of_kind).append(row)
        seen.add(kind)
    return (first_of_kind + others)[:count]


def _row_line(row: StoredRow) -> str:
    fields = row.row or {}
    user = fields.get("user") or {}
    acting_as = (fields.get("impersonatedUser") or {}).get("username")
    who = str(user.get("username", "?")) + (f" as {acting_as}" if acting_as else "")
    target = fields.get("objectRef") or {}
    what = "/".join(
        str(part)
        for part in (target.get("namespace"), target.get("resource"), target.get("name"))
        if part
    )
    code = (fields.get("responseStatus") or {}).get("code", "")
    when = fields.get("stageTimestamp") or fields.get("timestamp") or fields.get("TimeGenerated")
    return (
        f"{when}  {fields.get('verb', '')} {what or fields.get('requestURI', '')}  by {who}"
        f"  -> {code}  [{fields.get('level', '')}, cluster {fields.get('Cluster_Name', '')}]"
    )


def detections_report(rows: Sequence[StoredRow], store_dir: Path) -> tuple[str, int]:
    """The bundled detection rules run over the stored rows: the alerts, as the operator reads
    them, and how many there are."""
    try:
        from auditrelay.detect import add_rows, new_table, run_rules
    except ImportError:
        return "  detections: not run (pip install 'auditrelay[detect]' for the KQL engine)", 0
    rules = load_rules(BUNDLED_RULES)
    table = new_table()
    add_rows(table, (row.row for row in rows if row.row is not None))
    alerts = [alert for found in run_rules(table, rules).values() for alert in found]
    fired = len({alert.rule.slug for alert in alerts})
    lines = [
        f"  detections:     {len(alerts)} alert(s) from {fired} of {len(rules)} rules (docs/detections.md)"
    ]
    for alert in alerts:
        ids = alert.audit_ids
        lines.append(f"    {alert.rule.severity:<13} {alert.rule.slug}: {alert.entities_text()}")
        lines.append(f"    {'':13} evidence: {len(ids)} auditID(s), {', '.join(ids[:2])}")
    lines.append(f"  alerts again:   auditrelay detect --emulator-state-dir {store_dir}")
    return "\n".join(lines), len(alerts)


def run(args: argparse.Namespace) -> int:
    """Runs the demo and prints what arrived; 1 when a kept event did not arrive."""
    audit_log = read_audit_logs(args.audit_log or BUNDLED_LOGS)
    if not args.recorded_times:
        audit_log = replace(audit_log, lines=as_if_now(audit_log.lines, datetime.now(UTC)))
    try:
        summary, rows = run_demo(audit_log, args.state_dir, args.plugin, args.timeout)
    except (DemoError, SidecarError) as error:
        print(f"auditrelay demo: {error}", file=sys.stderr)
        return EXIT_FINDING
    alerts_text, alerts = detections_report(rows, Path(summary.emulator_store).parent)
    document = asdict(summary) | {"bytes_saved": summary.bytes_saved, "alerts": alerts}
    if args.output == "json":
        print_json(document)
    else:
        print(report(summary, rows, args.rows))
        print()
        print(alerts_text)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(document, indent=2) + "\n")
    delivered_all = summary.events_delivered + summary.events_dead_lettered >= summary.events_kept
    return EXIT_OK if delivered_all else EXIT_FINDING
