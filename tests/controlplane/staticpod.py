"""A kubeadm control-plane node in a directory, with a stand-in for the kubelet.

``node_root`` lays out kubeadm's PKI (``/etc/kubernetes/pki``, the file names kubeadm uses,
signed by a CA made for the run), starts an etcd on loopback, and writes the node's
``kube-apiserver.yaml``: the manifest kubeadm 1.37 wrote (tests/audit/data), with the
addresses and ports of this run put in.

``StandInKubelet`` does for that manifest what the kubelet does for a static pod: it starts
the container's command (``kube-apiserver`` from the test control plane's build), with every
path under a hostPath mount mapped into the node's root, refuses to start when a ``File``
hostPath is missing, creates ``DirectoryOrCreate`` ones, restarts the process when it exits
(CrashLoopBackOff, shortened) and, when the manifest changes, stops the old pod and starts the
new one.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from controlplane.build import Binaries
from controlplane.cluster import (
    _Component,
    _etcd_healthy,
    _free_ports,
    stop_process,
    wait_until,
)
from controlplane.pki import CertificateAuthority, KeyPair, write_kubeconfig, write_signing_key

REPO = Path(__file__).resolve().parents[2]
KUBEADM_MANIFEST = REPO / "tests" / "audit" / "data" / "kubeadm-v1.37" / "kube-apiserver.yaml"
MANIFEST = PurePosixPath("/etc/kubernetes/manifests/kube-apiserver.yaml")
POLL_SECONDS = 0.2
RESTART_BACKOFF_SECONDS = 2.0


@dataclass
class Node:
    """A control-plane node's root directory and how to reach its API server."""

    root: Path
    port: int
    admin_kubeconfig: Path
    etcd: _Component

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST.relative_to("/")

    @property
    def ca(self) -> Path:
        return self.root / "etc/kubernetes/pki/ca.crt"

    def host(self, path: str) -> Path:
        return self.root / PurePosixPath(path).relative_to("/")


def node_root(binaries: Binaries, root: Path) -> Node:
    """kubeadm's files for one node under ``root``, and its etcd running."""
    pki = root / "etc/kubernetes/pki"
    ca = CertificateAuthority(pki)
    ca.issue(
        "apiserver",
        common_name="kube-apiserver",
        server=True,
        client=False,
        dns_names=("kubernetes", "kubernetes.default", "kubernetes.default.svc"),
    )
    ca.issue(
        "apiserver-kubelet-client",
        common_name="kube-apiserver-kubelet-client",
        organizations=("kubeadm:cluster-admins",),
    )
    etcd_client = ca.issue("apiserver-etcd-client", common_name="kube-apiserver-etcd-client")
    ca.issue("front-proxy-client", common_name="front-proxy-client")
    write_signing_key(pki, "sa")
    shutil.copyfile(ca.cert_path, pki / "front-proxy-ca.crt")
    (pki / "etcd").mkdir()
    shutil.copyfile(ca.cert_path, pki / "etcd" / "ca.crt")
    admin = ca.issue("admin", common_name="kubernetes-admin", organizations=("system:masters",))

    port, etcd_port, etcd_peer_port = _free_ports(3)
    etcd = _start_etcd(binaries, root, ca, etcd_client, (etcd_port, etcd_peer_port))
    manifest = root / MANIFEST.relative_to("/")
    manifest.parent.mkdir(parents=True)
    manifest.write_text(_node_manifest(port, etcd_port), encoding="utf-8")
    kubeconfig = write_kubeconfig(
        root / "etc/kubernetes/admin.conf",  # where kubeadm puts it; enable reads it from there
        server=f"https://127.0.0.1:{port}",
        ca=ca.cert_path,
        client=admin,
        user="kubernetes-admin",
    )
    return Node(root, port, kubeconfig, etcd)


