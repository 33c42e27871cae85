"""auditrelay's audit-policy engine against kube-apiserver's own loader and checker.

Every case is put to both: ``auditrelay.policy`` and the policycheck program built from
k8s.io/apiserver (see upstream_policycheck.py). Level, omitted stages, omitManagedFields and the
index of the deciding rule are compared; any disagreement fails the test and is listed.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from auditrelay.decode import Reason, decode_chunk
from auditrelay.errors import PolicyError
from auditrelay.filter import request_attributes
from auditrelay.model import AuditEvent
from auditrelay.policy import (
    STAGES,
    CompiledPolicy,
    Decision,
    RequestAttributes,
    compile_policy,
    parse_policy,
)
from fixtures.chunks import chunk, raw_log_event, reference_policies, sample_lines
from upstream_policycheck import Upstream, build_policycheck

pytestmark = pytest.mark.timeout(900)  # the first test may build policycheck (about a minute)

REPO = Path(__file__).resolve().parents[2]
REFERENCE_POLICIES = reference_policies()
BUNDLED_POLICY = REPO / "audit_policy.yaml"


@pytest.fixture(scope="module", name="upstream")
def _upstream() -> Iterator[Upstream]:
    upstream = Upstream(build_policycheck())
    yield upstream
    upstream.close()


GENERATED_POLICIES = 240
REQUESTS_PER_POLICY = 25

# Small vocabularies, so that generated rules and requests meet often, with every trap in them:
# bare resources against "pods/*", "*/status" against no subresource, prefixes that are not
# path segments, the empty user, the core group, group "*", names a create never has.
USERS = ["alice", "bob", "", "system:anonymous", "system:serviceaccount:kube-system:x"]
USER_GROUPS = [
    "system:authenticated",
    "system:unauthenticated",
    "system:nodes",
    "system:serviceaccounts",
    "devs",
]
VERBS = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
VERBS += ["post", "put", "proxy"]
NAMESPACES = ["", "default", "kube-system", "team-a"]
API_GROUPS = ["", "apps", "rbac.authorization.k8s.io", "events.k8s.io"]
RULE_GROUPS = [*API_GROUPS, "*"]
RESOURCES = ["pods", "deployments", "configmaps", "secrets", "events", "clusterroles", "*"]
SUBRESOURCES = ["", "", "log", "status", "exec", "scale", "*"]
RESOURCE_PATTERNS = [
    "pods",
    "pods/*",
    "pods/log",
    "pods/exec",
    "*/status",
    "*/log",
    "*",
    "deployments",
    "deployments/scale",
    "configmaps",
    "secrets",
    "events",
    "clusterroles",
    "*/*",
    "pods/",
    "*/",
    "/*",
    "",
]
NAMES = ["", "busybox", "coredns", "edit", "x"]
URL_PATTERNS = [
    "*",
    "/",
    "/*",
    "/healthz",
    "/healthz*",
    "/logs*",
    "/logs/*",
    "/metrics",
    "/api",
    "/api*",
    "/apis/*",
    "/version",
]
PATHS = [
    "",
    "/",
    "/healthz",
    "/healthz/ready",
    "/healthzfoo",
    "/logs",
    "/logs/",
    "/logs/kubelet.log",
    "/logsfoo",
    "/metrics",
    "/metrics/x",
    "/api",
    "/api/v1",
    "/apis/apps",
    "/version",
    "/versionx",
]
LEVELS = ["None", "Metadata", "Request", "RequestResponse"]


def _sample(rng: random.Random, pool: list[str], most: int) -> list[str]:
    return rng.sample(pool, rng.randint(1, min(most, len(pool))))


def _generated_rule(rng: random.Random) -> dict[str, Any]:
    rule: dict[str, Any] = {"level": rng.choice(LEVELS)}
    if rng.random() < 0.3:
        rule["users"] = _sample(rng, USERS, 2)
    if rng.random() < 0.3:
        rule["userGroups"] = _sample(rng, USER_GROUPS, 2)
    if rng.random() < 0.5:
        rule["verbs"] = _sample(rng, VERBS, 3)
    shape = rng.random()
    if shape < 0.55:
        if rng.random() < 0.4:
            rule["namespaces"] = _sample(rng, NAMESPACES, 2)
        if rng.random() < 0.85:
            rule["resources"] = [_generated_group_resources(rng) for _ in range(rng.randint(1, 2))]
    elif shape < 0.8:
        rule["nonResourceURLs"] = _sample(rng, URL_PATTERNS, 3)
    if rng.random() < 0.3:
        rule["omitStages"] = _sample(rng, list(STAGES), 2)
    if rng.random() < 0.3:
        rule["omitManagedFields"] = rng.random() < 0.5
    return rule


def _generated_group_resources(rng: random.Random) -> dict[str, Any]:
    entry: dict[str, Any] = {"group": rng.choice(RULE_GROUPS)}
    if rng.random() < 0.8:
        entry["resources"] = _sample(rng, RESOURCE_PATTERNS, 3)
        if rng.random() < 0.3:
            entry["resourceNames"] = _sample(rng, NAMES, 2)
    return entry


def _generated_policy(rng: random.Random) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [_generated_rule(rng) for _ in range(rng.randint(1, 6))],
    }
    if rng.random() < 0.4:
        policy["omitStages"] = _sample(rng, list(STAGES), 2)
    if rng.random() < 0.4:
        policy["omitManagedFields"] = rng.random() < 0.5
    return policy


def _generated_request(rng: random.Random) -> RequestAttributes:
    user = None if rng.random() < 0.15 else rng.choice(USERS)
    groups = tuple(rng.sample(USER_GROUPS, rng.randint(0, 2)))
    if rng.random() < 0.6:
        return RequestAttributes(
            user=user,
            groups=groups,
            verb=rng.choice(VERBS),
            namespace=rng.choice(NAMESPACES),
            api_group=rng.choice(API_GROUPS),
            resource=rng.choice(RESOURCES),
            subresource=rng.choice(SUBRESOURCES),
            name=rng.choice(NAMES),
            path=rng.choice(PATHS),
            resource_request=True,
        )
    return RequestAttributes(
        user=user, groups=groups, verb=rng.choice(VERBS), path=rng.choice(PATHS)
    )


def _comparable(decision: Decision) -> dict[str, Any]:
    return {
        "level": decision.level.text,
        "omitStages": sorted(decision.omit_stages),
        "omitManagedFields": decision.omit_managed_fields,
        "rule": decision.rule_index,
    }


def _disagreements(
    upstream: Upstream, policy_text: str, requests: list[RequestAttributes]
) -> list[str]:
    compiled = compile_policy(parse_policy(policy_text))
    policy_id, loaded = upstream.load(policy_text)
    assert loaded["ok"], loaded
    found = []
    for request in requests:
        ours = _comparable(compiled.decide(request))
        theirs = upstream.evaluate(policy_id, request.to_json())
        if ours != theirs or _comparable(compiled.evaluate(request)) != theirs:
            found.append(f"{request} under\n{policy_text}\nours {ours}, upstream {theirs}")
    return found


def test_generated_policies_and_requests_agree_with_upstream(upstream: Upstream) -> None:
    """Thousands of random (policy, request) pairs over every matcher get upstream's decision."""
    rng = random.Random(20260701)  # noqa: S311 - a reproducible corpus, not a secret
    cases = 0
    disagreements: list[str] = []
    for _ in range(GENERATED_POLICIES):
        policy_text = json.dumps(_generated_policy(rng))
        requests = [_generated_request(rng) for _ in range(REQUESTS_PER_POLICY)]
        disagreements += _disagreements(upstream, policy_text, requests)
        cases += len(requests)

    assert 5000 <= cases
    assert [] == disagreements[:5]


