"""The filter stage: applies the audit policy to each recorded event.

The API server already applied its own policy; this stage applies ours on top, and can only
take away. For each event it rebuilds, from the event's header (``model.AuditEvent``), the
request attributes the API server's checker saw: the authenticated user, never
``impersonatedUser``; no user when authentication failed; for a resource request the namespace
and, for a create, the name as kube-apiserver parsed them from the URL (``requestURI``), since it
decides before the body fills ``objectRef`` in (a create of a cluster-scoped object whose body
carries a namespace is decided without one, but recorded with it); for a non-resource request the
decoded path of ``requestURI``. It asks the policy, and then:

* level None, or a stage the decision omits: the event is dropped;
* a level below the recorded one: the bodies that level does not carry are removed
  (``responseObject`` below RequestResponse; ``requestObject`` and the mutating-webhook patch
  annotations below Request) and ``level`` says the new level; a higher level is never invented;
* ``omitManagedFields``: ``metadata.managedFields`` is removed from the request and response
  objects, the items of lists and the rows of tables, but never from a patch body.

An event from which nothing is removed is returned as the very same object, ``raw`` and all,
so it can be shipped as the API server's bytes. An event decoded from JSON (``JsonEvent``) is
lowered without parsing it: the new event is its header with fields left out or replaced, its
JSON text the kept fields' own bytes; only a body that may hold ``managedFields`` is parsed, and
only when ``omitManagedFields`` applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import msgspec
import orjson
from msgspec import UNSET

from auditrelay.model import AuditEvent, EventHeader, JsonEvent
from auditrelay.policy import (
    CompiledPolicy,
    Decision,
    Level,
    RequestAttributes,
    compile_policy,
    load_policy,
)

PATCH_ANNOTATION_PREFIX: Final = "patch.webhook.admission.k8s.io/"

_RECORDED_LEVEL: Final[dict[object, Level]] = {level.text: level for level in Level}
_PATCH_PREFIX_BYTES: Final = PATCH_ANNOTATION_PREFIX.encode()
_MANAGED_FIELDS_BYTES: Final = b"managedFields"
# A key spelled with \u escapes is the same key once decoded; the letters of managedFields
# are ASCII, so their escapes start with \u00.
_ESCAPE: Final = b"\\u00"


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

    def decide(self, event: AuditEvent | dict[str, Any]) -> Decision:
        """The policy's decision for the request an event records."""
        return self.policy.decide_parts(*_header_parts(_header(event)))

    def apply(self, event: AuditEvent) -> AuditEvent | None:
        """The event as the policy keeps it, or None when the policy drops it."""
        header = event.header
        decision = self.policy.decide_parts(*_header_parts(header))
        level = decision.level
        if level is Level.NONE or header.stage in decision.omit_stages:
            self.counts.dropped += 1
            return None
        recorded = _RECORDED_LEVEL.get(header.level, Level.REQUEST_RESPONSE)
        omit_managed_fields = decision.omit_managed_fields
        if level >= recorded and (not omit_managed_fields or _without_bodies(header)):
            self.counts.kept += 1
            return event
        lowered = _lowered_event(event, min(level, recorded), recorded, omit_managed_fields)
        if lowered is None:
            self.counts.kept += 1
            return event
        self.counts.lowered += 1
        return lowered


def _without_bodies(header: EventHeader) -> bool:
    """True for an event decoded from JSON that has neither body (no managed fields to omit)."""
    return (
        type(header) is JsonEvent
        and header.requestObject is UNSET
        and header.responseObject is UNSET
    )


def request_attributes(event: AuditEvent | dict[str, Any]) -> RequestAttributes:
    """The attributes the API server's policy checker saw for the request an event records."""
    return RequestAttributes(*_header_parts(_header(event)))


def _header(event: AuditEvent | dict[str, Any]) -> EventHeader:
    return event.header if isinstance(event, AuditEvent) else AuditEvent(event).header


def _header_parts(
    header: EventHeader,
) -> tuple[str | None, tuple[str, ...], str, str, str, str, str, str, str, bool]:
    """The fields of a RequestAttributes, in order, read from an event's header."""
    user = header.user
    username: str | None = None
    groups: tuple[str, ...] = ()
    if user is not UNSET:
        name = user.username
        if user.groups is not UNSET:
            groups = tuple(user.groups)
        if name is not UNSET and (name or groups):
            username = name
        elif groups:
            username = ""
    verb = header.verb
    if verb is UNSET:
        verb = ""
    ref = header.objectRef
    uri = header.requestURI
    if ref is not UNSET:
        subresource = ref.subresource or ""
        namespace = ref.namespace or ""
        name = ref.name or ""
        create = verb == "create" and not subresource
        # The checker saw the namespace and name the URL gave: the body fills a create's name
        # in after the decision, and a body's namespace is copied into objectRef when the URL
        # has none (audit.LogRequestObject), e.g. for a cluster-scoped object.
        if create:
            parsed = None if uri is UNSET else _namespace_and_name_in_uri(uri)
            namespace, name = (namespace, "") if parsed is None else parsed
        elif namespace and uri is not UNSET:
            namespace = _namespace_in_uri(uri, namespace)
        return (
            username,
            groups,
            verb,
            namespace,
            ref.apiGroup or "",
            ref.resource or "",
            subresource,
            name,
            "",
            True,
        )
    path = uri.partition("?")[0] if uri is not UNSET else ""
    if "%" in path:
        path = unquote(path)
    return (username, groups, verb, "", "", "", "", "", path, False)


