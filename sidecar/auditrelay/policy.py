"""Audit policies: loading and validating an audit.k8s.io Policy, and evaluating it per request.

Both halves follow kube-apiserver (k8s.io/apiserver ``pkg/audit/policy``) to the letter:

* loading is ``reader.go``: apiVersion is required (``audit.k8s.io/v1``; the retired
  ``v1beta1`` is accepted here with a warning), kind must be Policy when given, decoding is
  strict first and falls back to a lenient decoding that ignores unknown fields with a warning
  (OpenShift ships a policy that relies on it), then ``validation.go`` runs and every problem
  is reported with its field path (``rules[3].level``), and a policy without rules is refused;
* evaluation is ``checker.go``: rules in order, the first that matches decides; rule
  ``omitStages`` are joined with the policy's; ``omitManagedFields`` of a rule overrides the
  policy's; no match means level None.

``compile_policy`` turns a loaded ``Policy`` into a ``CompiledPolicy`` whose ``decide`` costs a
dictionary lookup for the repetitive requests that make up audit traffic: a small bounded
cache is keyed by the request attributes, reduced to what the policy's rules can tell apart.
"""

from __future__ import annotations

import enum
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from auditrelay.errors import PolicyError

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


# --------------------------------------------------------------------------------------------
# Loading and validation


class _Problems:
    """Collects problems found while reading a policy, each with its field path."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.unknown: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")


def load_policy(path: Path | str) -> Policy:
    """Reads and validates the policy file at ``path``; raises PolicyError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise PolicyError(f"{source}: cannot read the policy file: {error.strerror}") from error
    return parse_policy(text, source=source)


