"""The fixture's audit log is what Fluent Bit will tail: JSON lines, rotated by kube-apiserver
itself, with nothing lost or split at a rotation."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from controlplane.build import Binaries
from controlplane.cluster import ADMIN_USER, AuditSettings
from controlplane.harness import VERBOSE_POLICY_TEXT, StartControlPlane
from controlplane.scenario import Kubectl

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]

CONFIGMAPS = 6
PAYLOAD_BYTES = 300_000


def test_rotated_audit_files_hold_every_event_once(
    start_control_plane: StartControlPlane,
    controlplane_binaries: Binaries,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With --audit-log-maxsize=1 kube-apiserver rotates to audit-<time>.log backups; every line
    of every file is one whole JSON event, and each request's events appear exactly once."""
    policy = tmp_path_factory.mktemp("rotation-policy") / "verbose.yaml"
    policy.write_text(VERBOSE_POLICY_TEXT, encoding="utf-8")
    audit = AuditSettings(policy=policy, max_size_mb=1, max_backups=20)
    with start_control_plane(audit, name="rotation", controllers=False) as plane:
        kubectl = Kubectl(controlplane_binaries.kubectl, plane, plane.workdir / "kubectl-cache")
        for index in range(CONFIGMAPS):
            manifest = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"big-{index}", "namespace": "default"},
                "data": {"payload": "x" * PAYLOAD_BYTES},
            }
            done = kubectl.run(ADMIN_USER, ("create", "-f", "-"), json.dumps(manifest))
            assert (0, "") == (done.returncode, done.stderr)
    files = plane.audit_files()
    backups = [path.name for path in files if path.name != "audit.log"]
    assert len(backups) >= 2, f"expected rotation, got {[p.name for p in files]}"
    assert all(name.startswith("audit-") and name.endswith(".log") for name in backups)

    events = [json.loads(line) for path in files for line in path.read_bytes().splitlines()]
    stages = Counter((e["auditID"], e["stage"]) for e in events)
    assert [] == [key for key, count in stages.items() if count > 1]
    created = sorted(
        e["objectRef"]["name"]
        for e in events
        if e["verb"] == "create"
        and e["stage"] == "ResponseComplete"
        and e.get("objectRef", {}).get("resource") == "configmaps"
        and e["objectRef"].get("name", "").startswith("big-")
    )
    assert [f"big-{index}" for index in range(CONFIGMAPS)] == created
