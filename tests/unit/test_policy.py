"""auditrelay.policy: loading, validation and evaluation of audit.k8s.io policies."""

from __future__ import annotations

from pathlib import Path

import pytest
from auditrelay.errors import PolicyError
from auditrelay.policy import (
    CompiledPolicy,
    GroupResources,
    Level,
    Policy,
    PolicyRule,
    RequestAttributes,
    compile_policy,
    load_policy,
    parse_policy,
)

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# Upstream's checker tests (k8s.io/apiserver pkg/audit/policy/checker_test.go), translated: the
# same named requests and rules, the same expected levels and stages.

TIM_GROUPS = ("humans", "developers")
REQUESTS = {
    "namespaced": RequestAttributes(
        user="tim@k8s.io",
        groups=TIM_GROUPS,
        verb="get",
        namespace="default",
        resource="pods",
        name="busybox",
        resource_request=True,
        path="/api/v1/namespaces/default/pods/busybox",
    ),
    "cluster": RequestAttributes(
        user="tim@k8s.io",
        groups=TIM_GROUPS,
        verb="get",
        api_group="rbac.authorization.k8s.io",
        resource="clusterroles",
        name="edit",
        resource_request=True,
        path="/apis/rbac.authorization.k8s.io/v1beta1/clusterroles/edit",
    ),
    "nonResource": RequestAttributes(
        user="tim@k8s.io", groups=TIM_GROUPS, verb="get", path="/logs/kubelet.log"
    ),
    "subresource": RequestAttributes(
        user="tim@k8s.io",
        groups=TIM_GROUPS,
        verb="get",
        namespace="default",
        resource="pods",
        subresource="log",
        name="busybox",
        resource_request=True,
        path="/api/v1/namespaces/default/pods/busybox",
    ),
    "Unauthorized": RequestAttributes(
        verb="get",
        namespace="default",
        resource="pods",
        name="busybox",
        resource_request=True,
        path="/api/v1/namespaces/default/pods/busybox",
    ),
    "ClusterRoleUpdate": RequestAttributes(
        user="tim@k8s.io",
        groups=TIM_GROUPS,
        verb="update",
        api_group="rbac.authorization.k8s.io",
        resource="clusterroles",
        subresource="status",
        name="somerole",
        resource_request=True,
        path="/apis/rbac.authorization.k8s.io/v1beta1/clusterroles/somerole",
    ),
}

RR, REQ, META, NONE = Level.REQUEST_RESPONSE, Level.REQUEST, Level.METADATA, Level.NONE
RULES = {
    "default": PolicyRule(level=META),
    "create": PolicyRule(level=REQ, verbs=("create",)),
    "tims": PolicyRule(level=META, users=("tim@k8s.io",)),
    "humans": PolicyRule(level=META, user_groups=("humans",)),
    "serviceAccounts": PolicyRule(level=REQ, user_groups=("system:serviceaccounts",)),
    "getPods": PolicyRule(level=RR, verbs=("get",), resources=(GroupResources("", ("pods",)),)),
    "getPodLogs": PolicyRule(
        level=REQ, verbs=("get",), resources=(GroupResources("", ("pods/log",)),)
    ),
    "getPodWildcardMatching": PolicyRule(
        level=REQ, verbs=("get",), resources=(GroupResources("", ("*",)),)
    ),
    "getPodResourceWildcardMatching": PolicyRule(
        level=REQ, verbs=("get",), resources=(GroupResources("", ("*/log",)),)
    ),
    "getPodSubResourceWildcardMatching": PolicyRule(
        level=REQ, verbs=("get",), resources=(GroupResources("", ("pods/*",)),)
    ),
    "getClusterRoles": PolicyRule(
        level=RR,
        verbs=("get",),
        resources=(GroupResources("rbac.authorization.k8s.io", ("clusterroles",)),),
        namespaces=("",),
    ),
    "getGroupWildCardMatchingWithSubresourceWildcardMatching": PolicyRule(
        level=RR, verbs=("update",), resources=(GroupResources("*", ("*/status",)),)
    ),
    "getLogs": PolicyRule(level=RR, verbs=("get",), non_resource_urls=("/logs*",)),
    "getMetrics": PolicyRule(level=REQ, verbs=("get",), non_resource_urls=("/metrics",)),
    "clusterRoleEdit": PolicyRule(
        level=REQ,
        resources=(GroupResources("rbac.authorization.k8s.io", ("clusterroles",), ("edit",)),),
    ),
    "omit RequestReceived": PolicyRule(level=REQ, omit_stages=("RequestReceived",)),
    "only audit panic": PolicyRule(
        level=REQ, omit_stages=("RequestReceived", "ResponseStarted", "ResponseComplete")
    ),
}

