"""``auditrelay detect``: the rules over audit logs or the emulator's store, alerts and exit codes."""

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

ATTACK_LOG = DATA_DIR / "controlplane-attack.jsonl"
QUIET_LOGS = [path for path in BUNDLED_LOGS if path != ATTACK_LOG]


def test_the_recorded_attack_raises_every_rule_with_its_evidence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real kube-apiserver log of the attack scenario raises an alert from every rule, each
    naming its rule and carrying auditIDs that are in the log; exit status 1 (a finding)."""
    in_log = {json.loads(line)["auditID"] for line in ATTACK_LOG.read_text().splitlines()}

    code = main(["detect", "--output", "json", str(ATTACK_LOG)])
    report = json.loads(capsys.readouterr().out)

    assert 1 == code
    assert [] == [slug for slug, count in report["rules"].items() if count == 0]
    assert all(alert["auditIds"] and set(alert["auditIds"]) <= in_log for alert in report["alerts"])
    assert {alert["rule"] for alert in report["alerts"]} == set(report["rules"])


def test_quiet_logs_raise_nothing_and_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled audit2rbac and lease logs hold no attack: no alert, exit status 0."""
    code = main(["detect", *map(str, QUIET_LOGS)])

    assert 0 == code
    assert capsys.readouterr().out.endswith(" 0 alert(s) from 0 of 18 rules over 38 rows.\n")


def test_table_output_names_rule_entities_and_evidence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One rule file, gzip input: the table shows severity, rule, entities and auditIDs."""
    rule = Path(__file__).resolve().parents[2] / "detections" / "defender-test-alert.yaml"
    log = tmp_path / "audit.jsonl.gz"
    log.write_bytes(gzip.compress(ATTACK_LOG.read_bytes()))

    code = main(["detect", "--rules", str(rule), str(log)])
    out = capsys.readouterr().out.splitlines()

    assert 1 == code
    assert out[0].startswith("INFORMATIONAL  defender-test-alert: Kubernetes - Defender")
    assert "Account=kubernetes-admin" in out[1]
    assert out[2].strip().startswith("evidence auditIDs: ")
    assert "1 alert(s) from 1 of 1 rules over" in out[-1]


def test_a_line_that_is_not_an_audit_event_is_named_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad lines are set aside and named FILE:LINE; the good lines still run; exit status 2."""
    log = tmp_path / "audit.log"
    log.write_bytes(ATTACK_LOG.read_bytes() + b"not json\n" + b'{"kind": "Event"}\n')

    code = main(["detect", "--output", "json", str(log)])
    captured = capsys.readouterr()
    lines = len(ATTACK_LOG.read_bytes().splitlines())

    assert 2 == code
    assert json.loads(captured.out)["alerts"]
    assert f"{log}:{lines + 1}: not JSON" in captured.err
    assert f"{log}:{lines + 2}: not an audit event (no auditID)" in captured.err


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
    """--emulator-state-dir reads the rows the emulator stored, as delivered."""
    encoder = RowEncoder("stored", "")
    rows = [
        encoder.encode(AuditEvent(json.loads(line), line))
        for line in ATTACK_LOG.read_bytes().splitlines()
    ]
    store = Store.in_directory(tmp_path)
    store.open_for_writing()
    request = RequestRecord(
        0.0, "dcr", STREAM_NAME, None, 204, None, 0, 0, None, len(rows), 0, None
    )
    store.record(request, [(None, None, row) for row in rows])
    store.close()

    code = main(["detect", "--output", "json", "--emulator-state-dir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)

    assert (1, len(rows)) == (code, report["rows"])
    assert {"stored"} == {alert["columns"]["Cluster_Name"] for alert in report["alerts"]}
