"""Delivery of request bodies to the Logs Ingestion API, through azure-monitor-ingestion.

The sidecar owns retries. The SDK's retry policy retries a POST only for 500/503/504 or a status
with Retry-After, three times; a 429 without Retry-After, 408, 502, a refused connection or a read
timeout are not retried at all. Its retries would also stack under ours. So the client is built
with ``retry_total=0`` and ``Deliverer`` retries every transient failure itself, with exponential
backoff and full jitter, honouring Retry-After, for as long as it takes: the rows stay in the
spool meanwhile. 413 splits a body in two; 400 bisects it down to the rows the service refuses,
which alone are set aside with the service's message. 401/403 (and 404, a wrong rule or stream)
keep the data, make the pipeline not ready at once, and keep trying.

Azure documents the 1 MB limit of a call for "both compressed and uncompressed data"; the 413
observed counts the bytes on the wire. ``Deliverer`` finds out which reading the endpoint applies
with ``request_limits.RequestLimits``, at the cost of at most one refused request, and packs
bodies again under a lowered uncompressed bound before it sends them.

Bodies are the sidecar's own gzip bytes, handed to the SDK as a seekable ``io.BytesIO`` so that it
sends them unchanged with ``Content-Encoding: gzip`` (a plain ``bytes`` would be encoded as a JSON
array of integers). All requests and the credential's token requests share one aiohttp session
with one TLS context, so connections are reused. ``logging_enable`` is never set: its network
trace logs the bearer token.
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.monitor.ingestion.aio import LogsIngestionClient

from auditrelay.config import PipelineSettings
from auditrelay.credentials import CredentialFactory as CredentialFactory
from auditrelay.credentials import build_credential as build_credential
from auditrelay.credentials import credential_factory_for as credential_factory_for
from auditrelay.credentials import secret_credential_factory as secret_credential_factory
from auditrelay.credentials import tls_context as tls_context
from auditrelay.errors import ConfigError, PropertyProblem
from auditrelay.request_limits import RawLimitEvidence, RequestLimits

MAX_RETRY_AFTER: Final = 600.0  # a longer Retry-After is taken as this; the spool holds the rows
_KNOWN_STATUSES: Final = frozenset({204, 400, 401, 403, 404, 408, 413, 429, 500, 502, 503, 504})
_MESSAGE_LIMIT: Final = 1_000

# azure-core logs every request at INFO (headers redacted); one line per batch is ours to write.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)


class Outcome(enum.Enum):
    """What one request attempt means for its rows."""

    DELIVERED = "delivered"
    RETRY = "retry"  # transient: throttling, outage, timeout, network
    BLOCKED = "blocked"  # the endpoint refuses us (401/403/404...): retry, report not ready now
    TOO_LARGE = "too_large"  # 413: split the body
    REFUSED = "refused"  # 400: some rows are bad; bisect to find them


@dataclass(frozen=True, slots=True)
class Attempt:
    """The result of one request: outcome, a bounded status label, and what the service said."""

    outcome: Outcome
    status: str  # "204", "429", ..., "4xx", "5xx", "timeout", "network", "auth"
    message: str = ""
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """Where rows go: the endpoint, the rule, its stream, and what the endpoint's TLS needs."""

    endpoint: str
    rule_id: str
    stream: str
    audience: str
    ca_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: PipelineSettings) -> Destination:
        """The destination a pipeline's properties name; requires endpoint and dcr_id."""
        if settings.endpoint is None or settings.dcr_id is None:
            raise ConfigError(
                [PropertyProblem("endpoint", "", "a value (the bundled emulator is set up by app)")]
            )
        return cls(
            endpoint=settings.endpoint,
            rule_id=settings.dcr_id,
            stream=settings.stream,
            audience=settings.audience,
            ca_file=settings.endpoint_ca,
        )


def _status_label(status: int) -> str:
    if status in _KNOWN_STATUSES:
        return str(status)
    return f"{status // 100}xx"


def retry_after_seconds(headers: Any) -> float | None:
    """The wait a response asks for: retry-after-ms, x-ms-retry-after-ms, Retry-After (s or date)."""
    for name, scale in (("retry-after-ms", 0.001), ("x-ms-retry-after-ms", 0.001)):
        value = headers.get(name)
        if value:
            try:
                return min(MAX_RETRY_AFTER, max(0.0, float(value) * scale))
            except ValueError:
                pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def _service_message(error: HttpResponseError) -> str:
    detail = getattr(error, "error", None)
    code = getattr(detail, "code", None)
    text = getattr(detail, "message", None) or error.message or str(error)
    message = f"{code}: {text}" if code else str(text)
    return message[:_MESSAGE_LIMIT]