# (request, expected level, rule names) from testAuditLevel.
AUDIT_LEVEL_CASES = [
    ("namespaced", META, ["default"]),
    ("namespaced", NONE, ["create"]),
    ("namespaced", META, ["tims"]),
    ("namespaced", META, ["humans"]),
    ("namespaced", NONE, ["serviceAccounts"]),
    ("namespaced", RR, ["getPods"]),
    ("namespaced", NONE, ["getClusterRoles"]),
    ("namespaced", NONE, ["getLogs"]),
    ("namespaced", NONE, ["getMetrics"]),
    ("namespaced", META, ["getMetrics", "serviceAccounts", "default"]),
    ("namespaced", RR, ["getMetrics", "getPods", "default"]),
    ("namespaced", RR, ["getPodLogs", "getPods"]),
    ("cluster", META, ["default"]),
    ("cluster", NONE, ["create"]),
    ("cluster", META, ["tims"]),
    ("cluster", META, ["humans"]),
    ("cluster", NONE, ["serviceAccounts"]),
    ("cluster", NONE, ["getPods"]),
    ("cluster", RR, ["getClusterRoles"]),
    ("cluster", REQ, ["clusterRoleEdit", "getClusterRoles"]),
    ("cluster", NONE, ["getLogs"]),
    ("cluster", NONE, ["getMetrics"]),
    ("cluster", META, ["getMetrics", "serviceAccounts", "default"]),
    ("cluster", RR, ["getMetrics", "getClusterRoles", "default"]),
    ("cluster", NONE, ["getPodLogs", "getPods"]),
    ("nonResource", META, ["default"]),
    ("nonResource", NONE, ["create"]),
    ("nonResource", META, ["tims"]),
    ("nonResource", META, ["humans"]),
    ("nonResource", NONE, ["serviceAccounts"]),
    ("nonResource", NONE, ["getPods"]),
    ("nonResource", NONE, ["getClusterRoles"]),
    ("nonResource", RR, ["getLogs"]),
    ("nonResource", NONE, ["getMetrics"]),
    ("nonResource", META, ["getMetrics", "serviceAccounts", "default"]),
    ("nonResource", RR, ["getLogs", "getClusterRoles", "default"]),
    ("nonResource", NONE, ["getPodLogs", "getPods"]),
    ("subresource", REQ, ["getPodLogs", "getPods"]),
    ("subresource", REQ, ["getPodWildcardMatching"]),
    ("subresource", REQ, ["getPodResourceWildcardMatching"]),
    ("subresource", REQ, ["getPodSubResourceWildcardMatching"]),
    ("Unauthorized", NONE, ["tims"]),
    ("Unauthorized", META, ["tims", "default"]),
    ("Unauthorized", NONE, ["humans"]),
    ("Unauthorized", META, ["humans", "default"]),
    ("ClusterRoleUpdate", RR, ["getGroupWildCardMatchingWithSubresourceWildcardMatching"]),
]
POLICY_STAGE_SETS = [(), ("RequestReceived", "ResponseStarted")]


def _policy(rule_names: list[str], stages: tuple[str, ...] = ()) -> CompiledPolicy:
    return compile_policy(
        Policy(rules=tuple(RULES[name] for name in rule_names), omit_stages=stages)
    )


@pytest.mark.parametrize("stages", POLICY_STAGE_SETS, ids=["no policy stages", "policy stages"])
@pytest.mark.parametrize(
    ("request_name", "level", "rule_names"),
    AUDIT_LEVEL_CASES,
    ids=[f"{case[0]}:{','.join(case[2])}" for case in AUDIT_LEVEL_CASES],
)
def test_upstream_checker_cases(
    request_name: str, level: Level, rule_names: list[str], stages: tuple[str, ...]
) -> None:
    """Upstream's testAuditLevel matrix: first match wins over named requests and rules."""
    decision = _policy(rule_names, stages).evaluate(REQUESTS[request_name])

    assert (level, frozenset(stages)) == (decision.level, decision.omit_stages)


