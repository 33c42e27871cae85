"""The kubeadm-config ConfigMap's ClusterConfiguration, changed by ``enable`` and restored by
``rollback`` through a real kube-apiserver: kubeadm's own documents (v1beta3 from kubeadm
1.30, v1beta4 from kubeadm 1.37; tests/audit/data), optimistic concurrency, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from auditrelay.audit import kubeadm_config
from auditrelay.audit.errors import BackupError, RollbackRefusedError
from auditrelay.audit.kubeadm import KUBEADM_TARGET
from auditrelay.cli import main
from kubernetes import client, config

from controlplane.cluster import ADMIN_USER, AuditSettings, ControlPlane, wait_until
from controlplane.harness import StartControlPlane, policy_under_test

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]
DATA = Path(__file__).resolve().parents[1] / "audit" / "data"
AUDIT_FLAGS = KUBEADM_TARGET.flags()


@pytest.fixture(scope="module")
def plane(start_control_plane: StartControlPlane) -> Iterator[ControlPlane]:
    """kube-apiserver (no controllers), once it has created kube-system."""
    with start_control_plane(
        AuditSettings(policy=policy_under_test()), name="kubeadm-config", controllers=False
    ) as running:
        core = _core(running)
        wait_until(
            lambda: any(n.metadata.name == "kube-system" for n in core.list_namespace().items),
            timeout=60,
            what="the kube-system namespace",
        )
        yield running


def _core(plane: ControlPlane) -> Any:
    api_client = config.new_client_from_config(config_file=str(plane.kubeconfig(ADMIN_USER)))
    return client.CoreV1Api(api_client)


@pytest.fixture
def core(plane: ControlPlane) -> Iterator[Any]:
    """The CoreV1Api; kubeadm-config is deleted after each test."""
    api = _core(plane)
    yield api
    api.delete_namespaced_config_map(kubeadm_config.NAME, kubeadm_config.NAMESPACE)


def _create(core: Any, release: str) -> str:
    text = (DATA / f"kubeadm-{release}" / "cluster-configuration.yaml").read_text()
    core.create_namespaced_config_map(
        kubeadm_config.NAMESPACE,
        {
            "metadata": {"name": kubeadm_config.NAME},
            "data": {kubeadm_config.KEY: text},
        },
    )
    return text


def _document(core: Any) -> str:
    found = core.read_namespaced_config_map(kubeadm_config.NAME, kubeadm_config.NAMESPACE)
    text: str = found.data[kubeadm_config.KEY]
    return text


@pytest.mark.parametrize(
    ("release", "version"),
    [("v1.30", "kubeadm.k8s.io/v1beta3"), ("v1.37", "kubeadm.k8s.io/v1beta4")],
)
def test_enable_adds_the_audit_settings_in_the_documents_shape_and_rollback_restores(
    core: Any, tmp_path: Path, release: str, version: str
) -> None:
    """v1beta3 gets an ``extraArgs`` map, v1beta4 a ``{name, value}`` list, both the two
    hostPath volumes; a second enable changes nothing; rollback restores the exact text."""
    original = _create(core, release)

    outcome = kubeadm_config.enable(core, tmp_path, KUBEADM_TARGET, dry_run=False)
    written = yaml.safe_load(_document(core))
    again = kubeadm_config.enable(core, tmp_path, KUBEADM_TARGET, dry_run=False)

    assert ("updated", version) == (outcome.action, written["apiVersion"])
    extra_args = written["apiServer"]["extraArgs"]
    if version.endswith("v1beta3"):
        assert AUDIT_FLAGS == extra_args
    else:
        assert [{"name": n, "value": v} for n, v in AUDIT_FLAGS.items()] == extra_args
    volumes = {v["name"]: v for v in written["apiServer"]["extraVolumes"]}
    assert str(KUBEADM_TARGET.policy_path) == volumes["audit-policy"]["hostPath"]
    assert str(KUBEADM_TARGET.log_path.parent) == volumes["audit-log"]["hostPath"]
    assert ("unchanged", []) == (again.action, again.changes)

    restored = kubeadm_config.rollback(core, tmp_path, force=False)

    assert "rolled-back" == restored.action
    assert original == _document(core)
    assert not kubeadm_config.has_backup(tmp_path)


def test_dry_run_writes_nothing(core: Any, tmp_path: Path) -> None:
    """--dry-run reads and plans; the ConfigMap keeps its resourceVersion, no backup is kept."""
    _create(core, "v1.37")
    before = core.read_namespaced_config_map(kubeadm_config.NAME, kubeadm_config.NAMESPACE)

    outcome = kubeadm_config.enable(core, tmp_path, KUBEADM_TARGET, dry_run=True)
    after = core.read_namespaced_config_map(kubeadm_config.NAME, kubeadm_config.NAMESPACE)

    assert ("dry-run", 8) == (outcome.action, len(outcome.changes))
    assert before.metadata.resource_version == after.metadata.resource_version
    assert not kubeadm_config.has_backup(tmp_path)


class _RacingConfigMaps:
    """The real CoreV1Api, with a second writer that changes the ConfigMap between enable's
    read and its first write: the server answers that write 409 Conflict."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.raced = False

    def read_namespaced_config_map(self, name: str, namespace: str, **options: Any) -> Any:
        return self.api.read_namespaced_config_map(name, namespace, **options)

    def replace_namespaced_config_map(
        self, name: str, namespace: str, body: Any, **options: Any
    ) -> Any:
        if not self.raced:
            self.raced = True
            rival = self.api.read_namespaced_config_map(name, namespace)
            rival.data["ClusterStatus"] = "apiEndpoints: {}\n"
            self.api.replace_namespaced_config_map(name, namespace, rival)
        return self.api.replace_namespaced_config_map(name, namespace, body, **options)


