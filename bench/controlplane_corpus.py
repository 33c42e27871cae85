"""Benchmark corpora written by a real kube-apiserver.

Starts the test control plane (tests/controlplane; build it first with
``python3 tests/controlplane/build.py``), runs the Defender scenario once, then drives a bounded
mix of requests through the real API from many keep-alive TLS clients (reads, lists, writes,
secrets, forbidden, anonymous and impersonated requests, health probes, events) while
kube-apiserver writes and rotates its audit log. The result, in ``--out``:

* ``audit/``: the audit files exactly as kube-apiserver left them (``audit.log`` and its rotated
  ``audit-<time>.log`` backups), for tail and rotation benchmarks;
* ``corpus.jsonl``: all of them concatenated in write order, one audit event per line;
* ``manifest.json``: policy, Kubernetes version, request and event counts, bytes, rates.

Example: ``python3 bench/controlplane_corpus.py --requests 200000 --out bench/corpora/cp``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from controlplane import scenario  # noqa: E402
from controlplane.build import cached_binaries, kubernetes_version  # noqa: E402
from controlplane.cluster import (  # noqa: E402
    ADMIN_USER,
    ANONYMOUS,
    DEVELOPER_USER,
    NODE_USER,
    AuditSettings,
    ControlPlane,
    running,
)
from controlplane.harness import VERBOSE_POLICY_TEXT  # noqa: E402

LOAD_NAMESPACE = "load"


@dataclass(frozen=True)
class Request:
    identity: str
    method: str
    path: str
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _configmap(name: str, size: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": LOAD_NAMESPACE, "labels": {"app": "load"}},
        "data": {"payload": "x" * size},
    }


def _event(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": LOAD_NAMESPACE},
        "involvedObject": {"kind": "ConfigMap", "name": "shared", "namespace": LOAD_NAMESPACE},
        "reason": "Load",
        "message": "benchmark traffic",
        "type": "Normal",
    }


def request_mix(worker: int, sequence: int, rng: random.Random) -> list[Request]:
    """One round of one client: mostly reads and probes, some writes, a few security-relevant."""
    ns = f"/api/v1/namespaces/{LOAD_NAMESPACE}"
    name = f"cm-{worker}-{sequence}"
    round_: list[Request] = [
        Request(ADMIN_USER, "GET", f"{ns}/configmaps/shared"),
        Request(ADMIN_USER, "GET", f"{ns}/configmaps?limit=20"),
        Request(ADMIN_USER, "GET", f"{ns}/pods"),
        Request(ADMIN_USER, "GET", "/readyz"),
        Request(NODE_USER, "GET", "/api/v1/nodes/node-1"),
        Request(ADMIN_USER, "POST", f"{ns}/configmaps", _configmap(name, rng.randint(16, 2048))),
        Request(ADMIN_USER, "GET", f"{ns}/configmaps/{name}"),
        Request(ADMIN_USER, "DELETE", f"{ns}/configmaps/{name}"),
        Request(ADMIN_USER, "POST", f"{ns}/events", _event(f"load.{worker}.{sequence}")),
    ]
    if sequence % 5 == 0:
        round_ += [
            Request(ADMIN_USER, "GET", f"{ns}/secrets/shared"),
            Request(DEVELOPER_USER, "GET", "/api/v1/namespaces/kube-system/secrets"),
            Request(ANONYMOUS, "GET", "/api/v1/pods"),
            Request(
                ADMIN_USER,
                "GET",
                f"{ns}/pods",
                headers={"Impersonate-User": f"system:serviceaccount:{LOAD_NAMESPACE}:default"},
            ),
            Request(ADMIN_USER, "GET", "/version"),
        ]
    return round_


class Client:
    """One keep-alive TLS connection to kube-apiserver per identity, for one thread."""

    def __init__(self, plane: ControlPlane, pki: Path) -> None:
        self.plane = plane
        self.pki = pki
        self._connections: dict[str, http.client.HTTPSConnection] = {}

    def _connection(self, identity: str) -> http.client.HTTPSConnection:
        connection = self._connections.get(identity)
        if connection is None:
            context = ssl.create_default_context(cafile=str(self.plane.ca_cert))
            if identity != ANONYMOUS:
                stem = identity.replace(":", "-")
                context.load_cert_chain(self.pki / f"{stem}.crt", self.pki / f"{stem}.key")
            connection = http.client.HTTPSConnection(
                "127.0.0.1", self.plane.apiserver_port, context=context, timeout=30
            )
            self._connections[identity] = connection
        return connection

    def send(self, request: Request) -> int:
        connection = self._connection(request.identity)
        body = json.dumps(request.body).encode() if request.body is not None else None
        headers = {"Accept": "application/json", "User-Agent": "auditrelay-corpus/1.0"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers.update(request.headers)
        try:
            connection.request(request.method, request.path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
        except (http.client.HTTPException, OSError):
            connection.close()
            del self._connections[request.identity]
            raise
        return int(response.status)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()


@dataclass
class LoadResult:
    requests: int
    seconds: float
    statuses: Counter[int]
    errors: int


def drive_load(
    plane: ControlPlane, *, requests: int, clients: int, deadline_seconds: float, seed: int
) -> LoadResult:
    """Send about ``requests`` requests from ``clients`` threads; stops at the deadline."""
    remaining = [requests]
    lock = threading.Lock()
    statuses: Counter[int] = Counter()
    errors = [0]
    stop_at = time.monotonic() + deadline_seconds

    def take(count: int) -> bool:
        with lock:
            if remaining[0] <= 0 or time.monotonic() >= stop_at:
                return False
            remaining[0] -= count
            return True

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        client = Client(plane, plane.workdir / "pki")
        local: Counter[int] = Counter()
        failures = 0
        sequence = 0
        try:
            while True:
                batch = request_mix(index, sequence, rng)
                if not take(len(batch)):
                    break
                for request in batch:
                    try:
                        local[client.send(request)] += 1
                    except (http.client.HTTPException, OSError):
                        failures += 1
                sequence += 1
        finally:
            client.close()
            with lock:
                statuses.update(local)
                errors[0] += failures

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    return LoadResult(sum(statuses.values()), seconds, statuses, errors[0])


def _prepare(plane: ControlPlane, kubectl: Path) -> None:
    """The load's namespace with the objects the reads expect."""
    runner = scenario.Kubectl(kubectl, plane, plane.workdir / "kubectl-cache")
    shared_configmap = _configmap("shared", 512)
    shared_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "shared", "namespace": LOAD_NAMESPACE},
        "stringData": {"token": "benchmark-not-a-secret"},
    }
    for args, manifest in (
        (("create", "namespace", LOAD_NAMESPACE), None),
        (("create", "-f", "-"), shared_configmap),
        (("create", "-f", "-"), shared_secret),
    ):
        done = runner.run(ADMIN_USER, args, json.dumps(manifest) if manifest else None)
        if done.returncode != 0:
            raise SystemExit(f"preparing the load failed: {done.stderr.strip()}")