@pytest.mark.parametrize(
    ("request_name", "policy_stages", "level", "stages", "rule_names"),
    [
        (
            "namespaced",
            (),
            REQ,
            {"RequestReceived"},
            ["omit RequestReceived", "getPods", "default"],
        ),
        (
            "namespaced",
            (),
            REQ,
            {"RequestReceived", "ResponseStarted", "ResponseComplete"},
            ["only audit panic", "getPods", "default"],
        ),
        ("cluster", (), REQ, {"RequestReceived"}, ["omit RequestReceived", "getPods", "default"]),
        ("nonResource", (), REQ, {"RequestReceived"}, ["omit RequestReceived", "getPods"]),
        (
            "namespaced",
            ("RequestReceived", "ResponseStarted"),
            REQ,
            {"RequestReceived", "ResponseStarted"},
            ["omit RequestReceived", "getPods", "default"],
        ),
        (
            "cluster",
            ("RequestReceived", "ResponseStarted"),
            REQ,
            {"RequestReceived", "ResponseStarted", "ResponseComplete"},
            ["only audit panic", "getPods", "default"],
        ),
        (
            "nonResource",
            ("RequestReceived", "ResponseStarted"),
            META,
            {"RequestReceived", "ResponseStarted"},
            ["default", "omit RequestReceived", "getPods"],
        ),
    ],
)
def test_upstream_omit_stages_cases(
    request_name: str,
    policy_stages: tuple[str, ...],
    level: Level,
    stages: set[str],
    rule_names: list[str],
) -> None:
    """Upstream's TestChecker/TestCheckerPolicyOmitStages: rule and policy stages are joined."""
    decision = _policy(rule_names, policy_stages).evaluate(REQUESTS[request_name])

    assert (level, frozenset(stages)) == (decision.level, decision.omit_stages)


@pytest.mark.parametrize(
    ("policy_default", "rule_value", "expected"),
    [(False, None, False), (True, None, True), (True, False, False), (False, True, True)],
)
def test_upstream_omit_managed_fields_cases(
    policy_default: bool, rule_value: bool | None, expected: bool
) -> None:
    """Upstream's TestOmitManagedFields: a rule's value overrides the policy default."""
    rule = PolicyRule(level=RR, verbs=("get",), omit_managed_fields=rule_value)
    policy = compile_policy(Policy(rules=(rule,), omit_managed_fields=policy_default))

    assert expected == policy.evaluate(RequestAttributes(verb="get")).omit_managed_fields


# ---------------------------------------------------------------------------------------------
# The traps of section 1 of the research notes, one each.


def _one_rule(rule: PolicyRule) -> CompiledPolicy:
    return compile_policy(Policy(rules=(rule,)))


def _pods(subresource: str = "", **fields: object) -> RequestAttributes:
    base = {"user": "u", "verb": "get", "resource": "pods", "resource_request": True}
    return RequestAttributes(subresource=subresource, **(base | fields))  # type: ignore[arg-type]


def test_pods_star_matches_bare_pods_and_its_subresources() -> None:
    """``pods/*`` matches ``pods`` itself as well as ``pods/log``, as checker.go does."""
    policy = _one_rule(PolicyRule(level=META, resources=(GroupResources("", ("pods/*",)),)))

    assert [META, META, NONE] == [
        policy.evaluate(request).level
        for request in (_pods(), _pods("log"), _pods(resource="services"))
    ]


def test_plain_resource_does_not_match_its_subresource() -> None:
    """A rule for ``pods`` says nothing about ``pods/exec``."""
    policy = _one_rule(PolicyRule(level=META, resources=(GroupResources("", ("pods",)),)))

    assert NONE == policy.evaluate(_pods("exec")).level


def test_star_status_needs_a_subresource() -> None:
    """``*/status`` matches any resource's status and never a bare resource."""
    policy = _one_rule(PolicyRule(level=META, resources=(GroupResources("", ("*/status",)),)))

    assert [META, NONE] == [policy.evaluate(r).level for r in (_pods("status"), _pods())]


def test_url_star_is_a_plain_string_prefix() -> None:
    """``/logs*`` matches ``/logsfoo`` too: the prefix is not segment-aware."""
    policy = _one_rule(PolicyRule(level=META, non_resource_urls=("/logs*",)))
    paths = ["/logs", "/logs/x", "/logsfoo", "/log"]

    assert [META, META, META, NONE] == [
        policy.evaluate(RequestAttributes(user="u", verb="get", path=p)).level for p in paths
    ]


def test_user_rules_never_match_a_request_without_user() -> None:
    """Rules naming users or groups do not match a failed authentication, even for ''."""
    policy = compile_policy(
        Policy(
            rules=(
                PolicyRule(level=RR, users=("",)),
                PolicyRule(level=REQ, user_groups=("system:unauthenticated",)),
                PolicyRule(level=META),
            )
        )
    )

    assert META == policy.evaluate(RequestAttributes(verb="get", path="/")).level


