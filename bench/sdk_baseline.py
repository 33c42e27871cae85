"""The baseline: the same rows through azure-monitor-ingestion's own ``upload()`` path.

``LogsIngestionClient.upload(rule_id, stream, logs)`` takes a list of row dicts, measures each
row with ``json.dumps``, cuts 1 MiB chunks, serializes each chunk again with ``json.dumps``,
gzips it at level 6 and POSTs the chunks one after another. ``prepare`` runs exactly that
preparation (the SDK's own ``_create_gzip_requests``) without a network; ``upload`` runs the
whole call against a Logs Ingestion endpoint (the bundled emulator in the benchmarks).

The rows are handed over already decoded (dicts), so the figure leaves out the decoding the
SDK's caller would have to do: the baseline is, if anything, flattered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from azure.monitor.ingestion import _helpers as sdk_helpers

from bench.results import Stopwatch

Row = dict[str, Any]


@dataclasses.dataclass
class SdkRun:
    """What one pass of the SDK path did and cost."""

    rows: int
    requests: int
    uncompressed_bytes: int
    compressed_bytes: int
    clock: Stopwatch

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.clock.wall if self.clock.wall else 0.0

    @property
    def rows_per_cpu_s(self) -> float:
        return self.rows / self.clock.cpu if self.clock.cpu else 0.0


def rows_from_lines(lines: Iterable[bytes]) -> list[Row]:
    """Row dicts from JSON rows (the sidecar's own encoded rows, or plain event lines)."""
    return [orjson.loads(line) for line in lines]


def uncompressed_size(rows: Sequence[Row]) -> int:
    """Bytes of the JSON arrays the SDK would send for these rows, before gzip."""
    return sum(len(json.dumps(chunk).encode()) for chunk in sdk_helpers._split_chunks(list(rows)))


def prepare(rows: Sequence[Row]) -> SdkRun:
    """Runs the SDK's own serialize + chunk + gzip-6 preparation over every row."""
    clock = Stopwatch()
    requests = compressed = 0
    with clock.running():
        for body, _chunk in sdk_helpers._create_gzip_requests(list(rows)):
            requests += 1
            compressed += len(body)
    return SdkRun(len(rows), requests, 0, compressed, clock)


def upload(
    rows: Sequence[Row],
    endpoint: str,
    rule_id: str,
    stream: str,
    credential: Any,
    ca_file: str | None = None,
) -> SdkRun:
    """One synchronous ``upload()`` of every row; raises if any chunk failed."""
    from azure.monitor.ingestion import LogsIngestionClient

    failures: list[BaseException] = []

    def on_error(error: Any) -> None:
        failures.append(error.error)

    client = LogsIngestionClient(endpoint, credential, connection_verify=ca_file or True)
    clock = Stopwatch()
    with client, clock.running():
        client.upload(rule_id=rule_id, stream_name=stream, logs=list(rows), on_error=on_error)
    if failures:
        raise RuntimeError(f"SDK upload failed for {len(failures)} chunk(s): {failures[0]!r}")
    requests = sum(1 for _ in sdk_helpers._split_chunks(list(rows)))
    return SdkRun(len(rows), requests, 0, 0, clock)


def upload_to(rows: Sequence[Row], emulator: Any) -> SdkRun:
    """``upload()`` to the bench emulator, with a client-secret credential from its Entra."""
    from azure.identity import ClientSecretCredential

    from bench.emulator import CLIENT_ID, CLIENT_SECRET, TENANT_ID

    credential = ClientSecretCredential(
        TENANT_ID,
        CLIENT_ID,
        CLIENT_SECRET,
        authority=emulator.authority_host,
        disable_instance_discovery=True,
        connection_verify=emulator.ca_file,
    )
    credential.get_token("https://monitor.azure.com/.default")  # not part of the timing
    with credential:
        return upload(
            rows, emulator.endpoint, emulator.dcr_id, "Custom-KubeAudit_CL", credential,
            emulator.ca_file,
        )  # fmt: skip
