"""out_auditrelay.so in a real Fluent Bit, with the shipped example configuration, against the sidecar.

The ctypes harness cannot call the plugin from Fluent Bit's coroutines and threads; these tests
do. They need a `fluent-bit` binary: set FLUENT_BIT to its path or put it on PATH (the official
image has it at /fluent-bit/bin/fluent-bit). Without one they are skipped, with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from auditrelay.flbproxy import build_plugin
from fixtures.chunks import audit_line
from harness.sidecar import Sidecar

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "fluent-bit" / "conf"
FLUENT_BIT = os.environ.get("FLUENT_BIT") or shutil.which("fluent-bit") or ""
DEADLINE_SECONDS = 30.0

pytestmark = pytest.mark.skipif(
    not FLUENT_BIT, reason="no fluent-bit binary (set FLUENT_BIT or put it on PATH)"
)


def fluent_bit_version() -> tuple[int, ...]:
    """The version of the fluent-bit binary, e.g. (5, 1, 1)."""
    output = subprocess.run([FLUENT_BIT, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"Fluent Bit v(\d+)\.(\d+)\.(\d+)", output)
    assert match is not None, output
    return tuple(int(part) for part in match.groups())


class FluentBit:
    """A fluent-bit process running the example configuration, rewritten for one directory."""

    def __init__(self, workdir: Path, sidecar: Sidecar) -> None:
        self.workdir = workdir
        self.audit_log = workdir / "audit.log"
        self.log_path = workdir / "fluent-bit.log"
        self.config = workdir / "fluent-bit.conf"
        self.sidecar = sidecar
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, **replace: str) -> None:
        """The shipped fluent-bit.conf and plugins.conf, with local paths and debug logging."""
        text = (CONF_DIR / "fluent-bit.conf").read_text()
        substitutions = {
            "/var/log/kubernetes/audit/audit.log": str(self.audit_log),
            "/var/fluent-bit/state/": f"{self.workdir}/state/",
            "unix:///run/auditrelay/relay.sock": self.sidecar.address,
            "/fluent-bit/etc/conf/plugins.conf": str(self.workdir / "plugins.conf"),
            "Log_Level                 info": "Log_Level                 debug",
            "HTTP_Server               On": "HTTP_Server               Off\n    Hot_Reload On",
            **replace,
        }
        for old, new in substitutions.items():
            assert old in text, f"{old!r} is not in the example configuration"
            text = text.replace(old, new)
        self.config.write_text(text)
        plugins = (CONF_DIR / "plugins.conf").read_text()
        plugin = str(build_plugin())
        (self.workdir / "plugins.conf").write_text(
            plugins.replace("/fluent-bit/plugins/out_auditrelay.so", plugin)
        )

    def append_events(self, count: int) -> None:
        """Appends audit lines, each with a new auditID, as kube-apiserver would."""
        with self.audit_log.open("ab") as log:
            for _ in range(count):
                log.write(audit_line(auditID=str(uuid.uuid4())) + b"\n")

    def start(self) -> None:
        """Starts fluent-bit on the configuration."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [FLUENT_BIT, "-c", str(self.config)], stdout=log, stderr=log
            )

    def run_to_exit(self) -> int:
        """Runs fluent-bit until it exits by itself (a refused configuration)."""
        self.start()
        assert self.process is not None
        return self.process.wait(timeout=DEADLINE_SECONDS)

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

    def log_text(self) -> str:
        """Everything fluent-bit printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory: a Unix socket path must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ar-fb-") as directory:
        yield Path(directory)


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


def test_events_flow_through_fluent_bit_and_survive_a_hot_reload(
    fluent_bit: FluentBit, sidecar: Sidecar
) -> None:
    """Tailed audit lines reach the sidecar through the plugin on Fluent Bit's worker threads;
    after a hot reload (SIGHUP) the re-registered plugin keeps forwarding; shutdown is clean."""
    fluent_bit.write_config()
    fluent_bit.append_events(40)
    fluent_bit.start()
    wait_for(lambda: events_accepted(sidecar) == 40, "40 events accepted", fluent_bit.log_text)
    fluent_bit.reload()
    wait_for(
        lambda: "[reload] successful reload done" in fluent_bit.log_text(),
        "a successful reload",
        fluent_bit.log_text,
    )
    fluent_bit.append_events(25)
    wait_for(lambda: events_accepted(sidecar) == 65, "65 events accepted", fluent_bit.log_text)
    assert 0 == fluent_bit.stop()
    log = fluent_bit.log_text()
    assert 2 == log.count("[output:auditrelay:auditrelay.0] connected to the sidecar at")
    assert "[error]" not in log


def test_sidecar_restart_costs_fluent_bit_one_retry(
    fluent_bit: FluentBit, sidecar: Sidecar
) -> None:
    """When the sidecar crashes and comes back, Fluent Bit retries the chunk and it gets through."""
    fluent_bit.write_config()
    fluent_bit.append_events(10)
    fluent_bit.start()
    wait_for(lambda: events_accepted(sidecar) == 10, "10 events accepted", fluent_bit.log_text)
    sidecar.kill()
    fluent_bit.append_events(10)
    wait_for(
        lambda: "[output:auditrelay:auditrelay.0] chunk retried" in fluent_bit.log_text(),
        "a retried chunk",
        fluent_bit.log_text,
    )
    sidecar.start()  # its log goes on in the same file: the count goes on too
    wait_for(lambda: events_accepted(sidecar) == 20, "10 more events", fluent_bit.log_text)
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


def test_fluent_bit_refuses_a_misspelled_key(fluent_bit: FluentBit, sidecar: Sidecar) -> None:
    """Fluent Bit 5.1.1+ reads the plugin's config map and refuses an unknown key by itself."""
    if fluent_bit_version() < (5, 1, 1):
        pytest.skip("Fluent Bit before 5.1.1 has no config map for Go plugins")
    fluent_bit.write_config(**{"sidecar_timeout          2s": "sidecar_timout           2s"})
    assert 0 != fluent_bit.run_to_exit()
    assert (
        "[error] [config] auditrelay: unknown configuration property 'sidecar_timout'"
    ) in fluent_bit.log_text()
    assert [] == sidecar.events("pipeline_configured")
