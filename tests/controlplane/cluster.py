"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, started from the binaries that ``build.py`` caches, with audit logging to a file in
JSON format under a given policy.

Every component listens on 127.0.0.1 only, on ports chosen free at start-up, and speaks TLS with
certificates from a CA made for this one run. ``start()`` returns once the components have shown
that they work (etcd /health, kube-apiserver /readyz, both controllers' /healthz and leader leases,
the service-account controller's ``default`` account); ``stop()`` sends SIGTERM in reverse order
and waits, so the audit log is complete and closed when it returns.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from controlplane.build import Binaries
from controlplane.pki import CertificateAuthority, KeyPair, write_kubeconfig, write_signing_key

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Identities the fixture creates; each gets a kubeconfig (see ControlPlane.kubeconfig).
HARNESS_USER = "auditrelay-harness"  # the harness's own readiness checks
ADMIN_USER = "kubernetes-admin"  # the scenario's cluster administrator (kubeadm's name)
DEVELOPER_USER = "dev-alice"  # an authenticated user with no RBAC grants
KUBE_PROXY_USER = "system:kube-proxy"  # kube-proxy's identity, for its read-only watches
NODE_USER = "system:node:node-1"  # a kubelet's identity, for its node reads
ANONYMOUS = "anonymous"


_PORT_TAKEN = "address already in use"
_START_ATTEMPTS = 3


class ControlPlaneError(Exception):
    """A component failed to start, stop or answer in time."""


@dataclass(frozen=True)
class AuditSettings:
    """How kube-apiserver writes its audit log.

    ``max_size_mb`` 0 means the file is never rotated (kube-apiserver >= 1.36 semantics);
    ``mode`` is the log backend's ``--audit-log-mode`` (blocking, blocking-strict or batch).
    """

    policy: Path
    max_size_mb: int = 0
    max_backups: int = 0
    mode: Literal["blocking", "blocking-strict", "batch"] = "blocking"
    compress: bool = False


@dataclass
class _Component:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ensure_running(self) -> None:
        if self.process is None:
            raise ControlPlaneError(f"{self.name} was never started")
        code = self.process.poll()
        if code is not None:
            raise ControlPlaneError(
                f"{self.name} exited with status {code}; last lines of {self.log_path}:\n"
                + self.log_tail()
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float) -> bool:
        """SIGTERM and wait; SIGKILL after ``timeout``. True when it stopped on SIGTERM."""
        return self.process is None or stop_process(self.process, timeout)


def stop_process(process: subprocess.Popen[Any], timeout: float) -> bool:
    """SIGTERM and wait; SIGKILL after ``timeout``. True when it stopped on SIGTERM (or had
    already ended)."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held together so that they are distinct)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    check: Callable[[], None] | None = None,
) -> None:
    """Poll ``condition`` until it holds; ControlPlaneError naming ``what`` at the deadline.

    ``check`` runs before each poll and raises when waiting longer cannot help (a process died).
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        if condition():
            return
        if time.monotonic() >= deadline:
            raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class ControlPlane:
    """One control plane in ``workdir``; use as a context manager or call start()/stop()."""

    binaries: Binaries
    workdir: Path
    audit: AuditSettings
    controllers: bool = True
    start_timeout: float = 120.0
    stop_timeout: float = 30.0
    apiserver_port: int = 0
    _components: list[_Component] = field(default_factory=list)
    _kubeconfigs: dict[str, Path] = field(default_factory=dict)
    _harness: KeyPair | None = None
    _ca: CertificateAuthority | None = None
    unclean_stops: list[str] = field(default_factory=list)

    # -- public surface -------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def audit_log(self) -> Path:
        """The file kube-apiserver writes; rotated backups sit beside it (audit-<time>.log)."""
        return self.workdir / "audit" / "audit.log"

    @property
    def ca_cert(self) -> Path:
        assert self._ca is not None, "start() first"
        return self._ca.cert_path

    def kubeconfig(self, identity: str) -> Path:
        """Kubeconfig for one of the identities named in this module (ADMIN_USER, ...)."""
        return self._kubeconfigs[identity]

    def audit_files(self) -> list[Path]:
        """Rotated backups oldest first, then the live file: the order events were written."""
        directory = self.audit_log.parent
        backups = sorted(p for p in directory.glob("audit-*.log*") if p.is_file())
        live = [self.audit_log] if self.audit_log.exists() else []
        return backups + live

    def audit_events(self) -> list[dict[str, Any]]:
        """Every event written so far, in order (uncompressed files only)."""
        events: list[dict[str, Any]] = []
        for path in self.audit_files():
            if path.suffix == ".gz":
                raise ControlPlaneError(f"{path}: compressed backups are not read by audit_events")
            with path.open(encoding="utf-8") as lines:
                events.extend(json.loads(line) for line in lines if line.strip())
        return events

    def api_get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` from kube-apiserver as the harness identity."""
        return https_get(self.server + path, self.ca_cert, self._harness)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start and await every component; a port taken between choosing and binding it
        (another process on the machine was quicker) costs a fresh start on new ports."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start()
            except ControlPlaneError as error:
                self.stop()
                if _PORT_TAKEN not in str(error) or attempt == _START_ATTEMPTS:
                    raise
                self._discard_state()
            except BaseException:
                self.stop()
                raise
            else:
                return

    def _discard_state(self) -> None:
        for directory in ("etcd", "audit", "pki", "kubeconfig"):
            shutil.rmtree(self.workdir / directory, ignore_errors=True)
        self._kubeconfigs.clear()

    def stop(self) -> None:
        """Stop the components newest first; remembers any that needed SIGKILL."""
        for component in reversed(self._components):
            if not component.stop(self.stop_timeout):
                self.unclean_stops.append(component.name)
        self._components.clear()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        ports = _free_ports(5)
        self.apiserver_port = ports[0]
        etcd_port, etcd_peer_port, kcm_port, scheduler_port = ports[1:]
        ca = self._ca = CertificateAuthority(self.workdir / "pki")
        self._write_identities(ca)

        etcd = self._component("etcd", self._etcd_argv(ca, etcd_port, etcd_peer_port))
        etcd_client = ca.issue("apiserver-etcd-client", common_name="kube-apiserver-etcd-client")
        self._await(
            etcd,
            lambda: _etcd_healthy(etcd_port, ca.cert_path, etcd_client),
            "etcd /health",
        )
        apiserver = self._component(
            "kube-apiserver", self._apiserver_argv(ca, etcd_port, etcd_client)
        )
        self._await(apiserver, lambda: self.api_get("/readyz")[0] == 200, "kube-apiserver /readyz")
        if not self.controllers:
            return
        kcm = self._component(
            "kube-controller-manager", self._controller_manager_argv(ca, kcm_port)
        )
        scheduler = self._component("kube-scheduler", self._scheduler_argv(ca, scheduler_port))
        for component, port in ((kcm, kcm_port), (scheduler, scheduler_port)):
            self._await_controller(component, port, ca.cert_path)
        self._await(
            kcm,
            lambda: self.api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            "the service-account controller to create default/default",
        )

    def _await(self, component: _Component, condition: Callable[[], bool], what: str) -> None:
        def healthy() -> None:
            for started in self._components:
                started.ensure_running()

        try:
            wait_until(condition, timeout=self.start_timeout, what=what, check=healthy)
        except ControlPlaneError as error:
            raise ControlPlaneError(
                f"{error}; last lines of {component.log_path}:\n{component.log_tail()}"
            ) from None

    def _await_controller(self, component: _Component, port: int, ca: Path) -> None:
        """Serving /healthz, then holding its leader lease (named like the component)."""
        healthz = f"https://127.0.0.1:{port}/healthz"
        self._await(
            component, lambda: https_get(healthz, ca, None)[0] == 200, f"{component.name} /healthz"
        )
        self._await(
            component, lambda: self._lease_held(component.name), f"{component.name} leader lease"
        )

    def _lease_held(self, name: str) -> bool:
        status, body = self.api_get(
            f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{name}"
        )
        return status == 200 and bool(json.loads(body).get("spec", {}).get("holderIdentity"))

    def _component(self, name: str, argv: list[str]) -> _Component:
        component = _Component(name, argv, self.workdir / "logs" / f"{name}.log")
        self._components.append(component)
        component.start()
        return component

    # -- identities and flags --------------------------------------------------------------------

    def _write_identities(self, ca: CertificateAuthority) -> None:
        config_dir = self.workdir / "kubeconfig"
        config_dir.mkdir(exist_ok=True)
        groups: dict[str, tuple[str, ...]] = {
            HARNESS_USER: ("system:masters",),
            ADMIN_USER: ("system:masters",),
            DEVELOPER_USER: ("developers",),
            KUBE_PROXY_USER: (),
            NODE_USER: ("system:nodes",),
            "system:kube-controller-manager": (),
            "system:kube-scheduler": (),
        }
        for user, organizations in groups.items():
            pair = ca.issue(user.replace(":", "-"), common_name=user, organizations=organizations)
            if user == HARNESS_USER:
                self._harness = pair
            self._kubeconfigs[user] = write_kubeconfig(
                config_dir / f"{user.replace(':', '-')}.yaml",
                server=self.server,
                ca=ca.cert_path,
                client=pair,
                user=user,
            )
        self._kubeconfigs[ANONYMOUS] = write_kubeconfig(
            config_dir / "anonymous.yaml",
            server=self.server,
            ca=ca.cert_path,
            client=None,
            user=ANONYMOUS,
        )

    def _etcd_argv(self, ca: CertificateAuthority, port: int, peer_port: int) -> list[str]:
        serving = ca.issue("etcd-server", common_name="etcd", server=True)
        data = self.workdir / "etcd"
        return [
            str(self.binaries.etcd),
            f"--data-dir={data}",
            f"--listen-client-url=https://127.0.0.1:{port}",
            f"--listen-peer-url=http://127.0.0.1:{peer_port}",
            f"--cert-file={serving.cert}",
            f"--key-file={serving.key}",
            f"--trusted-ca-file={ca.cert_path}",
        ]

    def _apiserver_argv(
        self, ca: CertificateAuthority, etcd_port: int, etcd_client: KeyPair
    ) -> list[str]:
        serving = ca.issue(
            "apiserver",
            common_name="kube-apiserver",
            server=True,
            client=False,
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
        )
        signing = write_signing_key(ca.directory, "service-account")
        audit = self.audit
        argv = [
            str(self.binaries.kube_apiserver),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # The endpoint reconcilers refuse a loopback advertise address; nothing here uses
            # the in-cluster `kubernetes` Service's endpoints.
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.apiserver_port}",
            f"--etcd-servers=https://127.0.0.1:{etcd_port}",
            f"--etcd-cafile={ca.cert_path}",
            f"--etcd-certfile={etcd_client.cert}",
            f"--etcd-keyfile={etcd_client.key}",
            f"--client-ca-file={ca.cert_path}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={signing.cert}",
            f"--service-account-signing-key-file={signing.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--anonymous-auth=true",
            "--allow-privileged=true",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--audit-policy-file={audit.policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            f"--audit-log-maxsize={audit.max_size_mb}",
            f"--audit-log-maxbackup={audit.max_backups}",
            f"--audit-log-mode={audit.mode}",
        ]
        if audit.compress:
            argv.append("--audit-log-compress=true")
        return argv

    def _controller_manager_argv(self, ca: CertificateAuthority, port: int) -> list[str]:
        serving = ca.issue("controller-manager-serving", common_name="localhost", server=True)
        signing_key = ca.directory / "service-account.key"
        kubeconfig = self._kubeconfigs["system:kube-controller-manager"]
        return [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.cert_path}",
            f"--root-ca-file={ca.cert_path}",
            f"--service-account-private-key-file={signing_key}",
            f"--cluster-signing-cert-file={ca.cert_path}",
            f"--cluster-signing-key-file={ca.pair.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=true",
            "--leader-elect=true",
        ]

    def _scheduler_argv(self, ca: CertificateAuthority, port: int) -> list[str]:
        serving = ca.issue("scheduler-serving", common_name="localhost", server=True)
        kubeconfig = self._kubeconfigs["system:kube-scheduler"]
        return [
            str(self.binaries.kube_scheduler),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.cert_path}",
            "--leader-elect=true",
        ]


def _etcd_healthy(port: int, ca: Path, client: KeyPair) -> bool:
    status, body = https_get(f"https://127.0.0.1:{port}/health", ca, client)
    return status == 200 and json.loads(body).get("health") == "true"


def https_get(url: str, ca: Path, client: KeyPair | None) -> tuple[int, bytes]:
    """GET over TLS verified against ``ca``; (status, body), or (0, b"") when not answering."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    # No ProxyHandler from the environment: loopback traffic must never go through a proxy.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return 0, b""


@contextlib.contextmanager
def running(
    binaries: Binaries, workdir: Path, audit: AuditSettings, *, controllers: bool = True
) -> Iterator[ControlPlane]:
    """Start a control plane in ``workdir``; stop it on exit, failing if a component hung."""
    plane = ControlPlane(binaries, workdir, audit, controllers=controllers)
    with plane:
        yield plane
    if plane.unclean_stops:
        raise ControlPlaneError(
            f"did not stop on SIGTERM within {plane.stop_timeout:.0f}s: {plane.unclean_stops}"
        )
