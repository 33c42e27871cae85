"""Records the attack scenario's audit log for ``auditrelay demo`` and the detect tests.

PYTHONPATH=sidecar:tests python3 -m controlplane.record_attack [OUT]
(default OUT: sidecar/auditrelay/data/controlplane-attack.jsonl)

Starts the test control plane with audit_policy.yaml, runs ``attacks.TECHNIQUES`` and writes
what kube-apiserver logged, untouched, keeping only the events of the scenario's identities (the
controllers' own background requests are left out to keep the file small).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from controlplane import attacks
from controlplane.build import cached_binaries
from controlplane.cluster import ADMIN_USER, AuditSettings, running
from controlplane.harness import REPO_POLICY, REPO_ROOT
from controlplane.scenario import Kubectl

DEFAULT_OUT = REPO_ROOT / "sidecar/auditrelay/data/controlplane-attack.jsonl"
SCENARIO_USERS = {ADMIN_USER, attacks.SERVICE_ACCOUNT, "system:anonymous", ""}


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    binaries = cached_binaries()
    with tempfile.TemporaryDirectory(prefix="attack-") as scratch:
        with running(binaries, Path(scratch), AuditSettings(policy=REPO_POLICY)) as plane:
            kubectl = Kubectl(binaries.kubectl, plane, plane.workdir / "kubectl-cache")
            attacks.run_attacks(plane, kubectl, attacks.TECHNIQUES)
        kept = [
            line
            for path in plane.audit_files()
            for line in path.read_bytes().splitlines()
            if line.strip()
            and json.loads(line).get("user", {}).get("username", "") in SCENARIO_USERS
        ]
    out.write_bytes(b"".join(line + b"\n" for line in kept))
    print(f"{out}: {len(kept)} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
