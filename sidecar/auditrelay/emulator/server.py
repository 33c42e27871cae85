"""The emulator's HTTPS server: Logs Ingestion, the Entra token endpoint, and an admin API.

``Emulator`` runs inside any asyncio loop (the sidecar's embedded default, tests) and is what
``auditrelay emulator serve`` runs in its own process. One aiohttp server on one TLS port
answers:

- ``POST /dataCollectionRules/{dcr}/streams/{stream}?api-version=2023-01-01`` (ingestion);
- ``POST /{tenant}/oauth2/v2.0/token`` and ``GET /{tenant}/v2.0/.well-known/openid-configuration``
  (Microsoft Entra, for azure-identity with ``AZURE_AUTHORITY_HOST`` pointed here);
- ``/admin/faults`` (GET, POST, DELETE) and ``POST /admin/tokens/revoke``, which require the
  ``x-auditrelay-admin-key`` header (the key is in ``admin.key`` of the state directory), so
  nothing meant for ingestion can reach them.

The work on a body (gunzip, strict JSON, row checks, the SQLite transaction) runs on one
store thread, in arrival order; the answer is sent only after the rows are committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import math
import os
import re
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import isal.isal_zlib
import orjson
import structlog
from aiohttp import web

from auditrelay.emulator.faults import STATUS_CODES, Fault, FaultError, FaultKind, FaultPlan
from auditrelay.emulator.schema import RowChecker, StreamDeclaration, shipped_declarations
from auditrelay.emulator.store import (
    ErrorEntry,
    PreparedRow,
    RequestRecord,
    Store,
    StoreMode,
    TokenRecord,
)
from auditrelay.emulator.tls import TlsFiles, ensure_certificates
from auditrelay.emulator.tokens import (
    GrantRefusedError,
    TokenIssuer,
    TokenRejectedError,
    load_signing_key,
)
from auditrelay.emulator.tokens import openid_configuration as openid_document

log = structlog.get_logger(__name__)

API_VERSIONS = frozenset({"2023-01-01", "2021-11-01-preview"})
DEFAULT_DCR_ID = "dcr-00000000000000000000000000000000"
DEFAULT_AUDIENCE = "https://monitor.azure.com"
MAX_BODY_BYTES = 1_048_576
MAX_RAW_BYTES = 64 * 1_048_576
REQUESTS_PER_MINUTE = 12_000
BYTES_PER_MINUTE = 2 * 1024**3
MAX_ERRORS_PER_REQUEST = 100
ADMIN_HEADER = "x-auditrelay-admin-key"
INFO_FILE = "emulator.json"

T = TypeVar("T")
# isal's stub declares its error as an instance; it is the exception class the inflater raises.
_GZIP_ERROR = cast("type[Exception]", isal.isal_zlib.IsalError)


class SizeLimits(enum.Enum):
    """Which bytes the 1 MiB limit of a call counts. Azure documents it for "both compressed
    and uncompressed data"; the 413 observed counts the bytes on the wire."""

    WIRE = "wire"  # the bytes sent; the decompressed body only has a bomb guard
    UNCOMPRESSED = "uncompressed"  # the bytes sent and the decompressed body, 1 MiB each

    @property
    def max_raw_bytes(self) -> int:
        """The largest decompressed body this reading allows."""
        return MAX_RAW_BYTES if self is SizeLimits.WIRE else MAX_BODY_BYTES


class BodyMode(enum.Enum):
    """What happens to a body whose top level is not a JSON array."""

    REALISTIC = "realistic"  # 204, nothing stored, an error-log entry (what the service does)
    STRICT = "strict"  # 400


