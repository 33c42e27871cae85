"""The traffic Defender for Kubernetes looks for, produced through the real API with kubectl.

Each ``Step`` runs one kubectl command as one identity and names the audit events it must leave
(``Expectation``: who, what, and the lowest level at which Defender can still see it). Noise is
made the way a cluster makes it: the controllers and scheduler run anyway (leases, watches,
events); the scenario adds discovery, health and version probes, kube-proxy's and a kubelet's
read-only calls, and events. ``Noise`` entries describe what a Defender policy should drop.
``run(plane, kubectl)`` drives it against a started ``cluster.ControlPlane``.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from controlplane.cluster import (
    ADMIN_USER,
    ANONYMOUS,
    DEVELOPER_USER,
    HARNESS_USER,
    KUBE_PROXY_USER,
    NODE_USER,
    ControlPlane,
    ControlPlaneError,
    https_get,
    wait_until,
)

NAMESPACE = "scenario"
IMAGE = "registry.k8s.io/pause:3.10"
LEVELS = ("None", "Metadata", "Request", "RequestResponse")
ANONYMOUS_USERNAME = "system:anonymous"
# A pod's status as a kubelet would report it: there is no kubelet to set it.
RUNNING: Final[Mapping[str, Any]] = {"status": {"phase": "Running"}}
IMPERSONATED_SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:default"

Event = Mapping[str, Any]


def _path(event: Event) -> str:
    return str(event.get("requestURI", "")).split("?")[0]


def level_rank(level: str) -> int:
    return LEVELS.index(level)


@dataclass(frozen=True)
class Expectation:
    """One audit event a step must leave, and the level range a Defender policy promises.

    ``user`` is the authenticated user name; "" for a request whose authentication failed.
    """

    need: str
    user: str
    verbs: tuple[str, ...]
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    api_group: str = ""
    path: str | None = None
    impersonated_user: str | None = None
    min_level: str = "Metadata"
    max_level: str = "RequestResponse"

    def matches(self, event: Event) -> bool:
        if event.get("user", {}).get("username", "") != self.user:
            return False
        if event.get("verb") not in self.verbs:
            return False
        impersonated = event.get("impersonatedUser", {}).get("username")
        if self.impersonated_user is not None and impersonated != self.impersonated_user:
            return False
        if self.path is not None:
            return _path(event) == self.path
        ref = event.get("objectRef", {})
        return bool(
            ref.get("resource") == self.resource
            and ref.get("subresource") == self.subresource
            and ref.get("namespace") == self.namespace
            and (self.name is None or ref.get("name") == self.name)
            and ref.get("apiGroup", "") == self.api_group
        )

    def describe(self) -> str:
        target = self.path or "/".join(
            part
            for part in (self.api_group, self.namespace, self.resource, self.name, self.subresource)
            if part
        )
        return f"{self.need}: {self.user} {'|'.join(self.verbs)} {target}"


@dataclass(frozen=True)
class Noise:
    """A kind of background request that a Defender policy drops (``matches`` picks it out)."""

    name: str
    matches: Callable[[Event], bool]


@dataclass(frozen=True)
class Step:
    """One kubectl invocation as one identity.

    ``succeeds`` is False when the API must refuse it, None when either outcome is fine (a
    watch that kubectl ends at its request timeout). A step with ``raw_get`` sends that one GET
    without any credentials instead of running kubectl (kubectl asks for a user name when a
    kubeconfig has none): what an anonymous scanner does.
    """

    name: str
    identity: str
    args: tuple[str, ...]
    manifest: Mapping[str, Any] | None = None
    succeeds: bool | None = True
    raw_get: str | None = None
    expectations: tuple[Expectation, ...] = ()


@dataclass
class StepResult:
    step: Step
    returncode: int
    stdout: str
    stderr: str


@dataclass
class ScenarioRun:
    """What the scenario did: each step's outcome and the secret values it created."""

    results: list[StepResult] = field(default_factory=list)
    secret_values: dict[str, str] = field(default_factory=dict)

    @property
    def expectations(self) -> list[Expectation]:
        return [e for result in self.results for e in result.step.expectations]


def _pod(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": IMAGE}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [container], **spec},
    }


