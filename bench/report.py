"""The goals table of BENCHMARKS.md from the latest saved results."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.results import RESULTS_DIR


def latest(directory: Path, benchmark: str, *words: str) -> dict[str, Any] | None:
    """The newest result of ``benchmark`` whose command has every one of ``words``."""
    found = None
    for path in sorted(directory.glob(f"{benchmark}-2*.json")):  # not e2e-backlog for e2e
        result = json.loads(path.read_text())
        command = result["command"].split()
        if all(word in command for word in words) and not _excluded(command, words):
            found = result
    return found


def _excluded(command: list[str], words: Iterable[str]) -> bool:
    """A plain run must not be one with checking, profiling or malloc tuning on."""
    extras = {"--check", "--profile", "--sdk", "--property", "--limits"} - set(words)
    tuned = any(word.startswith("MALLOC_") for word in command) and not any(
        word.startswith("MALLOC_") for word in words
    )
    return bool(extras & set(command)) or tuned


def figure(result: dict[str, Any] | None, name: str) -> float | None:
    if result is None:
        return None
    for item in result["figures"]:
        if item["name"] == name:
            return float(item["value"])
    return None


def shown(value: float | None, unit: str, digits: int = 0) -> str:
    if value is None:
        return "not measured"
    return f"{value:,.{digits}f} {unit}".strip()


def table(directory: Path = RESULTS_DIR) -> str:
    """Markdown: goal, measured, verdict, command."""
    throughput = latest(directory, "pipeline", "raw", "--sdk")
    parsed = latest(directory, "pipeline", "parsed")
    check = latest(directory, "pipeline", "raw", "--check")
    latency = latest(directory, "latency", "raw")
    backlog = latest(directory, "backlog", "raw")
    e2e = latest(directory, "e2e", "raw")
    events_s = figure(throughput, "sidecar throughput (input events)")
    per_cpu = figure(throughput, "sidecar throughput per CPU second")
    mb_s = figure(throughput, "sidecar input rate")
    ratio = figure(throughput, "sidecar / SDK (delivered rows per second)")
    cpu_ratio = figure(throughput, "sidecar / SDK (delivered rows per CPU second)")
    p99 = figure(latency, "Push -> receipt p99")
    rss_down = figure(backlog, "peak RSS while spooling the backlog")
    rss_drain = figure(backlog, "peak RSS while draining")
    rss_e2e = figure(e2e, "sidecar peak RSS (VmHWM)")
    serve_backlog = latest(directory, "e2e-backlog", "raw")
    e2e_events = _events_of(e2e)
    serve_down = figure(serve_backlog, "serve peak RSS (VmHWM) after the outage")
    serve_drain = figure(serve_backlog, "serve peak RSS (VmHWM) after draining")
    arena = latest(directory, "e2e-backlog", "raw", "MALLOC_ARENA_MAX=1")
    arena_down = figure(arena, "serve peak RSS (VmHWM) after the outage")
    arena_drain = figure(arena, "serve peak RSS (VmHWM) after draining")
    lost = figure(check, "kept events lost")
    altered = figure(check, "kept events altered")
    rows = [
        (
            "≥ 100,000 events/s on one core (decode, filter, spool, batch, gzip, deliver)",
            f"{shown(events_s, 'events/s')} ({shown(mb_s, 'MB/s', 1)} of chunks; "
            f"{shown(per_cpu, 'events per CPU-s')}); json-parsed chunks: "
            f"{shown(figure(parsed, 'sidecar throughput (input events)'), 'events/s')}",
            _verdict(events_s is not None and events_s >= 100_000),
            throughput,
        ),
        (
            "peak RSS ≤ 150 MB whatever the backlog",
            f"`auditrelay serve`, 1M-event backlog through the plugin: "
            f"{shown(serve_down, 'MiB')} after the outage, {shown(serve_drain, 'MiB')} after "
            f"draining; in-process pipeline: {shown(rss_down, 'MiB')} / "
            f"{shown(rss_drain, 'MiB')}; serve, {e2e_events} events, no backlog: "
            f"{shown(rss_e2e, 'MiB')}. With `MALLOC_ARENA_MAX=1`: serve "
            f"{shown(arena_down, 'MiB')} / {shown(arena_drain, 'MiB')}",
            _verdict(
                all(
                    v is not None and v <= 150
                    for v in (serve_down, serve_drain, rss_down, rss_drain, rss_e2e)
                )
            )
            + (
                " (yes with `MALLOC_ARENA_MAX=1`)"
                if arena_down is not None
                and arena_drain is not None
                and max(arena_down, arena_drain) <= 150
                else ""
            ),
            serve_backlog or backlog,
        ),
        (
            "p99 Push → delivered ≤ 2 s at 5,000 events/s",
            f"p50 {shown(figure(latency, 'Push -> receipt p50'), 's', 2)}, "
            f"p99 {shown(p99, 's', 2)}",
            _verdict(p99 is not None and p99 <= 2),
            latency,
        ),
        (
            "≥ 5x the SDK's `upload()` on the same rows, same run",
            f"{shown(ratio, 'x', 2)} per wall-clock second, {shown(cpu_ratio, 'x', 2)} per CPU "
            "second (SDK: "
            f"{shown(figure(throughput, 'SDK upload() of the same kept rows'), 'rows/s')})",
            _verdict(ratio is not None and ratio >= 5),
            throughput,
        ),
        (
            "no kept event lost or altered",
            f"{shown(lost, 'lost')}, {shown(altered, 'altered')} of "
            f"{shown(figure(check, 'events in / kept / delivered'), 'events')} in",
            _verdict(lost == 0 and altered == 0),
            check,
        ),
    ]
    lines = ["| goal | measured | met | command |", "| --- | --- | --- | --- |"]
    for goal, measured, verdict, result in rows:
        command = f"`{_short(result['command'])}`" if result else ""
        lines.append(f"| {goal} | {measured} | {verdict} | {command} |")
    return "\n".join(lines)


def _events_of(result: dict[str, Any] | None) -> str:
    if result is None:
        return "?"
    words = result["command"].split()
    return f"{int(words[words.index('--events') + 1]):,}" if "--events" in words else "?"


def _verdict(met: bool) -> str:
    return "yes" if met else "**no**"


def _short(command: str) -> str:
    words = command.split()
    if "--results" in words:
        at = words.index("--results")
        del words[at : at + 2]
    return " ".join(words)


def _figures_table(result: dict[str, Any] | None, names: Iterable[str] | None = None) -> str:
    """A result's figures (all, or the named ones) as a markdown table, with its command."""
    if result is None:
        return "_not measured_"
    wanted = list(names) if names is not None else None
    lines = ["| figure | value |", "| --- | --- |"]
    for item in result["figures"]:
        if wanted is not None and item["name"] not in wanted:
            continue
        value = item["value"]
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"
        note = f" ({item['note']})" if item.get("note") else ""
        lines.append(f"| {item['name']} | {text} {item['unit']}{note} |")
    machine = result.get("machine", {})
    lines.append("")
    lines.append(
        f"`{_short(result['command'])}` — {result.get('started', '')}, load average before "
        f"{machine.get('loadavg_before', '?')}, after {machine.get('loadavg_after', '?')}"
    )
    return "\n".join(lines)


