"""The chart's rendered Fluent Bit configuration, run by a real Fluent Bit with the real plugin and
the real sidecar.

The ConfigMap's files are written to a directory and only the pod's fixed paths are moved into it
(the configuration directory, the plugin, the state directory, the audit log, the socket, the HTTP
port); every section, key and value is the chart's. Fluent Bit is started with the container's own
arguments. The same is done with the fluent-bit chart values docs/helm.md gives for adopting the
plugin through values alone (Pattern B). The runs need a ``fluent-bit`` binary (``make test-fluent-bit
FLUENT_BIT=/path/to/fluent-bit``) and are skipped without one, and the run's last line names them.
"""

from __future__ import annotations

import functools
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from auditrelay.devtools.flbproxy import build_plugin
from auditrelay.fluentbit_conf import parse_classic
from fixtures.chunks import audit_line
from harness.real_fluent_bit import fluent_bit_binary, needs_fluent_bit
from harness.sidecar import Sidecar

from helm.conftest import Render, Rendered, ci_file

DEFAULT_SIDECAR_ADDRESS = "unix:///run/auditrelay/relay.sock"
HTTP_PORT_LINE = re.compile(r"(?im)^(\s*HTTP_Port\s+)\S+$")
OUTPUT_NAME_LINE = re.compile(r"(?im)^(\s*)Name\s+auditrelay\s*$")
HTTP_LISTEN_LINE = re.compile(r"(?im)^(\s*HTTP_Listen\s+)\S+$")
DEADLINE_SECONDS = 30.0
pytestmark = pytest.mark.timeout(900)  # the first run may build helm and the plugin


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
    """fluent-bit running a pod's Fluent Bit configuration files and arguments in one directory."""

    def __init__(
        self, config_files: Mapping[str, str], args: Sequence[str], workdir: Path, sidecar: Sidecar
    ) -> None:
        self.workdir = workdir
        self.sidecar = sidecar
        self.audit_log = workdir / "audit.log"
        self.log_path = workdir / "fluent-bit.log"
        self.port = free_port()
        sections = dict(parse_classic(config_files["fluent-bit.conf"]))
        outputs = [
            properties
            for name, properties in parse_classic(config_files["fluent-bit.conf"])
            if name == "OUTPUT" and properties["name"] == "auditrelay"
        ]
        if "sidecar_address" not in outputs[0]:  # the plugin's default: point it at the socket
            config_files = {
                **config_files,
                "fluent-bit.conf": OUTPUT_NAME_LINE.sub(
                    rf"\g<0>\n\g<1>sidecar_address {DEFAULT_SIDECAR_ADDRESS}",
                    config_files["fluent-bit.conf"],
                ),
            }
        moved = {
            "/fluent-bit/etc/conf/": f"{workdir}/conf/",
            "/fluent-bit/plugins/out_auditrelay.so": str(build_plugin()),
            "/var/fluent-bit/state/": f"{workdir}/state/",
            sections["INPUT"]["path"]: str(self.audit_log),
            outputs[0].get("sidecar_address", DEFAULT_SIDECAR_ADDRESS): sidecar.address,
        }
        conf = workdir / "conf"
        conf.mkdir()
        (workdir / "state").mkdir()
        for name, text in config_files.items():
            for old, new in moved.items():
                text = text.replace(old, new)
            text = HTTP_PORT_LINE.sub(rf"\g<1>{self.port}", text)
            text = HTTP_LISTEN_LINE.sub(r"\g<1>127.0.0.1", text)
            (conf / name).write_text(text)
        self.args = [
            arg.replace("/fluent-bit/etc/conf", str(conf)).replace("/fluent-bit/etc", str(workdir))
            for arg in args
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def of_chart(cls, rendered: Rendered, workdir: Path, sidecar: Sidecar) -> ChartFluentBit:
        """Fluent Bit as the chart's pod runs it."""
        args = rendered.container("fluent-bit")["args"]
        return cls(rendered.config_files, args, workdir, sidecar)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def append_events(self, count: int) -> None:
        with self.audit_log.open("ab") as log:
            for _ in range(count):
                log.write(audit_line(auditID=str(uuid.uuid4())) + b"\n")

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [fluent_bit_binary(), *self.args], cwd=self.workdir, stdout=log, stderr=log
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

    def logs(self) -> str:
        """Fluent Bit's log and the sidecar's, for a failure message."""
        return f"fluent-bit:\n{self.log_text()}\nsidecar:\n{self.sidecar.log_text()}"


def events_accepted(sidecar: Sidecar) -> int:
    return sum(int(event["events_accepted"]) for event in sidecar.events("chunk_accepted"))


def accepted_exactly(sidecar: Sidecar, count: int) -> bool:
    return events_accepted(sidecar) == count


def reloads_logged(fluent_bit: ChartFluentBit, count: int) -> bool:
    """Fluent Bit has logged exactly `count` successful reloads."""
    return fluent_bit.log_text().count("[reload] successful reload done") == count


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory: a Unix socket path must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ar-helm-") as directory:
        yield Path(directory)


@pytest.fixture
def sidecar(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sidecar]:
    """The real sidecar on a Unix socket, in the environment the workload identity webhook gives
    the pod (the chart's default identity): a federated token file and the tenant."""
    token = workdir / "azure-identity-token"
    token.write_text("a-projected-service-account-token")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token))
    monkeypatch.setenv("AZURE_TENANT_ID", "00000000-0000-0000-0000-000000000002")
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000001")
    started = Sidecar.on_socket(workdir / "relay.sock", workdir / "sidecar")
    started.start()
    yield started
    started.stop()