def _collect(plane: ControlPlane, out: Path) -> tuple[int, int, list[str]]:
    """Copy the audit files into ``out`` and concatenate them; (events, bytes, file names)."""
    audit_dir = out / "audit"
    audit_dir.mkdir(parents=True)
    events = 0
    written = 0
    names = []
    with (out / "corpus.jsonl").open("wb") as corpus:
        for path in plane.audit_files():
            shutil.copy2(path, audit_dir / path.name)
            names.append(path.name)
            with path.open("rb") as source:
                for line in source:
                    if line.strip():
                        corpus.write(line)
                        events += 1
                        written += len(line)
    return events, written, names


def generate(args: argparse.Namespace) -> dict[str, Any]:
    binaries = cached_binaries()
    out: Path = args.out
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new --out directory")
    with tempfile.TemporaryDirectory(prefix="controlplane-corpus-") as scratch:
        policy = args.policy
        if policy is None:
            policy = Path(scratch) / "verbose-policy.yaml"
            policy.write_text(VERBOSE_POLICY_TEXT, encoding="utf-8")
        audit = AuditSettings(
            policy=policy,
            max_size_mb=args.max_size_mb,
            max_backups=args.max_backups,
            mode=args.audit_mode,
        )
        with running(binaries, Path(scratch) / "plane", audit) as plane:
            if not args.no_scenario:
                scenario.run(plane, binaries.kubectl)
            _prepare(plane, binaries.kubectl)
            load = drive_load(
                plane,
                requests=args.requests,
                clients=args.clients,
                deadline_seconds=args.max_seconds,
                seed=args.seed,
            )
        events, size, files = _collect(plane, out)
    manifest = {
        "kubernetes": kubernetes_version(),
        "policy": str(args.policy) if args.policy else "verbose (RequestResponse for everything)",
        "audit_log": {
            "max_size_mb": args.max_size_mb,
            "max_backups": args.max_backups,
            "mode": args.audit_mode,
            "files": files,
        },
        "requests": load.requests,
        "request_errors": load.errors,
        "statuses": {str(code): count for code, count in sorted(load.statuses.items())},
        "load_seconds": round(load.seconds, 2),
        "requests_per_second": round(load.requests / load.seconds, 1) if load.seconds else 0.0,
        "events": events,
        "bytes": size,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add: Callable[..., Any] = parser.add_argument
    add("--out", type=Path, required=True, help="new directory for the corpus")
    add("--requests", type=int, default=100_000, help="requests to send after the scenario")
    add("--clients", type=int, default=16, help="concurrent keep-alive clients")
    add("--max-seconds", type=float, default=600.0, help="stop the load after this long")
    add("--policy", type=Path, default=None, help="audit policy (default: all RequestResponse)")
    add("--max-size-mb", type=int, default=20, help="--audit-log-maxsize: rotate at this size")
    add("--max-backups", type=int, default=1000, help="--audit-log-maxbackup")
    add("--audit-mode", choices=("blocking", "batch"), default="blocking", help="--audit-log-mode")
    add("--no-scenario", action="store_true", help="skip the Defender scenario")
    add("--seed", type=int, default=1, help="seed of the request mix")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    manifest = generate(args)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