def parse_policy(text: str | bytes, source: str = "<policy>") -> Policy:
    """Decodes and validates a policy document the way kube-apiserver's loader does."""
    try:
        # The reader checks the first characters (encoding, printable) when it is made.
        loader = _UniqueKeyLoader(text)
    except yaml.YAMLError as error:
        raise PolicyError(f"{source}: not valid YAML: {_one_line(error)}") from error
    try:
        # Like kube-apiserver's YAML reader, only the first document of a stream counts.
        has_document: bool = loader.check_data()  # type: ignore[no-untyped-call]
        document = loader.get_data() if has_document else None
    except yaml.YAMLError as error:
        raise PolicyError(f"{source}: not valid YAML: {_one_line(error)}") from error
    finally:
        loader.dispose()
    if not isinstance(document, dict):
        raise PolicyError(
            f"{source}: not an audit policy: expected a mapping with apiVersion "
            f"{API_VERSION_V1!r} and kind {KIND!r}, got {_type_name(document)}"
        )
    problems = _Problems()
    api_version = _check_type_meta(document, source)
    policy_rules = _decode_policy(document, problems)
    if problems.errors:
        raise PolicyError(f"{source}: invalid audit policy: " + "; ".join(problems.errors))
    rules, omit_stages, omit_managed_fields = policy_rules
    if not rules:
        raise PolicyError(f"{source}: invalid audit policy: the policy has no rules (rules: [])")
    warnings = [f"unknown field {name} ignored" for name in problems.unknown]
    warnings += [
        f"field {key!r} given twice in a mapping: the last one counts" for key in loader.duplicates
    ]
    if api_version == API_VERSION_V1BETA1:
        warnings.insert(
            0,
            f"apiVersion {API_VERSION_V1BETA1} is read like {API_VERSION_V1}, "
            "but kube-apiserver 1.24 and later refuse it",
        )
    warnings += [
        f"rules[{index}].resources[{entry_index}].group '*' needs kube-apiserver 1.36 or "
        "later; older servers refuse this policy"
        for index, rule in enumerate(rules)
        for entry_index, entry in enumerate(rule.resources)
        if entry.group == "*"
    ]
    return Policy(
        rules=rules,
        omit_stages=omit_stages,
        omit_managed_fields=omit_managed_fields,
        api_version=api_version,
        source=source,
        warnings=tuple(warnings),
        decoded_leniently=bool(problems.unknown or loader.duplicates),
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that reads scalars as kube-apiserver's YAML reader does, and remembers
    duplicate keys (a strict-decoding error upstream).

    Like go-yaml, it leaves timestamps as the strings they are: ``users: [2021-01-01]`` names a
    user. (YAML 1.1 booleans such as ``on`` are booleans in both.)
    """

    yaml_implicit_resolvers = {  # noqa: RUF012 - PyYAML reads its resolvers from the class
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                self.duplicates.append(key)
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_type_meta(document: Mapping[str, Any], source: str) -> str:
    # kube-apiserver's decoder needs the apiVersion, and takes a missing kind to be the kind it
    # decodes into (Policy); a kind that is there must be Policy.
    api_version = document.get("apiVersion")
    if not api_version:
        raise PolicyError(
            f"{source}: not an audit policy: apiVersion is missing "
            f"(expected apiVersion {API_VERSION_V1!r}, kind {KIND!r})"
        )
    if api_version not in (API_VERSION_V1, API_VERSION_V1BETA1):
        raise PolicyError(
            f"{source}: not an audit policy: apiVersion {api_version!r} "
            f"(expected {API_VERSION_V1!r})"
        )
    kind = document.get("kind")
    if kind and kind != KIND:
        raise PolicyError(f"{source}: not an audit policy: kind {kind!r} (expected {KIND!r})")
    return str(api_version)


_POLICY_FIELDS: Final = frozenset(
    {"apiVersion", "kind", "metadata", "rules", "omitStages", "omitManagedFields"}
)
_RULE_FIELDS: Final = frozenset(
    {
        "level",
        "users",
        "userGroups",
        "verbs",
        "resources",
        "namespaces",
        "nonResourceURLs",
        "omitStages",
        "omitManagedFields",
    }
)
_GROUP_RESOURCES_FIELDS: Final = frozenset({"group", "resources", "resourceNames"})


def _decode_policy(
    document: Mapping[str, Any], problems: _Problems
) -> tuple[tuple[PolicyRule, ...], tuple[str, ...], bool]:
    _note_unknown(document, _POLICY_FIELDS, "", problems)
    if not isinstance(document.get("metadata", {}) or {}, dict):
        problems.error("metadata", f"expected a mapping, got {_type_name(document['metadata'])}")
    omit_stages = _stages(document.get("omitStages"), "omitStages", problems)
    omit_managed_fields = _boolean(document.get("omitManagedFields"), "omitManagedFields", problems)
    raw_rules = document.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        problems.error("rules", f"expected a list of rules, got {_type_name(raw_rules)}")
        raw_rules = None
    rules = tuple(
        _decode_rule(raw, f"rules[{index}]", problems) for index, raw in enumerate(raw_rules or ())
    )
    return rules, omit_stages, bool(omit_managed_fields)


def _decode_rule(raw: Any, path: str, problems: _Problems) -> PolicyRule:
    if not isinstance(raw, dict):
        problems.error(path, f"expected a mapping, got {_type_name(raw)}")
        return PolicyRule(level=Level.NONE)
    _note_unknown(raw, _RULE_FIELDS, path + ".", problems)
    level = _level(raw.get("level"), f"{path}.level", problems)
    non_resource_urls = _strings(raw.get("nonResourceURLs"), f"{path}.nonResourceURLs", problems)
    _validate_non_resource_urls(non_resource_urls, f"{path}.nonResourceURLs", problems)
    resources = _group_resources(raw.get("resources"), f"{path}.resources", problems)
    namespaces = _strings(raw.get("namespaces"), f"{path}.namespaces", problems)
    if non_resource_urls and (resources or namespaces):
        problems.error(
            f"{path}.nonResourceURLs",
            "rules cannot apply to both regular resources and non-resource URLs "
            "(set nonResourceURLs, or resources/namespaces, not both)",
        )
    return PolicyRule(
        level=level,
        users=_strings(raw.get("users"), f"{path}.users", problems),
        user_groups=_strings(raw.get("userGroups"), f"{path}.userGroups", problems),
        verbs=_strings(raw.get("verbs"), f"{path}.verbs", problems),
        resources=resources,
        namespaces=namespaces,
        non_resource_urls=non_resource_urls,
        omit_stages=_stages(raw.get("omitStages"), f"{path}.omitStages", problems),
        omit_managed_fields=_boolean(
            raw.get("omitManagedFields"), f"{path}.omitManagedFields", problems
        ),
    )


def _level(raw: Any, path: str, problems: _Problems) -> Level:
    if raw is None or raw == "":
        problems.error(path, "required: one of None, Metadata, Request, RequestResponse")
        return Level.NONE
    level = Level.parse(raw) if isinstance(raw, str) else None
    if level is None:
        problems.error(
            path,
            f"unsupported value {raw!r}: expected one of None, Metadata, Request, RequestResponse",
        )
        return Level.NONE
    return level


def _validate_non_resource_urls(urls: Sequence[str], path: str, problems: _Problems) -> None:
    for index, url in enumerate(urls):
        if url == "*":
            continue
        if not url.startswith("/"):
            problems.error(
                f"{path}[{index}]", f"{url!r}: non-resource URL rules must begin with a '/'"
            )
        if "*" in url[:-1]:
            problems.error(
                f"{path}[{index}]",
                f"{url!r}: non-resource URL wildcards '*' must be the final character",
            )


# A DNS-1123 subdomain, as k8s.io/apimachinery's NameIsDNSSubdomain checks a group name.
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


def _group_resources(raw: Any, path: str, problems: _Problems) -> tuple[GroupResources, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.error(path, f"expected a list of group resources, got {_type_name(raw)}")
        return ()
    entries = []
    for index, item in enumerate(raw):
        entry_path = f"{path}[{index}]"
        if not isinstance(item, dict):
            problems.error(entry_path, f"expected a mapping, got {_type_name(item)}")
            continue
        _note_unknown(item, _GROUP_RESOURCES_FIELDS, entry_path + ".", problems)
        group = _string(item.get("group"), f"{entry_path}.group", problems)
        if group and group != "*" and not _is_dns_subdomain(group):
            problems.error(
                f"{path}.group",
                f"{group!r}: an API group must be '' (core), '*' or a lowercase DNS-1123 "
                "subdomain such as 'rbac.authorization.k8s.io'",
            )
        resources = _strings(item.get("resources"), f"{entry_path}.resources", problems)
        names = _strings(item.get("resourceNames"), f"{entry_path}.resourceNames", problems)
        if names and not resources:
            problems.error(
                f"{path}.resourceNames", "using resourceNames requires at least one resource"
            )
        entries.append(GroupResources(group=group, resources=resources, resource_names=names))
    return tuple(entries)


def _is_dns_subdomain(group: str) -> bool:
    return len(group) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(group) is not None


def _stages(raw: Any, path: str, problems: _Problems) -> tuple[str, ...]:
    stages = _strings(raw, path, problems)
    for index, stage in enumerate(stages):
        if stage not in STAGES:
            problems.error(f"{path}[{index}]", f"{stage!r}: allowed stages are {', '.join(STAGES)}")
    return stages


def _strings(raw: Any, path: str, problems: _Problems) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.error(path, f"expected a list of strings, got {_type_name(raw)}")
        return ()
    values = []
    for index, item in enumerate(raw):
        if item is None:
            values.append("")
        elif isinstance(item, str):
            values.append(item)
        else:
            problems.error(f"{path}[{index}]", f"expected a string, got {_type_name(item)}")
    return tuple(values)


def _string(raw: Any, path: str, problems: _Problems) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        problems.error(path, f"expected a string, got {_type_name(raw)}")
        return ""
    return raw


def _boolean(raw: Any, path: str, problems: _Problems) -> bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    problems.error(path, f"expected true or false, got {_type_name(raw)}")
    return None


def _note_unknown(
    mapping: Mapping[Any, Any], known: frozenset[str], prefix: str, problems: _Problems
) -> None:
    problems.unknown.extend(prefix + str(key) for key in mapping if key not in known)


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"a {type(value).__name__}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# --------------------------------------------------------------------------------------------
# Evaluation


class _CompiledGroupResources:
    """One ``resources`` entry, with its resource patterns sorted by kind of wildcard."""

    __slots__ = ("any_group", "exact", "group", "names", "star", "star_resources", "star_subs")

    def __init__(self, entry: GroupResources) -> None:
        self.group = entry.group
        self.any_group = entry.group == "*"
        self.names = frozenset(entry.resource_names)
        self.exact = frozenset(entry.resources)
        self.star = "*" in self.exact or not entry.resources
        # "*/sub" matches any resource's subresource "sub"; "res/*" matches res and every
        # subresource of it (including bare "res": checker.go compares only the resource).
        self.star_subs = frozenset(r[2:] for r in entry.resources if r.startswith("*/"))
        self.star_resources = frozenset(r[:-2] for r in entry.resources if r.endswith("/*"))

    def matches(self, api_group: str, resource: str, subresource: str, name: str) -> bool:
        if not (self.any_group or self.group == api_group):
            return False
        if not self.exact:
            return True
        if self.names and name not in self.names:
            return False
        if self.star:
            return True
        combined = f"{resource}/{subresource}" if subresource else resource
        return (
            combined in self.exact
            or (bool(subresource) and subresource in self.star_subs)
            or resource in self.star_resources
        )


class _CompiledRule:
    """A rule turned into sets and prefixes; ``matches`` is checker.go's ruleMatches."""

    __slots__ = (
        "any_path",
        "groups",
        "namespaces",
        "path_prefixes",
        "paths",
        "resource_rule",
        "resources",
        "url_rule",
        "users",
        "verbs",
    )

    def __init__(self, rule: PolicyRule) -> None:
        self.users = frozenset(rule.users)
        self.groups = frozenset(rule.user_groups)
        self.verbs = frozenset(rule.verbs)
        self.namespaces = frozenset(rule.namespaces)
        self.resources = tuple(_CompiledGroupResources(entry) for entry in rule.resources)
        self.resource_rule = bool(rule.namespaces or rule.resources)
        self.url_rule = not self.resource_rule and bool(rule.non_resource_urls)
        self.any_path = "*" in rule.non_resource_urls
        self.paths = frozenset(rule.non_resource_urls)
        self.path_prefixes = tuple(
            url.rstrip("*") for url in rule.non_resource_urls if url.endswith("*")
        )

    def matches(self, request: RequestAttributes) -> bool:
        if self.users and (request.user is None or request.user not in self.users):
            return False
        if self.groups and (request.user is None or self.groups.isdisjoint(request.groups)):
            return False
        if self.verbs and request.verb not in self.verbs:
            return False
        if self.resource_rule:
            return self._matches_resource(request)
        if self.url_rule:
            return self._matches_path(request)
        return True

    def _matches_resource(self, request: RequestAttributes) -> bool:
        if not request.resource_request:
            return False
        if self.namespaces and request.namespace not in self.namespaces:
            return False
        if not self.resources:
            return True
        return any(
            entry.matches(request.api_group, request.resource, request.subresource, request.name)
            for entry in self.resources
        )

    def _matches_path(self, request: RequestAttributes) -> bool:
        if request.resource_request:
            return False
        path = request.path
        return self.any_path or path in self.paths or path.startswith(self.path_prefixes)


@dataclass(slots=True)
class CacheStats:
    """How the decision cache has fared."""

    hits: int = 0
    misses: int = 0
    size: int = 0


class CompiledPolicy:
    """A policy ready to evaluate requests, with a bounded cache of recent decisions."""

    def __init__(self, policy: Policy, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.policy = policy
        policy_stages = frozenset(policy.omit_stages)
        self._rules = tuple(_CompiledRule(rule) for rule in policy.rules)
        self._decisions = tuple(
            Decision(
                level=rule.level,
                omit_stages=policy_stages | frozenset(rule.omit_stages),
                omit_managed_fields=(
                    policy.omit_managed_fields
                    if rule.omit_managed_fields is None
                    else rule.omit_managed_fields
                ),
                rule_index=index,
            )
            for index, rule in enumerate(policy.rules)
        )
        self._default = Decision(Level.NONE, policy_stages, policy.omit_managed_fields, None)
        # Insertion order is eviction order; OrderedDict drops its oldest entry in O(1).
        self._cache: OrderedDict[tuple[object, ...], Decision] = OrderedDict()
        self._cache_size = cache_size
        rules = policy.rules
        self._users = frozenset(user for rule in rules for user in rule.users)
        self._groups = frozenset(group for rule in rules for group in rule.user_groups)
        self._namespaces = frozenset(ns for rule in rules for ns in rule.namespaces)
        self._names = frozenset(
            name for rule in rules for entry in rule.resources for name in entry.resource_names
        )
        self.cache_stats = CacheStats()

    def evaluate(self, request: RequestAttributes) -> Decision:
        """The decision for ``request``: the first matching rule's, or the default."""
        for rule, decision in zip(self._rules, self._decisions, strict=True):
            if rule.matches(request):
                return decision
        return self._default

    def decide(self, request: RequestAttributes) -> Decision:
        """Like ``evaluate``, answered from the cache when an equivalent request was seen."""
        return self.decide_parts(
            request.user,
            request.groups,
            request.verb,
            request.namespace,
            request.api_group,
            request.resource,
            request.subresource,
            request.name,
            request.path,
            request.resource_request,
        )

    def decide_parts(
        self,
        user: str | None,
        groups: tuple[str, ...],
        verb: str,
        namespace: str,
        api_group: str,
        resource: str,
        subresource: str,
        name: str,
        path: str,
        resource_request: bool,
    ) -> Decision:
        """``decide`` for the fields of a RequestAttributes, in its order.

        The filter's hot path calls this with what it read from an event, so that a cache hit
        costs no RequestAttributes at all.
        """
        key_user: object = user
        if user is not None and user not in self._users:
            key_user = _ANY_OTHER
        key_groups = self._groups.intersection(groups) if self._groups else _NOTHING
        if resource_request:
            key: tuple[object, ...] = (
                key_user,
                key_groups,
                verb,
                namespace if namespace in self._namespaces else _ANY_OTHER,
                api_group,
                resource,
                subresource,
                name if name in self._names else _ANY_OTHER,
            )
        else:
            key = (key_user, key_groups, verb, path)
        decision = self._cache.get(key)
        if decision is not None:
            self.cache_stats.hits += 1
            return decision
        self.cache_stats.misses += 1
        decision = self.evaluate(
            RequestAttributes(
                user,
                groups,
                verb,
                namespace,
                api_group,
                resource,
                subresource,
                name,
                path,
                resource_request,
            )
        )
        if len(self._cache) >= self._cache_size:
            self._cache.popitem(last=False)
        self._cache[key] = decision
        self.cache_stats.size = len(self._cache)
        return decision


# The cache key folds away what the rules cannot tell apart: a user the rules never name is as
# good as any other user, and the same holds for groups, namespaces and resource names; the
# path matters only for non-resource requests, the resource fields only for resource requests.
# Real traffic varies far more in those than in its decisions, so the cache stays small.
_ANY_OTHER: Final = ("any other",)
_NOTHING: Final = frozenset[str]()


def compile_policy(policy: Policy, cache_size: int = DEFAULT_CACHE_SIZE) -> CompiledPolicy:
    """The policy made ready for per-request evaluation."""
    return CompiledPolicy(policy, cache_size=cache_size)


def load_compiled(path: Path | str, cache_size: int = DEFAULT_CACHE_SIZE) -> CompiledPolicy:
    """Loads, validates and compiles the policy at ``path``."""
    return compile_policy(load_policy(path), cache_size=cache_size)
