"""``auditrelay policy``: check a cluster's audit policy, evaluate requests, preview a filter.

* ``verify`` puts a catalog of representative requests (one per Defender detection need, one
  per rule of the required policy) to the cluster's policy and to the required one, and lists
  every request class the cluster records less of; ``--manifest`` also checks the
  kube-apiserver flags. Exit 0: nothing missing; 1: something is; 2: bad input.
* ``eval`` answers request attributes (JSON lines on stdin) with the policy's decision.
* ``filter`` applies a policy to audit logs and reports what it would ship and what it costs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

import orjson
import yaml

from auditrelay.cli import EXIT_BAD_INPUT, EXIT_FINDING, EXIT_OK, add_output_option
from auditrelay.config import BUNDLED_POLICY
from auditrelay.decode import audit_problem
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from auditrelay.policy import (
    STAGES,
    CompiledPolicy,
    Decision,
    Level,
    Policy,
    PolicyRule,
    RequestAttributes,
    compile_policy,
    load_policy,
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


@dataclass(frozen=True, slots=True)
class Probe:
    """A representative request, named for the need it stands for."""

    name: str
    request: RequestAttributes
    minimum: Level = Level.METADATA


HUMAN: Final = ("alice@example.com", ("system:authenticated", "developers"))
SERVICE_ACCOUNT: Final = (
    "system:serviceaccount:default:app",
    ("system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"),
)
ANONYMOUS: Final = ("system:anonymous", ("system:unauthenticated",))
NAMELESS_VERBS: Final = frozenset({"list", "watch", "deletecollection"})
LONG_RUNNING_SUBRESOURCES: Final = frozenset({"attach", "exec", "portforward", "proxy", "log"})


def _resource(
    verb: str,
    resource: str,
    *,
    group: str = "",
    namespace: str = "default",
    subresource: str = "",
    name: str = "",
    who: tuple[str | None, tuple[str, ...]] = HUMAN,
) -> RequestAttributes:
    if not name and not (verb == "create" and not subresource) and verb not in NAMELESS_VERBS:
        name = "probe"
    return RequestAttributes(
        user=who[0],
        groups=who[1],
        verb=verb,
        namespace=namespace,
        api_group=group,
        resource=resource,
        subresource=subresource,
        name=name,
        resource_request=True,
    )


def detection_probes() -> list[Probe]:
    """One request per need of Defender's control-plane detections (research notes, sec. 4)."""
    req, rr, meta = Level.REQUEST, Level.REQUEST_RESPONSE, Level.METADATA
    rbac, apps, batch = "rbac.authorization.k8s.io", "apps", "batch"
    admission = "admissionregistration.k8s.io"
    return [
        Probe(
            "cluster-admin binding created",
            _resource("create", "clusterrolebindings", group=rbac, namespace=""),
            req,
        ),
        Probe(
            "cluster role binding patched",
            _resource("patch", "clusterrolebindings", group=rbac, namespace=""),
            req,
        ),
        Probe("role binding created", _resource("create", "rolebindings", group=rbac), req),
        Probe(
            "cluster role created",
            _resource("create", "clusterroles", group=rbac, namespace=""),
            req,
        ),
        Probe("role updated", _resource("update", "roles", group=rbac), req),
        Probe("pod created", _resource("create", "pods"), req),
        Probe(
            "pod created in kube-system", _resource("create", "pods", namespace="kube-system"), req
        ),
        Probe(
            "ephemeral container added",
            _resource("patch", "pods", subresource="ephemeralcontainers"),
            req,
        ),
        Probe("deployment created", _resource("create", "deployments", group=apps), req),
        Probe(
            "deployment patched in kube-system",
            _resource("patch", "deployments", group=apps, namespace="kube-system"),
            req,
        ),
        Probe("daemonset created", _resource("create", "daemonsets", group=apps), req),
        Probe("statefulset updated", _resource("update", "statefulsets", group=apps), req),
        Probe("replicaset created", _resource("create", "replicasets", group=apps), req),
        Probe("replication controller created", _resource("create", "replicationcontrollers"), req),
        Probe("job created", _resource("create", "jobs", group=batch), req),
        Probe("cronjob created", _resource("create", "cronjobs", group=batch), req),
        Probe("service created (exposure)", _resource("create", "services"), req),
        Probe("service patched (exposure)", _resource("patch", "services"), req),
        Probe(
            "coredns configmap updated",
            _resource("update", "configmaps", namespace="kube-system", name="coredns"),
            rr,
        ),
        Probe(
            "coredns-custom configmap patched",
            _resource("patch", "configmaps", namespace="kube-system", name="coredns-custom"),
            rr,
        ),
        Probe(
            "mutating webhook created",
            _resource("create", "mutatingwebhookconfigurations", group=admission, namespace=""),
            req,
        ),
        Probe(
            "validating webhook created",
            _resource("create", "validatingwebhookconfigurations", group=admission, namespace=""),
            req,
        ),
        Probe("event deleted", _resource("delete", "events"), meta),
        Probe("events deleted as a collection", _resource("deletecollection", "events"), meta),
        Probe(
            "events.k8s.io event deleted",
            _resource("delete", "events", group="events.k8s.io"),
            meta,
        ),
        Probe("secret read", _resource("get", "secrets"), meta),
        Probe("secrets listed", _resource("list", "secrets"), meta),
        Probe(
            "secret read by a service account",
            _resource("get", "secrets", who=SERVICE_ACCOUNT),
            meta,
        ),
        Probe(
            "pods listed by a service account", _resource("list", "pods", who=SERVICE_ACCOUNT), meta
        ),
        Probe(
            "service-account token requested",
            _resource("create", "serviceaccounts", subresource="token", name="app"),
            meta,
        ),
        Probe("exec into a pod", _resource("create", "pods", subresource="exec"), meta),
        Probe("exec into a pod (websocket)", _resource("get", "pods", subresource="exec"), meta),
        Probe("attach to a pod", _resource("create", "pods", subresource="attach"), meta),
        Probe(
            "port-forward to a pod", _resource("create", "pods", subresource="portforward"), meta
        ),
        Probe("anonymous pod list", _resource("list", "pods", who=ANONYMOUS), meta),
        Probe(
            "anonymous version probe",
            RequestAttributes(user=ANONYMOUS[0], groups=ANONYMOUS[1], verb="get", path="/version"),
            meta,
        ),
        Probe(
            "request with failed authentication", _resource("list", "secrets", who=(None, ())), meta
        ),
        Probe(
            "Defender test alert (pods listed)",
            _resource("list", "pods", namespace="asc-alerttest-662jfi039n"),
            meta,
        ),
    ]


