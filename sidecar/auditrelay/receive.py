"""The receiving end: the auditrelay.v1.Relay gRPC service and grpc.health.v1, on grpc.aio.

It listens on a Unix socket (owner and group only, mode 0660) or on TCP with TLS (client
certificates required when a client CA is given); plain TCP is refused. This is the one place
where typed errors become replies and gRPC statuses:

- ``PipelineNotFoundError`` -> status NOT_FOUND (the plugin configures again and retries);
- ``ConfigError`` -> ``ConfigureResponse.errors``, one per property, never a secret's value;
- any other ``AuditRelayError`` in Configure -> status FAILED_PRECONDITION with the reason;
- ``SpoolError`` (``SpoolFullError`` included) -> ``RETRY_LATER``;
- a chunk over ``max_chunk_bytes`` -> ``REJECTED`` (retrying the same bytes cannot help);
- anything unexpected -> ``RETRY_LATER`` and a ``push_failed`` log line with the traceback:
  nothing was acknowledged, so Fluent Bit keeps the chunk.

The work itself is done by a ``RelayHandler`` (``app.App``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from auditrelay.config import PROPERTY_BY_NAME, ServerSettings
from auditrelay.errors import AuditRelayError, ConfigError, PropertyProblem, SpoolError
from auditrelay.model import PushResult, PushStatus
from auditrelay.v1 import relay_pb2, relay_pb2_grpc

log = structlog.get_logger("auditrelay.receive")

SERVICE_NAME: Final = "auditrelay.v1.Relay"
SOCKET_MODE: Final = 0o660
SOCKET_UMASK: Final = 0o117  # sockets are created 0777 & ~umask: 0660, never world-writable
SOCKET_DIR_MODE: Final = 0o750
# Room for the request's other fields and framing above the largest chunk we accept.
MESSAGE_OVERHEAD_BYTES: Final = 1 << 20

_STATUS: Final = {
    PushStatus.ACCEPTED: relay_pb2.PushResponse.ACCEPTED,
    PushStatus.RETRY_LATER: relay_pb2.PushResponse.RETRY_LATER,
    PushStatus.REJECTED: relay_pb2.PushResponse.REJECTED,
}


class PipelineNotFoundError(AuditRelayError):
    """A Push named a pipeline this process does not know (it restarted since Configure)."""


class RelayHandler(Protocol):
    """What the service needs from the application."""

    async def configure(
        self, properties: Mapping[str, str], instance_name: str, plugin_version: str
    ) -> str:
        """Returns the pipeline id for these properties; raises ConfigError."""

    async def push(self, pipeline_id: str, tag: str, chunk: bytes) -> PushResult:
        """Handles one chunk; raises PipelineNotFoundError or SpoolError."""


# --- the listen address ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: a Unix socket path, or a TCP host and port."""

    unix_path: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """``unix:///absolute/path.sock`` or ``host:port``; raises ConfigError otherwise."""
        if text.startswith("unix://"):
            path = text[len("unix://") :]
            if not path.startswith("/"):
                raise _listen_problem(text, "unix:///absolute/path.sock or host:port")
            return cls(unix_path=Path(path))
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise _listen_problem(text, "unix:///absolute/path.sock or host:port")
        return cls(host=host, port=int(port))

    def target(self, port: int | None = None) -> str:
        """The address as gRPC spells it."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{self.host}:{self.port if port is None else port}"


def _listen_problem(value: str, expected: str) -> ConfigError:
    return ConfigError([PropertyProblem("listen", value, expected)])


# --- the Unix socket ---------------------------------------------------------------------------


def _socket_answers(path: Path) -> bool:
    """True when a process accepts connections on the socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as error:
        if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


def prepare_socket_path(path: Path) -> None:
    """Makes path ready to bind: removes a stale socket, refuses a live one or a non-socket."""
    listen = f"unix://{path}"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        _ensure_socket_dir(path.parent, listen)
        return
    if not stat.S_ISSOCK(mode):
        raise _listen_problem(listen, "a socket path; a file that is not a socket is in the way")
    try:
        live = _socket_answers(path)
    except OSError as error:
        raise _listen_problem(listen, f"a socket path this process can use ({error})") from error
    if live:
        raise _listen_problem(
            listen, "a socket path no other process serves on; another sidecar answers there"
        )
    path.unlink()
    log.info("stale_socket_removed", path=str(path))