@dataclass(frozen=True, slots=True)
class EmulatorSettings:
    """How one emulator behaves. Sizes in bytes, times in seconds.

    ``streams`` maps each stream of the rule to its declared columns (``{column: type}`` in
    the DCR's type names) or to a ``StreamDeclaration``; by default, the stream auditrelay
    ships (``shipped_declarations()``). ``client_secrets`` (client id -> secret) makes the
    token endpoint check secrets; ``allowed_clients`` makes ingestion answer 403 to other
    clients, as a rule without their role assignment does.
    """

    state_dir: Path
    streams: Mapping[str, Mapping[str, str] | StreamDeclaration] = field(
        default_factory=shipped_declarations
    )
    dcr_id: str = DEFAULT_DCR_ID
    host: str = "127.0.0.1"
    port: int = 0
    audience: str = DEFAULT_AUDIENCE
    token_lifetime: float = 3600.0
    client_secrets: Mapping[str, str] | None = None
    allowed_clients: frozenset[str] | None = None  # None: every client may ingest
    max_body_bytes: int = MAX_BODY_BYTES
    max_raw_bytes: int = MAX_RAW_BYTES
    requests_per_minute: int = REQUESTS_PER_MINUTE
    bytes_per_minute: int = BYTES_PER_MINUTE
    throttle_retry_after: bool = True
    body_mode: BodyMode = BodyMode.REALISTIC
    store_mode: StoreMode = StoreMode.FULL
    fill_time_generated: bool = False
    faults: tuple[Fault, ...] = ()
    fault_seed: int | None = None

    def declarations(self) -> dict[str, StreamDeclaration]:
        """The stream declarations, whatever form they were given in."""
        return {
            name: value if isinstance(value, StreamDeclaration) else StreamDeclaration(name, value)
            for name, value in self.streams.items()
        }


class _Bucket:
    """A token bucket refilled continuously: ``per_minute`` units, at most ``per_minute`` held."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.stamp = time.monotonic()

    def shortfall(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0: available now)."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        amount = min(amount, self.capacity)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate


class _Throttle:
    """The per-rule limits: requests per minute and bytes per minute."""

    def __init__(self, requests_per_minute: int, bytes_per_minute: int) -> None:
        self._limits = (requests_per_minute, bytes_per_minute)
        self._buckets: dict[str, tuple[_Bucket, _Bucket]] = {}

    def admit(self, dcr: str, wire_bytes: int) -> float:
        """0 if the request may go on (and is counted), else the seconds to wait."""
        requests, volume = self._buckets.setdefault(
            dcr, (_Bucket(self._limits[0]), _Bucket(self._limits[1]))
        )
        now = time.monotonic()
        wait = max(requests.shortfall(1, now), volume.shortfall(wire_bytes, now))
        if wait == 0.0:
            requests.level -= 1
            volume.level -= min(wire_bytes, volume.capacity)
        return wait


@dataclass(slots=True)
class _Answer:
    """The outcome of the store thread's work on one body."""

    status: int
    code: str | None = None
    message: str = ""


class _RefusedError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


def error_body(code: str, message: str) -> bytes:
    """The service's ErrorResponse body."""
    return orjson.dumps({"error": {"code": code, "message": message}})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An ErrorResponse with the ``x-ms-error-code`` header, as the service sends it."""
    all_headers = {"x-ms-error-code": code, "x-ms-request-id": str(uuid.uuid4())}
    all_headers.update(headers or {})
    return web.Response(
        status=status,
        body=error_body(code, message),
        content_type="application/json",
        headers=all_headers,
    )


def access_denied_message(dcr: str) -> str:
    """The service's 403 message for an identity without Monitoring Metrics Publisher."""
    return (
        "The authentication token provided does not have access to ingest data for the data "
        f"collection rule with immutable Id '{dcr}' PipelineAccessResult: AccessGranted: False, "
        "IsRbacPresent: False."
    )


def too_large_message(limit: int, provided: int) -> str:
    """The service's 413 message."""
    megabytes = f"{limit // 1_048_576}" if limit % 1_048_576 == 0 else f"{limit / 1_048_576:.2f}"
    return (
        f"Maximum allowed content length: {limit} bytes ({megabytes} MB). "
        f"Provided content length: {provided} bytes."
    )


