"""Fuzz target ``filter``: the event -> request-attributes rebuild and the bundled policy applied
to audit events whose fields the fuzzer chose. The filter only ever takes away: it never changes
the event it is given, never adds a field, never raises the level."""

from __future__ import annotations

import copy
from typing import Any, Final

import atheris
import orjson
from auditrelay.config import BUNDLED_POLICY
from auditrelay.filter import PolicyFilter, request_attributes
from auditrelay.model import AuditEvent
from auditrelay.policy import Level, RequestAttributes
from fixtures.chunks import audit_event

from fuzz.targets.values import value

_BUNDLED_FILTER: PolicyFilter | None = None

_FILTER_KEYS: Final = (
    "user",
    "user.username",
    "user.groups",
    "impersonatedUser",
    "verb",
    "requestURI",
    "objectRef",
    "objectRef.namespace",
    "objectRef.name",
    "objectRef.resource",
    "objectRef.subresource",
    "objectRef.apiGroup",
    "requestObject",
    "responseObject",
    "annotations",
    "level",
    "stage",
)
_LEVELS: Final = ("None", "Metadata", "Request", "RequestResponse")
_STAGES: Final = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")


def _bundled_filter() -> PolicyFilter:
    global _BUNDLED_FILTER
    if _BUNDLED_FILTER is None:
        _BUNDLED_FILTER = PolicyFilter.from_file(BUNDLED_POLICY)
    return _BUNDLED_FILTER


def _body(fdp: atheris.FuzzedDataProvider) -> Any:
    """A request or response body, sometimes with managed fields where the filter looks."""
    body = value(fdp)
    if fdp.ConsumeBool():
        managed = {"managedFields": [{"manager": "kubectl"}], "name": "x"}
        body = {"metadata": managed, "items": [{"metadata": dict(managed)}, value(fdp)]}
        body["rows"] = [{"object": {"metadata": dict(managed)}}, value(fdp)]
    return body


def _fuzzed_fields(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    """An audit event as decode hands it on (kind, apiVersion, auditID, stage and level are
    strings), with the fields the filter reads chosen by the fuzzer."""
    fields = audit_event("fuzzed-filter-0000")
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        key = fdp.PickValueInList(list(_FILTER_KEYS))
        if key == "level":
            fields["level"] = fdp.PickValueInList(list(_LEVELS))
        elif key == "stage":
            fields["stage"] = fdp.PickValueInList(list(_STAGES))
        elif key in ("requestObject", "responseObject"):
            fields[key] = _body(fdp)
        elif key == "annotations":
            name = fdp.PickValueInList(["patch.webhook.admission.k8s.io/round_0_index_0", "a/b"])
            fields[key] = {name: value(fdp)} if fdp.ConsumeBool() else value(fdp)
        elif "." in key:
            parent, child = key.split(".")
            if type(fields.get(parent)) is not dict:
                fields[parent] = {}
            fields[parent][child] = (
                fdp.ConsumeUnicodeNoSurrogates(30) if fdp.ConsumeBool() else value(fdp)
            )
        elif fdp.ConsumeBool():
            fields.pop(key, None)
        else:
            fields[key] = fdp.ConsumeUnicodeNoSurrogates(60) if fdp.ConsumeBool() else value(fdp)
    return fields


def fuzz(data: bytes) -> None:
    """The filter on an event whose fields the fuzzer chose: it may only take away."""
    fdp = atheris.FuzzedDataProvider(data)
    fields = _fuzzed_fields(fdp)
    original = copy.deepcopy(fields)
    raw = orjson.dumps(fields) if fdp.ConsumeBool() else None
    attributes = request_attributes(fields)
    assert isinstance(attributes, RequestAttributes)
    event_filter = _bundled_filter()
    decision = event_filter.decide(fields)
    result = event_filter.apply(AuditEvent(fields, raw))
    assert fields == original, "the filter changed the event it was given"
    if decision.level is Level.NONE or fields["stage"] in decision.omit_stages:
        assert result is None
        return
    assert result is not None
    parsed = Level.parse(fields["level"])
    recorded = Level.REQUEST_RESPONSE if parsed is None else parsed
    kept_level = Level.parse(result.fields["level"])
    assert kept_level is not None and kept_level <= recorded, "the filter raised the level"
    assert result.fields.keys() <= fields.keys(), "the filter added a field"
    assert result.fields["auditID"] == fields["auditID"]
    if result.fields is not fields:
        assert result.raw is None, "a changed event kept its original JSON text"
    if kept_level == recorded:
        return  # bodies stay as recorded, even where the event carries more than its level says
    if kept_level < Level.REQUEST:
        assert "requestObject" not in result.fields and "responseObject" not in result.fields
    elif kept_level < Level.REQUEST_RESPONSE:
        assert "responseObject" not in result.fields
