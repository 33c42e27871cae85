"""``auditrelay audit enable|rollback`` against a real kube-apiserver run from the manifest.

The node is kubeadm's (tests/controlplane/staticpod.py): kubeadm 1.37's kube-apiserver.yaml,
kubeadm's PKI layout, an etcd, and a stand-in for the kubelet that (re)starts kube-apiserver
from the manifest whenever the file changes. The API server runs with exactly the manifest's
flags, its hostPaths mapped into the node's root; so what ``enable`` wrote either starts an API
server that writes audit events to the file the manifest names, or it does not start at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from auditrelay.audit.readiness import Endpoint
from auditrelay.cli import main
from kubernetes import client, config

from controlplane.build import Binaries
from controlplane.cluster import wait_until
from controlplane.staticpod import KUBEADM_MANIFEST, Node, StandInKubelet, node_root

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]
AUDIT_LOG = "/var/log/kubernetes/audit/audit.log"
POLICY = "/etc/kubernetes/audit/policy.yaml"
if not KUBEADM_MANIFEST.is_file():
    pytest.fail(f"{KUBEADM_MANIFEST}: the kubeadm test data is missing", pytrace=False)


@pytest.fixture
def kubelet(controlplane_binaries: Binaries, tmp_path: Path) -> Iterator[StandInKubelet]:
    """A node whose API server answers /readyz, audit logging off (as kubeadm leaves it)."""
    node = node_root(controlplane_binaries, tmp_path / "node")
    with StandInKubelet(controlplane_binaries, node) as running:
        _await_ready(node)
        yield running


def _await_ready(node: Node) -> None:
    endpoint = Endpoint(f"https://127.0.0.1:{node.port}", node.ca)
    wait_until(lambda: endpoint.get("/readyz") == 200, timeout=180, what="kube-apiserver /readyz")


def _audit(node: Node, *args: str) -> int:
    return main(["audit", *args, "--manifest", str(node.manifest), "--host-root", str(node.root)])


def _cluster_configuration(core: Any) -> str:
    text: str = core.read_namespaced_config_map("kubeadm-config", "kube-system").data[
        "ClusterConfiguration"
    ]
    return text


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(900)
def test_enable_starts_auditing_and_rollback_stops_it(
    kubelet: StandInKubelet, capsys: pytest.CaptureFixture[str]
) -> None:
    """enable's manifest starts kube-apiserver with the audit flags, which writes events
    under the installed policy to the file the manifest names, and then adds the flags to the
    kubeadm-config ConfigMap through that API server; rollback brings back kubeadm's manifest
    and ClusterConfiguration byte for byte and an API server without the flags."""
    node = kubelet.node
    original = node.manifest.read_bytes()
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(node.admin_kubeconfig)))
    cluster_configuration = KUBEADM_MANIFEST.with_name("cluster-configuration.yaml").read_text()
    core.create_namespaced_config_map(
        "kube-system",
        {
            "metadata": {"name": "kubeadm-config"},
            "data": {"ClusterConfiguration": cluster_configuration},
        },
    )

    enabled = _audit(node, "enable", "--timeout", "240")
    out = capsys.readouterr().out

    assert 0 == enabled, out
    # kubeadm upgrade keeps the flags: the node's admin.conf reached the kubeadm-config ConfigMap.
    kept = yaml.safe_load(_cluster_configuration(core))["apiServer"]["extraArgs"]
    assert {"name": "audit-log-path", "value": AUDIT_LOG} in kept
    assert f"--audit-policy-file={node.host(POLICY)}" in kubelet.current_argv
    assert f"--audit-log-path={node.host(AUDIT_LOG)}" in kubelet.current_argv
    events = _events(node.host(AUDIT_LOG))
    # The installed policy decides: anonymous reads at Metadata (rule 1), probes not at all.
    assert any(e["requestURI"] == "/version" and e["level"] == "Metadata" for e in events)
    assert not any(str(e["requestURI"]).startswith("/readyz") for e in events)
    assert 0 == _audit(node, "status")

    rolled_back = _audit(node, "rollback", "--timeout", "240")

    assert 0 == rolled_back
    assert original == node.manifest.read_bytes()
    assert cluster_configuration == _cluster_configuration(core)
    # The kubelet restarts the pod from the restored manifest, without the audit flags.
    wait_until(lambda: len(kubelet.argvs) >= 3, timeout=60, what="the restored pod")
    assert not any(word.startswith("--audit-") for word in kubelet.current_argv)
    _await_ready(node)


@pytest.mark.timeout(900)
def test_policy_the_apiserver_refuses_is_rolled_back(
    kubelet: StandInKubelet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An audit.k8s.io/v1beta1 policy (auditrelay reads it, kube-apiserver >= 1.24 refuses
    it): the new API server never starts, enable restores kubeadm's manifest, waits for the
    API server to answer again and exits 1 with the reason."""
    node = kubelet.node
    original = node.manifest.read_bytes()
    policy = tmp_path / "v1beta1.yaml"
    policy.write_text("apiVersion: audit.k8s.io/v1beta1\nkind: Policy\nrules:\n- level: Metadata\n")

    code = _audit(node, "enable", "--policy", str(policy), "--timeout", "90")
    captured = capsys.readouterr()

    assert 1 == code, captured.out
    assert f"the audit log {node.host(AUDIT_LOG)} did not appear" in captured.err
    assert original == node.manifest.read_bytes()
    assert not any(word.startswith("--audit-") for word in kubelet.current_argv)
    assert 3 <= len(kubelet.argvs)  # kubeadm's, enable's (failing), kubeadm's again
    assert 200 == Endpoint(f"https://127.0.0.1:{node.port}", node.ca).get("/readyz")
