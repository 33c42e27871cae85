"""``auditrelay policy``: check a cluster's audit policy, evaluate requests, preview a filter.

* ``verify`` puts a catalog of representative requests (``policy_verify``: one per Defender
  detection need, one per rule of the required policy) to the cluster's policy and to the
  required one, and lists every request class the cluster records less of; ``--manifest``
  also checks the kube-apiserver flags. Exit 0: nothing missing; 1: something is; 2: bad input.
* ``eval`` answers request attributes (JSON lines on stdin) with the policy's decision.
* ``filter`` applies a policy to audit logs and reports what it would ship and what it costs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import orjson

from auditrelay.cli import EXIT_BAD_INPUT, EXIT_FINDING, EXIT_OK, add_output_option
from auditrelay.config import BUNDLED_POLICY
from auditrelay.decode import audit_problem
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from auditrelay.policy import (
    CompiledPolicy,
    Decision,
    RequestAttributes,
    compile_policy,
    load_policy,
)
from auditrelay.policy_verify import (
    ManifestError,
    Probe,
    Shortfall,
    check_manifest,
    verify,
)
from auditrelay.replay import REASON_TEXT

EXIT_MISSING: Final = EXIT_FINDING


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers ``auditrelay policy`` and its three sub-commands."""
    parser = subparsers.add_parser(
        "policy",
        help="check, evaluate and try out audit policies",
        description="Check a cluster's audit policy against what Defender needs, evaluate "
        "requests under a policy, and preview what a policy keeps of real audit logs.",
    )
    parser.set_defaults(run=run)
    commands = parser.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="list the request classes a cluster's policy records less of than required",
        description="Exit status: 0 nothing missing, 1 something missing, 2 bad input.",
    )
    verify.add_argument("--policy", required=True, type=Path, help="the cluster's audit policy")
    verify.add_argument(
        "--required",
        type=Path,
        default=BUNDLED_POLICY,
        help="the policy whose records are required (default: the bundled Defender policy)",
    )
    verify.add_argument(
        "--manifest",
        type=Path,
        help="kube-apiserver static pod manifest: also check its audit-logging flags",
    )
    add_output_option(verify)
    verify.set_defaults(action=_verify)

    evaluate = commands.add_parser(
        "eval",
        help="decide request attributes read as JSON lines on stdin",
        description="Each input line is an object with the keys user, groups, verb, namespace, "
        "apiGroup, resource, subresource, name, path, resourceRequest (absent or null means "
        "empty, except that a null user is a request without an authenticated user). Each "
        "output line is "
        '{"level", "omitStages", "omitManagedFields", "rule"}.',
    )
    evaluate.add_argument("--policy", required=True, type=Path, help="the audit policy")
    add_output_option(evaluate, default="json")
    evaluate.set_defaults(action=_eval)

    preview = commands.add_parser(
        "filter",
        help="apply a policy to audit logs: what would be shipped, and its cost",
        description="Writes the events the policy keeps as JSON lines on stdout and the counts "
        "and bytes in and out on stderr. Exit status 2 when some lines were not JSON objects "
        "(each is reported with its line number; the rest is still processed).",
    )
    preview.add_argument("--policy", required=True, type=Path, help="the audit policy")
    preview.add_argument(
        "logs", nargs="*", type=Path, metavar="AUDIT_LOG", help="audit log files (default: stdin)"
    )
    add_output_option(preview)
    preview.set_defaults(action=_filter)


def run(args: argparse.Namespace) -> int:
    """Runs the chosen ``auditrelay policy`` sub-command."""
    code: int = args.action(args)
    return code


def _load(path: Path) -> CompiledPolicy:
    policy = load_policy(path)
    for warning in policy.warnings:
        print(f"auditrelay policy: {path}: warning: {warning}", file=sys.stderr)
    return compile_policy(policy)


