"""`python -m bench fluent-bit`: the configurations it gives a real Fluent Bit."""

from __future__ import annotations

from pathlib import Path

from auditrelay.fluentbit_conf import parse_classic

from bench.fluentbit import FluentBitRun, configuration, median_run


def _section(text: str, name: str) -> dict[str, str]:
    """The one section called ``name``, keys lower-cased as Fluent Bit matches them."""
    (section,) = [keys for found, keys in parse_classic(text) if found == name]
    return section


def test_null_run_is_the_shipped_tail_into_null(tmp_path: Path) -> None:
    """Same input as shipped (buffers, storage, no parser), our paths, a null output."""
    text = configuration(tmp_path / "audit.log", tmp_path, 24224, None)

    service, tail, output = (_section(text, name) for name in ("SERVICE", "INPUT", "OUTPUT"))
    assert (str(tmp_path / "audit.log"), str(tmp_path / "audit.db"), "512k", "filesystem") == (
        tail["path"],
        tail["db"],
        tail["buffer_chunk_size"],
        tail["storage.type"],
    )
    assert "parser" not in tail
    assert ("24224", str(tmp_path / "flb-storage")) == (
        service["http_port"],
        service["storage.path"],
    )
    assert {"name": "null", "match": "kube.audit"} == output


def test_auditrelay_run_keeps_the_shipped_output_with_the_benchs_destination(
    tmp_path: Path,
) -> None:
    """The shipped [OUTPUT] (workers, retries, storage limit) pointed at the bench's sidecar."""
    destination = {"sidecar_address": "unix:///tmp/x.sock", "endpoint": "https://127.0.0.1:1"}
    text = configuration(
        tmp_path / "audit.log", tmp_path, 24224, destination | {"auth": "client_secret"}
    )

    output = _section(text, "OUTPUT")
    assert ("auditrelay", "1", "no_limits") == (
        output["name"],
        output["workers"],
        output["retry_limit"],
    )
    assert ("unix:///tmp/x.sock", "https://127.0.0.1:1", "client_secret") == (
        output["sidecar_address"],
        output["endpoint"],
        output["auth"],
    )
    assert str(tmp_path / "plugins.conf") == _section(text, "SERVICE")["plugins_file"]


def test_median_run() -> None:
    runs = [FluentBitRun("null", 100) for _ in range(3)]
    for run, seconds in zip(runs, (2.0, 1.0, 4.0), strict=True):
        run.clock.wall = seconds

    assert 50.0 == median_run(runs).events_per_second