def _gunzip(body: bytes, limit: int) -> bytes:
    """The decompressed body (several gzip members allowed); raises _RefusedError."""
    parts: list[bytes] = []
    size = 0
    rest = body
    while rest:
        inflater = isal.isal_zlib.decompressobj(wbits=31)
        try:
            part = inflater.decompress(rest, limit - size + 1)
        except _GZIP_ERROR as error:
            raise _RefusedError(
                400, "InvalidContentEncoding", f"The gzip body is corrupt: {error}"
            ) from None
        size += len(part)
        if size > limit:
            raise _RefusedError(
                413,
                "ContentLengthLimitExceeded",
                f"Maximum allowed decompressed content length: {limit} bytes.",
            )
        if not inflater.eof:
            raise _RefusedError(400, "InvalidContentEncoding", "The gzip body is truncated.")
        parts.append(part)
        rest = inflater.unused_data
    return b"".join(parts)


def _audit_id_scanner(column: str) -> Callable[[bytes], list[bytes]]:
    """Finds every ``"<column>": "<value>"`` in a body without parsing it (StoreMode.IDS)."""
    pattern = re.compile(rb'"' + re.escape(column.encode()) + rb'"\s*:\s*"([^"\\]*)"')
    return pattern.findall


class Emulator:
    """A local Logs Ingestion endpoint with its own token authority; an async context manager.

    After ``start()``: ``endpoint`` (https://127.0.0.1:PORT), ``authority_host`` (the same
    URL, for ``AZURE_AUTHORITY_HOST``), ``ca_file``, ``dcr_id``, ``store`` (queries),
    ``admin_key``; ``add_fault``/``clear_faults``/``revoke_tokens`` change its behaviour live.
    """

    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.dcr_id = settings.dcr_id
        self.declarations = settings.declarations()
        self._checkers = {
            name: RowChecker(declaration, fill_time_generated=settings.fill_time_generated)
            for name, declaration in self.declarations.items()
        }
        self.store = Store.in_directory(settings.state_dir, settings.store_mode)
        self._id_scanners = {
            name: _audit_id_scanner(declaration.audit_id_column)
            for name, declaration in self.declarations.items()
            if settings.store_mode is StoreMode.IDS and declaration.audit_id_column
        }
        self.faults = FaultPlan(list(settings.faults), seed=settings.fault_seed)
        self._throttle = _Throttle(settings.requests_per_minute, settings.bytes_per_minute)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Condition | None = None
        self._tls: TlsFiles | None = None
        self._tokens: TokenIssuer | None = None
        self.port = 0
        self.admin_key = ""

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Creates the state directory, certificates and store, and starts listening."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._tls = ensure_certificates(self.state_dir / "tls")
        self._tokens = TokenIssuer(
            load_signing_key(self.state_dir / "token.key"),
            audience=self.settings.audience,
            lifetime=self.settings.token_lifetime,
            client_secrets=self.settings.client_secrets,
        )
        self.admin_key = secrets.token_urlsafe(24)
        _write_private(self.state_dir / "admin.key", self.admin_key.encode())
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="emulator-store"
        )
        self._changed = asyncio.Condition()
        await self._in_store_thread(self.store.open_for_writing)
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        listener = socket.create_server((self.settings.host, self.settings.port), family=family)
        try:
            self._runner = web.AppRunner(
                self._app(), access_log=None, shutdown_timeout=1.0, auto_decompress=False
            )
            await self._runner.setup()
            site = web.SockSite(self._runner, listener, ssl_context=self._tls.server_context())
            await site.start()
        except BaseException:
            listener.close()
            raise
        self.port = int(listener.getsockname()[1])
        self._write_info()
        log.info("emulator_started", endpoint=self.endpoint, dcr_id=self.dcr_id)

    async def stop(self) -> None:
        """Stops listening, lets answers in flight finish (1 s at most), closes the store."""
        was_serving = self._runner is not None and self.port != 0
        if self._runner is not None:
            server = self._runner.server
            handlers = server.connections if server is not None else []
            transports = [handler.transport for handler in handlers if handler.transport]
            await self._runner.cleanup()
            self._runner = None
            # A TLS close waits for the peer's close_notify; a stopped emulator does not wait.
            for transport in transports:
                transport.abort()
            await asyncio.sleep(0)
        if self._executor is not None:
            await self._in_store_thread(self.store.close)
            self._executor.shutdown(wait=True)
            self._executor = None
        if was_serving:
            (self.state_dir / INFO_FILE).unlink(missing_ok=True)
            log.info("emulator_stopped", endpoint=self.endpoint)

    # --- what clients need ----------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address clients use (a wildcard bind is reached on loopback)."""
        if self.settings.host in ("", "0.0.0.0", "::"):  # noqa: S104 -- comparing, not binding
            return "127.0.0.1"
        return self.settings.host

    @property
    def endpoint(self) -> str:
        """The Logs Ingestion endpoint URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def authority_host(self) -> str:
        """The Microsoft Entra authority URL (``AZURE_AUTHORITY_HOST``)."""
        return self.endpoint

    @property
    def ca_file(self) -> Path:
        """The PEM file of the CA that signed the emulator's certificate."""
        return self.tls.ca_file

    @property
    def tls(self) -> TlsFiles:
        """The certificate files (after start)."""
        if self._tls is None:
            raise RuntimeError("the emulator is not started")
        return self._tls

    @property
    def tokens(self) -> TokenIssuer:
        """The token authority (after start)."""
        if self._tokens is None:
            raise RuntimeError("the emulator is not started")
        return self._tokens

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client TLS context trusting the emulator's CA."""
        return self.tls.client_context()

    def ingestion_url(self, stream: str, dcr_id: str | None = None) -> str:
        """The full URL of one stream's upload."""
        return (
            f"{self.endpoint}/dataCollectionRules/{dcr_id or self.dcr_id}/streams/{stream}"
            "?api-version=2023-01-01"
        )

    def issue_token(
        self,
        *,
        audience: str | None = None,
        lifetime: float | None = None,
        tenant: str = "emulator",
        client_id: str = "emulator-client",
    ) -> str:
        """A token as the token endpoint would issue it; for tests of expiry and audience."""
        token, _ = self.tokens.issue(
            tenant=tenant,
            client_id=client_id,
            audience=audience or self.settings.audience,
            issuer=f"{self.authority_host}/{tenant}/v2.0",
            lifetime=lifetime,
        )
        return token

    def add_fault(self, fault: Fault) -> None:
        """Adds a fault behind those already active."""
        self.faults.add(fault)

    def clear_faults(self) -> None:
        """Removes every fault."""
        self.faults.clear()

    def revoke_tokens(self) -> None:
        """Refuses every token issued so far (as expired); new ones are accepted.

        azure-identity keeps using its cached token until that token's own expiry, so after
        this a real credential sees 401 until then: a credential gone bad. For a token that
        simply expires mid-stream, use a short ``token_lifetime`` instead.
        """
        self.tokens.revoke_all()

    def jump_token_clock(self, seconds: float) -> None:
        """Sets the token authority's clock ``seconds`` ahead of the real one (behind when
        negative; 0 puts it right): the tokens it issues meanwhile are refused as not yet valid
        or expired, until a client fetches one after the clock is right again."""
        self.tokens.clock_offset = seconds

    async def wait_until(self, predicate: Callable[[], bool], within: float) -> None:
        """Returns once ``predicate()`` holds, checked after every request.

        Raises TimeoutError if it does not hold within ``within`` seconds.
        """
        if self._changed is None:
            raise RuntimeError("the emulator is not started")
        changed = self._changed
        async with changed:
            await asyncio.wait_for(changed.wait_for(predicate), within)

    async def wait_for_rows(self, count: int, within: float = 10.0) -> None:
        """Returns once at least ``count`` rows are stored."""
        await self.wait_until(lambda: self.store.count() >= count, within)

    async def wait_for_requests(self, count: int, within: float = 10.0) -> None:
        """Returns once at least ``count`` ingestion attempts are logged."""
        await self.wait_until(lambda: len(self.store.requests()) >= count, within)

    # --- internals ------------------------------------------------------------------------

    def _write_info(self) -> None:
        info = {
            "endpoint": self.endpoint,
            "authority_host": self.authority_host,
            "ca_file": str(self.ca_file),
            "dcr_id": self.dcr_id,
            "streams": sorted(self.declarations),
            "audience": self.settings.audience,
            "database": str(self.store.path),
            "admin_key_file": str(self.state_dir / "admin.key"),
            "pid": os.getpid(),
        }
        (self.state_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    async def _in_store_thread(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the emulator is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=max(self.settings.max_body_bytes, 1) * 4 + 65536)
        app.router.add_post("/dataCollectionRules/{dcr}/streams/{stream}", self._ingest)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid)
        app.router.add_get("/admin/faults", self._list_faults)
        app.router.add_post("/admin/faults", self._add_fault)
        app.router.add_delete("/admin/faults", self._clear_faults)
        app.router.add_post("/admin/tokens/revoke", self._revoke)
        return app

    # --- Microsoft Entra --------------------------------------------------------------------

    async def _openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        return web.json_response(openid_document(self.authority_host, tenant))

    async def _token(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        form = {key: str(value) for key, value in (await request.post()).items()}
        endpoint = f"{self.authority_host}/{tenant}/oauth2/v2.0/token"
        client_id, scope = form.get("client_id", ""), form.get("scope", "")
        try:
            grant = self.tokens.check_grant(tenant, form, endpoint)
        except GrantRefusedError as refused:
            await self._in_store_thread(
                self.store.record_token,
                TokenRecord(
                    time.time(), tenant, client_id, scope, "", refused.status, refused.error
                ),
            )
            return web.json_response(refused.body(), status=refused.status)
        token, seconds = self.tokens.issue(
            tenant=tenant,
            client_id=grant.client_id,
            audience=grant.scope.removesuffix("/.default"),
            issuer=f"{self.authority_host}/{tenant}/v2.0",
        )
        await self._in_store_thread(
            self.store.record_token,
            TokenRecord(time.time(), tenant, grant.client_id, grant.scope, grant.method, 200, None),
        )
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": seconds,
                "ext_expires_in": seconds,
                "access_token": token,
            }
        )

    # --- admin ------------------------------------------------------------------------------

    def _admin_allowed(self, request: web.Request) -> bool:
        given = request.headers.get(ADMIN_HEADER, "")
        return bool(given) and secrets.compare_digest(given, self.admin_key)

    def _admin_refused(self) -> web.Response:
        return error_response(403, "AdminKeyRequired", f"Send the {ADMIN_HEADER} header.")

    async def _list_faults(self, request: web.Request) -> web.Response:
        if not self._admin_allowed(request):
            return self._admin_refused()
        return web.json_response({"faults": [fault.to_json() for fault in self.faults.active()]})

    async def _add_fault(self, request: web.Request) -> web.Response:
        if not self._admin_allowed(request):
            return self._admin_refused()
        try:
            document = await request.json(loads=orjson.loads)
            items = document if isinstance(document, list) else [document]
            faults = [Fault.from_json(item) for item in items]
        except (orjson.JSONDecodeError, FaultError) as error:
            return error_response(400, "InvalidFault", str(error))
        for fault in faults:
            self.faults.add(fault)
        return web.json_response({"faults": [fault.to_json() for fault in self.faults.active()]})

    async def _clear_faults(self, request: web.Request) -> web.Response:
        if not self._admin_allowed(request):
            return self._admin_refused()
        self.faults.clear()
        return web.json_response({"faults": []})

    async def _revoke(self, request: web.Request) -> web.Response:
        if not self._admin_allowed(request):
            return self._admin_refused()
        self.revoke_tokens()
        return web.json_response({"revoked": True})

    # --- ingestion --------------------------------------------------------------------------

    async def _ingest(self, request: web.Request) -> web.StreamResponse:
        attempt = _Attempt(
            received=time.time(),
            dcr=request.match_info["dcr"],
            stream=request.match_info["stream"],
            client_request_id=request.headers.get("x-ms-client-request-id"),
            wire_bytes=request.content_length or 0,
            content_encoding=request.headers.get("Content-Encoding"),
        )
        fault = self.faults.pick()
        attempt.fault = fault.name if fault is not None else None
        try:
            if fault is not None and fault.kind is FaultKind.DROP_BEFORE_BODY:
                return await self._drop(request, attempt)
            if fault is not None and fault.kind is FaultKind.SLOW:
                await asyncio.sleep(fault.delay)
            if fault is not None and fault.kind is FaultKind.STATUS:
                await self._read_body(request, attempt)
                return await self._fault_status(fault, attempt)
            self._check_request(request, attempt)
            wait = self._throttle.admit(attempt.dcr, attempt.wire_bytes)
            if wait > 0.0:
                return await self._throttled(attempt, wait)
            body = await self._read_body(request, attempt)
            if fault is not None and fault.kind is FaultKind.DROP_AFTER_BODY:
                return await self._drop(request, attempt)
            answer = await self._in_store_thread(self._process, attempt, body)
        except _RefusedError as refusal:
            attempt.status, attempt.error_code = refusal.status, refusal.code
            await self._log_attempt(attempt)
            if refusal.status == 413:
                refusal.headers["Connection"] = "close"
            return error_response(refusal.status, refusal.code, refusal.message, refusal.headers)
        await self._notify()
        if fault is not None and fault.kind is FaultKind.TIMEOUT_AFTER_STORE:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.kind is FaultKind.DROP_AFTER_STORE:
            return self._abort(request)
        if answer.status != 204:
            return error_response(answer.status, answer.code or "BadRequest", answer.message)
        return web.Response(status=204, headers={"x-ms-request-id": str(uuid.uuid4())})

    def _check_request(self, request: web.Request, attempt: _Attempt) -> None:
        version = request.query.get("api-version")
        if version is None:
            raise _RefusedError(
                400, "MissingApiVersionParameter", "The api-version query parameter is required."
            )
        if version not in API_VERSIONS:
            raise _RefusedError(
                400,
                "InvalidApiVersionParameter",
                f"The api-version '{version}' is invalid. The supported versions are "
                f"'{', '.join(sorted(API_VERSIONS))}'.",
            )
        try:
            claims = self.tokens.verify(request.headers.get("Authorization"))
        except TokenRejectedError as rejected:
            challenge = (
                f'Bearer authorization_uri="{self.authority_host}/common", '
                f'error="invalid_token", error_description="{rejected.message}"'
            )
            raise _RefusedError(
                401, rejected.code, rejected.message, {"WWW-Authenticate": challenge}
            ) from None
        allowed = self.settings.allowed_clients
        if allowed is not None and claims.get("appid") not in allowed:
            raise _RefusedError(403, "OperationFailed", access_denied_message(attempt.dcr))
        if attempt.dcr != self.dcr_id:
            raise _RefusedError(
                404,
                "InvalidDataCollectionRule",
                f"Data collection rule with immutable Id '{attempt.dcr}' not found.",
            )
        if attempt.stream not in self._checkers:
            raise _RefusedError(
                404,
                "InvalidStream",
                f"Stream '{attempt.stream}' is not declared in data collection rule "
                f"'{attempt.dcr}'.",
            )
        if request.content_type != "application/json":
            raise _RefusedError(
                415,
                "UnsupportedMediaType",
                f"Content-Type must be application/json, got '{request.content_type}'.",
            )
        encoding = (attempt.content_encoding or "").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            raise _RefusedError(
                415,
                "UnsupportedContentEncoding",
                f"Content-Encoding must be gzip or absent, got '{attempt.content_encoding}'.",
            )
        if (
            request.content_length is not None
            and request.content_length > self.settings.max_body_bytes
        ):
            raise _RefusedError(
                413,
                "ContentLengthLimitExceeded",
                too_large_message(self.settings.max_body_bytes, request.content_length),
            )

    async def _read_body(self, request: web.Request, attempt: _Attempt) -> bytes:
        limit = self.settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        attempt.wire_bytes = size
        if size > limit:
            raise _RefusedError(413, "ContentLengthLimitExceeded", too_large_message(limit, size))
        return b"".join(chunks)

    async def _throttled(self, attempt: _Attempt, wait: float) -> web.Response:
        attempt.status, attempt.error_code = 429, "TooManyRequests"
        await self._log_attempt(attempt)
        headers = (
            {"Retry-After": str(max(1, math.ceil(wait)))}
            if self.settings.throttle_retry_after
            else {}
        )
        return error_response(
            429,
            "TooManyRequests",
            f"Data collection rule '{attempt.dcr}' is over its limit of "
            f"{self.settings.requests_per_minute} requests or {self.settings.bytes_per_minute} "
            "bytes per minute.",
            headers,
        )

    async def _fault_status(self, fault: Fault, attempt: _Attempt) -> web.Response:
        assert fault.status is not None
        code = STATUS_CODES.get(fault.status, "InjectedFault")
        attempt.status, attempt.error_code = fault.status, code
        await self._log_attempt(attempt)
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        message = f"Injected fault: {fault.name}."
        if fault.status == 403:
            message = access_denied_message(attempt.dcr)
        return error_response(fault.status, code, message, headers)

    async def _drop(self, request: web.Request, attempt: _Attempt) -> web.StreamResponse:
        attempt.status = 0
        await self._log_attempt(attempt)
        return self._abort(request)

    def _abort(self, request: web.Request) -> web.StreamResponse:
        """Closes the connection without an answer; the response returned is never sent."""
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)

    async def _log_attempt(self, attempt: _Attempt) -> None:
        await self._in_store_thread(self.store.record, attempt.record())
        await self._notify()

    # --- the store thread -------------------------------------------------------------------

    def _process(self, attempt: _Attempt, body: bytes) -> _Answer:
        """Decodes, checks and stores one body; runs on the store thread."""
        try:
            answer, rows, errors = self._decode_and_check(attempt, body)
        except _RefusedError as refusal:
            answer, rows, errors = _Answer(refusal.status, refusal.code, refusal.message), [], []
        attempt.status, attempt.error_code = answer.status, answer.code
        if attempt.fault == FaultKind.DROP_AFTER_STORE.value:
            attempt.status = 0  # the rows are kept, but the client never gets an answer
        attempt.rows_stored = len(rows)
        self.store.record(attempt.record(), rows, errors)
        return answer

    def _decode_and_check(
        self, attempt: _Attempt, body: bytes
    ) -> tuple[_Answer, list[PreparedRow], list[ErrorEntry]]:
        raw = body
        if (attempt.content_encoding or "").strip().lower() == "gzip":
            raw = _gunzip(body, self.settings.max_raw_bytes)
        elif len(raw) > self.settings.max_raw_bytes:
            raise _RefusedError(
                413,
                "ContentLengthLimitExceeded",
                too_large_message(self.settings.max_raw_bytes, len(raw)),
            )
        attempt.raw_bytes = len(raw)
        checker = self._checkers[attempt.stream]
        scanner = self._id_scanners.get(attempt.stream)
        if scanner is not None:
            if raw.lstrip()[:1] != b"[":
                return self._not_an_array(attempt)
            return _Answer(204), [(found.decode(), None, None) for found in scanner(raw)], []
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise _RefusedError(
                400, "InvalidJson", f"The body is not valid JSON: {error}"
            ) from None
        if not isinstance(document, list):
            return self._not_an_array(attempt)
        checked = checker.check(document, datetime.fromtimestamp(attempt.received, UTC))
        attempt.rows_dropped = len(document) - len(checked.rows)
        errors = [
            attempt.error(problem.kind, problem.message, problem.index)
            for problem in checked.problems[:MAX_ERRORS_PER_REQUEST]
        ]
        if len(checked.problems) > MAX_ERRORS_PER_REQUEST:
            errors.append(
                attempt.error(
                    "MoreProblems",
                    f"{len(checked.problems) - MAX_ERRORS_PER_REQUEST} more problems in this "
                    "request",
                )
            )
        return _Answer(204), self._prepare(checker, checked.rows), errors

    def _not_an_array(
        self, attempt: _Attempt
    ) -> tuple[_Answer, list[PreparedRow], list[ErrorEntry]]:
        if self.settings.body_mode is BodyMode.STRICT:
            raise _RefusedError(400, "InvalidPayload", "The body must be a JSON array of objects.")
        entry = attempt.error("BodyNotArray", "The body is not a JSON array; nothing was stored.")
        attempt.rows_dropped = 1
        return _Answer(204), [], [entry]

    def _prepare(self, checker: RowChecker, rows: list[dict[str, Any]]) -> list[PreparedRow]:
        audit_column = checker.declaration.audit_id_column
        full = self.store.mode is StoreMode.FULL
        prepared: list[PreparedRow] = []
        for row in rows:
            audit_id = row.get(audit_column) if audit_column else None
            prepared.append(
                (
                    None if audit_id is None else str(audit_id),
                    row.get("TimeGenerated") if full else None,
                    orjson.dumps(row) if full else None,
                )
            )
        return prepared


