"""Benchmark corpora written by a real kube-apiserver.

Starts the test control plane (tests/controlplane; build it first with
``python3 tests/controlplane/build.py``), runs the Defender scenario once, then drives a bounded
mix of requests through the real API with our Go generator (tests/controlplane/loadgen: reads,
lists, writes, secrets, forbidden, anonymous and impersonated requests, health probes, events,
over keep-alive HTTP/2 from several identities) while
kube-apiserver writes and rotates its audit log. The result, in ``--out``:

* ``audit/``: the audit files exactly as kube-apiserver left them (``audit.log`` and its rotated
  ``audit-<time>.log`` backups), for tail and rotation benchmarks;
* ``corpus.jsonl``: all of them concatenated in write order, one audit event per line;
* ``manifest.json``: policy, Kubernetes version, request and event counts, bytes, rates.

Example: ``python3 bench/controlplane_corpus.py --requests 200000 --out bench/corpora/cp``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from controlplane import scenario  # noqa: E402
from controlplane.build import cached_binaries, kubernetes_version  # noqa: E402
from controlplane.cluster import ADMIN_USER, AuditSettings, ControlPlane, running  # noqa: E402
from controlplane.harness import VERBOSE_POLICY_TEXT  # noqa: E402

LOAD_NAMESPACE = "load"


def _configmap(name: str, size: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": LOAD_NAMESPACE, "labels": {"app": "load"}},
        "data": {"payload": "x" * size},
    }


def drive_load(
    plane: ControlPlane,
    loadgen: Path,
    *,
    requests: int,
    clients: int,
    deadline_seconds: float,
    seed: int,
) -> dict[str, Any]:
    """Run our Go request generator (tests/controlplane/loadgen) against ``plane``; its summary.

    The generator, not Python, makes the requests: on two cores a Python client would use as
    much CPU per request as kube-apiserver itself and cap the rate far below what it can write.
    """
    argv = [
        str(loadgen),
        f"-server={plane.server}",
        f"-ca={plane.ca_cert}",
        f"-pki={plane.workdir / 'pki'}",
        f"-namespace={LOAD_NAMESPACE}",
        f"-requests={requests}",
        f"-clients={clients}",
        f"-max-duration={deadline_seconds}s",
        f"-seed={seed}",
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=deadline_seconds + 60
    )
    if done.returncode != 0:
        raise SystemExit(f"loadgen failed (exit {done.returncode}): {done.stderr.strip()}")
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


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
                binaries.loadgen,
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
        "requests": load["requests"],
        "request_errors": load["errors"],
        "statuses": dict(sorted(load["statuses"].items())),
        "load_seconds": round(load["seconds"], 2),
        "requests_per_second": round(load["requests"] / load["seconds"], 1),
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
    add("--clients", type=int, default=32, help="concurrent request workers")
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
