"""The gRPC receiving end, over real sockets: statuses, socket safety, TLS, health, shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import stat
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from auditrelay.config import ServerSettings
from auditrelay.errors import ConfigError, PropertyProblem, SpoolError, SpoolFullError
from auditrelay.model import PushResult, PushStatus
from auditrelay.receive import (
    SERVICE_NAME,
    ListenAddress,
    PipelineNotFoundError,
    RelayServer,
    prepare_socket_path,
    wait_until_serving,
)
from auditrelay.v1 import relay_pb2, relay_pb2_grpc
from fixtures.certs import Pki, make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc

PIPELINE = "auditrelay.0-0000000000000000"


class ScriptedHandler:
    """A RelayHandler whose answers the test chooses: a result, or an error to raise."""

    def __init__(self) -> None:
        self.push_outcome: PushResult | Exception = PushResult(PushStatus.ACCEPTED, 3, 2, 1, 0)
        self.configure_error: Exception | None = None
        self.pushed: list[tuple[str, str, bytes]] = []
        self.push_entered = asyncio.Event()
        self.push_release: asyncio.Event | None = None

    async def configure(
        self, properties: Mapping[str, str], instance_name: str, plugin_version: str
    ) -> str:
        if self.configure_error is not None:
            raise self.configure_error
        return PIPELINE

    async def push(self, pipeline_id: str, tag: str, chunk: bytes) -> PushResult:
        self.pushed.append((pipeline_id, tag, chunk))
        self.push_entered.set()
        if self.push_release is not None:
            await self.push_release.wait()
        if pipeline_id != PIPELINE:
            raise PipelineNotFoundError(f"unknown pipeline {pipeline_id!r}")
        if isinstance(self.push_outcome, Exception):
            raise self.push_outcome
        return self.push_outcome


@pytest.fixture(name="socket_dir")
def _socket_dir() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ar-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(name="settings")
def _settings(socket_dir: Path) -> ServerSettings:
    return ServerSettings(listen=f"unix://{socket_dir}/relay.sock", state_dir=socket_dir / "state")


@pytest.fixture(name="handler")
def _handler() -> ScriptedHandler:
    return ScriptedHandler()


StartServer = Callable[..., Any]


@pytest.fixture(name="start_server")
async def _start_server(handler: ScriptedHandler) -> AsyncIterator[StartServer]:
    servers: list[RelayServer] = []

    async def start(settings: ServerSettings) -> RelayServer:
        server = RelayServer(settings, handler)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0)


@pytest.fixture(name="server")
async def _server(start_server: StartServer, settings: ServerSettings) -> RelayServer:
    server: RelayServer = await start_server(settings)
    return server


def relay_stub(channel: grpc.aio.Channel) -> Any:
    return relay_pb2_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(name="channel")
async def _channel(server: RelayServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


async def push(channel: grpc.aio.Channel, chunk: bytes = b"", pipeline_id: str = PIPELINE) -> Any:
    request = relay_pb2.PushRequest(pipeline_id=pipeline_id, tag="kube.audit", chunk=chunk)
    return await relay_stub(channel).Push(request, timeout=10)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return response.status


class TestPush:
    """Push replies and how typed errors become statuses."""

    async def test_result_is_returned_with_counts(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler
    ) -> None:
        """The handler's result comes back as the reply; the chunk arrives byte for byte."""
        chunk = bytes(range(256)) * 4

        reply = await push(channel, chunk)

        assert (relay_pb2.PushResponse.ACCEPTED, 3, 2, 1, 0) == (
            reply.status,
            reply.events_received,
            reply.events_accepted,
            reply.events_filtered,
            reply.events_invalid,
        )
        assert [(PIPELINE, "kube.audit", chunk)] == handler.pushed

    @pytest.mark.parametrize(
        "error", [SpoolFullError("spool is full"), SpoolError("disk failed")], ids=["full", "error"]
    )
    async def test_spool_errors_become_retry_later(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler, error: SpoolError
    ) -> None:
        """When the next stage cannot take the events, Fluent Bit is told to retry later."""
        handler.push_outcome = error

        reply = await push(channel)

        assert relay_pb2.PushResponse.RETRY_LATER == reply.status
        assert str(error) in reply.message

    async def test_a_chunk_refused_for_a_full_spool_is_freed_once_answered(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Under a full spool Fluent Bit retries chunk after chunk: each refused chunk's memory
        must go as soon as it is answered, not wait for a full garbage collection. The handler
        keeps its error in an outcome, as the app does: a reference cycle through the
        traceback, which the answer must break."""
        freed: list[weakref.ref[object]] = []

        class Outcome:
            deferred: Exception | None = None

        async def refuse(pipeline_id: str, tag: str, chunk: bytes) -> PushResult:
            outcome = Outcome()  # stands for the decoded chunk and its rows
            freed.append(weakref.ref(outcome))
            outcome.deferred = SpoolFullError("spool is full")
            raise outcome.deferred  # its traceback holds this frame, which holds the outcome

        monkeypatch.setattr(handler, "push", refuse)
        gc.disable()  # only reference counting may free it
        try:
            reply = await push(channel)
            assert relay_pb2.PushResponse.RETRY_LATER == reply.status
            assert [None] == [ref() for ref in freed]
        finally:
            gc.enable()

    async def test_unexpected_error_is_retry_later_and_logged(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler
    ) -> None:
        """A bug never acknowledges a chunk: RETRY_LATER, and a push_failed log line."""
        handler.push_outcome = RuntimeError("bug")

        with structlog.testing.capture_logs() as logs:
            reply = await push(channel)

        assert relay_pb2.PushResponse.RETRY_LATER == reply.status
        assert ["push_failed"] == [line["event"] for line in logs]

    async def test_unknown_pipeline_is_not_found(self, channel: grpc.aio.Channel) -> None:
        """A pipeline the sidecar does not know is NOT_FOUND, so the plugin configures again."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await push(channel, pipeline_id="auditrelay.0-ffffffffffffffff")

        assert grpc.StatusCode.NOT_FOUND == caught.value.code()

    async def test_chunk_over_the_limit_is_rejected(
        self, start_server: StartServer, settings: ServerSettings, handler: ScriptedHandler
    ) -> None:
        """A chunk over max_chunk_bytes is REJECTED (retrying the same bytes cannot help)."""
        server = await start_server(replace(settings, max_chunk_bytes=1000))

        async with grpc.aio.insecure_channel(server.address) as channel:
            reply = await push(channel, b"x" * 1001)

        assert relay_pb2.PushResponse.REJECTED == reply.status
        assert "max_chunk_bytes" in reply.message
        assert [] == handler.pushed

    async def test_several_megabyte_chunk_passes_the_message_limit(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler
    ) -> None:
        """Chunks far over gRPC's default 4 MiB receive limit are accepted."""
        chunk = os.urandom(12 << 20)

        reply = await push(channel, chunk)

        assert relay_pb2.PushResponse.ACCEPTED == reply.status
        assert chunk == handler.pushed[0][2]


class TestConfigure:
    """Configure errors name the property, the value and what was expected; never a secret."""

    async def test_pipeline_id_is_returned(self, channel: grpc.aio.Channel) -> None:
        """A good configuration returns the handler's pipeline id and no errors."""
        request = relay_pb2.ConfigureRequest(instance_name="auditrelay.0")

        reply = await relay_stub(channel).Configure(request, timeout=10)

        assert (PIPELINE, []) == (reply.pipeline_id, list(reply.errors))

    async def test_every_problem_is_listed(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler
    ) -> None:
        """Each problem arrives as property, value, expected; no pipeline id."""
        handler.configure_error = ConfigError(
            [
                PropertyProblem("compression_level", "12", "an integer from 1 to 9"),
                PropertyProblem("dcr_id", "", "a value when endpoint is set"),
            ]
        )

        reply = await relay_stub(channel).Configure(relay_pb2.ConfigureRequest(), timeout=10)

        assert "" == reply.pipeline_id
        assert [
            ("compression_level", "12", "an integer from 1 to 9"),
            ("dcr_id", "", "a value when endpoint is set"),
        ] == [(e.property, e.value, e.expected) for e in reply.errors]

    async def test_sidecar_that_cannot_serve_is_failed_precondition(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler
    ) -> None:
        """A sidecar-side failure (not the user's properties) is a status with the reason."""
        handler.configure_error = SpoolError("cannot create /var/lib/auditrelay/spool: read-only")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await relay_stub(channel).Configure(relay_pb2.ConfigureRequest(), timeout=10)

        assert grpc.StatusCode.FAILED_PRECONDITION == caught.value.code()
        assert "read-only" in (caught.value.details() or "")

    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (SpoolError("no space left on the state disk"), grpc.StatusCode.FAILED_PRECONDITION),
            (OSError(28, "No space left on device"), grpc.StatusCode.UNKNOWN),
        ],
        ids=["sidecar", "bug"],
    )
    async def test_a_failed_configure_is_freed_once_answered(
        self,
        channel: grpc.aio.Channel,
        handler: ScriptedHandler,
        monkeypatch: pytest.MonkeyPatch,
        error: Exception,
        code: grpc.StatusCode,
    ) -> None:
        """The plugin configures again at once after a failure (a full state disk after a
        restart): what the failed attempt built must go as soon as it is answered, not wait
        for a full garbage collection, or the sidecar grows with every attempt."""
        freed: list[weakref.ref[object]] = []

        class HalfBuiltPipeline:
            failure: Exception | None = None

        async def fail(properties: Mapping[str, str], instance: str, version: str) -> str:
            pipeline = HalfBuiltPipeline()
            freed.append(weakref.ref(pipeline))
            pipeline.failure = error
            raise pipeline.failure  # its traceback holds this frame, which holds the pipeline

        monkeypatch.setattr(handler, "configure", fail)
        gc.disable()  # only reference counting may free it
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await relay_stub(channel).Configure(relay_pb2.ConfigureRequest(), timeout=10)
            assert code == caught.value.code()
            assert [None] == [ref() for ref in freed]
        finally:
            gc.enable()

    @pytest.mark.parametrize(
        "problem",
        [
            PropertyProblem("client_secret", "hunter2", "a non-empty value"),
            PropertyProblem("client_secrte", "hunter2", "a known property"),
        ],
        ids=["secret-property", "unknown-property"],
    )
    async def test_secret_values_are_never_echoed_or_logged(
        self, channel: grpc.aio.Channel, handler: ScriptedHandler, problem: PropertyProblem
    ) -> None:
        """A secret's value (or a misspelled key's, which may be one) is in no reply or log."""
        handler.configure_error = ConfigError([problem])

        with structlog.testing.capture_logs() as logs:
            reply = await relay_stub(channel).Configure(relay_pb2.ConfigureRequest(), timeout=10)

        assert [(problem.property, "")] == [(e.property, e.value) for e in reply.errors]
        assert "hunter2" not in str(logs)


