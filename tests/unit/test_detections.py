"""The detection rules: well-formed, accepted by Microsoft's Kusto analyzer, fed by the policy."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from auditrelay.detections import (
    BUNDLED_RULES,
    EVIDENCE_COLUMN,
    RuleError,
    iso_duration,
    load_rule,
    load_rules,
)
from auditrelay.policy import compile_policy, load_policy
from auditrelay.policy_verify import detection_probes, stages_of
from auditrelay.stream import COLUMNS, TABLE_NAME
from kql.analyzer import analyze

from tools.detection_templates import (
    AKS_COLUMNS,
    FUNCTION_ALIAS,
    LOG_ALERT_MAX_WINDOW_HOURS,
    function_query,
    missing_sources,
    render_log_alerts_template,
    render_sentinel_template,
)

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "detections"
BUNDLED_POLICY = REPO / "audit_policy.yaml"
# One rule per control-plane alert need of docs/policy.md and the detections issue.
EXPECTED_RULES = {
    "cluster-admin-binding",
    "high-privilege-role",
    "privileged-container",
    "sensitive-host-mount",
    "kube-system-container",
    "malicious-image",
    "exposed-sensitive-service",
    "coredns-modification",
    "admission-webhook",
    "events-deleted",
    "secret-access",
    "service-account-pod-listing",
    "exec-into-pod",
    "anonymous-access",
    "pentest-user-agent",
    "privileged-impersonation",
    "failed-authentication-burst",
    "defender-test-alert",
}


def test_one_rule_per_alert_need_and_the_package_ships_the_same_files() -> None:
    """detections/ holds a rule for every need, and the package's copy is the same directory."""
    rules = load_rules(RULES_DIR)

    assert EXPECTED_RULES == {rule.slug for rule in rules}
    assert RULES_DIR.resolve() == BUNDLED_RULES.resolve()


EVERY_COLUMN = ", ".join(f"['{column.name}']" for column in COLUMNS)
CONTROL_QUERIES = {
    "control: every column": f"{TABLE_NAME} | project {EVERY_COLUMN}",
    "control: misspelt column": f"{TABLE_NAME} | where verbx == 'get'",
    "control: type error": f"{TABLE_NAME} | where toint(responseStatus.code) == 'x' + 1",
}


# A hunting query written for AKSAudit, run through the function by changing only the table name.
AKS_HUNTING_QUERY = f"""let {FUNCTION_ALIAS} = () {{ {function_query()} }};
{FUNCTION_ALIAS}()
| where RequestReceivedTime > ago(1d) and Stage == "ResponseComplete"
| where Verb == "create" and ObjectRef.resource == "clusterrolebindings"
| extend Who = tostring(User.username), Ip = tostring(SourceIps[0]), Code = toint(ResponseStatus.code)
| extend Role = tostring(RequestObject.roleRef.name), Decision = tostring(Annotations["authorization.k8s.io/decision"])
| project StageReceivedTime, AuditId, Who, Ip, Code, Role, Decision, UserAgent, RequestUri, Level
"""


@pytest.fixture(scope="module")
def analyzed() -> dict[str, dict[str, Any]]:
    """Every rule's query, the function and the control queries, in one Node run (it takes
    seconds): each with its diagnostics and its result columns."""
    queries = {rule.slug: rule.query for rule in load_rules(RULES_DIR)}
    return analyze(
        {
            **queries,
            **CONTROL_QUERIES,
            "function": function_query(),
            "hunting through the function": AKS_HUNTING_QUERY,
        }
    )


def test_every_query_passes_microsofts_parser_and_semantic_analyzer(
    analyzed: dict[str, dict[str, Any]],
) -> None:
    """Kusto.Language (the parser and binder of Log Analytics) finds no error and no warning
    in any query, against the table built from stream.COLUMNS."""
    assert {slug: [] for slug in EXPECTED_RULES} == {
        slug: found["diagnostics"] for slug, found in analyzed.items() if slug in EXPECTED_RULES
    }


