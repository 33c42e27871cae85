"""Metrics follow the naming rules, count per pipeline, and the health server answers."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from auditrelay.metrics import HealthServer, Metrics, parse_address
from prometheus_client.parser import text_string_to_metric_families

NAME = re.compile(r"^auditrelay_[a-z]+(_[a-z]+)*$")
BOUNDED_LABELS = {"pipeline", "status"}


def test_every_metric_is_named_and_labelled_by_the_rules() -> None:
    """auditrelay_<noun>_<unit>, _total on counters only, and only bounded labels."""
    metrics = Metrics()
    child = metrics.pipeline("auditrelay.0")
    child.request("204").inc()
    child.request_duration.observe(0.1)
    families = list(text_string_to_metric_families(metrics.render().decode()))
    assert 20 < len(families)
    for family in families:
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert NAME.match(exposed), exposed
        if family.type != "counter":
            assert not exposed.endswith("_total"), exposed
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= BOUNDED_LABELS, sample


def test_the_issues_metrics_exist() -> None:
    """Received, filtered, invalid, spooled, delivered, dead-lettered, bytes, requests, retries,
    spool size and age, latency, and the last delivery time are all exposed."""
    metrics = Metrics()
    metrics.pipeline("p")
    text = metrics.render().decode()
    for name in (
        "auditrelay_events_received_total",
        "auditrelay_events_filtered_total",
        "auditrelay_events_invalid_total",
        "auditrelay_events_spooled_total",
        "auditrelay_events_delivered_total",
        "auditrelay_events_dead_lettered_total",
        "auditrelay_received_bytes_total",
        "auditrelay_compressed_bytes_total",
        "auditrelay_sent_bytes_total",
        "auditrelay_requests_total",
        "auditrelay_retries_total",
        "auditrelay_spool_bytes",
        "auditrelay_spool_oldest_age_seconds",
        "auditrelay_delivery_latency_seconds",
        "auditrelay_last_delivery_timestamp_seconds",
    ):
        assert f"# TYPE {name} " in text, name


def test_the_operations_page_explains_every_metric() -> None:
    """docs/operations.md has a row for each metric the sidecar exposes."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    metrics = Metrics()
    metrics.pipeline("p")
    for family in text_string_to_metric_families(metrics.render().decode()):
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{exposed}` |" in page, exposed


def test_children_count_per_pipeline() -> None:
    """Increments on one pipeline's children show under its label only."""
    metrics = Metrics()
    first, second = metrics.pipeline("a"), metrics.pipeline("b")
    first.events_received.inc(5)
    second.events_received.inc(2)
    first.request("429").inc()
    first.spool_bytes.set_function(lambda: 1234.0)
    sample = metrics.registry.get_sample_value
    assert 5.0 == sample("auditrelay_events_received_total", {"pipeline": "a"})
    assert 2.0 == sample("auditrelay_events_received_total", {"pipeline": "b"})
    assert 1.0 == sample("auditrelay_requests_total", {"pipeline": "a", "status": "429"})
    assert 1234.0 == sample("auditrelay_spool_bytes", {"pipeline": "a"})


async def test_the_health_server_answers_metrics_healthz_and_readyz() -> None:
    """/healthz is 200; /readyz is 200 until the readiness callback names a problem, then 503
    with the problem; /metrics is the Prometheus text format."""
    metrics = Metrics()
    metrics.pipeline("a").events_delivered.inc(3)
    problems: list[str] = []
    server = HealthServer(metrics, lambda: problems, "127.0.0.1:0")
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/healthz") as response:
                assert (200, "ok\n") == (response.status, await response.text())
            async with session.get(f"{server.url}/readyz") as response:
                assert 200 == response.status
            problems.append("pipeline a: delivery failing for 301s: HTTP 503")
            async with session.get(f"{server.url}/readyz") as response:
                assert (503, "pipeline a: delivery failing for 301s: HTTP 503\n") == (
                    response.status,
                    await response.text(),
                )
            async with session.get(f"{server.url}/metrics") as response:
                body = await response.text()
                assert response.headers["Content-Type"].startswith("text/plain")
                assert 'auditrelay_events_delivered_total{pipeline="a"} 3.0' in body
    finally:
        await server.stop()
    assert 0 != server.port


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:2021", ("127.0.0.1", 2021)), ("[::1]:9", ("::1", 9)), (":80", ("127.0.0.1", 80))],
)
def test_addresses(address: str, expected: tuple[str, int]) -> None:
    """host:port, bracketed IPv6, and an empty host meaning loopback."""
    assert expected == parse_address(address)


def test_a_bad_address_is_a_clear_error() -> None:
    """An address without a port names itself in the error."""
    with pytest.raises(ValueError, match="'localhost': expected host:port"):
        parse_address("localhost")
