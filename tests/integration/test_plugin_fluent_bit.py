"""out_auditrelay.so in a real Fluent Bit, with the shipped example configuration, against the sidecar.

The ctypes harness cannot call the plugin from Fluent Bit's coroutines and threads; these tests
do. They run the binary FLUENT_BIT (or ``fluent-bit`` on PATH): ``make test-fluent-bit
FLUENT_BIT=/path/to/fluent-bit``. Without one they are skipped, and the run's last line says so.

The configuration is the shipped fluent-bit/conf/fluent-bit.conf with local paths and only its
``endpoint`` removed, as README tells an operator to try it: the sidecar then delivers to its
bundled emulator, so every test can check what was delivered, not only what was accepted.
"""

from __future__ import annotations

import functools
import re
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from auditrelay.devtools.flbproxy import build_plugin
from auditrelay.emulator import Store
from fixtures.chunks import audit_line
from harness.real_fluent_bit import FLUENT_BIT_MARKS, fluent_bit_binary, fluent_bit_version
from harness.sidecar import Sidecar, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "fluent-bit" / "conf"
DEADLINE_SECONDS = 60.0
RELOADS = 20
ENDPOINT_LINE = re.compile(r"(?m)^\s*endpoint\s+\S+\n")
# What docs/plugin.md tells an operator who needs hot reload: no worker pool (Fluent Bit starts
# a Go plugin's pool twice and a reload then crashes it), reload enabled in [SERVICE].
RELOADABLE = {
    "Workers                  1": "Workers                  0",
    "Grace                     30": "Grace                     30\n    Hot_Reload                On",
}
# ... and before Fluent Bit 5.0 no health check: its teardown frees the health counter while the
# HTTP server's thread may still write to it, which corrupts the heap on a reload.
NO_HEALTH_CHECK = {"Health_Check              On": "Health_Check              Off"}

pytestmark = [*FLUENT_BIT_MARKS, pytest.mark.timeout(600)]


