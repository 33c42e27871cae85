"""The service's error answers: the ErrorResponse body, its headers, and its messages."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import orjson
from aiohttp import web


class RefusedError(Exception):
    """A request the service refuses: the status, error code and message it answers with."""

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