class TestUnixSocket:
    """The socket is 0660, a stale one is replaced, a live one is never stolen."""

    async def test_socket_is_owner_and_group_only_whatever_the_umask(
        self, start_server: StartServer, settings: ServerSettings
    ) -> None:
        """Even under umask 000 the socket is created rw-rw---- (no world-writable window)."""
        previous = os.umask(0)
        try:
            server = await start_server(settings)
        finally:
            os.umask(previous)

        path = ListenAddress.parse(server.address).unix_path
        assert path is not None
        assert 0o660 == stat.S_IMODE(path.stat().st_mode)

    async def test_missing_directory_is_created_without_world_access(
        self, start_server: StartServer, socket_dir: Path
    ) -> None:
        """The socket's directory is created 0750 when it does not exist."""
        settings = ServerSettings(listen=f"unix://{socket_dir}/run/relay.sock")

        await start_server(settings)

        assert 0 == stat.S_IMODE((socket_dir / "run").stat().st_mode) & stat.S_IRWXO

    async def test_stale_socket_from_a_crash_is_replaced(
        self, start_server: StartServer, settings: ServerSettings, socket_dir: Path
    ) -> None:
        """A socket file nobody listens on (the previous sidecar was killed) is replaced."""
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(socket_dir / "relay.sock"))
        stale.close()  # the file stays, nobody listens: what SIGKILL leaves behind

        server = await start_server(settings)

        async with grpc.aio.insecure_channel(server.address) as channel:
            assert health_pb2.HealthCheckResponse.SERVING == await health_status(channel)

    async def test_live_socket_is_not_stolen(
        self, start_server: StartServer, server: RelayServer, settings: ServerSettings
    ) -> None:
        """A second sidecar on the same path refuses to start; the first keeps serving."""
        with pytest.raises(ConfigError, match="another sidecar answers there") as caught:
            await start_server(settings)

        assert ["listen"] == [problem.property for problem in caught.value.problems]
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert health_pb2.HealthCheckResponse.SERVING == await health_status(channel)

    def test_file_that_is_not_a_socket_is_left_alone(self, socket_dir: Path) -> None:
        """A regular file at the socket path is an operator mistake: refuse, do not delete."""
        path = socket_dir / "relay.sock"
        path.write_text("keep me")

        with pytest.raises(ConfigError, match="not a socket"):
            prepare_socket_path(path)

        assert "keep me" == path.read_text()

    async def test_socket_is_removed_at_shutdown(
        self, start_server: StartServer, settings: ServerSettings
    ) -> None:
        """A clean stop leaves no socket file behind."""
        server = await start_server(settings)

        await server.stop(1)

        assert not await asyncio.to_thread(os.path.exists, settings.listen.removeprefix("unix://"))


