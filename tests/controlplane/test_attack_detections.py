"""The detection rules on a real API server's attacks: each fires on its technique, none on a
benign day, and the ones that read request bodies go blind under a Metadata-only policy.

Each scenario runs against kube-apiserver (with controllers and scheduler) started with an audit
policy; its audit files go through out_auditrelay.so, ``auditrelay serve`` (the bundled policy)
and the emulator; the rules run over the emulator's stored rows with duckdb-kql, exactly as
``auditrelay detect --emulator-state-dir`` runs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from auditrelay.detect import Alert, add_rows, new_table, run_rules
from auditrelay.detections import Rule, load_rules
from auditrelay.emulator import StoredRow
from auditrelay.policy import Level

from controlplane import attacks
from controlplane.build import Binaries
from controlplane.cluster import AuditSettings
from controlplane.harness import REPO_POLICY, REPO_ROOT, StartControlPlane
from controlplane.pipeline import audit_lines, deliver
from controlplane.scenario import Kubectl

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(900)]

RULES_DIR = REPO_ROOT / "detections"
METADATA_ONLY_POLICY = Path(__file__).resolve().parent / "metadata-only.yaml"


@pytest.fixture(scope="module")
def rules() -> list[Rule]:
    return load_rules(RULES_DIR)


def _stored_rows(
    start_control_plane: StartControlPlane,
    binaries: Binaries,
    apiserver_policy: Path,
    name: str,
    attack: bool,
) -> list[StoredRow]:
    """Runs a scenario on a fresh control plane, then ships its audit log to the emulator."""
    with start_control_plane(AuditSettings(policy=apiserver_policy), name=name) as plane:
        kubectl = Kubectl(binaries.kubectl, plane, plane.workdir / "kubectl-cache")
        if attack:
            attacks.run_attacks(plane, kubectl, attacks.TECHNIQUES)
        else:
            attacks.run_benign(kubectl)
    lines = audit_lines(plane.audit_files())
    assert lines, "kube-apiserver wrote no audit events"
    return deliver(lines, REPO_POLICY, name)


def _alerts(rows: Sequence[StoredRow], rules: Sequence[Rule]) -> dict[str, list[Alert]]:
    table = new_table()
    add_rows(table, (row.row for row in rows if row.row is not None))
    assert table.rows == len(rows)
    return run_rules(table, rules)


@pytest.fixture(scope="module")
def attack_alerts(
    start_control_plane: StartControlPlane, controlplane_binaries: Binaries, rules: list[Rule]
) -> tuple[list[StoredRow], dict[str, list[Alert]]]:
    rows = _stored_rows(start_control_plane, controlplane_binaries, REPO_POLICY, "attack", True)
    return rows, _alerts(rows, rules)


@pytest.fixture(scope="module")
def benign_alerts(
    start_control_plane: StartControlPlane, controlplane_binaries: Binaries, rules: list[Rule]
) -> dict[str, list[Alert]]:
    rows = _stored_rows(start_control_plane, controlplane_binaries, REPO_POLICY, "benign", False)
    return _alerts(rows, rules)


@pytest.fixture(scope="module")
def metadata_only_alerts(
    start_control_plane: StartControlPlane, controlplane_binaries: Binaries, rules: list[Rule]
) -> dict[str, list[Alert]]:
    rows = _stored_rows(
        start_control_plane, controlplane_binaries, METADATA_ONLY_POLICY, "attack-metadata", True
    )
    return _alerts(rows, rules)


def _matches(alert: Alert, entities: Mapping[str, Any]) -> bool:
    for column, expected in entities.items():
        value = alert.to_json()["columns"].get(column)
        if isinstance(expected, list):
            if not isinstance(value, list) or not set(expected) <= set(value):
                return False
        elif value != expected:
            return False
    return True


def _print_table(title: str, header: Sequence[str], lines: Iterator[Sequence[object]]) -> str:
    rows = [list(header), *([str(cell) for cell in line] for line in lines)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    text = "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )
    return f"\n{title}\n{text}\n"


def test_every_rule_fires_on_its_attack_with_the_right_entities_and_evidence(
    attack_alerts: tuple[list[StoredRow], dict[str, list[Alert]]],
    benign_alerts: dict[str, list[Alert]],
    rules: list[Rule],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each technique done for real raises its rule's alert naming the expected entities, with
    auditIDs of delivered requests as evidence; the benign day raises no alert at all."""
    rows, alerts = attack_alerts
    stored = {row.audit_id for row in rows}
    expected = {technique.rule: technique for technique in attacks.TECHNIQUES}
    missing, unbacked = [], []
    for slug, technique in expected.items():
        if not any(_matches(alert, technique.entities) for alert in alerts[slug]):
            missing.append(
                f"{slug}: {technique.entities} not in {[a.to_json()['columns'] for a in alerts[slug]]}"
            )
        unbacked += [
            f"{slug}: {a.audit_ids}"
            for a in alerts[slug]
            if not a.audit_ids or not set(a.audit_ids) <= stored
        ]
    table = _print_table(
        "detections on the real control plane (audit_policy.yaml)",
        ("rule", "attack", "benign", "evidence auditIDs"),
        (
            (
                rule.slug,
                f"fired x{len(alerts[rule.slug])}" if alerts[rule.slug] else "NOT FIRED",
                f"FIRED x{len(benign_alerts[rule.slug])}" if benign_alerts[rule.slug] else "quiet",
                sum(len(a.audit_ids) for a in alerts[rule.slug]),
            )
            for rule in rules
        ),
    )
    with capsys.disabled():
        print(table)

    assert set(expected) == {rule.slug for rule in rules}
    assert [] == missing
    assert [] == unbacked
    assert {} == {
        slug: [a.to_json()["columns"] for a in found]
        for slug, found in benign_alerts.items()
        if found
    }