def _workload(kind: str, name: str, namespace: str, pod_spec: dict[str, Any]) -> dict[str, Any]:
    labels = {"app": name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


_PRIVILEGED = {"container": {"securityContext": {"privileged": True}}}
_HOST_MOUNT = {
    "hostPID": True,
    "hostNetwork": True,
    "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
    "container": {"volumeMounts": [{"name": "host", "mountPath": "/host"}]},
}


def _create(
    need: str,
    manifest: dict[str, Any],
    *,
    resource: str,
    api_group: str = "",
    min_level: str = "Request",
) -> Step:
    meta = manifest["metadata"]
    return Step(
        name=f"create {manifest['kind']} {meta.get('namespace', '')}/{meta['name']}",
        identity=ADMIN_USER,
        args=("create", "-f", "-"),
        manifest=manifest,
        expectations=(
            Expectation(
                need=need,
                user=ADMIN_USER,
                verbs=("create",),
                resource=resource,
                namespace=meta.get("namespace"),
                name=meta["name"],
                api_group=api_group,
                min_level=min_level,
            ),
        ),
    )


def merge_patch(
    kind: str, name: str, namespace: str, patch: Mapping[str, Any], *flags: str
) -> tuple[str, ...]:
    """``kubectl patch`` arguments applying the JSON merge ``patch`` to one object."""
    return ("patch", kind, name, "-n", namespace, *flags, "--type=merge", "-p", json.dumps(patch))


def _pod_subresource_step(subresource: str, args: tuple[str, ...]) -> Step:
    """exec/attach/portforward: refused without a kubelet, but audited on the way in."""
    return Step(
        name=f"{subresource} into {NAMESPACE}/privileged",
        identity=ADMIN_USER,
        args=args,
        succeeds=False,
        expectations=(
            Expectation(
                need=f"{subresource} into a pod",
                user=ADMIN_USER,
                verbs=("create", "get"),
                resource="pods",
                subresource=subresource,
                namespace=NAMESPACE,
                name="privileged",
            ),
        ),
    )


def build_steps(secret_value: str) -> list[Step]:
    """The scenario in order; ``secret_value`` is stored in a Secret and must never be logged."""
    pod_spec = _pod("x", NAMESPACE)["spec"]
    privileged_spec = {
        **pod_spec,
        "containers": [{**pod_spec["containers"][0], "securityContext": {"privileged": True}}],
    }
    cluster_admin_binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "scenario-cluster-admin"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "cluster-admin",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}],
    }
    wildcard_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "scenario-wildcard"},
        "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
    }
    wildcard_namespaced_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "scenario-secrets-all", "namespace": NAMESPACE},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["*"]}],
    }

    def service(name: str, kind: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": kind, "selector": {"app": name}, "ports": [{"port": 80}]},
        }

    coredns = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "coredns", "namespace": "kube-system"},
        "data": {"Corefile": ".:53 {\n    forward . /etc/resolv.conf\n}\n"},
    }
    return [
        Step("create namespace", ADMIN_USER, ("create", "namespace", NAMESPACE)),
        _create(
            "privileged container",
            _pod("privileged", NAMESPACE, **_PRIVILEGED),
            resource="pods",
        ),
        _create("host mounts", _pod("host-mount", NAMESPACE, **_HOST_MOUNT), resource="pods"),
        _create(
            "new pod in kube-system",
            _pod("kube-system-sneaky", "kube-system"),
            resource="pods",
        ),
        _create(
            "privileged workload",
            _workload("Deployment", "privileged-deploy", NAMESPACE, privileged_spec),
            resource="deployments",
            api_group="apps",
        ),
        _create(
            "privileged workload",
            _workload("DaemonSet", "host-daemon", "kube-system", privileged_spec),
            resource="daemonsets",
            api_group="apps",
        ),
        Step(
            "mark the privileged pod Running (there is no kubelet)",
            ADMIN_USER,
            merge_patch("pod", "privileged", NAMESPACE, RUNNING, "--subresource=status"),
        ),
        _pod_subresource_step("exec", ("exec", "-n", NAMESPACE, "privileged", "--", "id")),
        _pod_subresource_step("attach", ("attach", "-n", NAMESPACE, "privileged")),
        _pod_subresource_step(
            "portforward", ("port-forward", "-n", NAMESPACE, "pod/privileged", "0:80")
        ),
        _create(
            "binding to cluster-admin",
            cluster_admin_binding,
            resource="clusterrolebindings",
            api_group="rbac.authorization.k8s.io",
        ),
        _create(
            "role with wildcards",
            wildcard_role,
            resource="clusterroles",
            api_group="rbac.authorization.k8s.io",
        ),
        _create(
            "role with wildcards",
            wildcard_namespaced_role,
            resource="roles",
            api_group="rbac.authorization.k8s.io",
        ),
        Step(
            "create a secret",
            ADMIN_USER,
            (
                "create",
                "secret",
                "generic",
                "db-password",
                "-n",
                NAMESPACE,
                f"--from-literal=password={secret_value}",
            ),
            expectations=(
                Expectation(
                    "secret access",
                    ADMIN_USER,
                    ("create",),
                    "secrets",
                    namespace=NAMESPACE,
                    name="db-password",
                    max_level="Metadata",
                ),
            ),
        ),
        Step(
            "read a secret",
            ADMIN_USER,
            ("get", "secret", "db-password", "-n", NAMESPACE, "-o", "json"),
            expectations=(
                Expectation(
                    "secret access",
                    ADMIN_USER,
                    ("get",),
                    "secrets",
                    namespace=NAMESPACE,
                    name="db-password",
                    max_level="Metadata",
                ),
            ),
        ),
        Step(
            "list secrets everywhere",
            ADMIN_USER,
            ("get", "secrets", "--all-namespaces", "-o", "json"),
            expectations=(
                Expectation(
                    "secret access", ADMIN_USER, ("list",), "secrets", max_level="Metadata"
                ),
            ),
        ),
        Step(
            "request a service-account token",
            ADMIN_USER,
            ("create", "token", "default", "-n", NAMESPACE),
            expectations=(
                Expectation(
                    "service-account token request",
                    ADMIN_USER,
                    ("create",),
                    "serviceaccounts",
                    subresource="token",
                    namespace=NAMESPACE,
                    name="default",
                ),
            ),
        ),
        Step(
            "anonymous request",
            ANONYMOUS,
            (),
            raw_get="/api/v1/namespaces/kube-system/secrets",
            succeeds=False,
            expectations=(
                Expectation(
                    "anonymous request",
                    ANONYMOUS_USERNAME,
                    ("list",),
                    "secrets",
                    namespace="kube-system",
                ),
            ),
        ),
        Step(
            "request with an invalid token",
            ANONYMOUS,
            ("get", "--raw", "/api/v1/namespaces/kube-system/secrets", "--token=not-a-valid-token"),
            succeeds=False,
            expectations=(
                Expectation(
                    "failed authentication",
                    "",
                    ("list",),
                    "secrets",
                    namespace="kube-system",
                ),
            ),
        ),
        Step(
            "forbidden request",
            DEVELOPER_USER,
            ("get", "secrets", "-n", "kube-system"),
            succeeds=False,
            expectations=(
                Expectation(
                    "forbidden request",
                    DEVELOPER_USER,
                    ("list",),
                    "secrets",
                    namespace="kube-system",
                ),
            ),
        ),
        Step(
            "forbidden exec",
            DEVELOPER_USER,
            ("exec", "-n", NAMESPACE, "privileged", "--", "id"),
            succeeds=False,
            expectations=(
                Expectation(
                    "forbidden request",
                    DEVELOPER_USER,
                    ("get",),
                    "pods",
                    namespace=NAMESPACE,
                    name="privileged",
                ),
            ),
        ),
        Step(
            "impersonate a service account",
            ADMIN_USER,
            ("get", "pods", "-n", NAMESPACE, f"--as={IMPERSONATED_SERVICE_ACCOUNT}"),
            expectations=(
                Expectation(
                    "impersonation",
                    ADMIN_USER,
                    ("list",),
                    "pods",
                    namespace=NAMESPACE,
                    impersonated_user=IMPERSONATED_SERVICE_ACCOUNT,
                ),
            ),
        ),
        _create("exposed service", service("web-nodeport", "NodePort"), resource="services"),
        _create("exposed service", service("web-lb", "LoadBalancer"), resource="services"),
        _create(
            "exposed dashboard",
            service("kubernetes-dashboard", "LoadBalancer", "kube-system"),
            resource="services",
        ),
        _create(
            "kube-system change",
            coredns,
            resource="configmaps",
            min_level="Metadata",
        ),
        Step(
            "rewrite the cluster DNS configuration",
            ADMIN_USER,
            merge_patch(
                "configmap",
                "coredns",
                "kube-system",
                {"data": {"Corefile": ".:53 {\n    forward . 198.51.100.53\n}\n"}},
            ),
            expectations=(
                Expectation(
                    "kube-system DNS change",
                    ADMIN_USER,
                    ("patch",),
                    "configmaps",
                    namespace="kube-system",
                    name="coredns",
                    min_level="Request",
                ),
            ),
        ),
        Step(
            "delete the privileged pod",
            ADMIN_USER,
            ("delete", "pod", "privileged", "-n", NAMESPACE, "--wait=false"),
            expectations=(
                Expectation(
                    "workload deletion",
                    ADMIN_USER,
                    ("delete",),
                    "pods",
                    namespace=NAMESPACE,
                    name="privileged",
                ),
            ),
        ),
    ]


