"""End to end on a real control plane: what kube-apiserver wrote reaches the workspace.

kube-apiserver, started with the policy under test, writes its audit files while the scenario
runs. Those lines go, as Fluent Bit's tail input hands them to an output (v2 events, EventTime,
the raw line in ``log``, chunks under Fluent Bit's 2,048,000-byte file-system chunk size), to
``out_auditrelay.so`` driven the way Fluent Bit's Go proxy drives it, then to ``auditrelay serve``,
which applies the same policy and delivers to the bundled Logs Ingestion emulator over HTTPS.
"""

from __future__ import annotations

import orjson
import pytest

from controlplane.harness import ScenarioLog
from controlplane.pipeline import audit_lines, delivered_audit_ids, sent_through_the_plugin

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]


def test_every_event_kube_apiserver_wrote_arrives_in_the_workspace(
    policy_scenario_log: ScenarioLog,
) -> None:
    """Each auditID in the real audit log is delivered through plugin, sidecar and emulator.

    The sidecar applies the policy kube-apiserver already applied, so it keeps every event.
    """
    lines = audit_lines(policy_scenario_log.files)
    expected = {orjson.loads(line)["auditID"] for line in lines}
    assert expected, "kube-apiserver wrote no audit events"

    policy = policy_scenario_log.policy
    with sent_through_the_plugin(lines, policy, "controlplane-e2e") as store:
        delivered = delivered_audit_ids(store, expected)

    assert set() == expected - delivered
    assert set() == delivered - expected