def test_every_rule_of_generated_policies_is_reached(upstream: Upstream) -> None:
    """The generated corpus is not vacuous: rules of every kind decide some requests."""
    rng = random.Random(20260701)  # noqa: S311 - the same corpus as above
    deciding_kinds: set[str] = set()
    for _ in range(GENERATED_POLICIES):
        policy = _generated_policy(rng)
        compiled = compile_policy(parse_policy(json.dumps(policy)))
        for _ in range(REQUESTS_PER_POLICY):
            decision = compiled.evaluate(_generated_request(rng))
            if decision.rule_index is not None:
                rule = policy["rules"][decision.rule_index]
                deciding_kinds.update(key for key in rule if key != "level")

    expected = {
        "users",
        "userGroups",
        "verbs",
        "namespaces",
        "resources",
        "nonResourceURLs",
        "omitStages",
        "omitManagedFields",
    }
    assert expected == deciding_kinds


def _recorded_event(request: RequestAttributes, body_namespace: str = "") -> dict[str, Any]:
    """The event kube-apiserver writes for ``request`` (LogRequestMetadata, LogRequestObject).

    A create without subresource gets the name of its body in objectRef, as the API server
    fills it in after its policy decision. A create or update whose URL has no namespace but
    whose body carries ``body_namespace`` (a client sending a namespace on a cluster-scoped
    object) gets that namespace in objectRef: LogRequestObject copies it before the namespace is
    cleared, after the decision was made without one.
    """
    event: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "RequestResponse",
        "auditID": "00000000-0000-4000-8000-000000000000",
        "stage": "ResponseComplete",
        "verb": request.verb,
        "user": {},
    }
    if request.user is not None:
        event["user"] = {"username": request.user, "groups": list(request.groups)}
    if not request.resource_request:
        event["requestURI"] = quote(request.path) + "?timeout=32s"
        return event
    segments = ["api", "v1"] if not request.api_group else ["apis", request.api_group, "v1"]
    if request.namespace:
        segments += ["namespaces", request.namespace]
    segments.append(request.resource)
    if request.name or request.subresource:
        segments.append(request.name)
    if request.subresource:
        segments.append(request.subresource)
    event["requestURI"] = "/" + "/".join(quote(segment) for segment in segments)
    name = request.name
    if request.verb == "create" and not request.subresource and not name:
        name = "name-from-the-body"
    namespace = request.namespace
    if request.verb in ("create", "update") and not request.subresource and body_namespace:
        event["requestObject"] = {"metadata": {"name": name, "namespace": body_namespace}}
        namespace = namespace or body_namespace
    ref = {
        "namespace": namespace,
        "apiGroup": request.api_group,
        "apiVersion": "v1",
        "resource": request.resource,
        "subresource": request.subresource,
        "name": name,
    }
    event["objectRef"] = {key: value for key, value in ref.items() if value}
    return event


