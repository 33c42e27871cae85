"""`auditrelay serve` as a process: start-up line, real chunks over the socket, signals, restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from auditrelay.config import BUNDLED_POLICY
from auditrelay.v1 import relay_pb2, relay_pb2_grpc
from fixtures import chunks
from fixtures.chunks import chunk, parsed_event, raw_log_event
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
START_DEADLINE_SECONDS = 30.0
EXIT_DEADLINE_SECONDS = 30.0


@dataclass
class Sidecar:
    """A running `auditrelay serve` process and what it printed."""

    process: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    stderr: bytes = b""
    reader: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return str(next(line["listen"] for line in self.lines if line["event"] == "server_started"))

    def events(self) -> list[str]:
        return [str(line["event"]) for line in self.lines]

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = orjson.loads(raw)  # every line is JSON: a parse error fails the test
            self.lines.append(line)
            if line["event"] == "server_started":
                self.started.set()

    async def exit_code(self) -> int:
        """Waits for the process to end (and its output to be read); returns its exit code."""
        code = await asyncio.wait_for(self.process.wait(), EXIT_DEADLINE_SECONDS)
        if self.reader is not None:
            await self.reader
        assert self.process.stderr is not None
        self.stderr = await self.process.stderr.read()
        return code


Launch = Callable[..., Any]


@pytest.fixture(name="workdir")
def _workdir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ar-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(name="launch")
async def _launch(workdir: Path) -> AsyncIterator[Launch]:
    sidecars: list[Sidecar] = []

    async def launch(*extra: str, wait: bool = True) -> Sidecar:
        environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "sidecar")}
        environ["AUDITRELAY_STATE_DIR"] = str(workdir / "state")
        environ["AUDITRELAY_METRICS_ADDRESS"] = "127.0.0.1:0"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "auditrelay",
            "serve",
            "--log-format",
            "json",
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environ,
        )
        sidecar = Sidecar(process)
        sidecar.reader = asyncio.create_task(sidecar.read_stdout())
        sidecars.append(sidecar)
        if wait:
            started = asyncio.create_task(sidecar.started.wait())
            done, _ = await asyncio.wait(
                [started, sidecar.reader],
                timeout=START_DEADLINE_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if started not in done:
                started.cancel()
                if sidecar.process.returncode is None:
                    sidecar.process.kill()
                await sidecar.exit_code()
                pytest.fail(f"sidecar did not start: {sidecar.stderr.decode()}")
        return sidecar

    yield launch
    for sidecar in sidecars:
        if sidecar.process.returncode is None:
            sidecar.process.kill()
        with suppress(ProcessLookupError):
            await sidecar.process.wait()
        if sidecar.reader is not None:
            with suppress(Exception):
                await sidecar.reader


def socket_flag(workdir: Path) -> list[str]:
    return ["--listen", f"unix://{workdir}/relay.sock"]


def stub(channel: grpc.aio.Channel) -> Any:
    return relay_pb2_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]


async def configure(channel: grpc.aio.Channel, **properties: str) -> Any:
    request = relay_pb2.ConfigureRequest(
        properties=properties, instance_name="auditrelay.0", plugin_version="test"
    )
    return await stub(channel).Configure(request, timeout=10)


async def push(channel: grpc.aio.Channel, pipeline_id: str, data: bytes) -> Any:
    request = relay_pb2.PushRequest(pipeline_id=pipeline_id, tag="kube.audit", chunk=data)
    return await stub(channel).Push(request, timeout=30)


async def test_serves_chunks_and_stops_cleanly_on_sigterm(launch: Launch, workdir: Path) -> None:
    """The whole receiving end as the plugin sees it, then a clean SIGTERM exit."""
    mixed = chunk(
        [
            parsed_event(audit_id="a"),
            raw_log_event(b"not json"),
            raw_log_event(),
            chunks.group_end(),
        ]
    )
    sidecar = await launch(*socket_flag(workdir))
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="auditrelay.v1.Relay"), timeout=10
        )
        pipeline_id = (await configure(channel)).pipeline_id
        replies = [
            await push(channel, pipeline_id, mixed),
            await push(channel, pipeline_id, b""),
            await push(channel, pipeline_id, b"not msgpack at all"),
        ]

    sidecar.process.send_signal(signal.SIGTERM)

    assert health_pb2.HealthCheckResponse.SERVING == health.status
    assert [
        (relay_pb2.PushResponse.ACCEPTED, 2, 2, 1),
        (relay_pb2.PushResponse.ACCEPTED, 0, 0, 0),
        (relay_pb2.PushResponse.ACCEPTED, 0, 0, 1),
    ] == [(r.status, r.events_received, r.events_accepted, r.events_invalid) for r in replies]
    assert 0 == await sidecar.exit_code()
    assert ["server_started", "server_stopping", "server_stopped"] == [
        event for event in sidecar.events() if event.startswith("server_")
    ]
    assert not (workdir / "relay.sock").exists()


async def test_real_fluent_bit_chunks_are_accepted(launch: Launch, workdir: Path) -> None:
    """Fluent Bit's flushes of a real kube-apiserver log, json-parsed and raw-log: every record is
    an audit event; the events the bundled policy keeps are accepted."""
    sidecar = await launch(*socket_flag(workdir))
    lines = chunks.sample_lines()
    kept = chunks.kept_by_policy(BUNDLED_POLICY, lines)

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        pipeline_id = (await configure(channel)).pipeline_id
        replies = [
            await push(channel, pipeline_id, chunks.tail_chunk(chunks.TAIL_CHUNK_PARSED)),
            await push(channel, pipeline_id, chunks.tail_chunk(chunks.TAIL_CHUNK_RAW_LOG)),
        ]

    assert [(relay_pb2.PushResponse.ACCEPTED, len(lines), kept, 0)] * 2 == [
        (r.status, r.events_received, r.events_accepted, r.events_invalid) for r in replies
    ]


async def test_sigint_also_stops_gracefully(launch: Launch, workdir: Path) -> None:
    """Ctrl-C on a terminal is a clean stop too."""
    sidecar = await launch(*socket_flag(workdir))

    sidecar.process.send_signal(signal.SIGINT)

    assert 0 == await sidecar.exit_code()
    assert "server_stopped" in sidecar.events()


async def test_ten_megabyte_record_is_accepted(launch: Launch, workdir: Path) -> None:
    """A chunk with a 10 MB event passes gRPC's limits and decodes."""
    sidecar = await launch(*socket_flag(workdir))
    big = {"data": "y" * (10 << 20)}
    data = chunk([parsed_event(audit_id="big", requestObject=big), raw_log_event()])

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        pipeline_id = (await configure(channel)).pipeline_id
        reply = await push(channel, pipeline_id, data)

    assert (relay_pb2.PushResponse.ACCEPTED, 2) == (reply.status, reply.events_accepted)