def test_namespace_rule_never_matches_a_non_resource_request() -> None:
    """A rule with only namespaces is a resource rule: non-resource URLs fall through."""
    policy = _one_rule(PolicyRule(level=META, namespaces=("",)))

    assert NONE == policy.evaluate(RequestAttributes(user="u", verb="get", path="/x")).level


def test_resource_names_never_match_a_nameless_request() -> None:
    """resourceNames compare with the name in the URL, which a create or list does not have."""
    policy = _one_rule(
        PolicyRule(level=RR, resources=(GroupResources("", ("configmaps",), ("coredns",)),))
    )
    create = RequestAttributes(
        user="u", verb="create", resource="configmaps", resource_request=True
    )

    assert NONE == policy.evaluate(create).level


def test_no_match_gives_policy_defaults() -> None:
    """Without a matching rule: level None, the policy's stages and managed-fields setting."""
    policy = compile_policy(
        Policy(
            rules=(PolicyRule(level=META, verbs=("delete",)),),
            omit_stages=("RequestReceived",),
            omit_managed_fields=True,
        )
    )
    decision = policy.evaluate(_pods())

    assert (NONE, frozenset({"RequestReceived"}), True, None) == (
        decision.level,
        decision.omit_stages,
        decision.omit_managed_fields,
        decision.rule_index,
    )


def test_first_matching_rule_is_reported_by_index() -> None:
    """``rule_index`` names the rule that decided, counting from 0."""
    policy = compile_policy(
        Policy(rules=(PolicyRule(level=NONE, verbs=("list",)), PolicyRule(level=META)))
    )

    assert 1 == policy.evaluate(_pods()).rule_index


# ---------------------------------------------------------------------------------------------
# The decision cache.


def test_cache_answers_repeated_requests_and_folds_unnamed_users() -> None:
    """Requests differing only in what no rule names share one cache entry."""
    policy = compile_policy(
        Policy(rules=(PolicyRule(level=NONE, users=("system:kube-proxy",)), PolicyRule(level=META)))
    )
    requests = [_pods(user=f"user-{n}", name=f"pod-{n}", namespace=f"ns-{n}") for n in range(50)]

    decisions = {policy.decide(request) for request in requests}

    assert (1, 1, 49) == (len(decisions), policy.cache_stats.size, policy.cache_stats.hits)


def test_cache_keeps_named_users_apart() -> None:
    """A user a rule names gets its own decision, not the one of the other users."""
    policy = compile_policy(
        Policy(rules=(PolicyRule(level=NONE, users=("system:kube-proxy",)), PolicyRule(level=META)))
    )

    assert [META, NONE, META] == [
        policy.decide(_pods(user=user)).level for user in ("a", "system:kube-proxy", "b")
    ]


def test_cache_is_bounded() -> None:
    """The cache never holds more than its size, however varied the traffic."""
    policy = CompiledPolicy(Policy(rules=(PolicyRule(level=META),)), cache_size=16)
    for n in range(100):
        policy.decide(RequestAttributes(user="u", verb="get", path=f"/p{n}"))

    assert 16 == policy.cache_stats.size


# ---------------------------------------------------------------------------------------------
# Loading and validation.

HEADER = "apiVersion: audit.k8s.io/v1\nkind: Policy\n"


def _error(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="cluster.yaml")
    return str(caught.value)


def test_yaml_that_is_not_a_policy_is_refused() -> None:
    """A YAML list, or a document of another kind, is named as not being an audit policy."""
    assert "cluster.yaml: not an audit policy" in _error("- level: None\n")
    assert "kind 'Pod'" in _error("apiVersion: audit.k8s.io/v1\nkind: Pod\nrules: []\n")
    assert "apiVersion is missing" in _error("kind: Policy\nrules:\n- level: None\n")


def test_broken_yaml_is_refused_with_its_file() -> None:
    """YAML that does not parse is reported as such, naming the file."""
    assert _error(HEADER + "rules: [\n").startswith("cluster.yaml: not valid YAML")


def test_unknown_level_names_rule_and_field() -> None:
    """An unknown level is reported at rules[i].level with the levels that exist."""
    message = _error(HEADER + "rules:\n- level: Metadata\n- level: Verbose\n")

    assert "rules[1].level: unsupported value 'Verbose'" in message
    assert "RequestResponse" in message


def test_missing_level_is_required() -> None:
    """A rule without level is refused at rules[i].level."""
    assert "rules[0].level: required" in _error(HEADER + "rules:\n- verbs: [get]\n")


def test_rule_with_resources_and_urls_is_refused() -> None:
    """A rule may not match both resources and non-resource URLs."""
    text = HEADER + "rules:\n- level: None\n  resources: [{group: ''}]\n  nonResourceURLs: [/x]\n"

    assert "rules[0].nonResourceURLs: rules cannot apply to both" in _error(text)