def rule_probes(policy: Policy) -> list[Probe]:
    """A request for each rule of ``policy`` that matches that rule."""
    probes = []
    compiled = compile_policy(policy)
    for index, rule in enumerate(policy.rules):
        if rule.level is Level.NONE:
            continue
        request = _request_for(rule)
        if compiled.evaluate(request).rule_index == index:
            name = f"required rule {index}: {describe(request)}"
            probes.append(Probe(name, request, rule.level))
    return probes


def describe(request: RequestAttributes) -> str:
    """A short text for a request: ``create pods/exec in default``, ``get /version``."""
    if not request.resource_request:
        return f"{request.verb} {request.path}"
    resource = request.resource + (f"/{request.subresource}" if request.subresource else "")
    if request.api_group:
        resource += f".{request.api_group}"
    if request.name:
        resource += f" {request.name}"
    return f"{request.verb} {resource}" + (f" in {request.namespace}" if request.namespace else "")


def _request_for(rule: PolicyRule) -> RequestAttributes:
    user = rule.users[0] if rule.users else "probe@example.com"
    groups = (*rule.user_groups[:1], "system:authenticated")
    resource_rule = bool(rule.resources or rule.namespaces)
    if not resource_rule and rule.non_resource_urls:
        url = rule.non_resource_urls[0]
        path = "/" if url == "*" else url.rstrip("*") or "/"
        verb = rule.verbs[0] if rule.verbs else "get"
        return RequestAttributes(user=user, groups=groups, verb=verb, path=path)
    verb = rule.verbs[0] if rule.verbs else "create"
    group, resource, subresource, name = "", "widgets", "", ""
    if rule.resources:
        entry = rule.resources[0]
        group = "" if entry.group == "*" else entry.group
        pattern = entry.resources[0] if entry.resources else ("pods" if not group else "widgets")
        resource, _, subresource = pattern.partition("/")
        resource = "pods" if resource in ("*", "") else resource
        subresource = "status" if subresource == "*" else subresource
        if entry.resource_names:
            name = entry.resource_names[0]
            if verb == "create" and not subresource:
                verb = "update"
    elif not rule.namespaces:
        group = "example.com"
    if not name and not (verb == "create" and not subresource) and verb not in NAMELESS_VERBS:
        name = "probe"
    namespace = rule.namespaces[0] if rule.namespaces else "default"
    return RequestAttributes(
        user=user,
        groups=groups,
        verb=verb,
        namespace=namespace,
        api_group=group,
        resource=resource,
        subresource=subresource,
        name=name,
        resource_request=True,
    )


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A request class the cluster's policy records less of than the required one."""

    probe: Probe
    required: Decision
    cluster: Decision
    problem: str

    def to_json(self) -> dict[str, Any]:
        return {
            "request": self.probe.name,
            "attributes": self.probe.request.to_json(),
            "required": self.required.to_json(),
            "cluster": self.cluster.to_json(),
            "problem": self.problem,
        }