def _decoded(lines: list[bytes]) -> list[AuditEvent]:
    """The events of ``lines`` through the sidecar's decode path (raw `log` records)."""
    decoded = decode_chunk(chunk(raw_log_event(line) for line in lines))
    assert [] == [letter.reason for letter in decoded.dead_letters]
    return decoded.events


def _recordable(request: RequestAttributes) -> RequestAttributes:
    """``request`` as an event can carry it: only users have groups, and have at least one;
    resource requests have no path of their own, subresources come with a name."""
    if request.user is None:
        request = dataclasses.replace(request, groups=())
    elif not request.groups:
        request = dataclasses.replace(request, groups=("system:authenticated",))
    if request.resource_request:
        request = dataclasses.replace(request, path="")
        if request.subresource and not request.name:
            request = dataclasses.replace(request, name="x")
    return request


def _generated_recorded_requests(
    rng: random.Random, count: int
) -> list[tuple[RequestAttributes, dict[str, Any]]]:
    """Recordable requests and the events kube-apiserver writes for them; a third of the
    creates and updates without a namespace in the URL send one in the body."""
    recorded = []
    for _ in range(count):
        request = _generated_request(rng)
        if request.resource_request and rng.random() < 0.25:
            verb = rng.choice(["create", "update"])
            request = dataclasses.replace(request, verb=verb, namespace="", subresource="")
        request = _recordable(request)
        body_namespace = rng.choice(["", "", "team-a", "kube-system"])
        recorded.append((request, _recorded_event(request, body_namespace)))
    return recorded