class TestListenAddress:
    """The listen setting is checked before anything binds."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "unix:///run/auditrelay/relay.sock",
                ListenAddress(unix_path=Path("/run/auditrelay/relay.sock")),
            ),
            ("127.0.0.1:7443", ListenAddress(host="127.0.0.1", port=7443)),
            ("[::1]:7443", ListenAddress(host="[::1]", port=7443)),
        ],
    )
    def test_valid_addresses(self, text: str, expected: ListenAddress) -> None:
        """Unix paths and host:port parse."""
        assert expected == ListenAddress.parse(text)

    @pytest.mark.parametrize("text", ["unix://relative.sock", "localhost", "host:http", ":80"])
    def test_invalid_addresses_name_the_setting(self, text: str) -> None:
        """A wrong listen value names listen, the value and the accepted forms."""
        with pytest.raises(ConfigError) as caught:
            ListenAddress.parse(text)

        assert [("listen", text, "unix:///absolute/path.sock or host:port")] == [
            (p.property, p.value, p.expected) for p in caught.value.problems
        ]


@pytest.fixture(name="pki", scope="module")
def _pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, *, client_ca: bool) -> ServerSettings:
    return ServerSettings(
        listen="127.0.0.1:0",
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca if client_ca else None,
    )


def tls_channel(
    address: str, ca: Path, client: tuple[Path, Path] | None = None
) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(address, credentials)


class TestTls:
    """TCP always means TLS; a client CA makes client certificates mandatory."""

    async def test_tls_server_answers_a_client_trusting_its_ca(
        self, start_server: StartServer, pki: Pki
    ) -> None:
        """A TCP listener serves over TLS on the port it reports."""
        server = await start_server(tls_settings(pki, client_ca=False))

        async with tls_channel(server.address, pki.ca) as channel:
            reply = await push(channel)

        assert server.address.startswith("127.0.0.1:")
        assert relay_pb2.PushResponse.ACCEPTED == reply.status

    async def test_client_not_trusting_the_server_fails(
        self, start_server: StartServer, pki: Pki
    ) -> None:
        """A client with another CA cannot talk to the sidecar."""
        server = await start_server(tls_settings(pki, client_ca=False))

        async with tls_channel(server.address, pki.other_ca) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await push(channel)

        assert grpc.StatusCode.UNAVAILABLE == caught.value.code()

    async def test_mtls_accepts_a_client_certificate_from_the_ca(
        self, start_server: StartServer, pki: Pki
    ) -> None:
        """With tls_client_ca, a client presenting a certificate the CA signed gets through."""
        server = await start_server(tls_settings(pki, client_ca=True))

        async with tls_channel(
            server.address, pki.ca, (pki.client.cert, pki.client.key)
        ) as channel:
            reply = await push(channel)

        assert relay_pb2.PushResponse.ACCEPTED == reply.status

    async def test_mtls_refuses_a_client_without_certificate(
        self, start_server: StartServer, pki: Pki, handler: ScriptedHandler
    ) -> None:
        """With tls_client_ca, a client without a certificate never reaches the handler."""
        server = await start_server(tls_settings(pki, client_ca=True))

        async with tls_channel(server.address, pki.ca) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await push(channel)

        assert grpc.StatusCode.UNAVAILABLE == caught.value.code()
        assert [] == handler.pushed

    async def test_plain_tcp_is_refused(self, start_server: StartServer) -> None:
        """host:port without a certificate does not start: the error names the missing files."""
        with pytest.raises(ConfigError, match="plain TCP is refused") as caught:
            await start_server(ServerSettings(listen="127.0.0.1:0"))

        assert ["tls_cert", "tls_key"] == [problem.property for problem in caught.value.problems]

    async def test_key_of_another_certificate_is_refused_at_start(
        self, start_server: StartServer, pki: Pki
    ) -> None:
        """A key that does not belong to the certificate fails at start, not at the first call."""
        settings = replace(tls_settings(pki, client_ca=False), tls_key=pki.client.key)

        with pytest.raises(ConfigError) as caught:
            await start_server(settings)

        assert [("tls_key", str(pki.client.key), "the private key of tls_cert")] == [
            (p.property, p.value, p.expected) for p in caught.value.problems
        ]

    async def test_file_that_is_not_pem_is_named(self, start_server: StartServer, pki: Pki) -> None:
        """A client CA file that holds no certificate is named with what was expected."""
        settings = replace(tls_settings(pki, client_ca=True), tls_client_ca=pki.server.key)

        with pytest.raises(ConfigError) as caught:
            await start_server(settings)

        assert [("tls_client_ca", str(pki.server.key), "PEM certificates")] == [
            (p.property, p.value, p.expected) for p in caught.value.problems
        ]

    async def test_unreadable_certificate_is_named(
        self, start_server: StartServer, pki: Pki, socket_dir: Path
    ) -> None:
        """A certificate path that does not exist names the setting and the path."""
        settings = replace(tls_settings(pki, client_ca=False), tls_cert=socket_dir / "missing.crt")

        with pytest.raises(ConfigError) as caught:
            await start_server(settings)

        assert [("tls_cert", str(socket_dir / "missing.crt"))] == [
            (p.property, p.value) for p in caught.value.problems
        ]


class TestHealthAndShutdown:
    """grpc.health.v1 and the graceful stop sequence."""

    async def test_health_reports_serving(self, channel: grpc.aio.Channel) -> None:
        """The server and the Relay service report SERVING once started."""
        assert [health_pb2.HealthCheckResponse.SERVING] * 2 == [
            await health_status(channel),
            await health_status(channel, SERVICE_NAME),
        ]

    async def test_in_flight_push_finishes_during_graceful_stop(
        self, server: RelayServer, channel: grpc.aio.Channel, handler: ScriptedHandler
    ) -> None:
        """Stop waits for a push already running, not for health watchers (who see NOT_SERVING).

        The grace period is longer than the test timeout: an open Watch stream that held the
        shutdown until the grace ran out would fail this test.
        """
        handler.push_release = asyncio.Event()
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert health_pb2.HealthCheckResponse.SERVING == (await watch.read()).status
        in_flight = asyncio.create_task(push(channel))
        await handler.push_entered.wait()

        stopping = asyncio.create_task(server.stop(grace=600))
        assert health_pb2.HealthCheckResponse.NOT_SERVING == (await watch.read()).status
        assert not stopping.done()
        handler.push_release.set()

        reply = await in_flight
        await stopping
        assert relay_pb2.PushResponse.ACCEPTED == reply.status

    async def test_push_still_running_after_the_grace_is_cancelled(
        self, server: RelayServer, channel: grpc.aio.Channel, handler: ScriptedHandler
    ) -> None:
        """A push that outlives the grace period is cancelled; the client sees an error."""
        handler.push_release = asyncio.Event()  # never set
        in_flight = asyncio.create_task(push(channel))
        await handler.push_entered.wait()

        await server.stop(grace=0.2)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await in_flight
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


class TestWaitUntilServing:
    """The readiness probe the demo (and anything starting serve) uses: grpc.health.v1."""

    async def test_returns_once_the_relay_serves(
        self, server: RelayServer, settings: ServerSettings
    ) -> None:
        """A serving sidecar is found through its health service."""
        await asyncio.to_thread(wait_until_serving, settings.listen, 10.0)

    async def test_times_out_when_nothing_listens(self, socket_dir: Path) -> None:
        """No sidecar: TimeoutError after the deadline, naming the address."""
        address = f"unix://{socket_dir}/absent.sock"

        with pytest.raises(TimeoutError, match=r"absent\.sock did not serve within 0\.3s"):
            await asyncio.to_thread(wait_until_serving, address, 0.3)

    async def test_stops_waiting_when_the_process_is_gone(self, socket_dir: Path) -> None:
        """A sidecar process that exited is reported at once, not after the deadline."""
        address = f"unix://{socket_dir}/absent.sock"

        with pytest.raises(RuntimeError, match="exited while starting"):
            await asyncio.to_thread(wait_until_serving, address, 30.0, alive=lambda: False)