def classify(error: BaseException) -> Attempt:
    """What a failed upload means: retry, split, bisect, or report not ready."""
    if isinstance(error, HttpResponseError) and error.status_code is not None:
        status = error.status_code
        headers = getattr(error.response, "headers", None) or {}
        retry_after = retry_after_seconds(headers)
        message = f"HTTP {status} {_service_message(error)}"
        label = _status_label(status)
        if status == 413:
            return Attempt(Outcome.TOO_LARGE, label, message)
        if status == 400 and retry_after is None:
            return Attempt(Outcome.REFUSED, label, message)
        if status in (408, 429) or status >= 500:
            return Attempt(Outcome.RETRY, label, message, retry_after)
        return Attempt(Outcome.BLOCKED, label, message, retry_after)
    if isinstance(error, ClientAuthenticationError):  # the credential could not get a token
        return Attempt(Outcome.BLOCKED, "auth", f"authentication failed: {error}"[:_MESSAGE_LIMIT])
    if isinstance(error, TimeoutError | ServiceRequestTimeoutError | ServiceResponseTimeoutError):
        return Attempt(Outcome.RETRY, "timeout", "request timed out")
    if isinstance(
        error, ServiceRequestError | ServiceResponseError | aiohttp.ClientError | OSError
    ):
        return Attempt(
            Outcome.RETRY, "network", f"{type(error).__name__}: {error}"[:_MESSAGE_LIMIT]
        )
    raise error


class IngestionClient:
    """One pipeline's connection to its Logs Ingestion endpoint: session, credential, SDK client."""

    def __init__(
        self,
        destination: Destination,
        credential_factory: CredentialFactory,
        *,
        request_timeout: float = 30.0,
        on_connection: Callable[[], None] | None = None,
    ) -> None:
        self.destination = destination
        self.request_timeout = request_timeout
        self._on_connection = on_connection
        self._credential_factory = credential_factory
        self._session: aiohttp.ClientSession | None = None
        self._credential: AsyncTokenCredential | None = None
        self._client: LogsIngestionClient | None = None

    async def open(self) -> None:
        """Opens the HTTP session (needs the running loop)."""
        connector = aiohttp.TCPConnector(ssl=tls_context(self.destination.ca_file))
        tracing = aiohttp.TraceConfig()
        tracing.on_connection_create_end.append(self._connection_opened)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trace_configs=[tracing]
        )
        transport = AioHttpTransport(session=self._session, session_owner=False)
        try:
            self._credential = self._credential_factory(
                AioHttpTransport(session=self._session, session_owner=False)
            )
        except BaseException:
            await self._session.close()
            self._session = None
            raise
        self._client = LogsIngestionClient(
            self.destination.endpoint,
            self._credential,
            credential_scopes=[f"{self.destination.audience}/.default"],
            transport=transport,
            # The sidecar retries every transient failure itself (see the module docstring);
            # SDK retries would multiply ours and miss most transient statuses anyway.
            retry_total=0,
            logging_enable=False,
        )

    async def _connection_opened(self, *_trace: object) -> None:
        if self._on_connection is not None:
            self._on_connection()

    async def close(self) -> None:
        """Closes the client, the credential and the session."""
        if self._client is not None:
            await self._client.close()
        if self._credential is not None:
            await self._credential.close()
        if self._session is not None:
            await self._session.close()
        self._client = self._credential = self._session = None

    async def send(self, body: bytes) -> Attempt:
        """Posts one gzip body once; never raises for a failure the service or network causes."""
        if self._client is None:
            raise RuntimeError("IngestionClient.send before open")
        try:
            async with asyncio.timeout(self.request_timeout):
                await self._client.upload(
                    self.destination.rule_id,
                    self.destination.stream,
                    io.BytesIO(body),
                    connection_timeout=self.request_timeout,
                    read_timeout=self.request_timeout,
                )
        except (
            HttpResponseError,
            ClientAuthenticationError,
            ServiceRequestError,
            ServiceResponseError,
            aiohttp.ClientError,
            OSError,
        ) as error:
            return classify(error)
        except Exception as error:  # an SDK surprise must not lose the rows
            # Kept as transient: the rows stay in the spool and /readyz turns red if it persists.
            return Attempt(Outcome.RETRY, "error", f"{type(error).__name__}: {error}"[:1000])
        return Attempt(Outcome.DELIVERED, "204")


class Sender(Protocol):
    """Sends one body once (``IngestionClient`` is one)."""

    async def send(self, body: bytes) -> Attempt:
        """The outcome of one request; never raises for service or network failures."""
        ...


class Payload(Protocol):
    """A request body and the rows it carries (``batch.Body`` is one)."""

    @property
    def rows(self) -> Sequence[bytes]: ...

    @property
    def data(self) -> bytes: ...

    @property
    def raw_bytes(self) -> int: ...


