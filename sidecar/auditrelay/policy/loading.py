"""Loading and validating an audit.k8s.io Policy, as kube-apiserver's ``reader.go`` does.

apiVersion is required (``audit.k8s.io/v1``; the retired ``v1beta1`` is accepted with a
warning), kind must be Policy when given, decoding is strict first and falls back to a lenient
decoding that ignores unknown fields with a warning (OpenShift ships a policy that relies on
it), then ``validation.go`` runs and every problem is reported with its field path
(``rules[3].level``), and a policy without rules is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from auditrelay.errors import PolicyError
from auditrelay.policy.model import (
    API_VERSION_V1,
    API_VERSION_V1BETA1,
    KIND,
    STAGES,
    GroupResources,
    Level,
    Policy,
    PolicyRule,
)


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
