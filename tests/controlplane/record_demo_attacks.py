"""Record ``sidecar/auditrelay/data/controlplane-attacks.jsonl``: the attacks ``make demo`` shows.

1. Starts the test control plane (etcd, kube-apiserver, controller manager and scheduler of the
   pinned Kubernetes release; ``make controlplane`` builds them) with the bundled
   ``audit_policy.yaml`` and runs the attack scenario (attacks.py: every technique, for real,
   through kubectl and raw HTTPS as the scenario's identities).
2. Sends its audit log through the real path (out_auditrelay.so, ``auditrelay serve``, the
   emulator) and runs the bundled rules over the stored rows, as ``auditrelay detect`` does.
3. Keeps the lines of the events that are evidence of an alert (every stage of each such
   auditID), unchanged and in the order kube-apiserver wrote them, sends only those through the
   same path again, and checks that every rule that fired on the whole log fires on them.
4. Refuses to write a line that holds a bearer token (a JWT), and writes the file.

Run ``python3 tests/controlplane/record_demo_attacks.py`` (``make demo-attacks``). The file is
replaced only when every step succeeded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "sidecar"), str(REPO / "tests")]

from auditrelay.cli.demo import DATA_DIR  # noqa: E402
from auditrelay.detect import Alert, add_rows, new_table, run_rules  # noqa: E402
from auditrelay.detections import BUNDLED_RULES, load_rules  # noqa: E402
from auditrelay.emulator import StoredRow  # noqa: E402

from controlplane import attacks  # noqa: E402
from controlplane.build import cached_binaries, kubernetes_version  # noqa: E402
from controlplane.cluster import AuditSettings, running  # noqa: E402
from controlplane.harness import REPO_POLICY  # noqa: E402
from controlplane.pipeline import audit_lines, deliver  # noqa: E402
from controlplane.scenario import Kubectl  # noqa: E402

TARGET = DATA_DIR / "controlplane-attacks.jsonl"
CLUSTER_NAME = "demo"


def record_attack_lines(workdir: Path) -> list[bytes]:
    """Every audit line kube-apiserver wrote during the attack scenario."""
    binaries = cached_binaries()
    with running(binaries, workdir, AuditSettings(policy=REPO_POLICY)) as plane:
        kubectl = Kubectl(binaries.kubectl, plane, workdir / "kubectl-cache")
        attacks.run_attacks(plane, kubectl, attacks.TECHNIQUES)
    return audit_lines(plane.audit_files())


def alerts_of(rows: Sequence[StoredRow]) -> list[Alert]:
    table = new_table()
    add_rows(table, (row.row for row in rows if row.row is not None))
    found = run_rules(table, load_rules(BUNDLED_RULES))
    return [alert for alerts in found.values() for alert in alerts]


def evidence_lines(lines: list[bytes], alerts: Sequence[Alert]) -> list[bytes]:
    evidence = {audit_id for alert in alerts for audit_id in alert.audit_ids}
    return [line for line in lines if orjson.loads(line)["auditID"] in evidence]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=TARGET, help=f"default: {TARGET}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="demo-attacks-") as workdir:
        lines = record_attack_lines(Path(workdir))
    alerts = alerts_of(deliver(lines, REPO_POLICY, CLUSTER_NAME))
    fired = {alert.rule.slug for alert in alerts}
    kept = evidence_lines(lines, alerts)
    still = {alert.rule.slug for alert in alerts_of(deliver(kept, REPO_POLICY, CLUSTER_NAME))}
    if still != fired:
        raise SystemExit(
            f"rules that fire on the whole log but not on its evidence: {fired - still}"
        )
    if any(b"eyJ" in line for line in kept):
        raise SystemExit("an evidence line holds a bearer token; not written")
    args.out.write_bytes(b"".join(line + b"\n" for line in kept))
    print(
        f"{args.out}: {len(kept)} of {len(lines)} lines (kube-apiserver {kubernetes_version()}), "
        f"{len(fired)} rules fire: {', '.join(sorted(fired))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
