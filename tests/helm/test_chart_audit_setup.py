"""The chart's audit-logging setup step (templates/audit-setup*.yaml): on by default, one value
turns it off, the only privileged part, and only a hook Job that is gone once it succeeded."""

from __future__ import annotations

from typing import Any

from helm.conftest import Render, Rendered, ci_file

NODES = {"auditSetup.nodes": "{cp-1,cp-2}"}


def _jobs(rendered: Rendered) -> list[dict[str, Any]]:
    return rendered.all("Job")


def _privileged(rendered: Rendered) -> list[str]:
    """Names of every object whose pod runs a privileged container."""
    found = []
    for item in rendered.objects:
        spec = item.get("spec", {})
        pod = spec.get("template", {}).get("spec") or (spec if item["kind"] == "Pod" else {})
        containers = pod.get("containers", []) + pod.get("initContainers", [])
        if any(c.get("securityContext", {}).get("privileged") for c in containers):
            found.append(f"{item['kind']}/{item['metadata']['name']}")
    return found


def test_on_by_default_one_job_per_node_and_phase(render: Render) -> None:
    """Without any auditSetup value but the nodes, each control-plane node gets an enable Job
    (post-install/upgrade) and a rollback Job (pre-delete), pinned to it."""
    rendered = render(ci_file("default-values"), set_values=NODES)
    jobs = {
        (
            job["spec"]["template"]["spec"]["nodeName"],
            job["spec"]["template"]["spec"]["containers"][0]["command"][2],
        ): job
        for job in _jobs(rendered)
    }

    assert {
        ("cp-1", "enable"),
        ("cp-1", "rollback"),
        ("cp-2", "enable"),
        ("cp-2", "rollback"),
    } == set(jobs)
    enable = jobs["cp-1", "enable"]["metadata"]["annotations"]
    rollback = jobs["cp-2", "rollback"]["metadata"]["annotations"]
    assert "post-install,post-upgrade" == enable["helm.sh/hook"]
    assert "pre-delete" == rollback["helm.sh/hook"]
    assert "before-hook-creation,hook-succeeded" == enable["helm.sh/hook-delete-policy"]


def test_one_node_at_a_time(render: Render) -> None:
    """Each node's Jobs have their own hook weight: Helm runs them one after the other, so the
    API servers restart one at a time."""
    rendered = render(ci_file("default-values"), set_values=NODES)
    weights = {
        job["spec"]["template"]["spec"]["nodeName"]: job["metadata"]["annotations"][
            "helm.sh/hook-weight"
        ]
        for job in _jobs(rendered)
    }

    assert {"cp-1": "0", "cp-2": "1"} == weights


def test_enable_job_runs_the_cli_on_the_node_root(render: Render) -> None:
    """The Job runs `auditrelay audit enable` against the node's root at /host, with the backup
    outside the manifests directory and the configured timeout; rollback tolerates a node
    where enable changed nothing."""
    rendered = render(
        ci_file("default-values"), set_values=NODES | {"auditSetup.timeoutSeconds": "120"}
    )
    pods = {job["metadata"]["name"]: job["spec"]["template"]["spec"] for job in _jobs(rendered)}
    enable = next(pod for name, pod in pods.items() if "-audit-enable-0" in name)
    rollback = next(pod for name, pod in pods.items() if "-audit-rollback-0" in name)
    command = enable["containers"][0]["command"]

    assert ["auditrelay", "audit", "enable", "--distro=kubeadm", "--host-root=/host"] == command[:5]
    assert "--backup-dir=/host/var/lib/auditrelay/audit-backup" in command
    assert "--timeout=120" in command
    assert "--missing-ok" in rollback["containers"][0]["command"]
    assert {"path": "/", "type": "Directory"} == enable["volumes"][0]["hostPath"]
    assert (True, False) == (enable["hostNetwork"], enable["automountServiceAccountToken"])


def test_rancher_distros_restart_their_server_through_the_host(render: Render) -> None:
    """k3s and RKE2 read their config at start: the Job restarts the service via the host's
    systemd (nsenter into PID 1, hence hostPID)."""
    for distro, unit in (("k3s", "k3s"), ("rke2", "rke2-server")):
        rendered = render(ci_file("default-values"), set_values=NODES | {"auditLog.distro": distro})
        pod = _jobs(rendered)[0]["spec"]["template"]["spec"]
        command = pod["containers"][0]["command"]

        assert f"--distro={distro}" in command
        assert any(word.endswith(f"systemctl restart {unit}") for word in command)
        assert pod["hostPID"] is True


def test_off_renders_nothing_privileged(render: Render, ci_values: Any) -> None:
    """auditSetup.enabled=false: no Job, and no privileged container anywhere in the chart."""
    rendered = render(ci_values, set_values=NODES | {"auditSetup.enabled": "false"})

    assert [] == _jobs(rendered)
    assert [] == _privileged(rendered)


def test_the_setup_jobs_are_the_only_privileged_part(render: Render) -> None:
    """With the setup on, the per-node Jobs are the only objects that run privileged."""
    rendered = render(ci_file("default-values"), set_values=NODES)

    assert sorted(f"Job/{job['metadata']['name']}" for job in _jobs(rendered)) == sorted(
        _privileged(rendered)
    )


def test_openshift_moves_the_profile_with_minimal_rbac(render: Render) -> None:
    """On OpenShift one unprivileged Job per phase changes the APIServer resource; its
    ClusterRole may get and update apiservers/cluster and nothing else."""
    rendered = render(ci_file("openshift-values"))
    role = rendered.one("ClusterRole")
    jobs = _jobs(rendered)

    assert [
        {
            "apiGroups": ["config.openshift.io"],
            "resources": ["apiservers"],
            "resourceNames": ["cluster"],
            "verbs": ["get", "update"],
        }
    ] == role["rules"]
    assert ["enable", "rollback"] == sorted(
        job["spec"]["template"]["spec"]["containers"][0]["command"][2] for job in jobs
    )
    assert [] == _privileged(rendered)
    assert role["metadata"]["name"] == rendered.one("ClusterRoleBinding")["roleRef"]["name"]


def test_openshift_off_renders_no_rbac(render: Render) -> None:
    """auditSetup.enabled=false on OpenShift: no Job, no ClusterRole, no binding."""
    rendered = render(ci_file("openshift-values"), set_values={"auditSetup.enabled": "false"})

    for kind in ("Job", "ClusterRole", "ClusterRoleBinding"):
        assert [] == rendered.all(kind)


def test_managed_distributions_get_no_setup(render: Render) -> None:
    """AKS Engine manages its API server's flags itself: nothing to set up there."""
    rendered = render(
        ci_file("default-values"), set_values=NODES | {"auditLog.distro": "aksEngine"}
    )

    assert [] == _jobs(rendered)
