"""The filter stage: applies the audit policy to each recorded event.

The API server already applied its own policy; this stage applies ours on top, and can only
take away. For each event it rebuilds the request attributes the API server's checker saw (the
authenticated user, never ``impersonatedUser``; no user when authentication failed; a create's
name as its URL gave it, before the body filled it in; for a non-resource request the decoded path
of ``requestURI``), asks the policy, and then:

* level None, or a stage the decision omits: the event is dropped;
* a level below the recorded one: the bodies that level does not carry are removed
  (``responseObject`` below RequestResponse; ``requestObject`` and the mutating-webhook patch
  annotations below Request) and ``level`` says the new level; a higher level is never invented;
* ``omitManagedFields``: ``metadata.managedFields`` is removed from the request and response
  objects, the items of lists and the rows of tables, but never from a patch body.

An event from which nothing is removed is returned as the very same object, ``raw`` and all,
so it can be shipped without serializing it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from auditrelay.model import AuditEvent
from auditrelay.policy import (
    CompiledPolicy,
    Decision,
    Level,
    RequestAttributes,
    compile_policy,
    load_policy,
)

PATCH_ANNOTATION_PREFIX: Final = "patch.webhook.admission.k8s.io/"

_RECORDED_LEVEL: Final = {level.text: level for level in Level}


@dataclass(slots=True)
class FilterCounts:
    """What the filter did with the events it saw, since it was made.

    ``kept`` events went through untouched, ``lowered`` ones lost bodies, annotations or
    managed fields, ``dropped`` ones are gone.
    """

    kept: int = 0
    lowered: int = 0
    dropped: int = 0


class PolicyFilter:
    """``model.EventFilter`` for one pipeline's audit policy."""

    def __init__(self, policy: CompiledPolicy) -> None:
        self.policy = policy
        self.counts = FilterCounts()

    @classmethod
    def from_file(cls, path: Path | str) -> PolicyFilter:
        """A filter for the policy file at ``path``; raises PolicyError when it is invalid."""
        return cls(compile_policy(load_policy(path)))

    def decide(self, fields: dict[str, Any]) -> Decision:
        """The policy's decision for the request an event records."""
        return self.policy.decide_parts(*_request_parts(fields))

    def apply(self, event: AuditEvent) -> AuditEvent | None:
        """The event as the policy keeps it, or None when the policy drops it."""
        fields = event.fields
        decision = self.policy.decide_parts(*_request_parts(fields))
        level = decision.level
        stage = fields.get("stage")
        if level is Level.NONE or (type(stage) is str and stage in decision.omit_stages):
            self.counts.dropped += 1
            return None
        recorded_text = fields.get("level")
        recorded = (
            _RECORDED_LEVEL.get(recorded_text, Level.REQUEST_RESPONSE)
            if type(recorded_text) is str
            else Level.REQUEST_RESPONSE
        )
        omit_managed_fields = decision.omit_managed_fields
        if level >= recorded and not omit_managed_fields:
            self.counts.kept += 1
            return event
        lowered = _lower(fields, min(level, recorded), recorded, omit_managed_fields)
        if lowered is None:
            self.counts.kept += 1
            return event
        self.counts.lowered += 1
        return AuditEvent(fields=lowered, raw=None)


def request_attributes(fields: dict[str, Any]) -> RequestAttributes:
    """The attributes the API server's policy checker saw for the request an event records."""
    return RequestAttributes(*_request_parts(fields))


def _request_parts(
    fields: dict[str, Any],
) -> tuple[str | None, tuple[str, ...], str, str, str, str, str, str, str, bool]:
    """The fields of a RequestAttributes, in order, read from an event without trusting it."""
    user = fields.get("user")
    username: str | None = None
    groups: tuple[str, ...] = ()
    if type(user) is dict:
        name = user.get("username")
        raw_groups = user.get("groups")
        if type(raw_groups) is list:
            groups = tuple(raw_groups)
            try:
                hash(groups)  # cheaper than checking each group; only unhashables would break
            except TypeError:
                groups = tuple(group for group in raw_groups if type(group) is str)
        if type(name) is str and (name or groups):
            username = name
        elif groups:
            username = ""
    verb = fields.get("verb")
    if type(verb) is not str:
        verb = ""
    ref = fields.get("objectRef")
    if type(ref) is dict:
        subresource = _text(ref, "subresource")
        if verb == "create" and not subresource:
            # The body fills a create's name in after the policy decision; the checker saw only
            # the name in the URL, which a create normally has not.
            name = _name_in_uri(fields.get("requestURI"))
        else:
            name = _text(ref, "name")
        return (
            username,
            groups,
            verb,
            _text(ref, "namespace"),
            _text(ref, "apiGroup"),
            _text(ref, "resource"),
            subresource,
            name,
            "",
            True,
        )
    uri = fields.get("requestURI")
    path = uri.partition("?")[0] if type(uri) is str else ""
    if "%" in path:
        path = unquote(path)
    return (username, groups, verb, "", "", "", "", "", path, False)