def test_generated_events_rebuild_the_attributes_upstream_decided_on(upstream: Upstream) -> None:
    """Events recorded for generated requests, decoded by the sidecar's decode path, rebuild
    those requests' attributes, and our decision on the rebuilt attributes is upstream's
    decision on the original request."""
    rng = random.Random(4242)  # noqa: S311 - a reproducible corpus, not a secret
    rebuilt_wrong: list[str] = []
    disagreements: list[str] = []
    body_namespaces = 0
    for _ in range(40):
        policy_text = json.dumps(_generated_policy(rng))
        compiled = compile_policy(parse_policy(policy_text))
        policy_id, _ = upstream.load(policy_text)
        recorded = _generated_recorded_requests(rng, REQUESTS_PER_POLICY)
        events = _decoded([json.dumps(event).encode() for _, event in recorded])
        for (request, event), decoded in zip(recorded, events, strict=True):
            body_namespaces += "requestObject" in event and not request.namespace
            rebuilt = request_attributes(decoded)
            if rebuilt != request:
                rebuilt_wrong.append(f"{request} rebuilt as {rebuilt}")
            ours = _comparable(compiled.decide(rebuilt))
            theirs = upstream.evaluate(policy_id, request.to_json())
            if ours != theirs:
                disagreements.append(f"{request} under {policy_text}: ours {ours}, {theirs}")

    assert ([], [], True) == (rebuilt_wrong[:5], disagreements[:5], 50 <= body_namespaces)


def _escaped(text: str) -> str:
    """``text`` as a JSON string with every character written as a \\u escape."""
    return '"' + "".join(f"\\u{ord(character):04x}" for character in text) + '"'


def _unusual_lines(event: dict[str, Any], rng: random.Random) -> list[bytes]:
    """The same event written in ways kube-apiserver does not, but JSON allows: fields in
    reverse order, a duplicate key whose first value is a decoy, the policy's fields spelled
    with unicode escapes, and a body that makes the line longer than 1 MB."""
    reversed_event = {key: event[key] for key in reversed(list(event))}
    decoy = json.dumps(event)
    decoy = '{"verb":"decoy","user":{"username":"decoy"},' + decoy[1:]
    escaped = json.dumps({key: value for key, value in event.items() if key != "verb"})
    escaped = escaped[:-1] + ',"verb":' + _escaped(event["verb"]) + "}"
    for key in ("username", "namespace", "resource"):
        value = event.get("user", {}).get(key) or event.get("objectRef", {}).get(key)
        if value:
            escaped = escaped.replace(f'"{key}": {json.dumps(value)}', f'"{key}":{_escaped(value)}')
    big = dict(event)
    big["responseObject"] = {"kind": "ConfigMap", "data": {"x": "y" * (1 << 20)}}
    lines = [json.dumps(reversed_event), decoy, escaped, json.dumps(big)]
    return [line.encode() for line in rng.sample(lines, len(lines))]


def test_unusual_json_is_decided_as_upstream_decides(upstream: Upstream) -> None:
    """Field order, duplicate keys (the last wins, as in kube-apiserver's decoding), unicode
    escapes in the fields the policy reads and lines over 1 MB change no decision."""
    rng = random.Random(77)  # noqa: S311 - a reproducible corpus, not a secret
    disagreements: list[str] = []
    lines_checked = 0
    for _ in range(10):
        policy_text = json.dumps(_generated_policy(rng))
        compiled = compile_policy(parse_policy(policy_text))
        policy_id, _ = upstream.load(policy_text)
        for request, event in _generated_recorded_requests(rng, 10):
            theirs = upstream.evaluate(policy_id, request.to_json())
            for decoded in _decoded(_unusual_lines(event, rng)):
                lines_checked += 1
                rebuilt = request_attributes(decoded)
                ours = _comparable(compiled.decide(rebuilt))
                if (rebuilt, ours) != (request, theirs):
                    disagreements.append(f"{request}: rebuilt {rebuilt}, ours {ours}, {theirs}")

    assert 400 == lines_checked
    assert [] == disagreements[:5]


