"""The Logs Ingestion API of the emulator: ``POST /dataCollectionRules/{dcr}/streams/{stream}``.

A request is checked as the service checks it, in the service's order (api-version, token,
role, rule, stream, content type and encoding, size), throttled per rule, then its body is read
on the store thread (``bodies.BodyReader``) and the answer is sent only after its rows are
committed. Injected faults (``faults.FaultPlan``) act at the points a real outage would.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Mapping

from aiohttp import web

from auditrelay.emulator.bodies import Answer, Attempt, BodyReader
from auditrelay.emulator.context import EmulatorContext
from auditrelay.emulator.faults import STATUS_CODES, Fault, FaultKind
from auditrelay.emulator.responses import (
    RefusedError,
    access_denied_message,
    error_response,
    too_large_message,
)
from auditrelay.emulator.schema import StreamDeclaration
from auditrelay.emulator.settings import API_VERSIONS
from auditrelay.emulator.throttle import Throttle
from auditrelay.emulator.tokens import TokenRejectedError


class Ingestion:
    """The ingestion path of one emulator."""

    def __init__(
        self, context: EmulatorContext, declarations: Mapping[str, StreamDeclaration]
    ) -> None:
        self._context = context
        self.bodies = BodyReader(context.settings, declarations)
        settings = context.settings
        self._throttle = Throttle(settings.requests_per_minute, settings.bytes_per_minute)

    def add_routes(self, app: web.Application) -> None:
        """Registers the upload path."""
        app.router.add_post("/dataCollectionRules/{dcr}/streams/{stream}", self._ingest)

    async def _ingest(self, request: web.Request) -> web.StreamResponse:
        attempt = Attempt(
            received=time.time(),
            dcr=request.match_info["dcr"],
            stream=request.match_info["stream"],
            client_request_id=request.headers.get("x-ms-client-request-id"),
            wire_bytes=request.content_length or 0,
            content_encoding=request.headers.get("Content-Encoding"),
        )
        fault = self._context.faults.pick()
        attempt.fault = fault.name if fault is not None else None
        try:
            answer = await self._answer(request, attempt, fault)
        except RefusedError as refusal:
            attempt.status, attempt.error_code = refusal.status, refusal.code
            await self._log_attempt(attempt)
            if refusal.status == 413:
                refusal.headers["Connection"] = "close"
            return error_response(refusal.status, refusal.code, refusal.message, refusal.headers)
        if isinstance(answer, web.StreamResponse):
            return answer
        await self._context.notify()
        if fault is not None and fault.kind is FaultKind.TIMEOUT_AFTER_STORE:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.kind is FaultKind.DROP_AFTER_STORE:
            return _abort(request)
        if answer.status != 204:
            return error_response(answer.status, answer.code or "BadRequest", answer.message)
        return web.Response(status=204, headers={"x-ms-request-id": str(uuid.uuid4())})

    async def _answer(
        self, request: web.Request, attempt: Attempt, fault: Fault | None
    ) -> Answer | web.StreamResponse:
        """The stored body's answer, or the response that ends the request before that."""
        kind = fault.kind if fault is not None else None
        if kind is FaultKind.DROP_BEFORE_BODY:
            return await self._drop(request, attempt)
        if fault is not None and kind is FaultKind.SLOW:
            await asyncio.sleep(fault.delay)
        if fault is not None and kind is FaultKind.STATUS:
            await self._read_body(request, attempt)
            return await self._fault_status(fault, attempt)
        self._check_request(request, attempt)
        wait = self._throttle.admit(attempt.dcr, attempt.wire_bytes)
        if wait > 0.0:
            return await self._throttled(attempt, wait)
        body = await self._read_body(request, attempt)
        if kind is FaultKind.DROP_AFTER_BODY:
            return await self._drop(request, attempt)
        return await self._context.in_store_thread(self._process, attempt, body)

    def _check_request(self, request: web.Request, attempt: Attempt) -> None:
        version = request.query.get("api-version")
        if version is None:
            raise RefusedError(
                400, "MissingApiVersionParameter", "The api-version query parameter is required."
            )
        if version not in API_VERSIONS:
            raise RefusedError(
                400,
                "InvalidApiVersionParameter",
                f"The api-version '{version}' is invalid. The supported versions are "
                f"'{', '.join(sorted(API_VERSIONS))}'.",
            )
        self._check_caller(request, attempt)
        self._check_target(attempt)
        self._check_body_headers(request, attempt)

    def _check_caller(self, request: web.Request, attempt: Attempt) -> None:
        context = self._context
        try:
            claims = context.tokens.verify(request.headers.get("Authorization"))
        except TokenRejectedError as rejected:
            challenge = (
                f'Bearer authorization_uri="{context.authority_host}/common", '
                f'error="invalid_token", error_description="{rejected.message}"'
            )
            raise RefusedError(
                401, rejected.code, rejected.message, {"WWW-Authenticate": challenge}
            ) from None
        allowed = context.settings.allowed_clients
        if allowed is not None and claims.get("appid") not in allowed:
            raise RefusedError(403, "OperationFailed", access_denied_message(attempt.dcr))

    def _check_target(self, attempt: Attempt) -> None:
        if attempt.dcr != self._context.settings.dcr_id:
            raise RefusedError(
                404,
                "InvalidDataCollectionRule",
                f"Data collection rule with immutable Id '{attempt.dcr}' not found.",
            )
        if attempt.stream not in self.bodies.checkers:
            raise RefusedError(
                404,
                "InvalidStream",
                f"Stream '{attempt.stream}' is not declared in data collection rule "
                f"'{attempt.dcr}'.",
            )

    def _check_body_headers(self, request: web.Request, attempt: Attempt) -> None:
        if request.content_type != "application/json":
            raise RefusedError(
                415,
                "UnsupportedMediaType",
                f"Content-Type must be application/json, got '{request.content_type}'.",
            )
        encoding = (attempt.content_encoding or "").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            raise RefusedError(
                415,
                "UnsupportedContentEncoding",
                f"Content-Encoding must be gzip or absent, got '{attempt.content_encoding}'.",
            )
        limit = self._context.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise RefusedError(
                413, "ContentLengthLimitExceeded", too_large_message(limit, request.content_length)
            )

    async def _read_body(self, request: web.Request, attempt: Attempt) -> bytes:
        limit = self._context.settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        attempt.wire_bytes = size
        if size > limit:
            raise RefusedError(413, "ContentLengthLimitExceeded", too_large_message(limit, size))
        return b"".join(chunks)

    async def _throttled(self, attempt: Attempt, wait: float) -> web.Response:
        settings = self._context.settings
        attempt.status, attempt.error_code = 429, "TooManyRequests"
        await self._log_attempt(attempt)
        headers = (
            {"Retry-After": str(max(1, math.ceil(wait)))} if settings.throttle_retry_after else {}
        )
        return error_response(
            429,
            "TooManyRequests",
            f"Data collection rule '{attempt.dcr}' is over its limit of "
            f"{settings.requests_per_minute} requests or {settings.bytes_per_minute} "
            "bytes per minute.",
            headers,
        )

    async def _fault_status(self, fault: Fault, attempt: Attempt) -> web.Response:
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

    async def _drop(self, request: web.Request, attempt: Attempt) -> web.StreamResponse:
        attempt.status = 0
        await self._log_attempt(attempt)
        return _abort(request)

    async def _log_attempt(self, attempt: Attempt) -> None:
        await self._context.in_store_thread(self._context.store.record, attempt.record())
        await self._context.notify()

    def _process(self, attempt: Attempt, body: bytes) -> Answer:
        """Reads, checks and stores one body; runs on the store thread."""
        try:
            answer, rows, errors = self.bodies.read(attempt, body)
        except RefusedError as refusal:
            answer, rows, errors = Answer(refusal.status, refusal.code, refusal.message), [], []
        attempt.status, attempt.error_code = answer.status, answer.code
        if attempt.fault == FaultKind.DROP_AFTER_STORE.value:
            attempt.status = 0  # the rows are kept, but the client never gets an answer
        attempt.rows_stored = len(rows)
        self._context.store.record(attempt.record(), rows, errors)
        return answer


def _abort(request: web.Request) -> web.StreamResponse:
    """Closes the connection without an answer; the response returned is never sent."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)
