"""End to end on a real control plane: what kube-apiserver wrote reaches the workspace.

kube-apiserver, started with the policy under test, writes its audit files while the scenario
runs. Those lines go, as Fluent Bit's tail input hands them to an output (v2 events, EventTime,
the raw line in ``log``, chunks under Fluent Bit's 2,048,000-byte file-system chunk size), to
``out_auditrelay.so`` driven the way Fluent Bit's Go proxy drives it, then to ``auditrelay serve``,
which applies the same policy and delivers to the bundled Logs Ingestion emulator over HTTPS.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import orjson
import pytest
from auditrelay.devtools.flbproxy import GoProxy, build_plugin
from auditrelay.emulator.store import Store
from harness.sidecar import Sidecar

from controlplane.harness import ScenarioLog
from controlplane.pipeline import (
    audit_lines,
    delivered_audit_ids,
    flush_until_accepted,
    tail_chunks,
)

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

    with tempfile.TemporaryDirectory(prefix="ar-") as short:  # a socket path stays < 108 bytes
        workdir = Path(short)
        sidecar = Sidecar.on_socket(workdir / "relay.sock", workdir / "state")
        sidecar.start()
        proxy = GoProxy(build_plugin())
        proxy.register()
        try:
            instance = proxy.init(
                {
                    "sidecar_address": sidecar.address,
                    "sidecar_wait": "20s",
                    "policy": str(policy_scenario_log.policy),
                    "cluster_name": "controlplane-e2e",
                }
            )
            for chunk in tail_chunks(lines):
                flush_until_accepted(proxy, instance, chunk)
            delivered = delivered_audit_ids(
                Store.in_directory(sidecar.state_dir / "emulator"), expected
            )
        finally:
            proxy.shutdown()
            sidecar.stop()

    assert set() == expected - delivered
    assert set() == delivered - expected