def noise_steps() -> list[Step]:
    """Background requests of a real cluster that the scenario adds to the controllers' own."""
    short_watch = ("--watch", "--request-timeout=2s")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "scenario-noise.1", "namespace": NAMESPACE},
        "involvedObject": {"kind": "Pod", "name": "host-mount", "namespace": NAMESPACE},
        "reason": "Scenario",
        "message": "background noise",
        "type": "Normal",
    }
    return [
        Step("discovery", ADMIN_USER, ("api-resources", "-o", "name")),
        Step("version", ADMIN_USER, ("version", "-o", "json")),
        Step("health", ADMIN_USER, ("get", "--raw", "/healthz")),
        Step("livez", ADMIN_USER, ("get", "--raw", "/livez")),
        Step("an event", ADMIN_USER, ("create", "-f", "-"), manifest=event),
        Step("events", ADMIN_USER, ("get", "events", "-n", NAMESPACE)),
        Step(
            "kube-proxy watches services",
            KUBE_PROXY_USER,
            ("get", "services", "-A", *short_watch),
            succeeds=None,
        ),
        Step(
            "kubelet reads its node",
            NODE_USER,
            ("get", "--raw", "/api/v1/nodes/node-1"),
            succeeds=False,
        ),
    ]


def _is_event_write(event: Event) -> bool:
    ref = event.get("objectRef", {})
    return bool(
        ref.get("resource") == "events"
        and ref.get("apiGroup", "") in ("", "events.k8s.io")
        and event.get("verb") in ("create", "update", "patch")
    )