def test_numbers_where_the_policy_reads_text_are_set_aside() -> None:
    """An event with a number where the policy reads text is counted and set aside, and the
    good events around it in the same chunk are decided as usual."""
    good = json.dumps(_recorded_event(RequestAttributes(user="u", verb="get", path="/x")))
    bad = [
        good.replace('"verb": "get"', '"verb": 7'),
        good.replace('"username": "u"', '"username": 1'),
        good.replace('"requestURI": "/x', '"requestURI": 5, "x": "'),
    ]
    lines = [good, *bad, good]

    decoded = decode_chunk(chunk(raw_log_event(line.encode()) for line in lines))

    assert 2 == len(decoded.events)
    assert [Reason.WRONG_FIELD_TYPE] * 3 == [letter.reason for letter in decoded.dead_letters]


TRAPS = [
    # (rule, request): the traps of the research notes, section 1, put to upstream one by one.
    ({"resources": [{"group": "", "resources": ["pods/*"]}]}, {"resource": "pods"}),
    ({"resources": [{"group": "", "resources": ["pods"]}]}, {"resource": "pods", "subresource": "log"}),
    ({"resources": [{"group": "", "resources": ["*/status"]}]}, {"resource": "pods"}),
    ({"resources": [{"group": "*", "resources": ["*/status"]}]}, {"apiGroup": "apps", "resource": "deployments", "subresource": "status"}),
    ({"resources": [{"group": ""}]}, {"apiGroup": "apps", "resource": "deployments"}),
    ({"resources": [{"group": "", "resources": ["configmaps"], "resourceNames": ["coredns"]}]}, {"verb": "create", "resource": "configmaps"}),
    ({"namespaces": [""]}, {"resource": "nodes"}),
    ({"namespaces": [""]}, {"resourceRequest": False, "path": "/healthz"}),
    ({"nonResourceURLs": ["/logs*"]}, {"resourceRequest": False, "path": "/logsfoo"}),
    ({"nonResourceURLs": ["/logs/*"]}, {"resourceRequest": False, "path": "/logs"}),
    ({"nonResourceURLs": ["*"]}, {"resource": "pods"}),
    ({"users": [""]}, {"user": None}),
    ({"userGroups": ["system:unauthenticated"]}, {"user": None, "groups": ["system:unauthenticated"]}),
    ({"users": ["system:anonymous"]}, {"user": "system:anonymous"}),
    ({"verbs": ["GET"]}, {"verb": "get"}),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "request_fields"), TRAPS)
def test_traps_agree_with_upstream(
    upstream: Upstream, rule: dict[str, Any], request_fields: dict[str, Any]
) -> None:
    """Each known trap of a careful port gets upstream's answer."""
    base: dict[str, Any] = {"user": "u", "verb": "get", "resourceRequest": True}
    request = RequestAttributes.from_json(base | request_fields)
    policy = {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [rule | {"level": "Metadata"}],
    }

    assert [] == _disagreements(upstream, json.dumps(policy), [request])


def _shippable_sample_lines() -> list[bytes]:
    """The real events the sidecar ships: the audit.k8s.io/v1 lines of the test data's log."""
    return [line for line in sample_lines() if b'"apiVersion":"audit.k8s.io/v1' in line]


@pytest.mark.parametrize("policy_path", REFERENCE_POLICIES, ids=lambda path: path.name)
def test_sample_events_get_upstreams_decision_under_reference_policies(
    upstream: Upstream, policy_path: Path
) -> None:
    """Attributes rebuilt from real audit events are decided as kube-apiserver decides them."""
    requests = [request_attributes(event) for event in _decoded(_shippable_sample_lines())]

    assert 80 < len(requests)
    assert [] == _disagreements(upstream, policy_path.read_text(), requests)


