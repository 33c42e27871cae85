"""``auditrelay replay`` as a user runs it: a real process, real files, the emulator over HTTPS.

The expected rows are worked out here from the files themselves: a line is an audit event when
it is a JSON object of kind Event in audit.k8s.io/v1 with an auditID, stage and level, and the
bundled policy (the real PolicyFilter) decides which events are kept.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from auditrelay.config import BUNDLED_POLICY
from auditrelay.deadletter import payload_of, read_letters
from auditrelay.emulator import (
    Emulator,
    EmulatorSettings,
    Fault,
    FaultKind,
    Store,
    running_in_thread,
)
from auditrelay.filter import PolicyFilter
from auditrelay.fluentbit_conf import select_output
from auditrelay.model import AuditEvent
from auditrelay.stream import COLUMN_TYPES, STREAM_NAME
from fixtures.chunks import AUDIT_LOG, sample_lines
from harness.emulator import emulator_destination
from harness.fluentbit import wait_for

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    settings = EmulatorSettings(
        state_dir=tmp_path / "emulator", streams={STREAM_NAME: dict(COLUMN_TYPES)}
    )
    with running_in_thread(settings) as running:
        yield running


def endpoint_properties(emulator: Emulator) -> dict[str, str]:
    """The [OUTPUT] properties that point a pipeline at the emulator, with a client secret."""
    return {
        **emulator_destination(emulator),
        "batch_interval": "50ms",
    }


def replay_command(
    files: list[Path], state_dir: Path, properties: dict[str, str], *extra: str
) -> list[str]:
    flags = [part for key, value in properties.items() for part in ("-p", f"{key}={value}")]
    return [
        sys.executable,
        "-m",
        "auditrelay",
        "replay",
        *map(str, files),
        "--state-dir",
        str(state_dir),
        "--progress-interval",
        "100ms",
        *flags,
        *extra,
    ]


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SIDECAR))


def run_replay(
    files: list[Path], state_dir: Path, properties: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        replay_command(files, state_dir, properties, *extra),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=90,
        check=False,
    )


def is_audit_event(fields: Any) -> bool:
    return (
        isinstance(fields, dict)
        and fields.get("kind") == "Event"
        and fields.get("apiVersion") in ("audit.k8s.io/v1", "audit.k8s.io/v1beta1")
        and isinstance(fields.get("auditID"), str)
        and isinstance(fields.get("stage"), str)
        and isinstance(fields.get("level"), str)
    )


def parsed(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def expected_rows(lines: list[bytes]) -> tuple[Counter[str], int, int]:
    """The auditIDs the bundled policy keeps (with multiplicity), events, and filtered events."""
    policy = PolicyFilter.from_file(BUNDLED_POLICY)
    kept: Counter[str] = Counter()
    events = filtered = 0
    for line in lines:
        fields = parsed(line)
        if not is_audit_event(fields):
            continue
        events += 1
        if policy.apply(AuditEvent(fields, line)) is None:
            filtered += 1
        else:
            kept[fields["auditID"]] += 1
    return kept, events, filtered


def lines_of(path: Path) -> list[bytes]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [line for line in data.splitlines() if line.strip()]


def assert_all_arrived(emulator: Emulator, sent: Counter[str]) -> Counter[str]:
    """Every kept auditID is stored at least as often as it was kept; returns the extra copies."""
    stored = Counter(emulator.store.audit_id_counts())
    missing = {audit_id: n for audit_id, n in sent.items() if stored[audit_id] < n}
    assert {} == missing
    return stored - sent


def summary(output: str) -> dict[str, str]:
    """The summary's `name: value` lines."""
    found = {}
    for line in output.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip()] = value.strip()
    return found


# --- replaying ------------------------------------------------------------------------------


def test_plain_and_gzip_samples_arrive(emulator: Emulator, tmp_path: Path) -> None:
    """A real audit log, its first half plain and its second gzip-compressed, is replayed through
    the bundled policy: every auditID the policy keeps arrives, and the summary counts lines,
    events, filtered, invalid."""
    inputs = tmp_path / "logs"
    inputs.mkdir()
    log = sample_lines()
    middle = len(log) // 2
    plain, compressed = inputs / "audit-1.log", inputs / "audit-2.log.gz"
    plain.write_bytes(b"\n".join(log[:middle]) + b"\n")
    compressed.write_bytes(gzip.compress(b"\n".join(log[middle:]) + b"\n"))
    files = [plain, compressed]
    lines = [line for path in files for line in lines_of(path)]
    kept, events, filtered = expected_rows(lines)
    assert 0 < filtered < events

    done = run_replay(files, tmp_path / "state", endpoint_properties(emulator))

    assert 0 == done.returncode, done.stderr  # every line kube-apiserver wrote is an audit event
    assert {} == +assert_all_arrived(emulator, kept)
    shown = summary(done.stdout)
    assert f"{len(lines):,}" == shown["lines read"].split()[0]
    assert f"{events:,}" == shown["events"]
    assert f"{filtered:,}" == shown["filtered"].split()[0]
    assert f"{len(lines) - events:,}" == shown["invalid"].split()[0]
    assert shown["delivered"].startswith(f"{sum(kept.values()):,} rows to {emulator.endpoint}")
    assert any(line.startswith("replay: 100% ") for line in done.stderr.splitlines()), done.stderr