@dataclass(slots=True)
class _Attempt:
    received: float
    dcr: str
    stream: str
    client_request_id: str | None
    wire_bytes: int
    content_encoding: str | None
    raw_bytes: int = 0
    status: int = 0
    error_code: str | None = None
    rows_stored: int = 0
    rows_dropped: int = 0
    fault: str | None = None

    def record(self) -> RequestRecord:
        return RequestRecord(
            received=self.received,
            dcr=self.dcr,
            stream=self.stream,
            client_request_id=self.client_request_id,
            status=self.status,
            error_code=self.error_code,
            wire_bytes=self.wire_bytes,
            raw_bytes=self.raw_bytes,
            content_encoding=self.content_encoding,
            rows_stored=self.rows_stored,
            rows_dropped=self.rows_dropped,
            fault=self.fault,
        )

    def error(self, kind: str, message: str, row_index: int | None = None) -> ErrorEntry:
        return ErrorEntry(
            time=self.received,
            dcr=self.dcr,
            stream=self.stream,
            client_request_id=self.client_request_id,
            kind=kind,
            message=message,
            row_index=row_index,
        )


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


@contextmanager
def running_in_thread(settings: EmulatorSettings, timeout: float = 30.0) -> Iterator[Emulator]:
    """Runs an emulator on its own event loop in a background thread (for sync callers).

    Properties, ``store`` queries, ``add_fault`` and ``clear_faults`` may be used from the
    caller's thread; the ``wait_*`` coroutines belong to the emulator's loop.
    """
    emulator = Emulator(settings)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(emulator.start())
        except BaseException as error:  # handed to the caller's thread below
            failure.append(error)
            loop.close()
            started.set()
            return
        started.set()
        try:
            loop.run_forever()
            loop.run_until_complete(emulator.stop())
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name="emulator", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise TimeoutError("the emulator did not start in time")
    if failure:
        raise failure[0]
    try:
        yield emulator
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