def test_sample_events_get_upstreams_decision_under_bundled_policy(upstream: Upstream) -> None:
    """Our own policy decides the real events exactly as kube-apiserver would."""
    requests = [request_attributes(event) for event in _decoded(_shippable_sample_lines())]

    assert [] == _disagreements(upstream, BUNDLED_POLICY.read_text(), requests)


def test_bundled_policy_is_accepted_by_upstream_loader(upstream: Upstream) -> None:
    """kube-apiserver's loader and validation accept audit_policy.yaml without a warning."""
    _, answer = upstream.load(BUNDLED_POLICY.read_text())

    assert {"ok": True, "rules": len(parse_policy(BUNDLED_POLICY.read_text()).rules)} == answer


def _loader_verdicts(upstream: Upstream, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    _, theirs = upstream.load(text)
    try:
        policy = parse_policy(text)
    except PolicyError:
        ours: dict[str, Any] = {"ok": False}
    else:
        ours = {"ok": True, "rules": len(policy.rules)}
        if policy.decoded_leniently:
            ours["warned"] = True
    upstream_verdict: dict[str, Any] = {
        key: theirs[key] for key in ("ok", "rules", "warned") if key in theirs
    }
    return ours, upstream_verdict


@pytest.mark.parametrize(
    "policy_path",
    [path for path in REFERENCE_POLICIES if "audit.k8s.io/v1\n" in path.read_text()],
    ids=lambda path: path.name,
)
def test_reference_policies_load_as_upstream_loads_them(
    upstream: Upstream, policy_path: Path
) -> None:
    """Real-world policies are accepted, and warned about, exactly when upstream does."""
    ours, theirs = _loader_verdicts(upstream, policy_path.read_text())

    assert theirs == ours


_RULE = {"level": "Metadata"}
HEADER_V1 = "apiVersion: audit.k8s.io/v1\nkind: Policy\n"
LOADER_CASES = {
    "minimal": {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": [_RULE]},
    "no rules": {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": []},
    "rules missing": {"apiVersion": "audit.k8s.io/v1", "kind": "Policy"},
    "no kind": {"apiVersion": "audit.k8s.io/v1", "rules": [_RULE]},
    "no apiVersion": {"kind": "Policy", "rules": [_RULE]},
    "other group": {"apiVersion": "v1", "kind": "Policy", "rules": [_RULE]},
    "unknown level": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "Verbose"}],
    },
    "level missing": {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": [{}]},
    "unknown rule field": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "resource": ["pods"]}],
    },
    "unknown policy field": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "extra": 1,
        "rules": [_RULE],
    },
    "both resources and URLs": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "resources": [{"group": ""}], "nonResourceURLs": ["/x"]}],
    },
    "namespaces and URLs": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "namespaces": ["a"], "nonResourceURLs": ["/x"]}],
    },
    "URL without slash": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "nonResourceURLs": ["healthz"]}],
    },
    "URL with inner star": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "nonResourceURLs": ["/a*/b"]}],
    },
    "URL with two trailing stars": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "nonResourceURLs": ["/version**"]}],
    },
    "empty URL": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "nonResourceURLs": [""]}],
    },
    "group star": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "resources": [{"group": "*"}]}],
    },
    "group with version": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "resources": [{"group": "rbac.authorization.k8s.io/v1"}]}],
    },
    "group upper case": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "resources": [{"group": "Apps"}]}],
    },
    "resourceNames without resources": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "resources": [{"group": "", "resourceNames": ["x"]}]}],
    },
    "bad rule stage": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "omitStages": ["ResponseEnded"]}],
    },
    "bad policy stage": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["Nope"],
        "rules": [_RULE],
    },
    "users not a list": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "rules": [{"level": "None", "users": "alice"}],
    },
    "omitManagedFields not a boolean": {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitManagedFields": "yes please",
        "rules": [_RULE],
    },
}