def _name_in_uri(uri: Any) -> str:
    """The name kube-apiserver's RequestInfo parses from a resource URL (requestinfo.go)."""
    if type(uri) is not str:
        return ""
    path = uri.partition("?")[0]
    parts = unquote(path).strip("/").split("/")
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return ""
    parts = parts[2:] if parts[0] == "api" else parts[3:]  # prefix, [group,] version
    if parts and parts[0] == "namespaces" and len(parts) > 2 and parts[2] not in _NS_SUBRESOURCES:
        parts = parts[2:]
    return parts[1] if len(parts) >= 2 else ""


_NS_SUBRESOURCES: Final = frozenset({"status", "finalize"})


def _text(mapping: dict[str, Any], key: str) -> str:
    value = mapping.get(key)
    return value if type(value) is str else ""


def _lower(
    fields: dict[str, Any], level: Level, recorded: Level, omit_managed_fields: bool
) -> dict[str, Any] | None:
    """A copy of ``fields`` holding what ``level`` keeps, or None when that is everything.

    Nothing is copied until something is known to go: most events only need looking at.
    """
    removed: tuple[str, ...] = ()
    changed: dict[str, Any] = {}
    if level < recorded:
        changed["level"] = level.text
        if level < Level.REQUEST:
            removed = _OBJECT_KEYS
            annotations = fields.get("annotations")
            if type(annotations) is dict and any(
                key.startswith(PATCH_ANNOTATION_PREFIX) for key in annotations
            ):
                changed["annotations"] = {
                    key: value
                    for key, value in annotations.items()
                    if not key.startswith(PATCH_ANNOTATION_PREFIX)
                }
        elif level < Level.REQUEST_RESPONSE:
            removed = ("responseObject",)
    if omit_managed_fields:
        keys = ("responseObject",) if fields.get("verb") == "patch" else _OBJECT_KEYS
        for key in keys:
            body = fields.get(key)
            if body is None or key in removed:
                continue
            stripped = _without_managed_fields(body)
            if stripped is not body:
                changed[key] = stripped
    if not changed:
        return None
    result = dict(fields)
    for key in removed:
        result.pop(key, None)
    result.update(changed)
    return result


_OBJECT_KEYS: Final = ("requestObject", "responseObject")


def _without_managed_fields(body: Any) -> Any:
    """``body`` without metadata.managedFields in it, its list items or table rows.

    Returns ``body`` itself when there is nothing to remove; never changes it in place.
    """
    if type(body) is not dict:
        return body
    result = _without_own_managed_fields(body)
    items = body.get("items")
    if type(items) is list:
        stripped_items = [_without_own_managed_fields(item) for item in items]
        if any(new is not old for new, old in zip(stripped_items, items, strict=True)):
            result = dict(result) if result is body else result
            result["items"] = stripped_items
    rows = body.get("rows")
    if type(rows) is list:
        stripped_rows = [_row_without_managed_fields(row) for row in rows]
        if any(new is not old for new, old in zip(stripped_rows, rows, strict=True)):
            result = dict(result) if result is body else result
            result["rows"] = stripped_rows
    return result


def _without_own_managed_fields(obj: Any) -> Any:
    if type(obj) is not dict:
        return obj
    metadata = obj.get("metadata")
    if type(metadata) is not dict or "managedFields" not in metadata:
        return obj
    result = dict(obj)
    result["metadata"] = {key: value for key, value in metadata.items() if key != "managedFields"}
    return result


def _row_without_managed_fields(row: Any) -> Any:
    if type(row) is not dict:
        return row
    stripped = _without_own_managed_fields(row.get("object"))
    if stripped is row.get("object"):
        return row
    return {**row, "object": stripped}
