"""Evaluating an audit policy per request, as kube-apiserver's ``checker.go`` does.

Rules in order, the first that matches decides; rule ``omitStages`` are joined with the
policy's; ``omitManagedFields`` of a rule overrides the policy's; no match means level None.
``compile_policy`` turns a loaded ``Policy`` into a ``CompiledPolicy`` whose ``decide`` costs a
dictionary lookup for the repetitive requests that make up audit traffic: a small bounded cache
is keyed by the request attributes, reduced to what the policy's rules can tell apart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from auditrelay.policy.loading import load_policy
from auditrelay.policy.model import (
    DEFAULT_CACHE_SIZE,
    Decision,
    GroupResources,
    Level,
    Policy,
    PolicyRule,
    RequestAttributes,
)


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