def _start_etcd(
    binaries: Binaries,
    root: Path,
    ca: CertificateAuthority,
    client: KeyPair,
    ports: tuple[int, int],
) -> _Component:
    port, peer_port = ports
    serving = ca.issue("etcd-server", common_name="etcd", server=True)
    (root / "var/log/pods").mkdir(parents=True)
    etcd = _Component(
        "etcd",
        [
            str(binaries.etcd),
            f"--data-dir={root / 'var/lib/etcd'}",
            f"--listen-client-url=https://127.0.0.1:{port}",
            f"--listen-peer-url=http://127.0.0.1:{peer_port}",
            f"--cert-file={serving.cert}",
            f"--key-file={serving.key}",
            f"--trusted-ca-file={ca.cert_path}",
        ],
        root / "var/log/pods/etcd.log",
    )
    etcd.start()
    wait_until(
        lambda: _etcd_healthy(port, ca.cert_path, client),
        timeout=60,
        what="etcd /health",
        check=etcd.ensure_running,
    )
    return etcd


def _node_manifest(port: int, etcd_port: int) -> str:
    """kubeadm's manifest with this run's loopback address and ports (the only changes)."""
    text = KUBEADM_MANIFEST.read_text(encoding="utf-8")
    text = re.sub(r"--advertise-address=[\d.]+", "--advertise-address=127.0.0.1", text)
    text = text.replace("--secure-port=6443", f"--secure-port={port}")
    text = text.replace(
        "--etcd-servers=https://127.0.0.1:2379", f"--etcd-servers=https://127.0.0.1:{etcd_port}"
    )
    # Bind to loopback only on a shared machine; the endpoint reconciler refuses a loopback
    # advertise address (cluster.py does the same).
    return text.replace(
        "    - --allow-privileged=true\n",
        "    - --allow-privileged=true\n    - --bind-address=127.0.0.1\n"
        "    - --endpoint-reconciler-type=none\n",
    )


@dataclass
class StandInKubelet:
    """Runs kube-apiserver from ``node``'s static pod manifest, as the kubelet would."""

    binaries: Binaries
    node: Node
    argvs: list[list[str]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    _process: subprocess.Popen[bytes] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> StandInKubelet:
        self._thread = threading.Thread(target=self._run, name="stand-in-kubelet", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        self._kill_pod()
        self.node.etcd.stop(30)

    @property
    def current_argv(self) -> list[str]:
        return self.argvs[-1] if self.argvs else []

    def _run(self) -> None:
        seen = b""
        next_restart = 0.0
        clock = threading.Event()
        while not self._stop.is_set():
            data = self.node.manifest.read_bytes() if self.node.manifest.exists() else b""
            if hashlib.sha256(data).digest() != hashlib.sha256(seen).digest():
                seen = data
                self._kill_pod()
                self._start_pod(data)
            elif self._process is not None and self._process.poll() is not None:
                next_restart += POLL_SECONDS
                if next_restart >= RESTART_BACKOFF_SECONDS:
                    next_restart = 0.0
                    self._start_pod(data)
            clock.wait(POLL_SECONDS)

    def _start_pod(self, manifest: bytes) -> None:
        pod: dict[str, Any] = yaml.safe_load(manifest)
        spec = pod["spec"]
        container = spec["containers"][0]
        host_paths = {volume["name"]: volume["hostPath"] for volume in spec.get("volumes") or ()}
        for host_path in host_paths.values():
            on_node = self.node.host(host_path["path"])
            if host_path.get("type") == "File" and not on_node.is_file():
                self.refusals.append(f"hostPath {host_path['path']}: type File, not found")
                self._process = None
                return
            if host_path.get("type") == "DirectoryOrCreate":
                on_node.mkdir(parents=True, exist_ok=True)
        mounts = [
            (PurePosixPath(mount["mountPath"]), host_paths[mount["name"]]["path"])
            for mount in container.get("volumeMounts") or ()
            if mount["name"] in host_paths
        ]
        argv = [str(self.binaries.kube_apiserver)]
        argv += [self._mapped(word, mounts) for word in container["command"][1:]]
        self.argvs.append(argv)
        log = self.node.root / "var/log/pods" / f"kube-apiserver-{len(self.argvs)}.log"
        with log.open("ab") as output:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _mapped(self, word: str, mounts: list[tuple[PurePosixPath, str]]) -> str:
        """``--flag=/container/path`` with the path as the node's root holds it."""
        name, equals, value = word.partition("=")
        if not equals or not value.startswith("/"):
            return word
        path = PurePosixPath(value)
        for mount_path, host_path in mounts:
            if path == mount_path or mount_path in path.parents:
                return f"{name}={self.node.host(host_path) / path.relative_to(mount_path)}"
        return word

    def _kill_pod(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, 30)