_SPECIAL_VERBS: Final = ("watch", "proxy")
_NS_SUBRESOURCES: Final = frozenset({"status", "finalize"})


def _namespace_in_uri(uri: str, namespace: str) -> str:
    """The namespace kube-apiserver's RequestInfo parses from a resource URL, knowing that it is
    either ``namespace`` (objectRef's) or none; the common URL forms are recognised at once."""
    if uri.startswith(_CORE_PREFIX):
        rest = uri[len(_CORE_PREFIX) :]
    elif uri.startswith("/apis/"):
        # /apis/<group>/<version>/namespaces/...: skip the group and the version.
        version_end = uri.find("/", uri.find("/", 6) + 1)
        rest = uri[version_end + 1 :] if version_end > 0 else ""
        rest = rest[len("namespaces/") :] if rest.startswith("namespaces/") else ""
    else:
        rest = ""
    if rest.startswith(namespace) and rest[len(namespace) : len(namespace) + 1] == "/":
        return namespace  # .../namespaces/<namespace>/<something>: the URL's namespace
    parsed = _namespace_and_name_in_uri(uri)
    return namespace if parsed is None else parsed[0]


_CORE_PREFIX: Final = "/api/v1/namespaces/"


def _namespace_and_name_in_uri(uri: str) -> tuple[str, str] | None:
    """The namespace and name kube-apiserver's RequestInfo parses from a resource URL
    (requestinfo.go), or None when the URL is not a resource URL."""
    path = uri.partition("?")[0]
    if "%" in path:
        path = unquote(path)
    parts = path.strip("/").split("/")
    if len(parts) < 3:
        return None
    prefix = parts[0]
    if prefix == "api":
        parts = parts[2:]  # prefix, version
    elif prefix == "apis" and len(parts) >= 4:
        parts = parts[3:]  # prefix, group, version
    else:
        return None
    if parts[0] in _SPECIAL_VERBS:
        if len(parts) < 2:
            return None
        parts = parts[1:]
    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in _NS_SUBRESOURCES:
            parts = parts[2:]
    return namespace, parts[1] if len(parts) >= 2 else ""


def _lowered_event(
    event: AuditEvent, level: Level, recorded: Level, omit_managed_fields: bool
) -> AuditEvent | None:
    """The event holding what ``level`` keeps, or None when that is everything."""
    header = event.header
    if type(header) is JsonEvent and event.raw is not None:
        lowered = _lower_json(header, event.raw, level, recorded, omit_managed_fields)
        if lowered is None:
            return None
        return AuditEvent(raw=msgspec.json.encode(lowered), header=lowered)
    fields = _lower(event.fields, level, recorded, omit_managed_fields)
    return None if fields is None else AuditEvent(fields)


def _lower_json(
    header: JsonEvent, line: bytes, level: Level, recorded: Level, omit_managed_fields: bool
) -> JsonEvent | None:
    """``_lower`` for an event decoded from JSON: the header with fields left out or replaced,
    or None when nothing goes. Bodies stay the line's bytes unless managed fields leave them."""
    changes: dict[str, Any] = {}
    if level < recorded:
        changes["level"] = level.text
        if level < Level.REQUEST:
            changes["requestObject"] = changes["responseObject"] = UNSET
            annotations = header.annotations
            if annotations is not UNSET:
                text = bytes(annotations)
                if _PATCH_PREFIX_BYTES in text or _ESCAPE in text:
                    parsed = _parse(text)
                    if type(parsed) is dict and any(
                        key.startswith(PATCH_ANNOTATION_PREFIX) for key in parsed
                    ):
                        kept = {
                            key: value
                            for key, value in parsed.items()
                            if not key.startswith(PATCH_ANNOTATION_PREFIX)
                        }
                        changes["annotations"] = msgspec.Raw(_dumps(kept))
        elif level < Level.REQUEST_RESPONSE:
            changes["responseObject"] = UNSET
    if (
        omit_managed_fields
        and (header.requestObject is not UNSET or header.responseObject is not UNSET)
        and (_MANAGED_FIELDS_BYTES in line or _ESCAPE in line)
    ):
        keys = ("responseObject",) if header.verb == "patch" else _OBJECT_KEYS
        for key in keys:
            body = getattr(header, key)
            if body is UNSET or key in changes:
                continue
            text = bytes(body)
            if _MANAGED_FIELDS_BYTES not in text and _ESCAPE not in text:
                continue
            parsed = _parse(text)
            stripped = _without_managed_fields(parsed)
            if stripped is not parsed:
                changes[key] = msgspec.Raw(_dumps(stripped))
    if not changes:
        return None
    return msgspec.structs.replace(header, **changes)


def _parse(text: bytes) -> Any:
    """JSON text to Python objects; integers beyond 64 bits too (orjson refuses them)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


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