Splitter = Callable[[Payload], Awaitable[Sequence[Payload]]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: a uniform wait up to base * 2**n, capped."""

    base: float = 0.5
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (1 or more)."""
        ceiling = min(self.cap, self.base * (2 ** min(failures - 1, 32)))
        return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not cryptography


@dataclass(slots=True)
class DeliveryHealth:
    """Since when delivery fails, and when it last succeeded; what /readyz reports."""

    failing_since: float | None = None  # monotonic
    blocked: bool = False  # the endpoint refuses our identity or address: not ready at once
    last_error: str = ""
    last_success: float | None = None  # wall clock

    def succeeded(self) -> None:
        """A request was delivered."""
        self.failing_since = None
        self.blocked = False
        self.last_error = ""
        self.last_success = time.time()

    def failed(self, attempt: Attempt) -> None:
        """A request failed in a way that is retried."""
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.blocked = attempt.outcome is Outcome.BLOCKED
        self.last_error = attempt.message

    def problem(self, not_ready_after: float) -> str | None:
        """Why the pipeline is not ready, or None when it is."""
        if self.failing_since is None:
            return None
        failing_for = time.monotonic() - self.failing_since
        if self.blocked or failing_for >= not_ready_after:
            return f"delivery failing for {failing_for:.0f}s: {self.last_error}"
        return None


@dataclass(slots=True)
class DeliveryReport:
    """What became of one body's rows: delivered, or refused by the service (with its message)."""

    delivered_rows: int = 0
    requests: int = 0
    retries: int = 0
    refused: list[tuple[bytes, str]] = field(default_factory=list)


class AttemptObserver(Protocol):
    """Receives every attempt (metrics, logs)."""

    def __call__(self, attempt: Attempt, body_bytes: int, seconds: float) -> None: ...


class Deliverer:
    """Delivers one body until every row is either delivered or refused by the service.

    ``split`` divides a body; it is called after ``limits`` was lowered, so that it can pack
    the rows under the new bound. ``on_raw_limit`` hears of the lowering, once.
    """

    def __init__(
        self,
        client: Sender,
        split: Splitter,
        *,
        limits: RequestLimits | None = None,
        on_raw_limit: Callable[[RawLimitEvidence], None] | None = None,
        health: DeliveryHealth | None = None,
        backoff: Backoff | None = None,
        observe: AttemptObserver | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.health = health or DeliveryHealth()
        self.limits = limits or RequestLimits(sys.maxsize)  # no bound but the service's
        self._split = split
        self._on_raw_limit = on_raw_limit
        self._backoff = backoff or Backoff()
        self._observe = observe
        self._sleep = sleep

    async def deliver(self, payload: Payload) -> DeliveryReport:
        """Returns once the service has taken or refused every row of ``payload``."""
        report = DeliveryReport()
        await self._deliver(payload, report)
        return report

    async def _deliver(self, payload: Payload, report: DeliveryReport) -> None:
        failures = 0
        while True:
            if self._must_repack(payload):
                for part in await self._split(payload):  # packed before the bound was lowered
                    await self._deliver(part, report)
                return
            attempt = await self._attempt(payload, report)
            if attempt is None:
                continue  # the bound was lowered while the body waited: pack it again
            if attempt.outcome is Outcome.DELIVERED:
                self.health.succeeded()
                report.delivered_rows += len(payload.rows)
                return
            if attempt.outcome is Outcome.TOO_LARGE:
                evidence = self.limits.refused(
                    len(payload.data), payload.raw_bytes, attempt.status, attempt.message
                )
                if evidence is not None and self._on_raw_limit is not None:
                    self._on_raw_limit(evidence)
            if attempt.outcome in (Outcome.TOO_LARGE, Outcome.REFUSED):
                await self._divide(payload, attempt, report)
                return
            failures += 1
            report.retries += 1
            self.health.failed(attempt)
            delay = attempt.retry_after
            await self._sleep(self._backoff.delay(failures) if delay is None else delay)

    async def _attempt(self, payload: Payload, report: DeliveryReport) -> Attempt | None:
        """Sends the body once, one at a time while it would test the unknown reading; None
        when the bound was lowered meanwhile and the body was not sent."""
        if not self.limits.needs_probe(payload.raw_bytes):
            return await self._send(payload, report)
        async with self.limits.probe:
            if self._must_repack(payload):
                return None
            return await self._send(payload, report)

    def _must_repack(self, payload: Payload) -> bool:
        return len(payload.rows) > 1 and self.limits.too_large(payload.raw_bytes)

    async def _send(self, payload: Payload, report: DeliveryReport) -> Attempt:
        started = time.monotonic()
        attempt = await self.client.send(payload.data)
        report.requests += 1
        if self._observe is not None:
            self._observe(attempt, len(payload.data), time.monotonic() - started)
        if attempt.outcome is Outcome.DELIVERED:
            self.limits.accepted(payload.raw_bytes)
        return attempt

    async def _divide(self, payload: Payload, attempt: Attempt, report: DeliveryReport) -> None:
        if len(payload.rows) == 1:
            # The service refuses this row alone (or a single row is over the size limit).
            report.refused.append((payload.rows[0], attempt.message))
            return
        for part in await self._split(payload):
            await self._deliver(part, report)