# ---------------------------------------------------------------------------------------------
# verify
def _verify(args: argparse.Namespace) -> int:
    cluster = _load(args.policy)
    required = _load(args.required)
    manifest_problems: list[str] = []
    if args.manifest is not None:
        try:
            manifest_problems = check_manifest(args.manifest)
        except ManifestError as error:
            print(f"auditrelay policy verify: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
    probes, shortfalls = verify(cluster, required)
    if args.output == "json":
        report = {
            "policy": str(args.policy),
            "required": str(args.required),
            "requestsChecked": len(probes),
            "missing": [found.to_json() for found in shortfalls],
            "manifestProblems": manifest_problems,
        }
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_verify_table(args, probes, shortfalls, manifest_problems)
    return EXIT_MISSING if shortfalls or manifest_problems else EXIT_OK


def _print_verify_table(
    args: argparse.Namespace,
    probes: Sequence[Probe],
    shortfalls: Sequence[Shortfall],
    manifest_problems: Sequence[str],
) -> None:
    if shortfalls:
        rows = [("REQUEST CLASS", "REQUIRED", "CLUSTER", "MISSING")]
        rows += [
            (
                found.probe.name,
                _decision_text(found.required),
                _decision_text(found.cluster),
                found.problem,
            )
            for found in shortfalls
        ]
        _print_table(rows, sys.stdout)
        print()
    print(
        f"{args.policy}: {len(probes) - len(shortfalls)} of {len(probes)} request classes "
        f"recorded as {args.required} requires, {len(shortfalls)} missing."
    )
    for problem in manifest_problems:
        print(f"manifest {args.manifest}: {problem}")


def _decision_text(decision: Decision) -> str:
    rule = "default" if decision.rule_index is None else f"rule {decision.rule_index}"
    return f"{decision.level.text} ({rule})"


# ---------------------------------------------------------------------------------------------
# eval


def _eval(args: argparse.Namespace) -> int:
    policy = _load(args.policy)
    answers: list[dict[str, Any]] = []
    bad_lines = 0
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            answer = policy.evaluate(_attributes(line)).to_json()
        except ValueError as error:  # orjson.JSONDecodeError is a ValueError too
            bad_lines += 1
            print(f"auditrelay policy eval: stdin line {number}: {error}", file=sys.stderr)
            answer = {"error": f"line {number}: {error}"}
        if args.output == "json":
            sys.stdout.write(orjson.dumps(answer).decode() + "\n")
            sys.stdout.flush()
        else:
            answers.append(answer | {"line": number})
    if args.output == "text":
        _print_eval_table(answers)
    return EXIT_BAD_INPUT if bad_lines else EXIT_OK


def _attributes(line: str) -> RequestAttributes:
    document = orjson.loads(line)
    if not isinstance(document, dict):
        # A ValueError, like orjson's syntax errors: both are reported as a bad input line.
        raise ValueError(f"expected a JSON object, got {type(document).__name__}")  # noqa: TRY004
    return RequestAttributes.from_json(document)


def _print_eval_table(answers: Sequence[dict[str, Any]]) -> None:
    rows = [("LINE", "LEVEL", "OMIT STAGES", "OMIT MANAGED FIELDS", "RULE")]
    for answer in answers:
        if "error" in answer:
            rows.append((str(answer["line"]), "error", answer["error"], "", ""))
            continue
        rule = answer["rule"]
        rows.append(
            (
                str(answer["line"]),
                answer["level"],
                ",".join(answer["omitStages"]) or "-",
                "yes" if answer["omitManagedFields"] else "no",
                "default" if rule is None else str(rule),
            )
        )
    _print_table(rows, sys.stdout)


# ---------------------------------------------------------------------------------------------
# filter


@dataclass(slots=True)
class FilterTotals:
    """What a policy did to a set of audit logs."""

    events_in: int = 0
    bytes_in: int = 0
    events_out: int = 0
    bytes_out: int = 0
    lowered: int = 0
    dropped: int = 0
    bad_lines: int = 0


def filter_lines(
    policy: CompiledPolicy,
    sources: Iterable[tuple[str, Iterable[bytes]]],
    out: IO[bytes],
    errors: IO[str],
) -> FilterTotals:
    """Applies ``policy`` to every event of ``sources``, writing what it keeps to ``out``."""
    event_filter = PolicyFilter(policy)
    totals = FilterTotals()
    for name, lines in sources:
        for number, line in enumerate(lines, start=1):
            raw = line.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                fields = orjson.loads(raw)
            except orjson.JSONDecodeError as error:
                totals.bad_lines += 1
                errors.write(f"auditrelay policy filter: {name}:{number}: not JSON: {error}\n")
                continue
            if not isinstance(fields, dict):
                totals.bad_lines += 1
                errors.write(f"auditrelay policy filter: {name}:{number}: not a JSON object\n")
                continue
            problem = audit_problem(fields)
            if problem is not None:  # serve sets it aside as a dead letter: never shipped
                totals.bad_lines += 1
                errors.write(
                    f"auditrelay policy filter: {name}:{number}: not an audit event serve would "
                    f"ship ({problem}: {REASON_TEXT.get(problem, problem)}); serve sets it aside\n"
                )
                continue
            totals.events_in += 1
            totals.bytes_in += len(raw) + 1
            kept = event_filter.apply(AuditEvent(fields=fields, raw=raw))
            if kept is None:
                continue
            shipped = kept.raw if kept.raw is not None else orjson.dumps(kept.fields)
            out.write(shipped + b"\n")
            totals.events_out += 1
            totals.bytes_out += len(shipped) + 1
    totals.lowered = event_filter.counts.lowered
    totals.dropped = event_filter.counts.dropped
    return totals


def _sources(paths: Sequence[Path]) -> Iterator[tuple[str, Iterable[bytes]]]:
    if not paths:
        yield "stdin", sys.stdin.buffer
        return
    for path in paths:
        with path.open("rb") as lines:
            yield str(path), lines


def _filter(args: argparse.Namespace) -> int:
    policy = _load(args.policy)
    for path in args.logs:
        if not path.is_file():
            print(f"auditrelay policy filter: {path}: no such file", file=sys.stderr)
            return EXIT_BAD_INPUT
    totals = filter_lines(policy, _sources(args.logs), sys.stdout.buffer, sys.stderr)
    sys.stdout.flush()
    if args.output == "json":
        summary = {
            "eventsIn": totals.events_in,
            "bytesIn": totals.bytes_in,
            "eventsOut": totals.events_out,
            "bytesOut": totals.bytes_out,
            "eventsLowered": totals.lowered,
            "eventsDropped": totals.dropped,
            "badLines": totals.bad_lines,
        }
        sys.stderr.write(orjson.dumps(summary).decode() + "\n")
    else:
        _print_filter_table(totals)
    return EXIT_BAD_INPUT if totals.bad_lines else EXIT_OK


def _print_filter_table(totals: FilterTotals) -> None:
    def share(part: int, whole: int) -> str:
        return f"{100 * part / whole:.1f}%" if whole else "-"

    rows = [
        ("", "EVENTS", "BYTES"),
        ("in", str(totals.events_in), str(totals.bytes_in)),
        (
            "out",
            f"{totals.events_out} ({share(totals.events_out, totals.events_in)})",
            f"{totals.bytes_out} ({share(totals.bytes_out, totals.bytes_in)})",
        ),
        ("lowered", str(totals.lowered), ""),
        ("dropped", str(totals.dropped), ""),
    ]
    if totals.bad_lines:
        rows.append(("set aside", str(totals.bad_lines), ""))
    _print_table(rows, sys.stderr)


def _print_table(rows: Sequence[Sequence[str]], stream: IO[str]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        stream.write("  ".join(cells).rstrip() + "\n")