@contextmanager
def chart_fluent_bit(
    render: Render, values: Path, workdir: Path, sidecar: Sidecar
) -> Iterator[ChartFluentBit]:
    """fluent-bit on the configuration the chart renders with these values; stopped at the end."""
    running = ChartFluentBit.of_chart(render(values), workdir, sidecar)
    try:
        yield running
    finally:
        running.stop()


@needs_fluent_bit
def test_rendered_configuration_ships_audit_events_and_answers_the_probes(
    render: Render, workdir: Path, sidecar: Sidecar
) -> None:
    """The default rendered configuration loads the plugin from plugins.conf, tails the audit log
    into the sidecar, and Fluent Bit answers the liveness and readiness probes and the
    ServiceMonitor's metrics path; it stops cleanly."""
    rendered = render(ci_file("default-values"))
    container = rendered.container("fluent-bit")
    probe_paths = [
        container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")
    ]
    with chart_fluent_bit(render, ci_file("default-values"), workdir, sidecar) as fluent_bit:
        fluent_bit.append_events(30)
        fluent_bit.start()
        wait_for(lambda: events_accepted(sidecar) == 30, "30 events accepted", fluent_bit.logs)
        for path in [*probe_paths, "/api/v2/metrics/prometheus"]:
            url = fluent_bit.url(path)
            wait_for(functools.partial(answers_ok, url), f"200 from {path}", fluent_bit.logs)
        assert 0 == fluent_bit.stop()
        log = fluent_bit.log_text()
        assert "[output:auditrelay:auditrelay.0] connected to the sidecar at" in log
        assert "[error]" not in log


@needs_fluent_bit
def test_hot_reload_values_reload_through_the_reloaders_url(
    render: Render, workdir: Path, sidecar: Sidecar
) -> None:
    """With hotReload.enabled, Fluent Bit runs with the container's --enable-hot-reload, and each
    POST the reloader sends to /api/v2/reload reloads it (five in a row, with the settings the
    chart renders for its image: Workers 0, and Health_Check Off before Fluent Bit 5.0); events
    keep flowing and the probes answer after every reload."""
    reloads = 5
    rendered = render(ci_file("rke2-values"))
    container = rendered.container("fluent-bit")
    probe_paths = [
        container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")
    ]
    with chart_fluent_bit(render, ci_file("rke2-values"), workdir, sidecar) as fluent_bit:
        assert "--enable-hot-reload" in fluent_bit.args
        fluent_bit.append_events(10)
        fluent_bit.start()
        wait_for(lambda: events_accepted(sidecar) == 10, "10 events accepted", fluent_bit.logs)
        for done in range(1, reloads + 1):
            assert 200 == http_status(fluent_bit.url("/api/v2/reload"), method="POST")
            wait_for(
                functools.partial(reloads_logged, fluent_bit, done),
                f"reload {done} of {reloads}",
                fluent_bit.logs,
            )
            fluent_bit.append_events(10)
            wanted = 10 * (done + 1)
            wait_for(
                functools.partial(accepted_exactly, sidecar, wanted),
                f"{wanted} events accepted",
                fluent_bit.logs,
            )
            for path in probe_paths:
                url = fluent_bit.url(path)
                wait_for(functools.partial(answers_ok, url), f"200 from {path}", fluent_bit.logs)
        assert 0 == fluent_bit.stop()
        assert "[error]" not in fluent_bit.log_text()