def test_a_bad_line_is_reported_with_its_line_number(emulator: Emulator, tmp_path: Path) -> None:
    """A line that is not JSON is reported with its file and line number and set aside; the lines
    after it are still delivered, and the run ends with exit code 1."""
    good = [line for line in sample_lines() if is_audit_event(parsed(line))][:6]
    log = tmp_path / "audit.log"
    log.write_bytes(b"\n".join([*good[:2], b'{"kind":"Event", truncated', *good[2:]]) + b"\n")
    kept, _, _ = expected_rows(good)
    state = tmp_path / "state"

    done = run_replay([log], state, endpoint_properties(emulator))

    assert 1 == done.returncode, done.stderr
    assert f"invalid line {log}:3: not JSON" in done.stderr.splitlines()
    assert "1 (not audit events; set aside)" == summary(done.stdout)["invalid"]
    assert {} == +assert_all_arrived(emulator, kept)
    letters = [
        letter
        for path in sorted(state.glob("replay/*/deadletter/*.jsonl"))
        for letter in read_letters(path)
    ]
    assert [(f"{log}:3", b'{"kind":"Event", truncated')] == [
        (letter["tag"], payload_of(letter)) for letter in letters
    ]


def test_json_output_reports_the_run_for_programs(emulator: Emulator, tmp_path: Path) -> None:
    """--output json prints one JSON document: the totals, what was delivered where, each invalid
    line with its file, number and reason, and the exit code the run ends with."""
    good = [line for line in sample_lines() if is_audit_event(parsed(line))][:6]
    log = tmp_path / "audit.log"
    log.write_bytes(b"\n".join([*good[:2], b"[1, 2]", *good[2:]]) + b"\n")
    kept, _, _ = expected_rows(good)

    done = run_replay([log], tmp_path / "state", endpoint_properties(emulator), "--output", "json")

    report = orjson.loads(done.stdout)
    assert 1 == done.returncode == report["exit_code"], done.stderr
    assert (7, 6, 1) == (
        report["totals"]["lines_read"],
        report["totals"]["events"],
        report["totals"]["invalid"],
    )
    assert [{"path": str(log), "line": 3, "reason": "json_not_object"}] == (
        report["totals"]["invalid_lines"]
    )
    assert (sum(kept.values()), emulator.endpoint, False) == (
        report["delivered"],
        report["endpoint"],
        report["interrupted"],
    )


def test_without_an_endpoint_rows_go_to_the_bundled_emulator(tmp_path: Path) -> None:
    """No endpoint: the bundled emulator runs for the replay, over HTTPS with a real credential,
    and keeps the rows in the state directory, where `auditrelay emulator count` finds them."""
    log = tmp_path / "audit.log"
    shutil.copyfile(AUDIT_LOG, log)
    kept, _, _ = expected_rows(lines_of(log))
    state = tmp_path / "state"

    done = run_replay([log], state, {"batch_interval": "50ms"})

    assert done.returncode in (0, 1), done.stderr
    stored = Counter(Store.in_directory(state / "emulator").audit_id_counts())
    assert {} == {audit_id: n for audit_id, n in kept.items() if stored[audit_id] < n}
    assert f"auditrelay emulator count --state-dir {state / 'emulator'}" in done.stdout


def fresh_log(path: Path, count: int) -> list[bytes]:
    """A gzip audit log of real sample events with new auditIDs and current timestamps."""
    templates = [fields for line in sample_lines() if is_audit_event(fields := parsed(line))]
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    lines = []
    for index in range(count):
        fields = dict(templates[index % len(templates)])
        fields["auditID"] = f"replay-{index:06d}"
        for name in ("stageTimestamp", "requestReceivedTimestamp"):
            fields[name] = now
        lines.append(orjson.dumps(fields))
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    return lines


def checkpoint_lines(state: Path) -> int:
    """The line count of the (one) checkpoint written so far, 0 before the first."""
    found = sorted(state.glob("replay/*/checkpoints/*.json"))
    return int(orjson.loads(found[0].read_bytes())["line"]) if found else 0


