"""auditrelay.filter: the policy applied to recorded events."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from auditrelay.filter import PolicyFilter, request_attributes
from auditrelay.model import AuditEvent
from auditrelay.policy import RequestAttributes, compile_policy, parse_policy
from fixtures.chunks import reference_policies, sample_lines

REPO = Path(__file__).resolve().parents[2]


def _filter(rules: str, header: str = "") -> PolicyFilter:
    text = f"apiVersion: audit.k8s.io/v1\nkind: Policy\n{header}rules:\n{rules}"
    return PolicyFilter(compile_policy(parse_policy(text)))


def _event(**fields: Any) -> dict[str, Any]:
    """A ResponseComplete event of alice creating a pod, at RequestResponse, with bodies."""
    event: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "RequestResponse",
        "auditID": "6c3c4b3e-0000-4000-8000-000000000001",
        "stage": "ResponseComplete",
        "requestURI": "/api/v1/namespaces/default/pods",
        "verb": "create",
        "user": {"username": "alice", "groups": ["devs", "system:authenticated"]},
        "objectRef": {
            "resource": "pods",
            "namespace": "default",
            "name": "web",
            "apiVersion": "v1",
        },
        "responseStatus": {"code": 201},
        "requestObject": {"kind": "Pod", "metadata": {"name": "web"}},
        "responseObject": {"kind": "Pod", "metadata": {"name": "web", "uid": "u1"}},
        "annotations": {
            "authorization.k8s.io/decision": "allow",
            "mutation.webhook.admission.k8s.io/round_0_index_0": "{}",
            "patch.webhook.admission.k8s.io/round_0_index_0": "{}",
        },
    }
    event.update(fields)
    return event


def _apply(flt: PolicyFilter, fields: dict[str, Any]) -> AuditEvent | None:
    raw = json.dumps(fields).encode()
    return flt.apply(AuditEvent(fields=fields, raw=raw))


def test_event_kept_whole_is_the_same_object() -> None:
    """Nothing to remove: the very same AuditEvent comes back, raw bytes included."""
    flt = _filter("- level: RequestResponse\n")
    event = AuditEvent(fields=_event(), raw=b"{...}")

    assert event is flt.apply(event)


def test_level_none_drops_the_event() -> None:
    """A None decision drops the event."""
    assert _apply(_filter("- level: None\n"), _event()) is None


def test_unmatched_event_is_dropped() -> None:
    """No rule matches: the default level None drops it."""
    assert _apply(_filter("- level: Metadata\n  verbs: [delete]\n"), _event()) is None


def test_omitted_stage_drops_the_event() -> None:
    """An event of a stage the decision omits (rule or policy level) is dropped."""
    flt = _filter("- level: Metadata\n  omitStages: [ResponseStarted]\n", "omitStages: [Panic]\n")

    assert [None, None, "ResponseComplete"] == [
        None if (kept := _apply(flt, _event(stage=stage))) is None else kept.fields["stage"]
        for stage in ("ResponseStarted", "Panic", "ResponseComplete")
    ]


def test_metadata_removes_bodies_and_patch_annotations() -> None:
    """Lowered to Metadata: no request or response object, no webhook patch annotation."""
    original = _event()
    kept = _apply(_filter("- level: Metadata\n"), copy.deepcopy(original))
    assert kept is not None

    expected = {key: value for key, value in original.items() if not key.endswith("Object")}
    expected["level"] = "Metadata"
    expected["annotations"] = {
        "authorization.k8s.io/decision": "allow",
        "mutation.webhook.admission.k8s.io/round_0_index_0": "{}",
    }
    assert (expected, None) == (kept.fields, kept.raw)


def test_request_removes_only_the_response() -> None:
    """Lowered to Request: the request object and annotations stay, the response goes."""
    kept = _apply(_filter("- level: Request\n"), _event())
    assert kept is not None

    assert ("Request", True, False, 3) == (
        kept.fields["level"],
        "requestObject" in kept.fields,
        "responseObject" in kept.fields,
        len(kept.fields["annotations"]),
    )


def test_level_is_never_raised() -> None:
    """A Metadata event under a RequestResponse rule stays as it was recorded."""
    event = AuditEvent(fields=_event(level="Metadata"), raw=b"x")

    assert event is _filter("- level: RequestResponse\n").apply(event)


def test_original_fields_are_not_changed() -> None:
    """Lowering builds a new event; the decoded original is left as it was."""
    fields = _event()
    snapshot = copy.deepcopy(fields)
    _apply(_filter("- level: Metadata\n", "omitManagedFields: true\n"), fields)

    assert snapshot == fields


MANAGED = [{"manager": "kubectl", "operation": "Update"}]


def test_managed_fields_removed_from_objects_lists_and_tables() -> None:
    """omitManagedFields strips metadata.managedFields from objects, list items, table rows."""
    response = {
        "kind": "PodList",
        "metadata": {"resourceVersion": "1"},
        "items": [
            {"metadata": {"name": "a", "managedFields": MANAGED}},
            {"metadata": {"name": "b"}},
        ],
        "rows": [{"cells": [], "object": {"metadata": {"name": "c", "managedFields": MANAGED}}}],
    }
    request = {"kind": "Pod", "metadata": {"name": "web", "managedFields": MANAGED}}
    flt = _filter("- level: RequestResponse\n", "omitManagedFields: true\n")
    kept = _apply(flt, _event(verb="update", requestObject=request, responseObject=response))
    assert kept is not None

    assert (
        {"kind": "Pod", "metadata": {"name": "web"}},
        [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}],
        [{"cells": [], "object": {"metadata": {"name": "c"}}}],
        "RequestResponse",
    ) == (
        kept.fields["requestObject"],
        kept.fields["responseObject"]["items"],
        kept.fields["responseObject"]["rows"],
        kept.fields["level"],
    )


def test_managed_fields_stay_in_patch_bodies() -> None:
    """A patch body is the client's patch: its managedFields are never touched."""
    patch = {"metadata": {"managedFields": MANAGED}}
    response = {"metadata": {"name": "web", "managedFields": MANAGED}}
    flt = _filter("- level: RequestResponse\n  omitManagedFields: true\n")
    kept = _apply(flt, _event(verb="patch", requestObject=patch, responseObject=response))
    assert kept is not None

    assert (patch, {"metadata": {"name": "web"}}) == (
        kept.fields["requestObject"],
        kept.fields["responseObject"],
    )