def test_every_rule_returns_its_evidence_and_the_columns_its_entities_map(
    analyzed: dict[str, dict[str, Any]],
) -> None:
    """As the analyzer types each result: AuditIds is a dynamic array, and every column an
    entity mapping names exists and is a string (what Sentinel needs to map it)."""
    problems = []
    for rule in load_rules(RULES_DIR):
        columns = dict(analyzed[rule.slug]["columns"])
        if columns.get(EVIDENCE_COLUMN) != "dynamic":
            problems.append(f"{rule.slug}: {EVIDENCE_COLUMN} is {columns.get(EVIDENCE_COLUMN)}")
        problems.extend(
            f"{rule.slug}: {column} is {columns.get(column)}"
            for entity in rule.entities
            for _, column in entity.fields
            if columns.get(column) != "string"
        )

    assert [] == problems


def test_the_function_presents_the_table_with_aksaudits_columns(
    analyzed: dict[str, dict[str, Any]],
) -> None:
    """The workspace function returns AKSAudit's column names with AKSAudit's types, and a
    hunting query written for AKSAudit passes the analyzer through it."""
    assert [] == missing_sources()
    assert [] == analyzed["function"]["diagnostics"]
    assert [[c.name, c.type] for c in AKS_COLUMNS] == analyzed["function"]["columns"]
    assert [] == analyzed["hunting through the function"]["diagnostics"]


def test_the_analyzer_knows_every_column_and_reports_unknown_ones(
    analyzed: dict[str, dict[str, Any]],
) -> None:
    """The schema given to the analyzer has every stream column (a query naming all of them is
    clean), and a misspelt column or a type error is reported: the check above can fail."""
    every = analyzed["control: every column"]
    assert [] == every["diagnostics"]
    assert [[c.name, c.type] for c in COLUMNS] == every["columns"]
    assert [
        "The name 'verbx' does not refer to any known column, table, variable or function."
    ] == [d["message"] for d in analyzed["control: misspelt column"]["diagnostics"]]
    assert ["Error"] == [d["severity"] for d in analyzed["control: type error"]["diagnostics"]]


def test_every_rule_is_fed_by_the_bundled_policy_at_the_level_its_query_needs() -> None:
    """Each rule's probes are `policy verify` request classes whose verify minimum covers the
    rule's need, and audit_policy.yaml records them at that level, with ResponseComplete, by
    the rule(s) the rule's description names. A policy change that starves a rule fails here."""
    probes = {probe.name: probe for probe in detection_probes()}
    policy = compile_policy(load_policy(BUNDLED_POLICY))
    problems = []
    for rule in load_rules(RULES_DIR):
        for name in rule.policy.probes:
            probe = probes.get(name)
            if probe is None:
                problems.append(f"{rule.slug}: no `policy verify` probe named {name!r}")
                continue
            if probe.minimum < rule.policy.level:
                problems.append(f"{rule.slug}: verify asks {probe.minimum.text} of {name!r}")
            decision = policy.evaluate(probe.request)
            needed = {"ResponseComplete", "ResponseStarted"} & set(stages_of(probe.request))
            if decision.level < rule.policy.level or needed & decision.omit_stages:
                problems.append(f"{rule.slug}: {name!r} recorded at {decision.level.text}")
            if decision.rule_index not in rule.policy.rules:
                problems.append(f"{rule.slug}: {name!r} is decided by rule {decision.rule_index}")
        problems.extend(
            f"{rule.slug}: the description does not name rule {number}"
            for number in rule.policy.rules
            if not re.search(rf"\brules? ([0-9]+(, | and | or ))*{number}\b", rule.description)
        )

    assert [] == problems


def test_a_metadata_only_policy_starves_exactly_the_rules_that_need_bodies() -> None:
    """Under `rules: [{level: Metadata}]` the probes of the Request rules fall short, and
    those of the Metadata rules do not (the static half of the Metadata-only comparison)."""
    metadata_only = compile_policy(load_policy(REPO / "tests/controlplane/metadata-only.yaml"))
    probes = {probe.name: probe for probe in detection_probes()}
    starved = set()
    for rule in load_rules(RULES_DIR):
        for name in rule.policy.probes:
            if metadata_only.evaluate(probes[name].request).level < rule.policy.level:
                starved.add(rule.slug)

    assert {
        "cluster-admin-binding",
        "high-privilege-role",
        "privileged-container",
        "sensitive-host-mount",
        "malicious-image",
        "exposed-sensitive-service",
    } == starved


