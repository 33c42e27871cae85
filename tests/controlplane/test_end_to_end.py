"""End to end on a real control plane: what kube-apiserver wrote reaches the workspace.

kube-apiserver, started with the policy under test, writes its audit files while the scenario
runs. Those lines go, as Fluent Bit's tail input hands them to an output (v2 events, EventTime,
the raw line in ``log``, chunks under Fluent Bit's 2,048,000-byte file-system chunk size), to
``out_auditrelay.so`` driven the way Fluent Bit's Go proxy drives it, then to ``auditrelay serve``,
which applies the same policy and delivers to the bundled Logs Ingestion emulator over HTTPS.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from auditrelay.emulator.store import Store
from auditrelay.flbproxy import GoProxy, Instance, Result, build_plugin
from fixtures.chunks import event_time, raw_log_event
from harness.sidecar import Sidecar

from controlplane.harness import ScenarioLog

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]

TAG = "kube.audit"
FLUENT_BIT_CHUNK_BYTES = 2_048_000
DELIVERY_DEADLINE_SECONDS = 120.0
FLUSH_DEADLINE_SECONDS = 60.0


def audit_lines(files: list[Path]) -> list[bytes]:
    """Every line of the audit files, in the order kube-apiserver wrote them."""
    return [line for path in files for line in path.read_bytes().splitlines() if line.strip()]


def tail_chunks(lines: list[bytes]) -> Iterator[bytes]:
    """The lines as Fluent Bit's tail input (no parser) flushes them to an output."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        event = raw_log_event(line, event_time(int(time.time())))
        if chunk and size + len(event) > FLUENT_BIT_CHUNK_BYTES:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(event)
        size += len(event)
    if chunk:
        yield b"".join(chunk)


def flush_until_accepted(proxy: GoProxy, instance: Instance, chunk: bytes) -> None:
    """Flushes a chunk again on FLB_RETRY, as Fluent Bit's scheduler would."""
    deadline = time.monotonic() + FLUSH_DEADLINE_SECONDS
    result = proxy.flush(instance, chunk, TAG)
    while result is Result.RETRY and time.monotonic() < deadline:
        result = proxy.flush(instance, chunk, TAG)
    assert Result.OK == result, proxy.lines()


def delivered_audit_ids(store: Store, expected: set[str]) -> set[str]:
    """The auditIDs in the emulator's store once all expected ones arrived (or the deadline)."""
    deadline = time.monotonic() + DELIVERY_DEADLINE_SECONDS
    delivered = set(store.audit_id_counts())
    while not expected <= delivered and time.monotonic() < deadline:
        time.sleep(
            0.2
        )  # polling the store of another process; the condition decides, not the sleep
        delivered = set(store.audit_id_counts())
    return delivered


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