def test_url_without_leading_slash_is_refused() -> None:
    """Each nonResourceURL is '*' or begins with '/', reported with its index."""
    text = HEADER + "rules:\n- level: None\n  nonResourceURLs: [/ok, healthz]\n"

    assert "rules[0].nonResourceURLs[1]: 'healthz': non-resource URL rules must begin" in _error(
        text
    )


def test_every_problem_is_reported_at_once() -> None:
    """All validation problems of a file come in one error, not only the first."""
    text = HEADER + "omitStages: [Later]\nrules:\n- level: Loud\n- level: None\n  resources:\n"
    text += "  - group: Apps\n    resourceNames: [x]\n"
    message = _error(text)

    assert [True, True, True, True] == [
        part in message
        for part in (
            "omitStages[0]: 'Later'",
            "rules[0].level",
            "rules[1].resources.group: 'Apps'",
            "rules[1].resources.resourceNames",
        )
    ]


def test_policy_without_rules_is_refused() -> None:
    """A policy with no rules would audit nothing; kube-apiserver refuses it, so do we."""
    assert "no rules" in _error(HEADER + "rules: []\n")


def test_unknown_fields_are_ignored_with_a_warning() -> None:
    """OpenShift's ``resource:`` typo: the field is ignored and a warning names it."""
    text = HEADER + "rules:\n- level: None\n  resources:\n  - group: x.io\n    resource: [a]\n"
    policy = parse_policy(text)

    assert (("unknown field rules[0].resources[0].resource ignored",), (), True) == (
        policy.warnings,
        policy.rules[0].resources[0].resources,
        policy.decoded_leniently,
    )


def test_duplicate_fields_keep_the_last_with_a_warning() -> None:
    """A key given twice is a strict-decoding error upstream: the last value counts, warned."""
    policy = parse_policy(HEADER + "rules:\n- level: None\n  level: Metadata\n")

    assert (META, ("field 'level' given twice in a mapping: the last one counts",)) == (
        policy.rules[0].level,
        policy.warnings,
    )


def test_v1beta1_is_read_with_a_warning() -> None:
    """A v1beta1 policy is read like v1, with a warning that newer API servers refuse it."""
    policy = parse_policy("apiVersion: audit.k8s.io/v1beta1\nkind: Policy\nrules:\n- level: None\n")

    assert ("audit.k8s.io/v1beta1", 1) == (policy.api_version, len(policy.warnings))


def test_group_star_is_read_with_a_version_warning() -> None:
    """``group: "*"`` works as upstream's checker (1.36+) and warns that older servers refuse it."""
    text = HEADER + "rules:\n- level: None\n  resources:\n  - group: '*'\n"
    policy = parse_policy(text)

    assert (
        "rules[0].resources[0].group '*' needs kube-apiserver 1.36 or later; "
        "older servers refuse this policy",
    ) == policy.warnings


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A policy path that cannot be read is an error naming it."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read"):
        load_policy(missing)


def test_bundled_policy_loads_cleanly() -> None:
    """audit_policy.yaml loads without a warning, through the package's data symlink too."""
    from auditrelay.config import BUNDLED_POLICY

    assert ((), load_policy(REPO / "audit_policy.yaml").rules) == (
        load_policy(BUNDLED_POLICY).warnings,
        load_policy(BUNDLED_POLICY).rules,
    )


def test_request_attributes_from_json() -> None:
    """eval's JSON form: absent or null keys are empty; only a null user is no user at all."""
    document = {"groups": ["g"], "verb": "get", "resource": "pods", "resourceRequest": True}
    attributes = RequestAttributes.from_json(document | {"namespace": None})
    expected = RequestAttributes(
        user="", groups=("g",), verb="get", resource="pods", resource_request=True
    )

    assert expected == attributes
    assert None is RequestAttributes.from_json(document | {"user": None}).user
    assert attributes == RequestAttributes.from_json(attributes.to_json())


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"user": 3}, "'user' must be a string or null"),
        ({"groups": "g"}, "'groups' must be a list of strings"),
        ({"verb": ["get"]}, "'verb' must be a string"),
        ({"resourceRequest": "yes"}, "'resourceRequest' must be true"),
        ({"usr": "a"}, "unknown key 'usr'"),
    ],
)
def test_request_attributes_from_bad_json(document: dict[str, object], message: str) -> None:
    """Attributes of the wrong type are refused with the key named."""
    with pytest.raises(ValueError, match=message):
        RequestAttributes.from_json(document)
