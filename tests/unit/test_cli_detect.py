"""``auditrelay detect``: the rules over audit logs or the emulator's store, alerts and exit codes.

The rules themselves are proven on real attacks in tests/controlplane/test_attack_detections.py;
here the command's input, output and exit codes, with fixture events of the shape
kube-apiserver writes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from auditrelay.cli import main
from auditrelay.cli.demo import BUNDLED_LOGS, DATA_DIR
from auditrelay.emulator import RequestRecord, Store
from auditrelay.model import AuditEvent
from auditrelay.stream import STREAM_NAME, RowEncoder
from fixtures.chunks import audit_line

RULES = Path(__file__).resolve().parents[2] / "detections"
QUIET_LOGS = ("audit2rbac-demo.jsonl", "kube-audit-log-tool-single-event.jsonl")
ADMIN = {"username": "kubernetes-admin", "groups": ["system:masters", "system:authenticated"]}


def _attack_lines() -> list[bytes]:
    """An exec into a pod, and Defender's test command: two rules' worth of requests."""
    return [
        audit_line(audit_id="exec-1"),
        audit_line(
            audit_id="test-alert-1",
            verb="list",
            user=ADMIN,
            requestURI="/api/v1/namespaces/asc-alerttest-662jfi039n/pods?limit=500",
            objectRef={"resource": "pods", "namespace": "asc-alerttest-662jfi039n"},
            responseStatus={"metadata": {}, "code": 200},
        ),
    ]


@pytest.fixture
def attack_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(line + b"\n" for line in _attack_lines()))
    return path


def test_alerts_name_their_rule_and_evidence_and_exit_1(
    attack_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each alert names its rule and carries the auditIDs that raised it; exit status 1."""
    code = main(["detect", "--output", "json", str(attack_log)])
    report = json.loads(capsys.readouterr().out)

    assert 1 == code
    assert {"exec-into-pod": ["exec-1"], "defender-test-alert": ["test-alert-1"]} == {
        alert["rule"]: alert["auditIds"] for alert in report["alerts"]
    }
    assert (2, 18) == (report["rows"], len(report["rules"]))


def test_quiet_logs_raise_nothing_and_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled audit2rbac and lease logs hold no attack: no alert, exit status 0."""
    code = main(["detect", *(str(DATA_DIR / name) for name in QUIET_LOGS)])

    assert 0 == code
    assert "\n0 alert(s) from 0 of 18 rules over 38 rows.\n" == capsys.readouterr().out


def test_the_demos_attack_log_raises_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's bundled logs include a real control plane's attacks: each of the 18 rules
    raises an alert on them, whose evidence auditIDs are events of that log."""
    code = main(["detect", "--output", "json", *map(str, BUNDLED_LOGS)])
    report = json.loads(capsys.readouterr().out)
    attack_ids = {
        json.loads(line)["auditID"]
        for line in (DATA_DIR / "controlplane-attacks.jsonl").read_text().splitlines()
    }

    assert 1 == code
    assert all(count >= 1 for count in report["rules"].values()), report["rules"]
    assert 18 == len(report["rules"])
    assert all(set(alert["auditIds"]) <= attack_ids for alert in report["alerts"])


def test_table_output_names_rule_entities_and_evidence(
    attack_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One rule file, gzip input: the table shows severity, rule, entities and auditIDs."""
    compressed = tmp_path / "audit.log.gz"
    compressed.write_bytes(gzip.compress(attack_log.read_bytes()))

    code = main(["detect", "--rules", str(RULES / "defender-test-alert.yaml"), str(compressed)])
    out = capsys.readouterr().out.splitlines()

    assert 1 == code
    assert out[0].startswith("INFORMATIONAL defender-test-alert: Kubernetes - Defender")
    assert "Account=kubernetes-admin" in out[1]
    assert "evidence auditIDs: test-alert-1" == out[2].strip()
    assert "1 alert(s) from 1 of 1 rules over 2 rows." == out[-1]


def test_a_line_that_is_not_an_audit_event_is_named_and_exit_2(
    attack_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad lines are set aside and named FILE:LINE; the good lines still run; exit status 2."""
    with attack_log.open("ab") as log:
        log.write(b"not json\n" + b'{"kind": "Event"}\n')

    code = main(["detect", "--output", "json", str(attack_log)])
    captured = capsys.readouterr()

    assert 2 == code
    assert 2 == len(json.loads(captured.out)["alerts"])
    assert f"{attack_log}:3: not JSON" in captured.err
    assert f"{attack_log}:4: not an audit event (no auditID)" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["detect"], "AUDIT_LOG"),
        (["detect", "/nonexistent/audit.log"], "/nonexistent/audit.log"),
        (["detect", "--rules", "/nonexistent/rules", "x.log"], "/nonexistent/rules: no such"),
        (["detect", "--emulator-state-dir", "/nonexistent"], "--emulator-state-dir"),
    ],
)
def test_bad_input_exits_2_naming_what_is_wrong(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing logs, rules or store: exit status 2 and a message that names the culprit."""
    assert 2 == main(args)
    assert message in capsys.readouterr().err


def test_rules_run_over_the_emulators_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--emulator-state-dir reads the rows the emulator stored, as the sidecar encoded them."""
    encoder = RowEncoder("stored", "")
    rows = [encoder.encode(AuditEvent(json.loads(line), line)) for line in _attack_lines()]
    store = Store.in_directory(tmp_path)
    store.open_for_writing()
    request = RequestRecord(
        0.0, "dcr", STREAM_NAME, None, 204, None, 0, 0, None, len(rows), 0, None
    )
    store.record(request, [(None, None, row) for row in rows])
    store.close()

    code = main(["detect", "--output", "json", "--emulator-state-dir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)

    assert (1, 2) == (code, report["rows"])
    assert {"stored"} == {alert["columns"]["Cluster_Name"] for alert in report["alerts"]}