def _profile_table(result: dict[str, Any] | None) -> str:
    if result is None or "profile" not in result.get("details", {}):
        return "_not measured_"
    profile = result["details"]["profile"]
    lines = ["| stage (inclusive) | share of samples |", "| --- | --- |"]
    lines += [f"| {name} | {share * 100:.1f} % |" for name, share in profile["stages"]]
    lines += ["", "| function (self) | share of samples |", "| --- | --- |"]
    lines += [f"| `{name}` | {share * 100:.1f} % |" for name, share in profile["functions"][:12]]
    lines += ["", f"`{_short(result['command'])}` — {profile['samples']} samples"]
    return "\n".join(lines)


def sections(directory: Path = RESULTS_DIR) -> dict[str, str]:
    """The measured parts of BENCHMARKS.md, by placeholder."""
    plain = latest(directory, "pipeline", "raw", "--sdk")
    return {
        "TABLE": table(directory),
        "STAGES": _figures_table(latest(directory, "stages")),
        "PROFILE_RAW": _profile_table(latest(directory, "pipeline", "raw", "--profile")),
        "PROFILE_PARSED": _profile_table(latest(directory, "pipeline", "parsed", "--profile")),
        "THROUGHPUT": _figures_table(plain),
        "PARSED": _figures_table(latest(directory, "pipeline", "parsed")),
        "CHECK": _figures_table(latest(directory, "pipeline", "raw", "--check")),
        "LATENCY": _figures_table(latest(directory, "latency", "raw")),
        "BACKLOG": _figures_table(latest(directory, "backlog", "raw")),
        "SERVE_BACKLOG": _figures_table(latest(directory, "e2e-backlog", "raw")),
        "SERVE_BACKLOG_ARENA": _figures_table(
            latest(directory, "e2e-backlog", "raw", "MALLOC_ARENA_MAX=1")
        ),
        "E2E_ARENA": _figures_table(latest(directory, "e2e", "raw", "MALLOC_ARENA_MAX=1")),
        "COST": _figures_table(latest(directory, "cost")),
        "SDK_PREPARE": _figures_table(latest(directory, "sdk")),
        "E2E_RAW": _figures_table(latest(directory, "e2e", "raw")),
        "E2E_PARSED": _figures_table(latest(directory, "e2e", "parsed")),
    }