def stages_of(request: RequestAttributes) -> tuple[str, ...]:
    """The stages an event of ``request`` can be emitted at."""
    long_running = request.verb in ("watch", "proxy") or (
        request.resource_request and request.subresource in LONG_RUNNING_SUBRESOURCES
    )
    return tuple(stage for stage in STAGES if long_running or stage != "ResponseStarted")


def shortfall(probe: Probe, required: Decision, cluster: Decision) -> str | None:
    """What the cluster's decision records less of than the required one, or None."""
    if required.level is Level.NONE:
        return None
    if cluster.level is Level.NONE:
        return "not recorded at all"
    if cluster.level < required.level:
        return f"recorded at {cluster.level.text}, {required.level.text} required"
    lost = [
        stage
        for stage in stages_of(probe.request)
        if stage in cluster.omit_stages and stage not in required.omit_stages
    ]
    if lost:
        return f"stage{'s' if len(lost) > 1 else ''} {', '.join(lost)} omitted"
    return None


def verify(
    cluster: CompiledPolicy, required: CompiledPolicy
) -> tuple[list[Probe], list[Shortfall]]:
    """Every probe, and the shortfalls of ``cluster`` against ``required``."""
    probes = detection_probes() + rule_probes(required.policy)
    found = []
    for probe in probes:
        wanted, got = required.evaluate(probe.request), cluster.evaluate(probe.request)
        problem = shortfall(probe, wanted, got)
        if problem is not None:
            found.append(Shortfall(probe, wanted, got, problem))
    return probes, found


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


class ManifestError(Exception):
    """A kube-apiserver manifest that cannot be read as one."""


def check_manifest(path: Path) -> list[str]:
    """Problems with the audit-logging flags of a kube-apiserver static pod manifest."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: cannot read the manifest: {error}") from error
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    spec = document.get("spec") if isinstance(document, dict) else None
    containers = spec.get("containers") if isinstance(spec, dict) else None
    container = next(
        (c for c in containers or () if isinstance(c, dict) and _is_apiserver(c)), None
    )
    if container is None or not isinstance(spec, dict):
        raise ManifestError(f"{path}: no kube-apiserver container in spec.containers")
    flags = _flags([*(container.get("command") or ()), *(container.get("args") or ())])
    problems = []
    if not flags.get("audit-policy-file"):
        problems.append("audit logging is off: --audit-policy-file is not set")
    log_path = flags.get("audit-log-path", "")
    if not log_path:
        problems.append("no audit log file: --audit-log-path is not set")
    elif log_path == "-":
        problems.append("--audit-log-path=- writes to stdout; Fluent Bit needs a file to tail")
    elif not _on_host_path(PurePosixPath(log_path), container, spec):
        problems.append(
            f"--audit-log-path={log_path} is not on a hostPath volume: Fluent Bit on the node "
            "cannot tail it"
        )
    log_format = flags.get("audit-log-format", "json")
    if log_format != "json":
        problems.append(f"--audit-log-format={log_format}: Fluent Bit's parser needs json")
    return problems


def _is_apiserver(container: dict[str, Any]) -> bool:
    words = [*(container.get("command") or ()), container.get("name") or ""]
    return any("kube-apiserver" in str(word) for word in words)


def _flags(words: Iterable[Any]) -> dict[str, str]:
    flags: dict[str, str] = {}
    tokens = [token for word in words for token in shlex.split(str(word))]
    for index, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, equals, value = token[2:].partition("=")
        if not equals and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            value = tokens[index + 1]
        flags[name] = value
    return flags


def _on_host_path(log_path: PurePosixPath, container: dict[str, Any], spec: dict[str, Any]) -> bool:
    host_volumes = {
        volume.get("name")
        for volume in spec.get("volumes") or ()
        if isinstance(volume, dict) and isinstance(volume.get("hostPath"), dict)
    }
    for mount in container.get("volumeMounts") or ():
        if not isinstance(mount, dict) or mount.get("name") not in host_volumes:
            continue
        mount_path = PurePosixPath(str(mount.get("mountPath", "")))
        if log_path == mount_path or mount_path in log_path.parents:
            return True
    return False


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