@pytest.mark.slow
def test_a_killed_replay_resumes_without_loss(emulator: Emulator, tmp_path: Path) -> None:
    """SIGKILL in the middle of a gzip file (spool full, delivery failing): a second run resends
    what the spool holds, continues from the checkpoint, and every kept auditID arrives."""
    log = tmp_path / "audit.log.gz"
    lines = fresh_log(log, 3000)
    kept, _, _ = expected_rows(lines)
    state = tmp_path / "state"
    properties = endpoint_properties(emulator) | {"spool_limit": "256k"}
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    process = subprocess.Popen(
        replay_command([log], state, properties),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    try:
        wait_for(lambda: checkpoint_lines(state) > 0, 60, "the first checkpoint")
        wait_for(lambda: 0 < len(emulator.store.requests()), 60, "a first (failing) request")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    killed_at = checkpoint_lines(state)
    assert 0 < killed_at < len(lines)
    assert 0 == emulator.store.count()
    emulator.clear_faults()

    done = run_replay([log], state, properties)

    assert 0 == done.returncode, done.stderr
    assert f"{log}: resuming after line {killed_at:,}" in done.stderr
    duplicates = assert_all_arrived(emulator, kept)
    print(f"killed after line {killed_at}; {sum(duplicates.values())} duplicates")
    again = run_replay([log], state, properties)
    assert f"{log}: already replayed ({len(lines):,} lines); skipped" in again.stderr
    assert duplicates == assert_all_arrived(emulator, kept)


def test_ctrl_c_stops_after_a_checkpoint_and_the_next_run_continues(
    emulator: Emulator, tmp_path: Path
) -> None:
    """SIGINT (Ctrl-C) while delivery fails: the run stops at a checkpoint, prints the summary
    saying it was interrupted, exits 130; the same command then delivers everything, exit 0."""
    log = tmp_path / "audit.log"
    lines = fresh_log(log, 2000)
    kept, _, _ = expected_rows(lines)
    state = tmp_path / "state"
    properties = endpoint_properties(emulator) | {"spool_limit": "256k"}
    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    process = subprocess.Popen(
        replay_command([log], state, properties),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        wait_for(lambda: checkpoint_lines(state) > 0, 60, "the first checkpoint")
        wait_for(lambda: 0 < len(emulator.store.requests()), 60, "a first (failing) request")
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert 130 == process.returncode, stderr
    assert "interrupted: run the same command again to continue where it stopped" in stdout
    stopped_at = checkpoint_lines(state)
    assert 0 < stopped_at < len(lines)
    emulator.clear_faults()

    done = run_replay([log], state, properties)

    assert 0 == done.returncode, done.stderr
    assert f"{log}: resuming after line {stopped_at:,}" in done.stderr
    duplicates = assert_all_arrived(emulator, kept)
    print(f"stopped after line {stopped_at}; {sum(duplicates.values())} duplicates")


# --- configuration --------------------------------------------------------------------------


def test_a_fluent_bit_config_section_configures_the_pipeline(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config takes the auditrelay [OUTPUT] of a classic Fluent Bit file (its own keys ignored,
    ${VAR} expanded from @SET and the environment); --property overrides a key."""
    properties = endpoint_properties(emulator)
    secret = properties.pop("client_secret")
    monkeypatch.setenv("AUDITRELAY_TEST_SECRET", secret)
    keys = "\n".join(f"    {key} {value}" for key, value in properties.items())
    config = tmp_path / "fluent-bit.conf"
    config.write_text(
        "@SET cluster=prod-weu-1\n"
        "[INPUT]\n    Name tail\n    Path /var/log/audit.log\n"
        "[OUTPUT]\n    Name stdout\n    Match *\n"
        "[OUTPUT]\n    Name auditrelay\n    Match kube.*\n    Retry_Limit no_limits\n"
        "    storage.total_limit_size 2G\n    sidecar_address unix:///run/relay.sock\n"
        f"{keys}\n    client_secret ${{AUDITRELAY_TEST_SECRET}}\n"
        "    cluster_name ${cluster}\n    batch_interval 1h\n"
    )
    section = select_output(config, None, "--fluent-bit-output")
    assert ("auditrelay.0", secret, "prod-weu-1") == (
        section.instance_name,
        section.properties()["client_secret"],
        section.properties()["cluster_name"],
    )
    assert "retry_limit" not in section.properties()
    log = tmp_path / "audit.log"
    shutil.copyfile(AUDIT_LOG, log)
    kept, _, _ = expected_rows(lines_of(log))

    done = run_replay(
        [log], tmp_path / "state", {"batch_interval": "50ms"}, "--config", str(config)
    )

    assert done.returncode in (0, 1), done.stderr
    assert {} == +assert_all_arrived(emulator, kept)
    stored = emulator.store.rows(limit=1)[0].row
    assert stored is not None
    assert "prod-weu-1" == stored["Cluster_Name"]


def test_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    """A missing input file and a bad property are reported with what was expected; exit code 2."""
    done = run_replay([tmp_path / "missing.log"], tmp_path / "state", {"stream": "Audit"})
    assert 2 == done.returncode
    assert f"AUDIT_LOG: got '{tmp_path / 'missing.log'}', expected a readable audit log" in (
        done.stderr
    )
