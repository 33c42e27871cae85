"""``auditrelay audit status|enable|rollback`` on a node's files (``--host-root`` a temporary
directory, ``--no-wait``: the API server itself is the control-plane tests' part)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from auditrelay.audit.files import sha256
from auditrelay.cli import main
from fixtures.disks import read_only_directory

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "audit" / "data"
KUBEADM = sorted(DATA.glob("kubeadm-v1.*"))[-1] / "kube-apiserver.yaml"
KUBEADM_AUDITED = KUBEADM.with_name("kube-apiserver-audited.yaml")
MANIFEST = Path("etc/kubernetes/manifests/kube-apiserver.yaml")
BACKUP = Path("var/lib/auditrelay/audit-backup")
if not KUBEADM.is_file():
    pytest.fail(f"{KUBEADM}: the kubeadm test data is missing", pytrace=False)


def _node(root: Path, manifest: Path = KUBEADM) -> Path:
    """A control-plane node's root holding kubeadm's manifest; returns the manifest path."""
    path = root / MANIFEST
    path.parent.mkdir(parents=True)
    shutil.copyfile(manifest, path)
    return path


def _audit(*args: str) -> int:
    return main(["audit", *args])


def _json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    report: dict[str, object] = json.loads(capsys.readouterr().out)
    return report


def test_status_reports_off_then_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status exits 1 while audit logging is off, 0 once enable turned it on with the bundled
    policy (nothing missing in the policy verify verdict)."""
    _node(tmp_path)
    off = _audit("status", "--host-root", str(tmp_path), "--output", "json")
    off_report = _json(capsys)
    _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    capsys.readouterr()
    on = _audit("status", "--host-root", str(tmp_path), "--output", "json")
    on_report = _json(capsys)

    assert (1, "off") == (off, off_report["state"])
    assert (0, "on", []) == (on, on_report["state"], on_report["missing"])


def test_enable_then_rollback_restores_the_original_bytes(tmp_path: Path) -> None:
    """rollback puts back kubeadm's manifest byte for byte and removes the installed policy;
    the backup lives outside the manifests directory."""
    manifest = _node(tmp_path)
    original = manifest.read_bytes()

    assert 0 == _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    assert original != manifest.read_bytes()
    assert ["kube-apiserver.yaml"] == [p.name for p in manifest.parent.iterdir()]
    assert (tmp_path / "etc/kubernetes/audit/policy.yaml").read_bytes() == (
        REPO / "audit_policy.yaml"
    ).read_bytes()
    assert 0 == _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    assert original == manifest.read_bytes()
    assert not (tmp_path / "etc/kubernetes/audit/policy.yaml").exists()


def test_enable_twice_changes_nothing_the_second_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second enable finds audit logging on and writes nothing."""
    manifest = _node(tmp_path)
    _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    after_first = manifest.read_bytes(), manifest.stat().st_mtime_ns
    capsys.readouterr()

    code = _audit("enable", "--host-root", str(tmp_path), "--no-wait", "--output", "json")

    assert (0, "unchanged") == (code, _json(capsys)["action"])
    assert after_first == (manifest.read_bytes(), manifest.stat().st_mtime_ns)


def test_rollback_twice_is_a_no_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second rollback says it was already done and exits 0."""
    _node(tmp_path)
    _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    capsys.readouterr()

    code = _audit("rollback", "--host-root", str(tmp_path), "--no-wait", "--output", "json")

    assert (0, "nothing-to-do") == (code, _json(capsys)["action"])