def test_managed_fields_rule_override_keeps_them() -> None:
    """A rule's omitManagedFields: false overrides the policy default, keeping the event whole."""
    event = AuditEvent(
        fields=_event(requestObject={"metadata": {"managedFields": MANAGED}}), raw=b"x"
    )
    flt = _filter(
        "- level: RequestResponse\n  omitManagedFields: false\n", "omitManagedFields: true\n"
    )

    assert event is flt.apply(event)


def test_authenticated_user_decides_not_the_impersonated_one() -> None:
    """The policy saw the authenticated user; impersonatedUser plays no part."""
    flt = _filter("- level: None\n  users: [admin]\n- level: Metadata\n")
    fields = _event(
        user={"username": "alice", "groups": ["system:authenticated"]},
        impersonatedUser={"username": "admin"},
    )

    assert _apply(flt, fields) is not None


def test_failed_authentication_has_no_user() -> None:
    """An event with an empty user matches no user or group rule, not even for ''."""
    flt = _filter(
        "- level: None\n  users: ['']\n- level: None\n  userGroups: [x]\n- level: Metadata\n"
    )
    kept = _apply(flt, _event(user={}))

    assert (None, "Metadata") == (
        request_attributes(_event(user={})).user,
        kept and kept.fields["level"],
    )


def test_create_name_is_the_one_in_the_url() -> None:
    """A create's objectRef.name was filled in from the body after the decision; the policy
    saw the name in the URL (RequestInfo), which a create to a collection has not."""
    cases = [
        ("create", "/api/v1/namespaces/default/pods", {"resource": "pods", "name": "web"}),
        ("create", "/api/v1/namespaces", {"resource": "namespaces", "name": "team"}),
        ("create", "/api/v1/namespaces/team", {"resource": "namespaces", "name": "team"}),
        ("create", "/apis/apps/v1/namespaces/a/deployments/d?dryRun=All", {"resource": "x"}),
        ("create", "/api/v1/nodes/n%201", {"resource": "nodes", "name": "ignored"}),
        ("create", None, {"resource": "pods", "name": "web"}),
        ("update", "/api/v1/namespaces/default/pods/web", {"resource": "pods", "name": "web"}),
        (
            "create",
            "/api/v1/namespaces/default/pods/web/exec?command=sh",
            {"resource": "pods", "subresource": "exec", "name": "web"},
        ),
    ]

    assert ["", "", "team", "d", "n 1", "", "web", "web"] == [
        request_attributes(_event(verb=verb, requestURI=uri, objectRef=ref)).name
        for verb, uri, ref in cases
    ]


def test_non_resource_path_is_the_decoded_path_without_query() -> None:
    """Without objectRef the path of requestURI, URL-decoded and without query, is matched."""
    fields = _event(requestURI="/logs/a%20b?tail=1", verb="get")
    del fields["objectRef"]

    assert RequestAttributes(
        user="alice", groups=("devs", "system:authenticated"), verb="get", path="/logs/a b"
    ) == request_attributes(fields)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"objectRef": None, "user": None, "verb": None, "requestURI": None},
        {"objectRef": "pods", "user": "alice", "verb": 3, "requestURI": ["/"]},
        {"objectRef": {"resource": 1, "namespace": None}, "user": {"username": 5, "groups": [1]}},
        {"level": "Loud", "stage": None, "annotations": "x", "requestObject": [1]},
        {"level": ["Metadata"], "stage": {"x": 1}, "user": {"groups": [["g"]]}},
    ],
    ids=["empty", "nulls", "wrong types", "wrong inner types", "odd level", "unhashable"],
)
def test_malformed_events_are_decided_on_what_is_there(fields: dict[str, Any]) -> None:
    """Events with fields missing or of the wrong type never raise; the catch-all keeps them."""
    flt = _filter("- level: Metadata\n")

    assert _apply(flt, fields) is not None