def test_every_rule_projects_its_evidence() -> None:
    """Every query's final summarize carries the auditIDs (the loader checks each file)."""
    for rule in load_rules(RULES_DIR):
        assert f"{EVIDENCE_COLUMN} = make_set(auditID" in rule.query, rule.slug


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("id: acfd2cee-6913-44c0-b1c5-4b603a620bc7", "id: not-a-guid"), "id: expected a GUID"),
        (("severity: High", "severity: Severe"), "severity: expected one of"),
        (("queryFrequency: 1h", "queryFrequency: hourly"), "queryFrequency: expected a duration"),
        (("  - T1098", "  - Persistence"), "relevantTechniques: expected MITRE ATT&CK ids"),
        (("  level: Request", "  level: Verbose"), "auditPolicy.level: expected Metadata"),
        (("AuditIds = make_set", "Evidence = make_set"), "query: expected a query that projects"),
        (("kind: Scheduled", "kind: NRT"), "kind: expected Scheduled"),
    ],
)
def test_a_broken_rule_file_is_refused_naming_the_file_and_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    """A rule that Sentinel or the local engine could not use is refused before it runs."""
    text = (RULES_DIR / "cluster-admin-binding.yaml").read_text()
    assert change[0] in text
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace(change[0], change[1], 1))

    with pytest.raises(RuleError) as caught:
        load_rule(broken)

    assert str(caught.value).startswith(f"{broken}: {message}")


def test_two_rules_with_one_id_are_refused(tmp_path: Path) -> None:
    """Sentinel identifies a rule by its id: a copied file without a new id is an error."""
    text = (RULES_DIR / "events-deleted.yaml").read_text()
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)

    with pytest.raises(RuleError, match=r"b\.yaml: id: .* is also the id of .*a\.yaml"):
        load_rules(tmp_path)


def test_durations_become_iso_8601() -> None:
    """ARM templates take ISO 8601 durations."""
    assert ["PT5M", "PT1H", "P14D"] == [iso_duration(text) for text in ("5m", "1h", "14d")]


def test_both_templates_deploy_every_rule_with_its_query_unchanged() -> None:
    """The Sentinel and the Azure Monitor templates carry each rule once, with the file's query;
    Sentinel raises one alert per result row (each with its evidence), and the log search
    alerts never look back further than Azure Monitor allows."""
    rules = load_rules(RULES_DIR)
    sentinel = json.loads(render_sentinel_template(rules))["resources"]
    alerts = json.loads(render_log_alerts_template(rules))["resources"]
    queries = {rule.query for rule in rules}

    assert queries == {resource["properties"]["query"] for resource in sentinel}
    assert queries == {
        resource["properties"]["criteria"]["allOf"][0]["query"] for resource in alerts
    }
    assert {rule.id for rule in rules} == {resource["name"].split("'")[-2] for resource in sentinel}
    assert {"AlertPerResult"} == {
        resource["properties"]["eventGroupingSettings"]["aggregationKind"] for resource in sentinel
    }
    assert {"PT1H", f"PT{LOG_ALERT_MAX_WINDOW_HOURS}H"} == {
        resource["properties"]["windowSize"] for resource in alerts
    }


def _doc_rows(text: str) -> dict[str, list[list[str]]]:
    """The table rows of docs/detections.md that start with a rule's name, by rule."""
    rows: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        found = re.match(r"^\| `([a-z-]+)` \|(.*)\|$", line)
        if found:
            rows.setdefault(found[1], []).append([c.strip() for c in found[2].split("|")])
    return rows


def test_the_docs_list_every_rule_with_its_alert_and_the_test_that_proves_it() -> None:
    """docs/detections.md shows each rule twice: what it finds, and its Defender alert beside
    the attack and test id that prove it; the test id exists and has a technique per rule."""
    from controlplane import attacks

    text = (REPO / "docs" / "detections.md").read_text(encoding="utf-8")
    rows = _doc_rows(text)
    proof_test = (REPO / "tests/controlplane/test_attack_detections.py").read_text()

    assert {rule.slug for rule in load_rules(RULES_DIR)} == set(rows)
    for rule in load_rules(RULES_DIR):
        assert 2 == len(rows[rule.slug]), rule.slug
        alert_cell = rows[rule.slug][1][0]
        expected = list(rule.defender_alerts) or ["(none of its own)"]
        assert all(alert in alert_cell for alert in expected), (rule.slug, alert_cell)
    assert "test_rule_fires_on_its_attack[" in text
    assert "def test_rule_fires_on_its_attack(" in proof_test
    assert set(rows) == {technique.rule for technique in attacks.TECHNIQUES}
