"""A namespace in the body of a cluster-scoped object, on a real kube-apiserver.

kube-apiserver decides its audit policy with the namespace of the URL, which a cluster-scoped
object's URL has not; the event it then writes carries the body's ``metadata.namespace`` in
``objectRef.namespace`` (audit.LogRequestObject copies it before the registry clears it). Raw API
clients send such bodies here: a ClusterRole created and updated, a Namespace, and a
cluster-scoped custom resource, each with a namespace in its metadata. The sidecar, applying the
same policy again to what kube-apiserver wrote, must keep every event as it is: a namespaced rule
that matched the copied namespace would drop or lower events kube-apiserver kept whole.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from auditrelay.decode import decode_chunk
from auditrelay.filter import PolicyFilter
from fixtures.chunks import chunk, raw_log_event

from controlplane.cluster import ADMIN_USER, AuditSettings, ControlPlane, wait_until
from controlplane.harness import StartControlPlane

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(600)]

# Namespaced rules first: the copied namespaces below would match them, the URLs do not.
POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    namespaces: ["kube-system"]
  - level: Metadata
    namespaces: ["team-a"]
  - level: RequestResponse
"""

RBAC = "/apis/rbac.authorization.k8s.io/v1/clusterroles"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
WIDGETS = "/apis/example.com/v1/widgets"
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Cluster",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object"}},
            }
        ],
    },
}


class RawClient:
    """HTTPS requests with the admin's client certificate, bodies exactly as given."""

    def __init__(self, plane: ControlPlane) -> None:
        config = yaml.safe_load(plane.kubeconfig(ADMIN_USER).read_text(encoding="utf-8"))
        user = config["users"][0]["user"]
        context = ssl.create_default_context(cafile=str(plane.ca_cert))
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        self._server = plane.server

    def send(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - https to the test's own apiserver
            self._server + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with self._opener.open(request, timeout=30) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def status(self, path: str) -> int:
        try:
            self.send("GET", path)
        except urllib.error.HTTPError as error:
            return error.code
        return 200


def _metadata(created: dict[str, Any], namespace: str) -> dict[str, Any]:
    """Metadata for an update of ``created``: its name and resourceVersion, and ``namespace``."""
    meta = created["metadata"]
    return {
        "name": meta["name"],
        "resourceVersion": meta["resourceVersion"],
        "namespace": namespace,
    }


def _send_bodies_with_namespaces(client: RawClient) -> None:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "rules": []}
    created = client.send(
        "POST", RBAC, role | {"metadata": {"name": "body-ns", "namespace": "kube-system"}}
    )
    client.send("PUT", f"{RBAC}/body-ns", role | {"metadata": _metadata(created, "team-a")})
    namespace = {"apiVersion": "v1", "kind": "Namespace"}
    client.send(
        "POST",
        "/api/v1/namespaces",
        namespace | {"metadata": {"name": "body-ns", "namespace": "kube-system"}},
    )
    client.send("POST", CRDS, WIDGET_CRD)
    wait_until(lambda: client.status(WIDGETS) == 200, timeout=60, what="the widgets CRD served")
    widget = {"apiVersion": "example.com/v1", "kind": "Widget"}
    created = client.send(
        "POST", WIDGETS, widget | {"metadata": {"name": "w", "namespace": "kube-system"}}
    )
    client.send("PUT", f"{WIDGETS}/w", widget | {"metadata": _metadata(created, "team-a")})


def _copied_namespaces(events: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(verb, resource, objectRef.namespace) of the events whose URL had no namespace but whose
    objectRef has one: the trap, as kube-apiserver really writes it."""
    return {
        (event["verb"], ref["resource"], ref["namespace"])
        for event in events
        if (ref := event.get("objectRef")) is not None
        and ref.get("namespace")
        and "/namespaces/" not in event["requestURI"]
        and event["stage"] == "ResponseComplete"
    }


def test_events_of_cluster_scoped_bodies_with_a_namespace_are_kept_whole(
    start_control_plane: StartControlPlane, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    with start_control_plane(AuditSettings(policy=policy), name="body-namespace") as plane:
        _send_bodies_with_namespaces(RawClient(plane))
        expected = {
            ("create", "clusterroles", "kube-system"),
            ("update", "clusterroles", "team-a"),
            ("create", "namespaces", "kube-system"),
            ("create", "widgets", "kube-system"),
            ("update", "widgets", "team-a"),
        }
        wait_until(
            lambda: expected <= _copied_namespaces(plane.audit_events()),
            timeout=30,
            what="kube-apiserver's events of the requests",
        )
        lines = [
            line
            for path in plane.audit_files()
            for line in path.read_bytes().splitlines()
            if line.strip()
        ]

    decoded = decode_chunk(chunk(raw_log_event(line) for line in lines))
    event_filter = PolicyFilter.from_file(policy)
    changed = [
        event.raw[:200] if event.raw else b""
        for event in decoded.events
        if event_filter.apply(event) is not event
    ]

    assert ([], len(lines)) == ([d.reason for d in decoded.dead_letters], len(decoded.events))
    assert [] == changed