def _is_lease_renewal(event: Event) -> bool:
    """The recurring lease traffic: heartbeats and leader-election renewals every few seconds.

    A lease's creation (once per component start) is not counted: it costs nothing.
    """
    ref = event.get("objectRef", {})
    return bool(
        ref.get("resource") == "leases"
        and ref.get("apiGroup") == "coordination.k8s.io"
        and event.get("verb") in ("get", "list", "watch", "update", "patch")
    )


NOISE = (
    Noise("event writes", _is_event_write),
    Noise("health endpoints", lambda e: _path(e) in ("/healthz", "/livez", "/readyz")),
    Noise("version endpoint", lambda e: _path(e) == "/version"),
    Noise("lease renewals", _is_lease_renewal),
    Noise(
        "kube-proxy watches",
        lambda e: e.get("user", {}).get("username") == KUBE_PROXY_USER and e.get("verb") == "watch",
    ),
    Noise(
        "kubelet node reads",
        lambda e: (
            "system:nodes" in e.get("user", {}).get("groups", [])
            and e.get("verb") == "get"
            and e.get("objectRef", {}).get("resource") == "nodes"
        ),
    ),
)


class Kubectl:
    """Runs the kubectl binary against one control plane with a private discovery cache."""

    def __init__(self, binary: Path, plane: ControlPlane, cache_dir: Path) -> None:
        self.binary = binary
        self.plane = plane
        self.cache_dir = cache_dir

    def run(
        self, identity: str, args: Sequence[str], stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            str(self.binary),
            f"--kubeconfig={self.plane.kubeconfig(identity)}",
            f"--cache-dir={self.cache_dir}",
            *args,
        ]
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(self.cache_dir)},
        )

    def await_default_service_account(self, namespace: str) -> None:
        """Pods (and tokens) can only be created once the service-account controller made
        ``default`` in ``namespace``.

        The harness's own identity polls, so the scenario's users leave the same requests every
        run.
        """
        wait_until(
            lambda: (
                self.run(
                    HARNESS_USER, ("get", "serviceaccount", "default", "-n", namespace)
                ).returncode
                == 0
            ),
            timeout=60,
            what=f"service account {namespace}/default",
            interval=0.3,
        )


def _run_step(kubectl: Kubectl, step: Step) -> StepResult:
    if step.raw_get is not None:
        plane = kubectl.plane
        status, body = https_get(plane.server + step.raw_get, plane.ca_cert, None)
        done = subprocess.CompletedProcess(
            [step.raw_get], 0 if status == 200 else 1, body.decode(errors="replace"), str(status)
        )
    else:
        stdin = json.dumps(step.manifest) if step.manifest is not None else None
        done = kubectl.run(step.identity, step.args, stdin)
    result = StepResult(step, done.returncode, done.stdout, done.stderr)
    if step.succeeds is not None and (done.returncode == 0) != step.succeeds:
        outcome = "failed" if step.succeeds else "succeeded but the API should have refused it"
        raise ControlPlaneError(
            f"scenario step {step.name!r} {outcome} (exit {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return result


def run(plane: ControlPlane, kubectl_binary: Path, *, noise: bool = True) -> ScenarioRun:
    """Run the scenario (and the noise) once against ``plane``."""
    kubectl = Kubectl(kubectl_binary, plane, plane.workdir / "kubectl-cache")
    secret_value = secrets.token_hex(16)
    outcome = ScenarioRun(secret_values={"db-password": secret_value})
    steps = build_steps(secret_value)
    outcome.results.append(_run_step(kubectl, steps[0]))
    kubectl.await_default_service_account(NAMESPACE)
    for step in steps[1:]:
        result = _run_step(kubectl, step)
        outcome.results.append(result)
        if step.args[:2] == ("create", "token"):
            outcome.secret_values["service-account token"] = result.stdout.strip()
    if noise:
        outcome.results.extend(_run_step(kubectl, step) for step in noise_steps())
    return outcome