def test_concurrent_writer_conflict_is_retried(core: Any, tmp_path: Path) -> None:
    """enable's write based on a stale resourceVersion gets 409; it reads again and writes
    once more, keeping the other writer's change."""
    _create(core, "v1.37")

    outcome = kubeadm_config.enable(_RacingConfigMaps(core), tmp_path, KUBEADM_TARGET, False)
    found = core.read_namespaced_config_map(kubeadm_config.NAME, kubeadm_config.NAMESPACE)

    assert (1, "updated") == (outcome.conflicts, outcome.action)
    assert "apiEndpoints: {}\n" == found.data["ClusterStatus"]
    assert "audit-log-path" in found.data[kubeadm_config.KEY]


def test_rollback_refuses_a_document_changed_since(core: Any, tmp_path: Path) -> None:
    """Someone edited the ClusterConfiguration after enable: rollback refuses and writes
    nothing; --force restores the original."""
    original = _create(core, "v1.30")
    kubeadm_config.enable(core, tmp_path, KUBEADM_TARGET, dry_run=False)
    found = core.read_namespaced_config_map(kubeadm_config.NAME, kubeadm_config.NAMESPACE)
    edited = found.data[kubeadm_config.KEY].replace("clusterName: kubernetes", "clusterName: x")
    found.data[kubeadm_config.KEY] = edited
    core.replace_namespaced_config_map(kubeadm_config.NAME, kubeadm_config.NAMESPACE, found)

    with pytest.raises(RollbackRefusedError, match="changed since auditrelay enabled"):
        kubeadm_config.rollback(core, tmp_path, force=False)
    assert edited == _document(core)

    kubeadm_config.rollback(core, tmp_path, force=True)
    assert original == _document(core)


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_a_damaged_backup_restores_nothing(core: Any, tmp_path: Path, damage: str) -> None:
    """The kept original missing or altered: a clear error, the ConfigMap as enable left it."""
    _create(core, "v1.37")
    kubeadm_config.enable(core, tmp_path, KUBEADM_TARGET, dry_run=False)
    written = _document(core)
    original = tmp_path / kubeadm_config.ORIGINAL
    if damage == "missing":
        original.unlink()
    else:
        original.write_text("apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\n")

    with pytest.raises(BackupError, match=f"{damage if damage == 'missing' else 'altered'}"):
        kubeadm_config.rollback(core, tmp_path, force=True)
    assert written == _document(core)


def test_an_enable_run_offline_is_finished_by_the_next_one(
    plane: ControlPlane, core: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """enable --no-wait (offline) leaves kubeadm-config alone; the next enable, with the
    cluster answering, finds audit logging on (nothing else changes) and adds the manifest's
    settings to the ConfigMap; rollback restores both."""
    original = _create(core, "v1.37")
    manifest = tmp_path / "etc/kubernetes/manifests/kube-apiserver.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes((DATA / "kubeadm-v1.37" / "kube-apiserver.yaml").read_bytes())
    at = ["--host-root", str(tmp_path), "--kubeconfig", str(plane.kubeconfig(ADMIN_USER))]

    assert 0 == main(["audit", "enable", *at, "--no-wait"])
    assert original == _document(core)
    written = manifest.read_bytes()
    capsys.readouterr()
    assert 0 == main(["audit", "enable", *at])
    out = capsys.readouterr().out

    assert "audit logging is already on: nothing changed" in out
    assert written == manifest.read_bytes()
    kept = yaml.safe_load(_document(core))["apiServer"]["extraArgs"]
    assert {"name": "audit-log-path", "value": str(KUBEADM_TARGET.log_path)} in kept
    assert 0 == main(["audit", "rollback", *at, "--no-wait"])
    assert original == _document(core)


def test_rollback_restores_the_node_even_when_the_cluster_does_not_answer(
    plane: ControlPlane, core: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The node's manifest comes first: with the cluster unreachable rollback restores it,
    exits 1 naming the ConfigMap it could not restore and keeps that backup; the next
    rollback, with the cluster answering, restores the ConfigMap."""
    original = _create(core, "v1.30")
    node = tmp_path / "node"
    manifest = node / "etc/kubernetes/manifests/kube-apiserver.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes((DATA / "kubeadm-v1.30" / "kube-apiserver.yaml").read_bytes())
    reachable = ["--host-root", str(node), "--kubeconfig", str(plane.kubeconfig(ADMIN_USER))]
    main(["audit", "enable", *reachable, "--no-wait"])
    main(["audit", "enable", *reachable])  # the ConfigMap, through the API
    closed_port = tmp_path / "unreachable.kubeconfig"
    closed_port.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', "
        "insecure-skip-tls-verify: true}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "users: [{name: u, user: {token: x}}]\n"
    )
    capsys.readouterr()

    code = main(
        [
            "audit",
            "rollback",
            "--host-root",
            str(node),
            "--kubeconfig",
            str(closed_port),
            "--no-wait",
        ]
    )
    reason = capsys.readouterr().err

    assert 1 == code
    assert manifest.read_bytes() == (DATA / "kubeadm-v1.30" / "kube-apiserver.yaml").read_bytes()
    assert "kubeadm-config not restored" in reason
    assert original != _document(core)
    assert 0 == main(["audit", "rollback", *reachable, "--no-wait"])
    assert original == _document(core)