# --- Pattern B: the fluent-bit chart's own values, from docs/helm.md -----------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "helm.md"
FLUENT_BIT_CHART_ARGS = [
    "--workdir=/fluent-bit/etc",
    "--config=/fluent-bit/etc/conf/fluent-bit.conf",
]


def pattern_b_values() -> dict[str, Any]:
    """The YAML block of docs/helm.md's section on the fluent-bit chart."""
    text = DOCS.read_text()
    section = text[text.index("## Already running the fluent-bit chart?") :]
    block = section[section.index("```yaml\n") + len("```yaml\n") : section.index("```\n", 1)]
    values: dict[str, Any] = yaml.safe_load(block)
    return values


def pattern_b_config_files(values: Mapping[str, Any]) -> dict[str, str]:
    """The files the fluent-bit chart's ConfigMap holds for these values (its fluent-bit.conf is
    service, inputs, filters and outputs one after the other)."""
    config = values["config"]
    sections = [config.get(key, "") for key in ("service", "inputs", "filters", "outputs")]
    return {"fluent-bit.conf": "\n".join(sections), **config.get("extraFiles", {})}


def by_name(items: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {item["name"]: item for item in items}


def test_pattern_b_values_wire_the_plugin_socket_and_state_together() -> None:
    """In the docs' fluent-bit chart values, the init container fills the volume Fluent Bit loads
    the plugin from, both containers share the socket's volume and group, and the spool and the
    tail DB sit on the node."""
    values = pattern_b_values()
    fluent_bit_mounts = by_name(values["extraVolumeMounts"])
    init = by_name(values["initContainers"])
    sidecar = by_name(values["extraContainers"])["auditrelay"]
    sidecar_mounts = {mount["mountPath"]: mount for mount in sidecar["volumeMounts"]}
    plugin_path = parse_classic(values["config"]["extraFiles"]["plugins.conf"])[0][1]["path"]
    copy_target = init["install-plugin"]["command"][-1]
    plugin_volume = init["install-plugin"]["volumeMounts"][0]
    assert copy_target.startswith(plugin_volume["mountPath"] + "/")
    plugin_mount = fluent_bit_mounts[plugin_volume["name"]]
    assert plugin_path == plugin_mount["mountPath"] + copy_target.removeprefix(
        plugin_volume["mountPath"]
    )
    assert "/run/auditrelay" == fluent_bit_mounts["auditrelay-socket"]["mountPath"]
    assert "auditrelay-socket" == sidecar_mounts["/run/auditrelay"]["name"]
    assert sidecar["securityContext"]["runAsGroup"] == values["podSecurityContext"]["fsGroup"]
    state = by_name(values["extraVolumes"])["auditrelay-state"]["hostPath"]
    assert "/var/lib/auditrelay" == state["path"]
    assert "sidecar" == sidecar_mounts["/var/lib/auditrelay"]["subPath"]
    assert "/state/sidecar" == init["prepare-state"]["command"][-1]
    assert "fluent-bit" == fluent_bit_mounts["auditrelay-state"]["subPath"]
    environment = {item["name"]: item["value"] for item in sidecar["env"]}
    assert "0.0.0.0:2021" == environment["AUDITRELAY_METRICS_ADDRESS"]


@needs_fluent_bit
def test_pattern_b_configuration_ships_audit_events(workdir: Path, sidecar: Sidecar) -> None:
    """The docs' fluent-bit chart configuration, run as that chart runs it, loads the plugin and
    tails the audit log into the sidecar."""
    files = pattern_b_config_files(pattern_b_values())
    fluent_bit = ChartFluentBit(files, FLUENT_BIT_CHART_ARGS, workdir, sidecar)
    try:
        fluent_bit.append_events(12)
        fluent_bit.start()
        wait_for(lambda: events_accepted(sidecar) == 12, "12 events accepted", fluent_bit.logs)
        assert 0 == fluent_bit.stop()
        assert "[error]" not in fluent_bit.log_text()
    finally:
        fluent_bit.stop()