LOADER_TEXTS = {
    "timestamp-like user": HEADER_V1 + "rules:\n- level: Metadata\n  users: [2021-01-01]\n",
    "boolean-like user": HEADER_V1 + "rules:\n- level: Metadata\n  users: [on]\n",
    "number as user": HEADER_V1 + "rules:\n- level: Metadata\n  users: [0x10]\n",
    "quoted boolean-like user": HEADER_V1 + "rules:\n- level: Metadata\n  users: ['on']\n",
    "duplicate key": HEADER_V1 + "rules:\n- level: None\n  level: Metadata\n",
    "anchors and aliases": HEADER_V1
    + "rules:\n- &r {level: Metadata, verbs: [get]}\n- *r\n- level: None\n",
    "null list": HEADER_V1 + "rules:\n- level: Metadata\n  users: ~\n",
    "metadata name": HEADER_V1 + "metadata: {name: p}\nrules:\n- level: Metadata\n",
    "not YAML": HEADER_V1 + "rules: [\n",
    "capitalised key": HEADER_V1 + "rules:\n- Level: Metadata\n",
    "capitalised key beside the real one": HEADER_V1 + "rules:\n- level: None\n  Verbs: [get]\n",
    "lower-case level": HEADER_V1 + "rules:\n- level: metadata\n",
    "stages as a string": HEADER_V1 + "omitStages: RequestReceived\nrules:\n- level: None\n",
    "rules as a mapping": HEADER_V1 + "rules: {level: None}\n",
    "rule as a string": HEADER_V1 + "rules: [None]\n",
    "two documents": HEADER_V1 + "rules:\n- level: None\n---\napiVersion: v1\nkind: Pod\n",
    "policy in the second document": "apiVersion: v1\nkind: Pod\n---\n"
    + HEADER_V1
    + "rules:\n- level: None\n",
    "JSON": json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": [_RULE]}),
    "PolicyList": HEADER_V1.replace("Policy", "PolicyList") + "items: []\n",
    "empty document": "",
}


@pytest.mark.parametrize("name", sorted(LOADER_TEXTS))
def test_yaml_details_load_as_upstream_loads_them(upstream: Upstream, name: str) -> None:
    """YAML scalars, duplicates, aliases and nulls decode to upstream's verdict."""
    ours, theirs = _loader_verdicts(upstream, LOADER_TEXTS[name])

    assert theirs == ours


@pytest.mark.parametrize("name", sorted(LOADER_CASES))
def test_loader_accepts_and_refuses_what_upstream_does(upstream: Upstream, name: str) -> None:
    """Each decoding and validation rule gives upstream's verdict (accepted, warned, refused)."""
    ours, theirs = _loader_verdicts(upstream, yaml.safe_dump(LOADER_CASES[name]))

    assert theirs == ours


def test_loader_reads_yaml_as_upstream_does(upstream: Upstream) -> None:
    """YAML details (flow lists, quoted empty group, comments, null lists) decode the same."""
    text = """
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  # comment
  - level: RequestResponse
    verbs: [update, patch]
    users:
    resources:
      - group: ""
        resources: ["configmaps"]
        resourceNames: ["coredns"]
    namespaces: ["kube-system"]
  - level: Metadata
"""
    ours, theirs = _loader_verdicts(upstream, text)
    policy = compile_policy(parse_policy(text))
    request = RequestAttributes(
        user="u",
        verb="patch",
        namespace="kube-system",
        resource="configmaps",
        name="coredns",
        resource_request=True,
    )

    assert theirs == ours
    assert [] == _disagreements(upstream, text, [request])
    assert "RequestResponse" == policy.decide(request).level.text


def test_cache_does_not_change_decisions(upstream: Upstream) -> None:
    """A small cache under churn answers as the uncached evaluator and upstream do."""
    rng = random.Random(7)  # noqa: S311 - a reproducible corpus
    policy_text = json.dumps(
        {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "rules": [_generated_rule(rng) for _ in range(6)],
        }
    )
    compiled = CompiledPolicy(parse_policy(policy_text), cache_size=8)
    requests = [_generated_request(rng) for _ in range(400)]
    policy_id, _ = upstream.load(policy_text)

    for request in requests:
        assert upstream.evaluate(policy_id, request.to_json()) == _comparable(
            compiled.decide(request)
        )
    assert 8 >= compiled.cache_stats.size
