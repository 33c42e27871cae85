"""Prometheus metrics of the sidecar, and the small HTTP server for /metrics, /healthz, /readyz.

Every metric is ``auditrelay_<noun>_<unit>`` (``_total`` for counters) with bounded labels only:
``pipeline`` (the Fluent Bit output instance, a handful per process) and, on requests, ``status``
(a fixed set of codes, a class such as ``5xx``, or ``timeout``/``network``/``auth``/``error``).
``Metrics`` owns its registry, so tests make a fresh one; ``Metrics.pipeline(id)`` returns the
children bound to one pipeline, which the hot path increments without label lookups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double every counter's lines and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_REQUEST_SECONDS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_SECONDS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True, slots=True)
class PipelineMetrics:
    """The metric children of one pipeline."""

    events_received: Counter
    events_filtered: Counter
    events_invalid: Counter
    events_spooled: Counter
    events_delivered: Counter
    events_dead_lettered: Counter
    received_bytes: Counter
    spooled_bytes: Counter
    uncompressed_bytes: Counter
    compressed_bytes: Counter
    sent_bytes: Counter
    retries: Counter
    spool_full: Counter
    chunks_duplicate: Counter
    spool_corrupt_bytes: Counter
    fields_truncated: Counter
    connections_opened: Counter
    spool_bytes: Gauge
    spool_pending_bytes: Gauge
    spool_oldest_age: Gauge
    last_delivery: Gauge
    ready: Gauge
    request_raw_bytes_limit: Gauge
    request_duration: Histogram
    delivery_latency: Histogram
    pipeline_id: str
    requests: Counter  # the parent; use ``request(status)``

    def request(self, status: str) -> Counter:
        """The request counter for one status label."""
        return self.requests.labels(pipeline=self.pipeline_id, status=status)


class Metrics:
    """All metrics of one sidecar process, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        labels = ["pipeline"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg)

        self.events_received = counter(
            "auditrelay_events_received_total", "Audit events decoded from Fluent Bit chunks."
        )
        self.events_filtered = counter(
            "auditrelay_events_filtered_total", "Events the audit policy dropped (level None)."
        )
        self.events_invalid = counter(
            "auditrelay_events_invalid_total", "Records that are not audit events (set aside)."
        )
        self.events_spooled = counter(
            "auditrelay_events_spooled_total", "Events written to the spool as rows."
        )
        self.events_delivered = counter(
            "auditrelay_events_delivered_total", "Rows the Logs Ingestion API accepted (204)."
        )
        self.events_dead_lettered = counter(
            "auditrelay_events_dead_lettered_total",
            "Rows the Logs Ingestion API refused (400), set aside with its message.",
        )
        self.received_bytes = counter(
            "auditrelay_received_bytes_total", "Bytes of Fluent Bit chunks received."
        )
        self.spooled_bytes = counter(
            "auditrelay_spooled_bytes_total", "Bytes of rows written to the spool."
        )
        self.uncompressed_bytes = counter(
            "auditrelay_uncompressed_bytes_total", "Bytes of request bodies before gzip."
        )
        self.compressed_bytes = counter(
            "auditrelay_compressed_bytes_total", "Bytes of request bodies after gzip."
        )
        self.sent_bytes = counter(
            "auditrelay_sent_bytes_total", "Bytes of request bodies sent, retries included."
        )
        self.requests = Counter(
            "auditrelay_requests_total",
            "Requests to the Logs Ingestion API by outcome: HTTP status, or timeout/network/auth.",
            ["pipeline", "status"],
            registry=reg,
        )
        self.retries = counter(
            "auditrelay_retries_total", "Requests that failed transiently and will be retried."
        )
        self.spool_full = counter(
            "auditrelay_spool_full_total",
            "Appends refused because the spool (or its disk) is full.",
        )
        self.chunks_duplicate = counter(
            "auditrelay_chunks_duplicate_total",
            "Chunks sent again whose rows the spool holds already (answered ACCEPTED, not stored).",
        )
        self.spool_corrupt_bytes = counter(
            "auditrelay_spool_corrupt_bytes_total",
            "Bytes of torn or damaged spool records skipped on reading.",
        )
        self.fields_truncated = counter(
            "auditrelay_fields_truncated_total", "Row fields cut to the service's size limits."
        )
        self.connections_opened = counter(
            "auditrelay_connections_opened_total",
            "TLS connections opened to the endpoint and the token authority.",
        )
        self.spool_bytes = gauge("auditrelay_spool_bytes", "Bytes of spool segment files on disk.")
        self.spool_pending_bytes = gauge(
            "auditrelay_spool_pending_bytes", "Bytes in the spool not yet delivered."
        )
        self.spool_oldest_age = gauge(
            "auditrelay_spool_oldest_age_seconds", "Age of the oldest undelivered row (about 1 s)."
        )
        self.last_delivery = gauge(
            "auditrelay_last_delivery_timestamp_seconds",
            "Unix time of the last successful request.",
        )
        self.ready = gauge("auditrelay_pipeline_ready", "1 when the pipeline is ready, else 0.")
        self.request_raw_bytes_limit = gauge(
            "auditrelay_request_raw_bytes_limit",
            "Largest uncompressed body of one request: max_request_raw_bytes, or 1048576 once "
            "the endpoint refused a body for its uncompressed size.",
        )
        self.spool_orphaned_bytes = Gauge(
            "auditrelay_spool_orphaned_bytes",
            "Bytes pending in spools that no configured pipeline owns (see auditrelay spool list).",
            registry=reg,
        )
        self.spools_orphaned = Gauge(
            "auditrelay_spools_orphaned",
            "Spools with pending rows that no configured pipeline owns.",
            registry=reg,
        )
        self.request_duration = Histogram(
            "auditrelay_request_duration_seconds",
            "Duration of one request to the Logs Ingestion API.",
            labels,
            buckets=_REQUEST_SECONDS,
            registry=reg,
        )
        self.delivery_latency = Histogram(
            "auditrelay_delivery_latency_seconds",
            "From a row's arrival in the spool to the service's confirmation (about 1 s).",
            labels,
            buckets=_LATENCY_SECONDS,
            registry=reg,
        )

    def pipeline(self, pipeline_id: str) -> PipelineMetrics:
        """The children bound to one pipeline."""
        return PipelineMetrics(
            events_received=self.events_received.labels(pipeline_id),
            events_filtered=self.events_filtered.labels(pipeline_id),
            events_invalid=self.events_invalid.labels(pipeline_id),
            events_spooled=self.events_spooled.labels(pipeline_id),
            events_delivered=self.events_delivered.labels(pipeline_id),
            events_dead_lettered=self.events_dead_lettered.labels(pipeline_id),
            received_bytes=self.received_bytes.labels(pipeline_id),
            spooled_bytes=self.spooled_bytes.labels(pipeline_id),
            uncompressed_bytes=self.uncompressed_bytes.labels(pipeline_id),
            compressed_bytes=self.compressed_bytes.labels(pipeline_id),
            sent_bytes=self.sent_bytes.labels(pipeline_id),
            retries=self.retries.labels(pipeline_id),
            spool_full=self.spool_full.labels(pipeline_id),
            chunks_duplicate=self.chunks_duplicate.labels(pipeline_id),
            spool_corrupt_bytes=self.spool_corrupt_bytes.labels(pipeline_id),
            fields_truncated=self.fields_truncated.labels(pipeline_id),
            connections_opened=self.connections_opened.labels(pipeline_id),
            spool_bytes=self.spool_bytes.labels(pipeline_id),
            spool_pending_bytes=self.spool_pending_bytes.labels(pipeline_id),
            spool_oldest_age=self.spool_oldest_age.labels(pipeline_id),
            last_delivery=self.last_delivery.labels(pipeline_id),
            ready=self.ready.labels(pipeline_id),
            request_raw_bytes_limit=self.request_raw_bytes_limit.labels(pipeline_id),
            request_duration=self.request_duration.labels(pipeline_id),
            delivery_latency=self.delivery_latency.labels(pipeline_id),
            pipeline_id=pipeline_id,
            requests=self.requests,
        )

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


Readiness = Callable[
    [], Sequence[str]
]  # the problems that make the process not ready; empty: ready


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a (host, port) pair."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r}: expected host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class HealthServer:
    """Serves /metrics, /healthz (the process answers) and /readyz (``readiness`` has no problem)."""

    def __init__(
        self, metrics: Metrics, readiness: Readiness, address: str = "127.0.0.1:2021"
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.host, self._port = parse_address(address)
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when the address asked for port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self._port}"

    async def start(self) -> None:
        """Binds and serves; returns once the port accepts connections."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        server = site._server  # aiohttp keeps the bound sockets here; needed for port 0
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self._port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stops serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        problems = list(self.readiness())
        if problems:
            return web.Response(status=503, text="".join(f"{problem}\n" for problem in problems))
        return web.Response(text="ok\n")