@pytest.mark.parametrize("technique", attacks.TECHNIQUES, ids=lambda t: t.rule)
def test_rule_fires_on_its_attack(
    technique: attacks.Technique,
    attack_alerts: tuple[list[StoredRow], dict[str, list[Alert]]],
    benign_alerts: dict[str, list[Alert]],
) -> None:
    """One rule (the test id docs/detections.md names for it): its technique, done for real,
    raises its alert with the expected entities and delivered auditIDs as evidence; the benign
    day raises none of it."""
    rows, alerts = attack_alerts
    stored = {row.audit_id for row in rows}
    found = alerts[technique.rule]

    assert any(_matches(alert, technique.entities) for alert in found), [
        alert.to_json()["columns"] for alert in found
    ]
    assert all(alert.audit_ids and set(alert.audit_ids) <= stored for alert in found)
    assert [] == benign_alerts[technique.rule]


def test_metadata_only_policy_blinds_exactly_the_rules_that_read_request_bodies(
    attack_alerts: tuple[list[StoredRow], dict[str, list[Alert]]],
    metadata_only_alerts: dict[str, list[Alert]],
    rules: list[Rule],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same attacks under `rules: [{level: Metadata}]`: the rules whose auditPolicy.level is
    above Metadata see nothing; the others still fire on every technique."""
    _, full = attack_alerts
    expected = {technique.rule: technique for technique in attacks.TECHNIQUES}
    blind = {
        slug
        for slug, technique in expected.items()
        if not any(_matches(alert, technique.entities) for alert in metadata_only_alerts[slug])
    }
    table = _print_table(
        "the same attacks with a Metadata-only policy",
        ("rule", "needs", "audit_policy.yaml", "Metadata only"),
        (
            (
                rule.slug,
                rule.policy.level.text,
                "fires" if full[rule.slug] else "BLIND",
                "BLIND" if rule.slug in blind else "fires",
            )
            for rule in rules
        ),
    )
    with capsys.disabled():
        print(table)

    assert {rule.slug for rule in rules if rule.policy.level > Level.METADATA} == blind
