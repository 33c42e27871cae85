"""The emulator's HTTPS server: one aiohttp app on one TLS port, and its lifecycle.

``Emulator`` runs inside any asyncio loop (the sidecar's embedded default, tests) and is what
``auditrelay emulator serve`` runs in its own process. It wires the parts, each its own module:

- ``ingestion``: ``POST /dataCollectionRules/{dcr}/streams/{stream}?api-version=2023-01-01``,
  with the bodies read by ``bodies`` against the rule's ``schema`` and limited by ``throttle``;
- ``entra``: ``POST /{tenant}/oauth2/v2.0/token`` and the OpenID configuration (Microsoft Entra,
  for azure-identity with ``AZURE_AUTHORITY_HOST`` pointed here), tokens from ``tokens``;
- ``admin``: ``/admin/faults`` and ``POST /admin/tokens/revoke``, behind the admin key;
- ``store``: the SQLite database every request, row, error and token request lands in.

The work on a body (gunzip, strict JSON, row checks, the SQLite transaction) runs on one
store thread, in arrival order; the answer is sent only after the rows are committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import web

from auditrelay.emulator.admin import AdminApi
from auditrelay.emulator.entra import EntraEndpoint
from auditrelay.emulator.faults import Fault, FaultPlan
from auditrelay.emulator.ingestion import Ingestion
from auditrelay.emulator.settings import (
    ADMIN_HEADER,
    DEFAULT_DCR_ID,
    INFO_FILE,
    BodyMode,
    EmulatorSettings,
    SizeLimits,
)
from auditrelay.emulator.store import Store
from auditrelay.emulator.tls import TlsFiles, ensure_certificates, write_private
from auditrelay.emulator.tokens import TokenIssuer, load_signing_key

__all__ = [
    "ADMIN_HEADER",
    "DEFAULT_DCR_ID",
    "INFO_FILE",
    "BodyMode",
    "Emulator",
    "EmulatorSettings",
    "SizeLimits",
    "running_in_thread",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")


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
        self.store = Store.in_directory(settings.state_dir, settings.store_mode)
        self.faults = FaultPlan(list(settings.faults), seed=settings.fault_seed)
        self.ingestion = Ingestion(self, self.declarations)
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
        write_private(self.state_dir / "admin.key", self.admin_key.encode())
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="emulator-store"
        )
        self._changed = asyncio.Condition()
        await self.in_store_thread(self.store.open_for_writing)
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
            await self.in_store_thread(self.store.close)
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

    async def in_store_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Runs ``function`` on the one store thread, in arrival order."""
        if self._executor is None:
            raise RuntimeError("the emulator is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def notify(self) -> None:
        """Wakes the ``wait_*`` callers: something was stored or logged."""
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=max(self.settings.max_body_bytes, 1) * 4 + 65536)
        self.ingestion.add_routes(app)
        EntraEndpoint(self).add_routes(app)
        AdminApi(self).add_routes(app)
        return app


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
