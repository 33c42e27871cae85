"""`auditrelay demo` end to end: plugin, sidecar and emulator, and a summary that matches the store."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from auditrelay.cli.demo import BUNDLED_LOGS
from auditrelay.config import BUNDLED_POLICY
from auditrelay.emulator import Store
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from fixtures.chunks import audit_line

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DEADLINE_SECONDS = 180


def run_demo(plugin: Path, state_dir: Path, *extra: str) -> tuple[int, str, dict[str, Any]]:
    summary_path = state_dir.parent / "summary.json"
    environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sidecar")}
    command = [sys.executable, "-m", "auditrelay", "demo", "--state-dir", str(state_dir)]
    command += ["--plugin", str(plugin), "--summary-json", str(summary_path), *extra]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=environ,
        cwd=state_dir.parent,
        timeout=DEMO_DEADLINE_SECONDS,
    )
    summary = orjson.loads(summary_path.read_bytes()) if summary_path.exists() else {}
    return done.returncode, done.stdout + done.stderr, summary


def kept_audit_ids(lines: list[bytes]) -> Counter[str]:
    """How many lines of each auditID the bundled policy keeps (an exec is audited at two
    stages), decided here independently of the sidecar."""
    policy = PolicyFilter.from_file(BUNDLED_POLICY)
    kept: Counter[str] = Counter()
    for line in lines:
        fields = orjson.loads(line)
        if policy.apply(AuditEvent(fields, line)) is not None:
            kept[str(fields["auditID"])] += 1
    return kept


def printed(output: str, label: str) -> int:
    match = re.search(rf"^  {label}\s+([\d,]+)", output, re.MULTILINE)
    assert match is not None, output
    return int(match.group(1).replace(",", ""))


def test_demo_delivers_every_kept_event_of_the_bundled_log(
    plugin_path: Path, tmp_path: Path
) -> None:
    """The bundled real audit log goes through the plugin and the sidecar to the embedded
    emulator: every event the policy keeps is stored once, and the printed numbers (events in,
    filtered, delivered, bytes on the wire) are those of the store."""
    lines = [line for path in BUNDLED_LOGS for line in path.read_bytes().splitlines() if line]
    kept = kept_audit_ids(lines)

    code, output, summary = run_demo(plugin_path, tmp_path / "demo")

    store = Store.in_directory(tmp_path / "demo" / "sidecar" / "emulator")
    stored = store.audit_id_counts()
    assert 0 == code, output
    assert kept == stored
    rows = kept.total()
    assert (len(lines), 0, len(lines) - rows, rows, rows) == (
        printed(output, "events in"),
        printed(output, "not audit events"),
        printed(output, "filtered out by policy"),
        printed(output, "kept"),
        printed(output, "delivered"),
    )
    wire = sum(request.wire_bytes for request in store.requests())
    assert (wire, sum(len(line) for line in lines)) == (
        printed(output, "bytes on the wire"),
        printed(output, "bytes before the policy"),
    )
    assert (rows, store.count()) == (summary["events_delivered"], summary["stored_rows"])
    assert summary["bytes_saved"] == summary["audit_log_bytes"] - wire
    assert f"auditrelay emulator rows --state-dir {store.path.parent} --limit {store.count()}" in (
        output
    )
    # The bundled attack log (a real control plane's attacks) raises every detection rule.
    assert "alert(s) from 18 of 18 rules" in output, output
    assert summary["alerts"] >= 18


def test_demo_takes_the_operators_own_gzipped_log(plugin_path: Path, tmp_path: Path) -> None:
    """--audit-log FILE: a gzipped log of the operator's; a line that is not an audit event is
    counted and set aside, the exec events arrive."""
    lines = [audit_line(auditID=f"exec-{index}") for index in range(3)] + [b'{"not": "audit"}']
    own_log = tmp_path / "audit.log.gz"
    own_log.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))

    code, output, summary = run_demo(plugin_path, tmp_path / "demo", "--audit-log", str(own_log))

    store = Store.in_directory(tmp_path / "demo" / "sidecar" / "emulator")
    assert 0 == code, output
    assert {"exec-0", "exec-1", "exec-2"} == set(store.audit_id_counts())
    assert (3, 1, 0, 3) == (
        summary["events_in"],
        summary["events_not_audit"],
        summary["events_filtered"],
        summary["events_delivered"],
    )


def test_demo_refuses_a_state_dir_it_did_not_make(plugin_path: Path, tmp_path: Path) -> None:
    """The demo empties its state directory first, so it refuses one with someone else's files."""
    state_dir = tmp_path / "precious"
    state_dir.mkdir()
    (state_dir / "keep.txt").write_text("mine")

    code, output, _ = run_demo(plugin_path, state_dir)

    assert 2 == code
    assert (
        f"auditrelay demo: --state-dir: got '{state_dir}', expected an empty or a demo directory"
    ) in output
    assert "mine" == (state_dir / "keep.txt").read_text()
