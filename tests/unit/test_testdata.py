"""tests/data is what its README says: a real kube-apiserver audit log that covers what the tests
need, its Fluent Bit flushes in both tail shapes, and attributed third-party policies."""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from fixtures.chunks import (
    DATA_DIR,
    MANIFEST,
    TAIL_CHUNK_PARSED,
    TAIL_CHUNK_RAW_LOG,
    data_file,
    reference_policies,
    sample_lines,
)

REPO = Path(__file__).resolve().parents[2]
MAX_TOTAL_BYTES = 2_000_000
EVENT_HEADER = b"\xdd\x00\x00\x00\x02" * 2  # array32 of 2: the event, then its header
EMPTY_METADATA = b"\xdf\x00\x00\x00\x00"  # map32 of 0 entries


def events() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in sample_lines()]


def manifest() -> dict[str, Any]:
    written: dict[str, Any] = json.loads(data_file(MANIFEST))
    return written


def test_every_line_is_an_audit_event_of_the_pinned_kubernetes() -> None:
    """Each line is one audit.k8s.io/v1 Event with the fields kube-apiserver always writes, from
    the Kubernetes release the manifest and README name."""
    pinned = re.search(
        r"k8s\.io/kubernetes (v[\d.]+)", (REPO / "tests/controlplane/go.mod").read_text()
    )
    assert pinned is not None
    required = {"kind", "apiVersion", "level", "auditID", "stage", "requestURI", "verb", "user"}

    assert [] == [e["auditID"] for e in events() if not required <= set(e)]
    assert {("Event", "audit.k8s.io/v1")} == {(e["kind"], e["apiVersion"]) for e in events()}
    assert pinned[1] == manifest()["kubernetes"]
    assert f"Kubernetes {pinned[1]}" in (DATA_DIR / "README.md").read_text()
    assert len(events()) == manifest()["events"]


def _has(event: dict[str, Any], **wanted: Any) -> bool:
    ref = event.get("objectRef") or {}
    for key, value in wanted.items():
        if key in ("resource", "subresource", "namespace", "apiGroup"):
            if ref.get(key) != value:
                return False
        elif event.get(key) != value:
            return False
    return True


COVERAGE = {
    "exec into a pod": {"resource": "pods", "subresource": "exec"},
    "attach to a pod": {"resource": "pods", "subresource": "attach"},
    "port-forward": {"resource": "pods", "subresource": "portforward"},
    "pod status patch": {"verb": "patch", "resource": "pods", "subresource": "status"},
    "service-account token": {"verb": "create", "subresource": "token"},
    "secret created": {"verb": "create", "resource": "secrets"},
    "secrets listed": {"verb": "list", "resource": "secrets"},
    "configmap patched": {"verb": "patch", "resource": "configmaps"},
    "cluster-scoped binding": {"verb": "create", "resource": "clusterrolebindings"},
    "lease renewal": {"verb": "update", "resource": "leases"},
    "watch": {"verb": "watch"},
    "delete": {"verb": "delete", "resource": "pods"},
    "event written": {"verb": "create", "resource": "events"},
    "RequestReceived stage": {"stage": "RequestReceived"},
    "ResponseStarted stage": {"stage": "ResponseStarted"},
}


@pytest.mark.parametrize("wanted", COVERAGE.values(), ids=COVERAGE.keys())
def test_the_log_covers_what_the_tests_rely_on(wanted: dict[str, Any]) -> None:
    """The traffic Defender's detections and the policy's noise rules are about is in the log."""
    assert any(_has(event, **wanted) for event in events())


def test_the_log_covers_users_outcomes_levels_and_bodies() -> None:
    """Impersonation, anonymous and failed authentication, 403s, every level, both bodies."""
    log = events()
    codes = {e.get("responseStatus", {}).get("code") for e in log}
    users = {e["user"].get("username") for e in log}

    assert any("impersonatedUser" in e for e in log)
    assert "system:anonymous" in users
    assert any(not e["user"] for e in log)  # authentication failed: no user at all
    assert {200, 201, 401, 403} <= codes
    assert {"Metadata", "Request", "RequestResponse"} == {e["level"] for e in log}
    assert any("requestObject" in e and "responseObject" in e for e in log)
    assert any("objectRef" in e and "namespace" not in e["objectRef"] for e in log)


def _records(buffer: bytes) -> Iterator[tuple[int, bytes]]:
    """(read time in ns, record bytes) of a flush, checking Fluent Bit's framing byte by byte."""
    unpacker = msgpack.Unpacker(raw=True)
    unpacker.feed(buffer)
    position = 0
    while position < len(buffer):
        assert EVENT_HEADER == buffer[position : position + 10], position
        assert b"\xd7\x00" == buffer[position + 10 : position + 12]  # fixext8, EventTime
        seconds, nanoseconds = struct.unpack(">II", buffer[position + 12 : position + 20])
        assert EMPTY_METADATA == buffer[position + 20 : position + 25]
        start = position + 25
        unpacker.skip()  # the whole event, to find where the record ends
        position = unpacker.tell()
        yield seconds * 1_000_000_000 + nanoseconds, buffer[start:position]


@pytest.mark.parametrize("path", [TAIL_CHUNK_RAW_LOG, TAIL_CHUNK_PARSED], ids=lambda p: p.name)
def test_flushes_hold_the_log_in_fluent_bits_framing(path: Path) -> None:
    """Both flushes are v2 events one after another, 32-bit headers, EventTime read times in
    file order after each event's stage; records are the log's lines: the line itself in `log`,
    or its fields parsed into a map32."""
    lines = sample_lines()
    records = list(_records(data_file(path)))
    read_times = [at for at, _ in records]

    assert len(lines) == len(records)
    assert read_times == sorted(read_times)
    for (at, record), line in zip(records, lines, strict=True):
        stage = orjson.loads(line)["stageTimestamp"]
        assert stage[:19] <= _utc(at)[:19]
        if path == TAIL_CHUNK_RAW_LOG:
            assert b"\xdf\x00\x00\x00\x01\xa3log" == record[:9]
            assert {"log": line.decode()} == msgpack.unpackb(record)
        else:
            fields = orjson.loads(line)
            assert b"\xdf" + struct.pack(">I", len(fields)) == record[:5]
            assert fields == msgpack.unpackb(record)


def _utc(nanoseconds: int) -> str:
    stamp = dt.datetime.fromtimestamp(nanoseconds / 1e9, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S")


def test_the_data_stays_small() -> None:
    """The generated files stay under 2 MB together: the repository carries them."""
    generated = [path for path in DATA_DIR.iterdir() if path.is_file()]

    assert sum(path.stat().st_size for path in generated) < MAX_TOTAL_BYTES
    assert manifest()["bytes"] == {
        name: (DATA_DIR / name).stat().st_size for name in manifest()["bytes"]
    }


@pytest.mark.parametrize("policy", reference_policies(), ids=lambda p: p.name)
def test_each_reference_policy_names_its_source_and_license(policy: Path) -> None:
    """Third-party policies keep their header: where they come from and under which license;
    the licenses they point to are beside them."""
    header = policy.read_text().split("\napiVersion:")[0]

    assert re.search(r"^# Source repository: github\.com/\S+", header, re.M)
    assert re.search(r"^# Source commit: [0-9a-f]{12}", header, re.M)
    assert re.search(r"License: (MIT|Apache-2\.0|CC-BY-4\.0)", header)
    if "LICENSES/Apache-2.0.txt" in header:
        assert (policy.parent / "LICENSES" / "Apache-2.0.txt").is_file()