class FluentBit:
    """A fluent-bit process running the example configuration, rewritten for one directory."""

    def __init__(self, workdir: Path, sidecar: Sidecar) -> None:
        self.workdir = workdir
        self.audit_log = workdir / "audit.log"
        self.log_path = workdir / "fluent-bit.log"
        self.config = workdir / "fluent-bit.conf"
        self.sidecar = sidecar
        self.appended: list[str] = []
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, **replace: str) -> None:
        """The shipped fluent-bit.conf and plugins.conf: local paths, debug logging, a free HTTP
        port on loopback, no endpoint (the sidecar's emulator), then `replace`."""
        text = ENDPOINT_LINE.sub("", (CONF_DIR / "fluent-bit.conf").read_text(), count=1)
        substitutions = {
            "/var/log/kubernetes/audit/audit.log": str(self.audit_log),
            "/var/fluent-bit/state/": f"{self.workdir}/state/",
            "unix:///run/auditrelay/relay.sock": self.sidecar.address,
            "/fluent-bit/etc/conf/plugins.conf": str(self.workdir / "plugins.conf"),
            "Log_Level                 info": "Log_Level                 debug",
            "HTTP_Listen               127.0.0.1": (
                f"HTTP_Listen               127.0.0.1\n    HTTP_Port                 {self.http_port}"
            ),
            **replace,
        }
        for old, new in substitutions.items():
            assert old in text, f"{old!r} is not in the example configuration"
            text = text.replace(old, new)
        assert "endpoint" not in text.lower().replace("sidecar_", "")
        self.config.write_text(text)
        plugins = (CONF_DIR / "plugins.conf").read_text()
        plugin = str(build_plugin())
        (self.workdir / "plugins.conf").write_text(
            plugins.replace("/fluent-bit/plugins/out_auditrelay.so", plugin)
        )

    def append_events(self, count: int) -> None:
        """Appends audit lines, each with a new auditID, as kube-apiserver would."""
        ids = [str(uuid.uuid4()) for _ in range(count)]
        with self.audit_log.open("ab") as log:
            log.write(b"".join(audit_line(auditID=audit_id) + b"\n" for audit_id in ids))
        self.appended += ids

    def start(self) -> None:
        """Starts fluent-bit on the configuration."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [fluent_bit_binary(), "-c", str(self.config)], stdout=log, stderr=log
            )

    def run_to_exit(self) -> int:
        """Runs fluent-bit until it exits by itself (a refused configuration)."""
        self.start()
        assert self.process is not None
        return self.process.wait(timeout=DEADLINE_SECONDS)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM and wait for the exit code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def reload(self) -> None:
        """SIGHUP: Fluent Bit's hot reload."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def reload_by_http(self) -> None:
        """POST /api/v2/reload, as the Helm chart's reloader asks for a hot reload."""
        url = f"http://127.0.0.1:{self.http_port}/api/v2/reload"
        request = urllib.request.Request(url, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            assert 200 == answer.status, answer.read()

    def log_text(self) -> str:
        """Everything fluent-bit printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> str:
        """Fluent Bit's log and the sidecar's, for a failure message."""
        return f"fluent-bit:\n{self.log_text()}\nsidecar:\n{self.sidecar.log_text()}"

    def delivered(self) -> Counter[str]:
        """How often each auditID reached the sidecar's emulator."""
        store = Store.in_directory(self.sidecar.state_dir / "emulator")
        try:
            return Counter(store.audit_id_counts())
        except sqlite3.OperationalError:  # the emulator has not created its tables yet
            return Counter()

    def wait_delivered(self, what: str, *, exactly_once: bool = True) -> None:
        """Waits until every appended event was delivered; fails on any duplicate unless the
        test killed the sidecar (a SIGKILL between delivery and its record means at least once)."""
        wanted = Counter(self.appended)
        wait_for(lambda: set(self.delivered()) == set(wanted), what, self.logs)
        if exactly_once:
            assert wanted == self.delivered(), "delivered more than once"


def wait_for(condition: Callable[[], bool], what: str, explain: Callable[[], str]) -> None:
    """Polls condition until it holds, failing with explain() after the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {DEADLINE_SECONDS}s:\n{explain()}")
        time.sleep(0.1)


def events_accepted(sidecar: Sidecar) -> int:
    """Events the sidecar accepted so far."""
    return sum(int(event["events_accepted"]) for event in sidecar.events("chunk_accepted"))


def reloads_done(fluent_bit: FluentBit, count: int) -> bool:
    """Fluent Bit has logged exactly `count` successful reloads."""
    return fluent_bit.log_text().count("[reload] successful reload done") == count


def accepted_at_least(sidecar: Sidecar, count: int) -> bool:
    return events_accepted(sidecar) >= count


@pytest.fixture
def sidecar(workdir: Path) -> Iterator[Sidecar]:
    """The real sidecar on a Unix socket."""
    started = Sidecar.on_socket(workdir / "relay.sock", workdir / "sidecar")
    started.start()
    yield started
    started.stop()


@pytest.fixture
def fluent_bit(workdir: Path, sidecar: Sidecar) -> Iterator[FluentBit]:
    """A configured (not started) fluent-bit; stopped after the test."""
    running = FluentBit(workdir, sidecar)
    yield running
    running.stop()


def test_events_flow_through_fluent_bit_on_worker_threads(
    fluent_bit: FluentBit, sidecar: Sidecar
) -> None:
    """With the shipped settings (Workers 1), tailed audit lines reach the emulator through the
    plugin on Fluent Bit's worker thread, each once; shutdown is clean."""
    fluent_bit.write_config()
    fluent_bit.append_events(40)
    fluent_bit.start()
    fluent_bit.wait_delivered("40 events delivered")
    assert 0 == fluent_bit.stop()
    log = fluent_bit.log_text()
    assert 1 == log.count("[output:auditrelay:auditrelay.0] connected to the sidecar at")
    assert "[error]" not in log


def reload_settings() -> dict[str, str]:
    """The hot-reload settings docs/plugin.md gives for the Fluent Bit under test."""
    if fluent_bit_version() < (5, 0, 0):
        return {**RELOADABLE, **NO_HEALTH_CHECK}
    return RELOADABLE


def test_hot_reload_twenty_times_under_load_loses_nothing(
    fluent_bit: FluentBit, sidecar: Sidecar
) -> None:
    """With the settings docs/plugin.md gives for hot reload (Workers 0; before Fluent Bit 5.0
    also Health_Check Off), Fluent Bit reloads twenty times in a row while the audit log grows,
    by SIGHUP and by the HTTP reload endpoint in turn; it never crashes, the re-registered plugin
    keeps forwarding, and every appended event is delivered exactly once."""
    fluent_bit.write_config(**reload_settings())
    fluent_bit.append_events(50)
    fluent_bit.start()
    fluent_bit.wait_delivered("the first 50 events delivered")
    stop_writing = threading.Event()
    lock = threading.Lock()

    def write_steadily() -> None:
        while not stop_writing.wait(0.05):
            with lock:
                fluent_bit.append_events(5)

    writer = threading.Thread(target=write_steadily, daemon=True)
    writer.start()
    try:
        for done in range(1, RELOADS + 1):
            with lock:
                before = len(fluent_bit.appended)
            if done % 2:
                fluent_bit.reload()
            else:
                fluent_bit.reload_by_http()
            wait_for(
                functools.partial(reloads_done, fluent_bit, done),
                f"reload {done} of {RELOADS}",
                fluent_bit.logs,
            )
            wait_for(
                functools.partial(accepted_at_least, sidecar, before),
                f"forwarding after reload {done}",
                fluent_bit.logs,
            )
            assert fluent_bit.running(), fluent_bit.logs()
    finally:
        stop_writing.set()
        writer.join()
    fluent_bit.wait_delivered(f"every event delivered across {RELOADS} reloads")
    assert 0 == fluent_bit.stop()
    log = fluent_bit.log_text()
    assert RELOADS + 1 == log.count("[output:auditrelay:auditrelay.0] connected to the sidecar at")
    assert "[error]" not in log
    assert "SIGSEGV" not in log


def test_sidecar_restart_costs_fluent_bit_one_retry(
    fluent_bit: FluentBit, sidecar: Sidecar
) -> None:
    """When the sidecar crashes (SIGKILL) and comes back, Fluent Bit retries the chunk and it gets
    through; nothing is lost (at least once: a batch delivered just before the kill may repeat)."""
    fluent_bit.write_config()
    fluent_bit.append_events(10)
    fluent_bit.start()
    fluent_bit.wait_delivered("10 events delivered")
    sidecar.kill()
    fluent_bit.append_events(10)
    wait_for(
        lambda: "[output:auditrelay:auditrelay.0] chunk retried" in fluent_bit.log_text(),
        "a retried chunk",
        fluent_bit.logs,
    )
    sidecar.start()
    fluent_bit.wait_delivered("the 10 events held while the sidecar was down", exactly_once=False)
    assert "configured again after a sidecar restart" in fluent_bit.log_text()


def test_misconfigured_pipeline_stops_fluent_bit_with_the_reason(
    fluent_bit: FluentBit, sidecar: Sidecar
) -> None:
    """A property the sidecar refuses makes Fluent Bit refuse to start, saying which and why."""
    fluent_bit.write_config(
        **{"stream                   Custom-KubeAudit_CL": "stream                   KubeAudit"}
    )
    assert 0 != fluent_bit.run_to_exit()
    assert (
        "[error] [output:auditrelay:auditrelay.0] the sidecar rejected the configuration: "
        "property 'stream' = 'KubeAudit': expected a custom stream name"
    ) in fluent_bit.log_text()


def test_a_misspelled_key_is_refused_or_visible_in_the_sidecars_log(
    fluent_bit: FluentBit, sidecar: Sidecar
) -> None:
    """Fluent Bit 5.1.1+ reads the plugin's config map and refuses an unknown key by itself.
    Before 5.1.1 a Go plugin cannot declare one: Fluent Bit starts, the key is ignored, and the
    sidecar's pipeline_configured line, which docs/plugin.md tells operators to read, lists every
    property name the plugin sent, without the misspelled one and without the one it meant."""
    fluent_bit.write_config(**{"sidecar_timeout          2s": "sidecar_timout           2s"})
    if fluent_bit_version() >= (5, 1, 1):
        assert 0 != fluent_bit.run_to_exit()
        assert (
            "[error] [config] auditrelay: unknown configuration property 'sidecar_timout'"
        ) in fluent_bit.log_text()
        assert [] == sidecar.events("pipeline_configured")
        return
    fluent_bit.append_events(5)
    fluent_bit.start()
    fluent_bit.wait_delivered("5 events delivered despite the ignored key")
    [configured] = sidecar.events("pipeline_configured")
    properties = configured["properties"]
    assert {"sidecar_address", "sidecar_wait", "stream", "dcr_id"} <= set(properties)
    assert "sidecar_timeout" not in properties
    assert "sidecar_timout" not in properties
