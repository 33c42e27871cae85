"""kubeadm's kube-apiserver manifest as kubeadm itself writes it, for three Kubernetes minor
versions (tests/audit/make_kubeadm_manifests.py made them): the audit edit adds lines and
changes no other byte; the ClusterConfiguration gets the same settings in its version's shape."""

from __future__ import annotations

import difflib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from auditrelay.audit.errors import AuditSetupError
from auditrelay.audit.kubeadm import (
    KUBEADM_TARGET,
    parse_static_pod,
    plan_cluster_configuration,
    plan_enable,
)

DATA = Path(__file__).resolve().parents[1] / "audit" / "data"
RELEASES = sorted(DATA.glob("kubeadm-v1.*"))
if len(RELEASES) < 3:
    pytest.fail(f"{DATA}: expected kubeadm-v1.* for three releases", pytrace=False)

AUDIT_FLAGS = {
    "--audit-policy-file=/etc/kubernetes/audit/policy.yaml",
    "--audit-log-path=/var/log/kubernetes/audit/audit.log",
    "--audit-log-format=json",
    "--audit-log-maxage=30",
    "--audit-log-maxbackup=10",
    "--audit-log-maxsize=100",
}


def _release_id(path: Path) -> str:
    return path.name


@pytest.fixture(params=RELEASES, ids=_release_id)
def release(request: pytest.FixtureRequest) -> Path:
    directory: Path = request.param
    return directory


def test_kubeadm_manifest_is_off(release: Path) -> None:
    """kubeadm leaves audit logging off: no policy file, no log path."""
    pod = parse_static_pod((release / "kube-apiserver.yaml").read_text(), "kube-apiserver.yaml")

    assert (False, None, None) == (pod.audit.on, pod.audit.policy_file, pod.audit.log_path)


def test_enable_only_adds_lines(release: Path) -> None:
    """The edit inserts whole lines and keeps every other byte of kubeadm's manifest."""
    original = (release / "kube-apiserver.yaml").read_text()
    edit = plan_enable(parse_static_pod(original, "m"), KUBEADM_TARGET)
    diff = list(
        difflib.ndiff(original.splitlines(keepends=True), edit.text.splitlines(keepends=True))
    )

    assert [] == [line for line in diff if line.startswith("- ")]
    assert original == "".join(line[2:] for line in diff if line.startswith("  "))


def test_enabled_manifest_runs_with_audit_flags_and_mounts(release: Path) -> None:
    """After the edit the container has every audit flag, the policy file and the log
    directory on hostPath volumes, and the rest of the pod is as kubeadm wrote it."""
    original = (release / "kube-apiserver.yaml").read_text()
    edit = plan_enable(parse_static_pod(original, "m"), KUBEADM_TARGET)
    after = parse_static_pod(edit.text, "m")

    assert AUDIT_FLAGS <= set(after.container["command"])
    assert PurePosixPath("/etc/kubernetes/audit/policy.yaml") == after.host_path(
        "/etc/kubernetes/audit/policy.yaml"
    )
    assert PurePosixPath("/var/log/kubernetes/audit/audit.log") == after.host_path(
        "/var/log/kubernetes/audit/audit.log"
    )
    before = yaml.safe_load(original)
    assert before["metadata"] == after.document["metadata"]
    assert before["spec"]["containers"][0]["livenessProbe"] == after.container["livenessProbe"]


def test_already_audited_manifest_is_on(release: Path) -> None:
    """kubeadm's manifest from a ClusterConfiguration with audit extraArgs reads as on; its
    hostPath volumes are recognised (a plan would add only the flag it lacks, never a volume)."""
    text = (release / "kube-apiserver-audited.yaml").read_text()
    pod = parse_static_pod(text, "kube-apiserver-audited.yaml")

    assert pod.audit.on
    assert "/etc/kubernetes/audit/policy.yaml" == pod.audit.policy_file
    assert ("added --audit-log-format=json to command",) == plan_enable(pod, KUBEADM_TARGET).changes


def test_cluster_configuration_gets_the_flags_in_its_shape(release: Path) -> None:
    """v1beta3 extraArgs is a map, v1beta4 a list of {name, value}; both get every flag and
    the two extraVolumes, and the rest of the document stays."""
    text = (release / "cluster-configuration.yaml").read_text()
    before = yaml.safe_load(text)
    after = yaml.safe_load(plan_cluster_configuration(text, "cc.yaml", KUBEADM_TARGET).text)
    args = after["apiServer"]["extraArgs"]
    if before["apiVersion"].endswith("v1beta3"):
        flags = dict(args)
    else:
        flags = {arg["name"]: arg["value"] for arg in args}

    assert KUBEADM_TARGET.flags() == flags
    assert ["audit-policy", "audit-log"] == [v["name"] for v in after["apiServer"]["extraVolumes"]]
    assert {k: v for k, v in before.items() if k != "apiServer"} == {
        k: v for k, v in after.items() if k != "apiServer"
    }


def test_releases_cover_both_cluster_configuration_versions() -> None:
    """The data spans kubeadm's v1beta3 and v1beta4 ClusterConfiguration."""
    versions = {
        yaml.safe_load((release / "cluster-configuration.yaml").read_text())["apiVersion"]
        for release in RELEASES
    }

    assert {"kubeadm.k8s.io/v1beta3", "kubeadm.k8s.io/v1beta4"} == versions


def test_comments_and_quoting_survive() -> None:
    """An operator's comments, quoted strings and blank lines stay byte for byte."""
    original = (RELEASES[-1] / "kube-apiserver.yaml").read_text()
    commented = original.replace(
        "    - kube-apiserver\n", '    # the API server, hand-tuned\n    - "kube-apiserver"\n'
    ).replace("  hostNetwork: true\n", "\n  hostNetwork: true  # needed\n")
    edit = plan_enable(parse_static_pod(commented, "m"), KUBEADM_TARGET)
    diff = list(
        difflib.ndiff(commented.splitlines(keepends=True), edit.text.splitlines(keepends=True))
    )

    assert commented == "".join(line[2:] for line in diff if line.startswith("  "))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Pod\nspec: [unclosed\n", "not valid YAML"),
        ("apiVersion: v1\nkind: ConfigMap\ndata: {}\n", "kind: expected Pod"),
        (
            "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: etcd\n    command: [etcd]\n",
            "no kube-apiserver container",
        ),
        (
            "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: kube-apiserver\n    command: [kube-apiserver, --secure-port=6443]\n",
            "flow-style",
        ),
    ],
    ids=["malformed", "not-a-pod", "no-apiserver", "flow-style"],
)
def test_unusable_manifests_are_refused(text: str, message: str) -> None:
    """Each problem is named; nothing is planned."""
    with pytest.raises(AuditSetupError, match=message):
        plan_enable(parse_static_pod(text, "kube-apiserver.yaml"), KUBEADM_TARGET)


def test_cluster_configuration_of_unknown_version_is_refused() -> None:
    """Only v1beta3 and v1beta4 have a known extraArgs shape."""
    text = "apiVersion: kubeadm.k8s.io/v1beta2\nkind: ClusterConfiguration\n"

    with pytest.raises(AuditSetupError, match=r"expected kubeadm\.k8s\.io/v1beta3 or v1beta4"):
        plan_cluster_configuration(text, "cc.yaml", KUBEADM_TARGET)
