"""Does a cluster's audit policy record what the required one does (``auditrelay policy verify``,
``auditrelay audit status``)?

A catalog of representative requests, one per Defender detection need and one per rule of the
required policy, is put to both policies; every request class the cluster's policy records less
of (a lower level, an omitted stage, managed fields left out) is a shortfall. A kube-apiserver
static pod manifest's audit-logging flags are checked as well.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml

from auditrelay.policy import (
    STAGES,
    CompiledPolicy,
    Decision,
    Level,
    Policy,
    PolicyRule,
    RequestAttributes,
    compile_policy,
)


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
    return _resource(
        verb,
        resource,
        group=group,
        namespace=rule.namespaces[0] if rule.namespaces else "default",
        subresource=subresource,
        name=name,
        who=(user, groups),
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