async def test_configure_error_is_precise_and_never_shows_a_secret(
    launch: Launch, workdir: Path
) -> None:
    """A wrong value is named; the client secret given alongside appears in no reply or log."""
    sidecar = await launch(*socket_flag(workdir))

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        reply = await configure(
            channel,
            compression_level="12",
            client_secret="s3cr3t-value",
            client_secrte="s3cr3t-value",
        )
    sidecar.process.send_signal(signal.SIGTERM)
    await sidecar.exit_code()

    assert "" == reply.pipeline_id
    assert [
        ("client_secrte", ""),
        ("compression_level", "12"),
    ] == sorted((e.property, e.value) for e in reply.errors)
    assert b"s3cr3t-value" not in orjson.dumps(sidecar.lines) + sidecar.stderr


async def test_second_sidecar_on_the_same_socket_refuses(launch: Launch, workdir: Path) -> None:
    """A live socket is never stolen: the second process exits 2 naming listen; the first serves."""
    first = await launch(*socket_flag(workdir))

    second = await launch(*socket_flag(workdir), wait=False)

    assert 2 == await second.exit_code()
    assert b"listen" in second.stderr
    assert b"another sidecar answers there" in second.stderr
    async with grpc.aio.insecure_channel(first.address) as channel:
        assert "" != (await configure(channel)).pipeline_id


async def test_restart_after_a_crash(launch: Launch, workdir: Path) -> None:
    """After SIGKILL the stale socket is replaced; the old pipeline is NOT_FOUND until the plugin
    configures again, which gives back the same pipeline id."""
    first = await launch(*socket_flag(workdir))
    async with grpc.aio.insecure_channel(first.address) as channel:
        before = (await configure(channel)).pipeline_id
    first.process.kill()
    await first.exit_code()
    assert (workdir / "relay.sock").exists()  # what a crash leaves behind

    second = await launch(*socket_flag(workdir))
    async with grpc.aio.insecure_channel(second.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await push(channel, before, parsed_event())
        after = (await configure(channel)).pipeline_id
        reply = await push(channel, after, parsed_event())

    assert grpc.StatusCode.NOT_FOUND == caught.value.code()
    assert before == after
    assert relay_pb2.PushResponse.ACCEPTED == reply.status


async def test_plain_tcp_is_refused_at_start(launch: Launch) -> None:
    """Listening on TCP without a certificate exits 2 with the reason."""
    sidecar = await launch("--listen", "127.0.0.1:0", wait=False)

    assert 2 == await sidecar.exit_code()
    assert b"plain TCP is refused" in sidecar.stderr


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_metrics_health_and_readiness_are_served(launch: Launch, workdir: Path) -> None:
    """The address of /metrics is in the start-up line; /healthz and /readyz answer 200 while
    delivery works, and /metrics counts the pipeline's events and bytes."""
    sidecar = await launch(*socket_flag(workdir))
    [started] = [line for line in sidecar.lines if line["event"] == "server_started"]
    base = str(started["metrics"])
    data = chunk([parsed_event(audit_id="a"), parsed_event(audit_id="b"), raw_log_event(b"x")])
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        pipeline_id = (await configure(channel, batch_interval="50ms")).pipeline_id
        await push(channel, pipeline_id, data)

    health, ready, metrics = [
        await asyncio.to_thread(http_get, f"{base}/{path}")
        for path in ("healthz", "readyz", "metrics")
    ]

    assert ((200, "ok\n"), (200, "ok\n")) == (health, ready)
    assert 200 == metrics[0]
    for line in (
        f'auditrelay_events_received_total{{pipeline="{pipeline_id}"}} 2.0',
        f'auditrelay_events_invalid_total{{pipeline="{pipeline_id}"}} 1.0',
        f'auditrelay_received_bytes_total{{pipeline="{pipeline_id}"}} {float(len(data))}',
    ):
        assert line in metrics[1].splitlines()


async def test_metrics_address_in_use_is_a_clear_error(launch: Launch) -> None:
    """A metrics address that cannot be bound stops serve with exit 2, naming the setting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        sidecar = await launch("--metrics-address", address, wait=False)

        assert 2 == await sidecar.exit_code()
    assert f"metrics_address: got '{address}', expected a free host:port".encode() in (
        sidecar.stderr
    )