def test_missing_object_ref_is_a_non_resource_request() -> None:
    """An event without objectRef cannot match resource rules, only URL or catch-all rules."""
    flt = _filter("- level: RequestResponse\n  resources: [{group: ''}]\n- level: Metadata\n")
    fields = _event()
    del fields["objectRef"]
    kept = _apply(flt, fields)

    assert kept is not None
    assert "Metadata" == kept.fields["level"]


def test_counts_follow_what_was_done() -> None:
    """kept, lowered and dropped count unchanged, changed and removed events."""
    flt = _filter("- level: None\n  verbs: [delete]\n- level: Request\n  verbs: [create]\n")
    flt.apply(AuditEvent(_event(verb="delete")))
    flt.apply(AuditEvent(_event(verb="create")))
    flt.apply(AuditEvent(_event(verb="create", level="Metadata")))

    assert (1, 1, 1) == (flt.counts.kept, flt.counts.lowered, flt.counts.dropped)


def _samples() -> list[dict[str, Any]]:
    return [json.loads(line) for line in sample_lines()]


# The requests test_bundled_policy_on_real_events follows, by (verb, resource, subresource).
KINDS: dict[tuple[str, str | None, str | None], str] = {
    ("create", "pods", "exec"): "exec",
    ("get", "pods", "exec"): "exec",
    ("create", "clusterrolebindings", None): "binding",
    ("create", "secrets", None): "secret write",
    ("update", "leases", None): "lease renewal",
}


def test_bundled_policy_on_real_events() -> None:
    """On the real log, audit_policy.yaml keeps exec and RBAC bindings (bindings whole), lowers
    secret writes to Metadata and drops lease renewals."""
    flt = PolicyFilter.from_file(REPO / "audit_policy.yaml")
    outcome: dict[str, set[tuple[str, str | None]]] = {
        "exec": set(),
        "binding": set(),
        "secret write": set(),
        "lease renewal": set(),
    }
    for fields in _samples():
        if fields["stage"] != "ResponseComplete":
            continue
        ref = fields.get("objectRef") or {}
        target: tuple[str, str | None, str | None] = (
            fields["verb"],
            ref.get("resource"),
            ref.get("subresource"),
        )
        kind = KINDS.get(target)
        if kind is None:
            continue
        recorded = fields["level"]
        kept = flt.apply(AuditEvent(fields))
        outcome[kind].add((recorded, None if kept is None else kept.fields["level"]))

    assert all(outcome.values()), outcome
    assert {"Metadata"} == {level for _, level in outcome["exec"]}
    assert all(recorded == level for recorded, level in outcome["binding"])
    assert {"Metadata"} == {level for _, level in outcome["secret write"]}
    assert any(recorded != "Metadata" for recorded, _ in outcome["secret write"])
    assert {None} == {level for _, level in outcome["lease renewal"]}


REFERENCE_POLICIES = reference_policies()
LEVEL_ORDER = ["None", "Metadata", "Request", "RequestResponse"]


@pytest.mark.parametrize(
    "policy_path", [REPO / "audit_policy.yaml", *REFERENCE_POLICIES], ids=lambda path: path.name
)
def test_filter_only_removes(policy_path: Path) -> None:
    """Under any policy, every shipped event is the recorded one minus some of its parts:
    no key appears, no level rises, annotations only shrink, bodies stay or lose managedFields."""
    flt = PolicyFilter.from_file(policy_path)
    invented = []
    for fields in _samples():
        original = copy.deepcopy(fields)
        kept = flt.apply(AuditEvent(fields))
        if kept is None:
            continue
        out = kept.fields
        rises = LEVEL_ORDER.index(out.get("level", "RequestResponse")) > LEVEL_ORDER.index(
            original.get("level", "RequestResponse")
        )
        new_keys = set(out) - set(original)
        new_annotations = set(out.get("annotations", {})) - set(original.get("annotations", {}))
        changed_bodies = [
            key
            for key in ("requestObject", "responseObject")
            if key in out and _strip_managed(out[key]) != _strip_managed(original[key])
        ]
        if rises or new_keys or new_annotations or changed_bodies:
            invented.append(original.get("auditID"))

    assert [] == invented


def _strip_managed(body: Any) -> Any:
    if isinstance(body, dict):
        return {key: _strip_managed(value) for key, value in body.items() if key != "managedFields"}
    if isinstance(body, list):
        return [_strip_managed(item) for item in body]
    return body
