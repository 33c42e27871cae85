"""The chart's rendered Fluent Bit configuration, run by a real Fluent Bit with the real plugin and
the real sidecar.

The ConfigMap's files are written to a directory and only the pod's fixed paths are moved into it
(the configuration directory, the plugin, the state directory, the audit log, the socket, the HTTP
port); every section, key and value is the chart's. Fluent Bit is started with the container's own
arguments. They need a ``fluent-bit`` binary (FLUENT_BIT, or one on PATH) and are skipped without
one, as tests/integration/test_plugin_fluent_bit.py is.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fixtures.chunks import audit_line
from harness.flb_proxy import build_plugin
from harness.sidecar import Sidecar

from helm.conftest import Render, Rendered, ci_file

FLUENT_BIT = os.environ.get("FLUENT_BIT") or shutil.which("fluent-bit") or ""
DEADLINE_SECONDS = 30.0

pytestmark = [
    pytest.mark.skipif(
        not FLUENT_BIT, reason="no fluent-bit binary (set FLUENT_BIT or put it on PATH)"
    ),
    pytest.mark.timeout(900),  # the first run may build helm and the plugin
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], what: str, explain: Callable[[], str]) -> None:
    """Polls condition until it holds, failing with explain() after the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {DEADLINE_SECONDS}s:\n{explain()}")
        time.sleep(0.1)


def http_status(url: str, method: str = "GET") -> int:
    """The status of one request, 0 when nothing answers."""
    request = urllib.request.Request(url, method=method)  # noqa: S310 (a loopback http URL)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
            status: int = answer.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def answers_ok(url: str) -> bool:
    return 200 == http_status(url)


class ChartFluentBit:
    """fluent-bit running the chart's rendered configuration in one directory."""

    def __init__(self, rendered: Rendered, workdir: Path, sidecar: Sidecar) -> None:
        self.workdir = workdir
        self.audit_log = workdir / "audit.log"
        self.log_path = workdir / "fluent-bit.log"
        self.port = free_port()
        self.container = rendered.container("fluent-bit")
        service = rendered.section("SERVICE")
        moved = {
            "/fluent-bit/etc/conf/": f"{workdir}/conf/",
            "/fluent-bit/plugins/out_auditrelay.so": str(build_plugin()),
            "/var/fluent-bit/state/": f"{workdir}/state/",
            rendered.section("INPUT", "tail")["path"]: str(self.audit_log),
            rendered.section("OUTPUT", "auditrelay")["sidecar_address"]: sidecar.address,
            f"HTTP_Port                 {service['http_port']}": f"HTTP_Port {self.port}",
            "HTTP_Listen               0.0.0.0": "HTTP_Listen 127.0.0.1",
        }
        conf = workdir / "conf"
        conf.mkdir()
        (workdir / "state").mkdir()
        for name, text in rendered.config_files.items():
            for old, new in moved.items():
                text = text.replace(old, new)
            (conf / name).write_text(text)
        self.args = [
            arg.replace("/fluent-bit/etc/conf", str(conf)).replace("/fluent-bit/etc", str(workdir))
            for arg in self.container["args"]
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def probe_path(self, probe: str) -> str:
        path: str = self.container[probe]["httpGet"]["path"]
        return path

    def append_events(self, count: int) -> None:
        with self.audit_log.open("ab") as log:
            for _ in range(count):
                log.write(audit_line(auditID=str(uuid.uuid4())) + b"\n")

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [FLUENT_BIT, *self.args], cwd=self.workdir, stdout=log, stderr=log
            )

    def stop(self) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def events_accepted(sidecar: Sidecar) -> int:
    return sum(int(event["events_accepted"]) for event in sidecar.events("chunk_accepted"))


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory: a Unix socket path must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ar-helm-") as directory:
        yield Path(directory)


@pytest.fixture
def sidecar(workdir: Path) -> Iterator[Sidecar]:
    started = Sidecar.on_socket(workdir / "relay.sock", workdir / "sidecar")
    started.start()
    yield started
    started.stop()


@contextmanager
def chart_fluent_bit(
    render: Render, values: Path, workdir: Path, sidecar: Sidecar
) -> Iterator[ChartFluentBit]:
    """fluent-bit on the configuration the chart renders with these values; stopped at the end."""
    running = ChartFluentBit(render(values), workdir, sidecar)
    try:
        yield running
    finally:
        running.stop()


def test_rendered_configuration_ships_audit_events_and_answers_the_probes(
    render: Render, workdir: Path, sidecar: Sidecar
) -> None:
    """The default rendered configuration loads the plugin from plugins.conf, tails the audit log
    into the sidecar, and Fluent Bit answers the liveness and readiness probes and the
    ServiceMonitor's metrics path; it stops cleanly."""
    with chart_fluent_bit(render, ci_file("default-values"), workdir, sidecar) as fluent_bit:
        fluent_bit.append_events(30)
        fluent_bit.start()
        wait_for(lambda: events_accepted(sidecar) == 30, "30 events accepted", fluent_bit.log_text)
        for path in (
            fluent_bit.probe_path("livenessProbe"),
            fluent_bit.probe_path("readinessProbe"),
            "/api/v2/metrics/prometheus",
        ):
            url = fluent_bit.url(path)
            wait_for(functools.partial(answers_ok, url), f"200 from {path}", fluent_bit.log_text)
        assert 0 == fluent_bit.stop()
        log = fluent_bit.log_text()
        assert "[output:auditrelay:auditrelay.0] connected to the sidecar at" in log
        assert "[error]" not in log


def test_hot_reload_values_reload_through_the_reloaders_url(
    render: Render, workdir: Path, sidecar: Sidecar
) -> None:
    """With hotReload.enabled, Fluent Bit runs with the container's --enable-hot-reload, and the
    POST the reloader sends to /api/v2/reload reloads it; events keep flowing afterwards."""
    with chart_fluent_bit(render, ci_file("rke2-values"), workdir, sidecar) as fluent_bit:
        assert "--enable-hot-reload" in fluent_bit.args
        fluent_bit.append_events(10)
        fluent_bit.start()
        wait_for(lambda: events_accepted(sidecar) == 10, "10 events accepted", fluent_bit.log_text)
        assert 200 == http_status(fluent_bit.url("/api/v2/reload"), method="POST")
        wait_for(
            lambda: "[reload] successful reload done" in fluent_bit.log_text(),
            "a successful reload",
            fluent_bit.log_text,
        )
        fluent_bit.append_events(10)
        wait_for(lambda: events_accepted(sidecar) == 20, "20 events accepted", fluent_bit.log_text)
        assert 0 == fluent_bit.stop()
