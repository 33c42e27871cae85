"""A pipeline's spool belongs to its destination: rotated secrets keep the backlog, and a spool
whose destination is gone is reported and can be drained into a pipeline, losing nothing.

out_auditrelay.so is driven exactly as Fluent Bit does (auditrelay.devtools.flbproxy); a Fluent Bit
restart with a changed configuration is the plugin exiting, registering again and initialising
its instance with the new properties. ``auditrelay serve`` runs as a subprocess, the emulator in
this process; faults, secrets and token revocation go through its API. Events are the bundled
real audit log's, each given a fresh auditID; the ones the bundled policy keeps (worked out with
the real PolicyFilter) must all be in the emulator's store at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from auditrelay.devtools.flbproxy import GoProxy
from auditrelay.emulator import DEFAULT_DCR_ID, Emulator, EmulatorSettings, Fault, FaultKind
from auditrelay.emulator import running_in_thread as emulator_in_thread
from harness.emulator import CLIENT, emulator_destination
from harness.fluentbit import Chunks, FluentBit, http_get, missing, wait_for
from harness.sidecar import REPO_ROOT, Sidecar

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # sidecar restarts, CLI runs

WRONG_DCR_ID = "dcr-11111111111111111111111111111111"


@pytest.fixture
def emulator(workdir: Path) -> Iterator[Emulator]:
    settings = EmulatorSettings(state_dir=workdir / "emulator", client_secrets={CLIENT: "first"})
    with emulator_in_thread(settings) as running:
        yield running


@pytest.fixture
def sidecar(workdir: Path) -> Iterator[Sidecar]:
    started = Sidecar.on_socket(
        workdir / "relay.sock", workdir / "relay", ["--orphan-after", "500ms"]
    )
    started.start()
    yield started
    started.stop()


def output_section(sidecar: Sidecar, emulator: Emulator, secret: str) -> dict[str, str]:
    return {
        "sidecar_address": sidecar.address,
        "sidecar_wait": "20s",
        **emulator_destination(emulator, secret),
        "batch_interval": "50ms",
        "request_timeout": "10s",
    }


def orphaned_bytes(sidecar: Sidecar) -> float:
    _, text = http_get(sidecar, "/metrics")
    [line] = [x for x in text.splitlines() if x.startswith("auditrelay_spool_orphaned_bytes ")]
    return float(line.split()[1])


def spool_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sidecar")}
    command = [sys.executable, "-m", "auditrelay", "spool", *args, "--state-dir", str(state_dir)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)


def statuses(emulator: Emulator) -> list[int]:
    return [request.status for request in emulator.store.requests()]


def test_a_rotated_secret_delivers_the_backlog(
    emulator: Emulator, sidecar: Sidecar, proxy: GoProxy
) -> None:
    """The endpoint answers 503 while chunks pile up in the spool; the secret expires and is
    rotated (Fluent Bit restarted with the new one): the pipeline keeps its id and its spool, is
    rebuilt with the new secret and delivers the backlog. Then once more with the sidecar
    killed in the outage and restarted: the backlog is still delivered, with the third secret."""
    chunks = Chunks("rotate")
    flb = FluentBit(proxy, output_section(sidecar, emulator, "first"))
    flb.send(chunks.make())
    wait_for(lambda: not missing(emulator, chunks.sent), 60, "the rows before the outage")

    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    for _ in range(4):
        flb.send(chunks.make())
    wait_for(lambda: 503 in statuses(emulator), 60, "a 503")
    emulator.tokens.client_secrets = {CLIENT: "second"}  # the old secret expires
    emulator.revoke_tokens()
    flb.restart(client_secret="second")
    emulator.clear_faults()
    wait_for(lambda: not missing(emulator, chunks.sent), 120, "the backlog, with the new secret")

    first, second = sidecar.events("pipeline_configured")
    assert first["pipeline_id"] == second["pipeline_id"]
    assert ["client_secret"] == second["rebuilt_for"]
    assert 0 < sidecar.events("pipeline_started")[-1]["backlog_bytes"]

    emulator.add_fault(Fault(FaultKind.STATUS, status=503))
    before = len(statuses(emulator))
    for _ in range(3):
        flb.send(chunks.make())
    wait_for(lambda: 503 in statuses(emulator)[before:], 60, "a 503")
    sidecar.kill()
    emulator.tokens.client_secrets = {CLIENT: "third"}
    emulator.revoke_tokens()
    sidecar.start()
    flb.restart(client_secret="third")
    emulator.clear_faults()
    wait_for(lambda: not missing(emulator, chunks.sent), 120, "the backlog after the restart")

    assert first["pipeline_id"] == sidecar.events("pipeline_configured")[-1]["pipeline_id"]
    assert 0 < sidecar.events("pipeline_started")[-1]["backlog_bytes"]
    assert [] == sidecar.events("spool_orphaned")
    refused = [t for t in emulator.store.token_requests() if t.status != 200]
    assert refused == [] or all(t.error == "invalid_client" for t in refused)


def test_a_changed_dcr_id_leaves_an_orphan_that_is_reported_and_drained(
    emulator: Emulator, sidecar: Sidecar, proxy: GoProxy
) -> None:
    """A wrong dcr_id (404) strands rows in the spool; the operator corrects it and restarts:
    the old spool is an orphan, reported in the log, by auditrelay_spool_orphaned_bytes and on
    /readyz; `spool list` shows it with its destination; `spool discard` without --yes is
    refused; `spool drain` into the new pipeline (serve running) moves it and every kept
    event is delivered."""
    chunks = Chunks("dcr")
    flb = FluentBit(proxy, {**output_section(sidecar, emulator, "first"), "dcr_id": WRONG_DCR_ID})
    for _ in range(3):
        flb.send(chunks.make())
    wait_for(lambda: 404 in statuses(emulator), 60, "a 404 for the wrong rule")
    sidecar.kill()
    sidecar.start()
    flb.restart(dcr_id=DEFAULT_DCR_ID)
    flb.send(chunks.make())
    old = sidecar.events("pipeline_configured")[0]["pipeline_id"]
    new = sidecar.events("pipeline_configured")[-1]["pipeline_id"]
    assert old != new

    wait_for(lambda: orphaned_bytes(sidecar) > 0, 60, "the orphaned spool's metric")
    status, text = http_get(sidecar, "/readyz")
    assert 503 == status
    assert f"spool {old} is orphaned" in text
    assert WRONG_DCR_ID in text
    wait_for(lambda: bool(sidecar.events("spool_orphaned")), 60, "the spool_orphaned log line")
    assert old == sidecar.events("spool_orphaned")[0]["spool"]

    listed = spool_cli(sidecar.state_dir, "list", "--output", "json")
    assert 1 == listed.returncode, listed.stderr
    spools = {entry["pipeline_id"]: entry for entry in json.loads(listed.stdout)["spools"]}
    assert ("orphaned", WRONG_DCR_ID) == (
        spools[old]["state"],
        spools[old]["destination"]["dcr_id"],
    )
    assert 0 < spools[old]["pending_events"]
    assert "owned" == spools[new]["state"]

    refused = spool_cli(sidecar.state_dir, "discard", old)
    assert 2 == refused.returncode
    assert "--yes" in refused.stderr
    assert (sidecar.state_dir / "spool" / old).is_dir()

    drained = spool_cli(sidecar.state_dir, "drain", old, "--to-pipeline", new)
    assert 0 == drained.returncode, drained.stderr
    wait_for(lambda: bool(sidecar.events("spool_drained")), 60, "the running serve's drain")
    wait_for(lambda: not missing(emulator, chunks.sent), 120, "every kept event")
    wait_for(lambda: orphaned_bytes(sidecar) == 0, 60, "the metric to clear")
    assert 200 == http_get(sidecar, "/readyz")[0]
    assert not (sidecar.state_dir / "spool" / old).exists()