def _ensure_socket_dir(directory: Path, listen: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=SOCKET_DIR_MODE)
    except OSError as error:
        raise _listen_problem(listen, f"a path in a writable directory ({error})") from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _listen_problem(listen, f"a path in a directory this process can write: {directory}")


# --- TLS ---------------------------------------------------------------------------------------


def _read_file(field: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        problem = PropertyProblem(field, str(path), f"a readable PEM file ({error.strerror})")
        raise ConfigError([problem]) from error


def _check_key_pair(settings: ServerSettings, cert: bytes, key: bytes) -> list[PropertyProblem]:
    """Problems with the server certificate and key, found now rather than at the first handshake."""
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError:
        return [PropertyProblem("tls_cert", str(settings.tls_cert), "a PEM certificate")]
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        return [PropertyProblem("tls_key", str(settings.tls_key), "an unencrypted PEM private key")]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if leaf.public_key().public_bytes(encoding, public) != private_key.public_key().public_bytes(
        encoding, public
    ):
        return [PropertyProblem("tls_key", str(settings.tls_key), "the private key of tls_cert")]
    return []


def _log_certificate(leaf: x509.Certificate, clients_need_certificates: bool) -> None:
    """What a plugin will be shown, so that a refused handshake can be understood from this
    side too: the names the certificate is valid for, until when, and whether the plugin must
    present a certificate. An expired (or not yet valid) certificate is an error: every plugin
    refuses it. Refused handshakes themselves are logged by gRPC's core on stderr
    ("Handshake failed ...")."""
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        valid_for = [str(name.value) for name in names]
    except x509.ExtensionNotFound:
        valid_for = []
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    log.info(
        "tls_configured",
        valid_for=valid_for,
        not_after=end.isoformat(),
        client_certificate_required=clients_need_certificates,
    )
    now = time.time()
    if not start.timestamp() <= now <= end.timestamp():
        log.error(
            "tls_certificate_not_valid",
            not_before=start.isoformat(),
            not_after=end.isoformat(),
            note="every plugin refuses this certificate (expired or not yet valid): renew tls_cert",
        )


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials:
    """TLS credentials for a TCP listener; requires and checks client certificates given a CA."""
    missing = [
        PropertyProblem(name, "", "a PEM file: listen is host:port and plain TCP is refused")
        for name, path in (("tls_cert", settings.tls_cert), ("tls_key", settings.tls_key))
        if path is None
    ]
    if missing or settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError(missing)
    cert = _read_file("tls_cert", settings.tls_cert)
    key = _read_file("tls_key", settings.tls_key)
    problems = _check_key_pair(settings, cert, key)
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read_file("tls_client_ca", settings.tls_client_ca)
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError:
            problems.append(
                PropertyProblem("tls_client_ca", str(settings.tls_client_ca), "PEM certificates")
            )
    if problems:
        raise ConfigError(problems)
    _log_certificate(x509.load_pem_x509_certificates(cert)[0], client_ca is not None)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


# --- the service -------------------------------------------------------------------------------


def _shown_value(problem: PropertyProblem) -> str:
    """The value to echo back: never a secret's, never an unknown key's (it may be a typo'd secret)."""
    prop = PROPERTY_BY_NAME.get(problem.property)
    if prop is None or prop.secret:
        return ""
    return problem.value


class RelayService(relay_pb2_grpc.RelayServicer):
    """auditrelay.v1.Relay: translates between protobuf messages and the handler."""

    def __init__(self, handler: RelayHandler, max_chunk_bytes: int) -> None:
        self._handler = handler
        self._max_chunk_bytes = max_chunk_bytes
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no Configure or Push is running or still sending its reply."""
        await self._idle.wait()

    def _track(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Counted until the call is done (reply sent), not just until the handler returns:
        # cancelling the remaining calls at shutdown must not cut a reply already decided.
        self.in_flight += 1
        self._idle.clear()
        context.add_done_callback(self._call_done)  # type: ignore[arg-type]

    def _call_done(self, _context: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def Configure(  # noqa: N802 - the gRPC method name
        self,
        request: relay_pb2.ConfigureRequest,
        context: grpc.aio.ServicerContext[relay_pb2.ConfigureRequest, relay_pb2.ConfigureResponse],
    ) -> relay_pb2.ConfigureResponse:
        """Validates the properties and returns the pipeline id, or every problem found."""
        self._track(context)
        return await self._configure(request, context)

    async def _configure(
        self,
        request: relay_pb2.ConfigureRequest,
        context: grpc.aio.ServicerContext[relay_pb2.ConfigureRequest, relay_pb2.ConfigureResponse],
    ) -> relay_pb2.ConfigureResponse:
        try:
            pipeline_id = await self._handler.configure(
                dict(request.properties), request.instance_name, request.plugin_version
            )
        except ConfigError as error:
            return self._rejected(request, error)
        except AuditRelayError as error:  # the sidecar itself cannot serve (e.g. its state dir)
            # The plugin asks again at once: one line with the reason, no traceback to render
            # each time, and none kept (it holds the half-built pipeline; see _push).
            log.error(  # noqa: TRY400 - the reason is the message; no traceback per retry
                "configure_failed", instance_name=request.instance_name, error=str(error)
            )
            message, error.__traceback__ = str(error), None
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        except Exception as error:  # a bug: the status gRPC gives it anyway, and the traceback
            log.exception("configure_failed", instance_name=request.instance_name)
            error.__traceback__ = None
            await context.abort(grpc.StatusCode.UNKNOWN, "internal error; see sidecar log")
        return relay_pb2.ConfigureResponse(pipeline_id=pipeline_id)

    def _rejected(
        self, request: relay_pb2.ConfigureRequest, error: ConfigError
    ) -> relay_pb2.ConfigureResponse:
        """The reply naming every problem; secrets and unknown keys without their value."""
        errors = [
            relay_pb2.PropertyError(
                property=problem.property,
                value=_shown_value(problem),
                expected=problem.expected,
            )
            for problem in error.problems
        ]
        log.warning(
            "configure_rejected",
            instance_name=request.instance_name,
            problems=[f"{item.property}: expected {item.expected}" for item in errors],
        )
        return relay_pb2.ConfigureResponse(errors=errors)

    async def Push(  # noqa: N802 - the gRPC method name
        self,
        request: relay_pb2.PushRequest,
        context: grpc.aio.ServicerContext[relay_pb2.PushRequest, relay_pb2.PushResponse],
    ) -> relay_pb2.PushResponse:
        """Hands the chunk to its pipeline and answers ACCEPTED, RETRY_LATER or REJECTED."""
        self._track(context)
        return await self._push(request, context)

    async def _push(
        self,
        request: relay_pb2.PushRequest,
        context: grpc.aio.ServicerContext[relay_pb2.PushRequest, relay_pb2.PushResponse],
    ) -> relay_pb2.PushResponse:
        if len(request.chunk) > self._max_chunk_bytes:
            return relay_pb2.PushResponse(
                status=relay_pb2.PushResponse.REJECTED,
                message=f"chunk of {len(request.chunk)} bytes is over max_chunk_bytes "
                f"{self._max_chunk_bytes}",
            )
        try:
            result = await self._handler.push(request.pipeline_id, request.tag, request.chunk)
        except PipelineNotFoundError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except SpoolError as error:
            # Its traceback holds the frames that decoded the chunk (the chunk, its rows), in a
            # cycle through the handler's outcome; dropped here, they are freed now instead of
            # at the next full garbage collection: under a full spool Fluent Bit retries chunk
            # after chunk, and the process grew by their size every time (1.5 MB a chunk).
            error.__traceback__ = None
            return relay_pb2.PushResponse(
                status=relay_pb2.PushResponse.RETRY_LATER, message=f"spool: {error}"
            )
        except Exception as error:  # a bug must not acknowledge the chunk, nor kill the server
            log.exception("push_failed", pipeline_id=request.pipeline_id, tag=request.tag)
            error.__traceback__ = None
            return relay_pb2.PushResponse(
                status=relay_pb2.PushResponse.RETRY_LATER, message="internal error; see sidecar log"
            )
        return relay_pb2.PushResponse(
            status=_STATUS[result.status],
            events_received=result.events_received,
            events_accepted=result.events_accepted,
            events_filtered=result.events_filtered,
            events_invalid=result.events_invalid,
            message=result.message,
        )


# --- the server --------------------------------------------------------------------------------


class RelayServer:
    """The gRPC server's lifecycle: bind safely, serve, shut down gracefully."""

    def __init__(self, settings: ServerSettings, handler: RelayHandler) -> None:
        self.settings = settings
        self.listen = ListenAddress.parse(settings.listen)
        self.health = HealthServicer()
        self._service = RelayService(handler, settings.max_chunk_bytes)
        self._server: grpc.aio.Server | None = None
        self._socket_inode: int | None = None
        self.address = ""

    async def start(self) -> str:
        """Binds and starts serving; returns the address actually listened on."""
        limit = self.settings.max_chunk_bytes + MESSAGE_OVERHEAD_BYTES
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 4 << 20),
                # Without this, a second sidecar could silently share the TCP port.
                ("grpc.so_reuseport", 0),
            ]
        )
        relay_pb2_grpc.add_RelayServicer_to_server(self._service, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.address = self._bind(server)
        await server.start()
        self._server = server
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    def _bind(self, server: grpc.aio.Server) -> str:
        path = self.listen.unix_path
        if path is None:
            port = server.add_secure_port(self.listen.target(), server_credentials(self.settings))
            return self.listen.target(port)
        prepare_socket_path(path)
        previous = os.umask(SOCKET_UMASK)
        try:
            server.add_insecure_port(self.listen.target())
        except RuntimeError as error:
            raise _listen_problem(
                f"unix://{path}", f"a socket path this process can bind ({error})"
            ) from error
        finally:
            os.umask(previous)
        os.chmod(path, SOCKET_MODE)
        self._socket_inode = path.lstat().st_ino
        return f"unix://{path}"

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets running pushes finish within grace seconds, cancels the rest.

        Health watchers see NOT_SERVING first. Long-lived calls that are not work (health
        Watch streams) do not hold the shutdown for the whole grace period.
        """
        server, self._server = self._server, None
        if server is None:
            return
        await self.health.enter_graceful_shutdown()
        if grace > 0:
            refusing = asyncio.create_task(server.stop(grace))  # no new calls from here on
            try:
                await asyncio.wait_for(self._service.wait_idle(), grace)
            except TimeoutError:
                log.warning("shutdown_grace_expired", calls_cancelled=self._service.in_flight)
            if not refusing.done():
                await server.stop(None)  # cancels whatever still runs (health watches)
            await refusing
        else:
            await server.stop(None)
        self._remove_socket()

    def _remove_socket(self) -> None:
        path = self.listen.unix_path
        if path is None or self._socket_inode is None:
            return
        try:
            if path.lstat().st_ino == self._socket_inode:  # still ours, not a successor's
                path.unlink()
        except FileNotFoundError:
            pass


def wait_until_serving(
    address: str, timeout: float, *, alive: Callable[[], bool] = lambda: True
) -> None:
    """Blocks until the sidecar on the Unix socket ``address`` (``unix:///path``) reports the
    Relay service SERVING through grpc.health.v1; raises TimeoutError after ``timeout`` seconds,
    or RuntimeError as soon as ``alive()`` says the sidecar's process is gone."""
    if not address.startswith("unix://"):
        raise ValueError(f"{address!r}: expected unix:///path.sock")
    with grpc.insecure_channel("unix:" + address.removeprefix("unix://")) as channel:
        wait_for_health(channel, timeout, alive=alive, where=address)


def wait_for_health(
    channel: grpc.Channel, timeout: float, *, alive: Callable[[], bool], where: str
) -> None:
    """``wait_until_serving`` on a channel of the caller's (any address, TLS or not)."""
    deadline = time.monotonic() + timeout
    health = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the sidecar at {where} exited while starting")
        try:
            reply = health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=0.5,
                wait_for_ready=True,
            )
        except grpc.RpcError:
            continue
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return
    raise TimeoutError(f"the sidecar at {where} did not serve within {timeout:g}s")
