"""What an audit policy is made of: levels, rules, the policy, a request's attributes, a decision.

The types of k8s.io/apiserver's ``pkg/apis/audit`` that the loader (``loading``) builds and the
evaluator (``evaluation``) reads.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

API_VERSION_V1: Final = "audit.k8s.io/v1"
API_VERSION_V1BETA1: Final = "audit.k8s.io/v1beta1"
KIND: Final = "Policy"

STAGES: Final = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")
DEFAULT_CACHE_SIZE: Final = 4096


class Level(enum.IntEnum):
    """An audit level; the order is how much an event carries."""

    NONE = 0
    METADATA = 1
    REQUEST = 2
    REQUEST_RESPONSE = 3

    @property
    def text(self) -> str:
        """The level as audit.k8s.io spells it."""
        return _LEVEL_TEXT[self]

    @classmethod
    def parse(cls, text: str) -> Level | None:
        """The level spelled ``text``, or None when it is not one."""
        return _LEVEL_BY_TEXT.get(text)


_LEVEL_TEXT: Final = {
    Level.NONE: "None",
    Level.METADATA: "Metadata",
    Level.REQUEST: "Request",
    Level.REQUEST_RESPONSE: "RequestResponse",
}
_LEVEL_BY_TEXT: Final = {text: level for level, text in _LEVEL_TEXT.items()}


@dataclass(frozen=True, slots=True)
class GroupResources:
    """One ``resources`` entry of a rule."""

    group: str = ""
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One rule of a policy, as written (omit_stages are the rule's own)."""

    level: Level
    users: tuple[str, ...] = ()
    user_groups: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()
    resources: tuple[GroupResources, ...] = ()
    namespaces: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()
    omit_stages: tuple[str, ...] = ()
    omit_managed_fields: bool | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """A loaded and validated audit policy, with the warnings its loading raised.

    ``decoded_leniently`` says that strict decoding failed (unknown or duplicate fields) and
    the lenient reading was used, as kube-apiserver does with a warning.
    """

    rules: tuple[PolicyRule, ...]
    omit_stages: tuple[str, ...] = ()
    omit_managed_fields: bool = False
    api_version: str = API_VERSION_V1
    source: str = "<policy>"
    warnings: tuple[str, ...] = ()
    decoded_leniently: bool = False


@dataclass(frozen=True, slots=True)
class RequestAttributes:
    """What the API server's policy checker sees of a request.

    ``user`` None is a request whose authentication failed (no user at all); empty strings
    are empty attributes, as in k8s.io/apiserver's ``authorizer.AttributesRecord``.
    """

    user: str | None = None
    groups: tuple[str, ...] = ()
    verb: str = ""
    namespace: str = ""
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""
    resource_request: bool = False

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RequestAttributes:
        """Attributes from their JSON form (``auditrelay policy eval``'s input).

        Keys are ``user``, ``groups``, ``verb``, ``namespace``, ``apiGroup``, ``resource``,
        ``subresource``, ``name``, ``path``, ``resourceRequest``; absent or null means empty
        (an absent ``user`` is the empty user name), except that a null ``user`` is a request
        without an authenticated user. Raises
        ValueError naming the key whose value has the wrong type.
        """
        unknown = sorted(set(document) - set(_JSON_KEYS))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (expected {', '.join(_JSON_KEYS)})")
        user = document.get("user", "")
        if user is not None and not isinstance(user, str):
            raise ValueError("'user' must be a string or null")
        groups = document.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("'groups' must be a list of strings")
        texts = {}
        for key in ("verb", "namespace", "apiGroup", "resource", "subresource", "name", "path"):
            value = document.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key!r} must be a string or null")
            texts[key] = value or ""
        resource_request = document.get("resourceRequest")
        if resource_request is not None and not isinstance(resource_request, bool):
            raise ValueError("'resourceRequest' must be true, false or null")
        return cls(
            user=user,
            groups=tuple(groups),
            verb=texts["verb"],
            namespace=texts["namespace"],
            api_group=texts["apiGroup"],
            resource=texts["resource"],
            subresource=texts["subresource"],
            name=texts["name"],
            path=texts["path"],
            resource_request=bool(resource_request),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form ``from_json`` reads."""
        return {
            "user": self.user,
            "groups": list(self.groups),
            "verb": self.verb,
            "namespace": self.namespace,
            "apiGroup": self.api_group,
            "resource": self.resource,
            "subresource": self.subresource,
            "name": self.name,
            "path": self.path,
            "resourceRequest": self.resource_request,
        }


_JSON_KEYS: Final = (
    "user",
    "groups",
    "verb",
    "namespace",
    "apiGroup",
    "resource",
    "subresource",
    "name",
    "path",
    "resourceRequest",
)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy says about a request; ``rule_index`` is None when no rule matched."""

    level: Level
    omit_stages: frozenset[str]
    omit_managed_fields: bool
    rule_index: int | None

    def to_json(self) -> dict[str, Any]:
        """``{"level", "omitStages", "omitManagedFields", "rule"}``, stages in pipeline order."""
        return {
            "level": self.level.text,
            "omitStages": [stage for stage in STAGES if stage in self.omit_stages],
            "omitManagedFields": self.omit_managed_fields,
            "rule": self.rule_index,
        }