def test_already_audited_manifest_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest with audit flags: enable changes nothing (exit 0) and reports the policy
    verify verdict (the node's policy records less than required: the gaps are listed)."""
    manifest = _node(tmp_path, KUBEADM_AUDITED)
    policy = tmp_path / "etc/kubernetes/audit/policy.yaml"
    policy.parent.mkdir(parents=True)
    policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n")
    before = manifest.read_bytes()

    code = _audit("enable", "--host-root", str(tmp_path), "--no-wait", "--output", "json")
    report = _json(capsys)

    assert (0, "unchanged") == (code, report["action"])
    assert any("RequestResponse required" in str(note) for note in report["notes"])  # type: ignore[attr-defined]
    assert before == manifest.read_bytes()


def test_replace_policy_installs_ours_and_restarts_through_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--replace-policy on a node whose audit logging is on: the node's policy file gets the
    required policy, the manifest only an annotation with its checksum (so the kubelet restarts
    kube-apiserver); rollback puts both back byte for byte."""
    manifest = _node(tmp_path, KUBEADM_AUDITED)
    policy = tmp_path / "etc/kubernetes/audit/policy.yaml"
    policy.parent.mkdir(parents=True)
    policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n")
    before = manifest.read_bytes(), policy.read_bytes()
    bundled = (REPO / "audit_policy.yaml").read_bytes()

    code = _audit("enable", "--host-root", str(tmp_path), "--no-wait", "--replace-policy")
    added = set(manifest.read_text().splitlines()) - set(before[0].decode().splitlines())

    assert (0, bundled) == (code, policy.read_bytes())
    assert {f"    auditrelay.io/audit-policy-sha256: {sha256(bundled)}"} == added
    capsys.readouterr()
    assert 0 == _audit("status", "--host-root", str(tmp_path))
    assert 0 == _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    assert before == (manifest.read_bytes(), policy.read_bytes())


def test_dry_run_prints_the_diff_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run prints the unified diff of the manifest and leaves every file as it was."""
    manifest = _node(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    assert 0 == _audit("enable", "--host-root", str(tmp_path), "--dry-run")
    out = capsys.readouterr().out

    assert "+    - --audit-policy-file=/etc/kubernetes/audit/policy.yaml\n" in out
    assert f"--- {manifest} (now)" in out
    assert before == sorted(str(p) for p in tmp_path.rglob("*"))


def test_rollback_refuses_when_the_manifest_changed_since(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone edited the manifest after enable: rollback refuses (exit 1) and names the file;
    --force restores the original anyway."""
    manifest = _node(tmp_path)
    original = manifest.read_bytes()
    _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    edited = manifest.read_bytes() + b"# edited by hand\n"
    manifest.write_bytes(edited)

    refused = _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    message = capsys.readouterr().err

    assert (1, edited) == (refused, manifest.read_bytes())
    assert f"{manifest} changed since auditrelay enabled" in message
    assert 0 == _audit("rollback", "--host-root", str(tmp_path), "--no-wait", "--force")
    assert original == manifest.read_bytes()


def test_tampered_backup_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A backup whose bytes no longer match their recorded sha256 is never restored (exit 2)."""
    manifest = _node(tmp_path)
    _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    enabled = manifest.read_bytes()
    (tmp_path / BACKUP / "kubeadm" / "original-0").write_bytes(b"kind: Pod\n")

    code = _audit("rollback", "--host-root", str(tmp_path), "--no-wait")

    assert 2 == code
    assert "does not match its recorded sha256" in capsys.readouterr().err
    assert enabled == manifest.read_bytes()


def test_missing_backup_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The original's copy is gone: a clear error, the manifest stays as enable left it; and
    a node where enable never ran has no backup at all: a clear error too."""
    manifest = _node(tmp_path)
    never = _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    never_message = capsys.readouterr().err
    _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    enabled = manifest.read_bytes()
    (tmp_path / BACKUP / "kubeadm" / "original-0").unlink()

    code = _audit("rollback", "--host-root", str(tmp_path), "--no-wait")

    missing_ok = _audit(
        "rollback", "--host-root", str(tmp_path), "--distro", "k3s", "--no-wait", "--missing-ok"
    )

    assert (2, 2, 0) == (never, code, missing_ok)
    assert "no backup here" in never_message
    assert "the backup of" in capsys.readouterr().err
    assert enabled == manifest.read_bytes()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"apiVersion: v1\nkind: Pod\nspec: [unclosed\n", "not valid YAML"),
        (b"apiVersion: v1\nkind: Service\nspec: {}\n", "kind: expected Pod"),
    ],
    ids=["malformed-yaml", "not-a-pod"],
)
def test_unusable_manifest_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: bytes, message: str
) -> None:
    """A manifest enable cannot read as a kube-apiserver pod: exit 2, the file named, no
    backup and no policy written."""
    manifest = tmp_path / MANIFEST
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(text)

    code = _audit("enable", "--host-root", str(tmp_path), "--no-wait")

    err = capsys.readouterr().err
    assert 2 == code
    assert f"{manifest}: " in err
    assert message in err
    assert [manifest] == [p for p in tmp_path.rglob("*") if p.is_file()]


def test_read_only_manifest_directory_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The manifests directory cannot be written: exit 2 before any file (backup, policy) is."""
    with read_only_directory(tmp_path, {"kube-apiserver.yaml": KUBEADM.read_bytes()}) as manifests:
        backup = tmp_path / "backup"
        code = _audit(
            "enable",
            "--manifest",
            str(manifests / "kube-apiserver.yaml"),
            "--host-root",
            str(tmp_path / "root"),
            "--backup-dir",
            str(backup),
            "--no-wait",
        )

        assert 2 == code
        assert f"{manifests}: directory is not writable" in capsys.readouterr().err
        assert KUBEADM.read_bytes() == (manifests / "kube-apiserver.yaml").read_bytes()
        assert not (tmp_path / "root").exists()
        assert not (backup / "kubeadm").exists()


def test_invalid_required_policy_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """enable will not install a policy kube-apiserver refuses (it would not start)."""
    manifest = _node(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Verbose\n")

    code = _audit("enable", "--host-root", str(tmp_path), "--no-wait", "--policy", str(bad))

    assert 2 == code
    assert "rules[0].level" in capsys.readouterr().err
    assert KUBEADM.read_bytes() == manifest.read_bytes()


def test_cluster_configuration_is_written_beside_the_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--cluster-config: the same settings for the kubeadm-config ConfigMap, to apply."""
    _node(tmp_path)
    cluster_config = KUBEADM.with_name("cluster-configuration.yaml")

    code = _audit(
        "enable", "--host-root", str(tmp_path), "--no-wait", "--cluster-config", str(cluster_config)
    )
    written = tmp_path / BACKUP / "kubeadm" / "cluster-configuration.yaml"

    assert 0 == code
    assert "audit-policy-file" in written.read_text()
    assert str(written) in capsys.readouterr().out


def test_no_wait_leaves_the_cluster_alone_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-wait (offline) never asks the cluster: no kubeadm-config backup, and the output
    says the ConfigMap was not changed and how to get it changed (the API path is tested
    against a real kube-apiserver in tests/controlplane/test_audit_kubeadm_config.py)."""
    _node(tmp_path)

    code = _audit("enable", "--host-root", str(tmp_path), "--no-wait")

    assert 0 == code
    assert "kubeadm-config not changed (--no-wait" in capsys.readouterr().out
    assert not (tmp_path / BACKUP / "kubeadm" / "kubeadm-config.json").exists()


def test_an_unreachable_cluster_is_named_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run reads the kubeadm-config ConfigMap; a cluster that does not answer (a closed
    port) is reported in the output, and the manifest's diff is still printed."""
    _node(tmp_path / "node")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', "
        "insecure-skip-tls-verify: true}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "users: [{name: u, user: {token: not-a-secret}}]\n"
    )

    code = _audit(
        "enable",
        "--host-root",
        str(tmp_path / "node"),
        "--dry-run",
        "--kubeconfig",
        str(kubeconfig),
    )
    out = capsys.readouterr().out

    assert 0 == code
    assert "+    - --audit-log-format=json" in out
    assert "kubeadm-config: cannot plan its change: configmap kube-system/kubeadm-config: " in out
    assert "cannot reach the API server" in out
    assert "not-a-secret" not in out


def test_record_names_what_changed(tmp_path: Path) -> None:
    """The backup record holds each file's original and written sha256."""
    manifest = _node(tmp_path)
    original = manifest.read_bytes()
    _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    record = json.loads((tmp_path / BACKUP / "kubeadm" / "record.json").read_bytes())

    assert [sha256(original), None] == [f["original_sha256"] for f in record["files"]]
    assert sha256(manifest.read_bytes()) == record["files"][0]["written_sha256"]
    assert any("--audit-log-format=json" in change for change in record["changes"])


# ---------------------------------------------------------------------------------------------
# k3s and RKE2


def _rancher_node(root: Path, distro: str, fixture: str) -> Path:
    config = root / "etc" / "rancher" / distro / "config.yaml"
    config.parent.mkdir(parents=True)
    shutil.copyfile(DATA / distro / fixture, config)
    return config


def test_k3s_enable_adds_apiserver_args_and_rolls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """k3s: the audit flags join the kube-apiserver-arg list (comments and the existing
    entries stay), the policy and the log directory are created; rollback restores the file."""
    config = _rancher_node(tmp_path, "k3s", "config.yaml")
    original = config.read_bytes()

    assert 0 == _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    text = config.read_text()
    assert text.startswith(original.decode())
    assert (
        '  - "audit-policy-file=/var/lib/rancher/k3s/server/audit.yaml"\n' not in original.decode()
    )
    assert "  - audit-policy-file=/var/lib/rancher/k3s/server/audit.yaml\n" in text
    assert (tmp_path / "var/lib/rancher/k3s/server/audit.yaml").is_file()
    assert (tmp_path / "var/lib/rancher/k3s/server/logs").is_dir()
    capsys.readouterr()
    assert 0 == _audit("status", "--host-root", str(tmp_path))
    assert 0 == _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    assert original == config.read_bytes()


def test_k3s_audited_config_is_left_alone(tmp_path: Path) -> None:
    """The hardening guide's config has audit logging on: enable writes nothing (the policy
    file it names is missing, so status cannot tell what it records: exit 2)."""
    config = _rancher_node(tmp_path, "k3s", "config-audited.yaml")
    before = config.read_bytes()

    assert 2 == _audit("status", "--host-root", str(tmp_path))
    assert before == config.read_bytes()


def test_k3s_without_config_file_gets_one_and_loses_it_on_rollback(tmp_path: Path) -> None:
    """k3s runs without a config file; enable creates it, rollback removes it again."""
    (tmp_path / "var/lib/rancher/k3s/server").mkdir(parents=True)
    (tmp_path / "etc/rancher/k3s").mkdir(parents=True)
    config = tmp_path / "etc/rancher/k3s/config.yaml"

    assert 0 == _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    assert config.read_text().startswith("kube-apiserver-arg:\n- audit-policy-file=")
    assert 0 == _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    assert not config.exists()


def test_rke2_enable_sets_the_policy_file(tmp_path: Path) -> None:
    """RKE2: one key, audit-policy-file, and the policy written there (RKE2 adds the log path
    and rotation itself); rollback restores the file byte for byte."""
    config = _rancher_node(tmp_path, "rke2", "config.yaml")
    original = config.read_bytes()

    assert 0 == _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    assert (
        original + b"audit-policy-file: /etc/rancher/rke2/audit-policy.yaml\n"
        == config.read_bytes()
    )
    assert 0 == _audit("status", "--host-root", str(tmp_path))
    assert 0 == _audit("rollback", "--host-root", str(tmp_path), "--no-wait")
    assert original == config.read_bytes()


def test_rke2_cis_without_policy_file_logs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """profile: cis turns auditing on, but with no policy file RKE2 writes a `level: None`
    one: status says on-but-gaps (exit 1) and why; enable leaves the config alone and writes
    the required policy where RKE2 would have written its empty one."""
    config = _rancher_node(tmp_path, "rke2", "config-cis.yaml")
    before = config.read_bytes()

    code = _audit("status", "--host-root", str(tmp_path), "--output", "json")
    report = _json(capsys)

    assert (1, "on-but-gaps") == (code, report["state"])
    assert "records nothing" in str(report["problems"])
    assert 0 == _audit("enable", "--host-root", str(tmp_path), "--no-wait")
    assert before == config.read_bytes()
    assert (REPO / "audit_policy.yaml").read_bytes() == (
        tmp_path / "etc/rancher/rke2/audit-policy.yaml"
    ).read_bytes()
    assert 0 == _audit("status", "--host-root", str(tmp_path))


def test_rke2_policy_with_only_none_rules_is_a_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The policy RKE2 writes when it finds none (one `level: None` rule) records nothing."""
    _rancher_node(tmp_path, "rke2", "config-cis.yaml")
    policy = tmp_path / "etc/rancher/rke2/audit-policy.yaml"
    policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: None\n")

    code = _audit("status", "--host-root", str(tmp_path), "--output", "json")
    report = _json(capsys)

    assert (1, "on-but-gaps") == (code, report["state"])
    assert "records nothing" in str(report["problems"])


def test_no_known_distribution_cannot_tell(tmp_path: Path) -> None:
    """An empty root: status exits 2 (cannot tell); enable refuses with exit 2."""
    assert 2 == _audit("status", "--host-root", str(tmp_path))
    assert 2 == _audit("enable", "--host-root", str(tmp_path), "--no-wait")
