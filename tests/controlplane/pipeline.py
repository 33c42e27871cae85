"""kube-apiserver's audit files through the real path: out_auditrelay.so, ``auditrelay serve``, emulator.

The lines go as Fluent Bit's tail input hands them to an output (v2 events, EventTime, the raw
line in ``log``, chunks under Fluent Bit's 2,048,000-byte file-system chunk size) to the plugin
driven the way Fluent Bit's Go proxy drives it, then to the sidecar, which applies a policy and
delivers to the bundled Logs Ingestion emulator over HTTPS.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from auditrelay.devtools.flbproxy import GoProxy, Instance, Result, build_plugin
from auditrelay.emulator import StoredRow
from auditrelay.emulator.store import Store
from auditrelay.filter import PolicyFilter
from auditrelay.model import AuditEvent
from fixtures.chunks import event_time, raw_log_event
from harness.sidecar import Sidecar

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


def kept_events(lines: list[bytes], policy: Path) -> int:
    """How many of the lines ``policy`` keeps: the rows the workspace must end up with."""
    event_filter = PolicyFilter.from_file(policy)
    return sum(
        event_filter.apply(AuditEvent(fields=orjson.loads(line), raw=line)) is not None
        for line in lines
    )


def stored_rows(store: Store, count: int) -> list[StoredRow]:
    """The store's rows once ``count`` of them arrived (or the deadline)."""
    deadline = time.monotonic() + DELIVERY_DEADLINE_SECONDS
    while store.count() < count and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the store of another process; the count decides, not the sleep
    return store.rows()


@contextmanager
def sent_through_the_plugin(lines: list[bytes], policy: Path, cluster_name: str) -> Iterator[Store]:
    """Sends the lines through plugin and sidecar (applying ``policy``) to a fresh emulator;
    yields the emulator's store while both still run."""
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
                    "policy": str(policy),
                    "cluster_name": cluster_name,
                }
            )
            for chunk in tail_chunks(lines):
                flush_until_accepted(proxy, instance, chunk)
            yield Store.in_directory(sidecar.state_dir / "emulator")
        finally:
            proxy.shutdown()
            sidecar.stop()


def deliver(lines: list[bytes], policy: Path, cluster_name: str) -> list[StoredRow]:
    """Sends the lines through plugin and sidecar (applying ``policy``) to a fresh emulator
    and returns the stored rows once every event the policy keeps has arrived."""
    expected = kept_events(lines, policy)
    with sent_through_the_plugin(lines, policy, cluster_name) as store:
        rows = stored_rows(store, expected)
    assert expected == len(rows), "the workspace holds other rows than the policy keeps"
    return rows
