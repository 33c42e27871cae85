"""``auditrelay audit --distro openshift`` against a real kube-apiserver serving OpenShift's
``apiservers.config.openshift.io`` resource (our CRD, written from OpenShift's published
schema: tests/audit/data/openshift/apiservers-crd.yaml)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from auditrelay.audit import openshift
from auditrelay.cli import main
from kubernetes import client, config

from controlplane.cluster import ADMIN_USER, AuditSettings, ControlPlane, wait_until
from controlplane.harness import StartControlPlane, policy_under_test

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]
CRD = Path(__file__).resolve().parents[1] / "audit" / "data" / "openshift" / "apiservers-crd.yaml"


@pytest.fixture(scope="module")
def plane(start_control_plane: StartControlPlane) -> Iterator[ControlPlane]:
    """kube-apiserver (no controllers) with the APIServer CRD established."""
    with start_control_plane(
        AuditSettings(policy=policy_under_test()), name="openshift", controllers=False
    ) as running:
        api = _api_client(running)
        extensions = client.ApiextensionsV1Api(api)
        extensions.create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
        wait_until(
            lambda: _established(extensions),
            timeout=60,
            what="the apiservers.config.openshift.io CRD to be established",
        )
        yield running


def _api_client(plane: ControlPlane) -> Any:
    return config.new_client_from_config(config_file=str(plane.kubeconfig(ADMIN_USER)))


def _established(extensions: Any) -> bool:
    crd = extensions.read_custom_resource_definition("apiservers.config.openshift.io")
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or ())


@pytest.fixture
def objects(plane: ControlPlane) -> Iterator[Any]:
    """The CustomObjectsApi; the APIServer named cluster is deleted after each test."""
    api = client.CustomObjectsApi(_api_client(plane))
    yield api
    api.delete_cluster_custom_object(
        openshift.GROUP, openshift.VERSION, openshift.PLURAL, "cluster"
    )


def _create(objects: Any, audit: dict[str, Any] | None) -> None:
    spec: dict[str, Any] = {} if audit is None else {"audit": audit}
    objects.create_cluster_custom_object(
        openshift.GROUP,
        openshift.VERSION,
        openshift.PLURAL,
        {
            "apiVersion": "config.openshift.io/v1",
            "kind": "APIServer",
            "metadata": {"name": "cluster"},
            "spec": spec,
        },
    )


def _read(objects: Any) -> dict[str, Any]:
    found: dict[str, Any] = objects.get_cluster_custom_object(
        openshift.GROUP, openshift.VERSION, openshift.PLURAL, "cluster"
    )
    return found


def _audit(plane: ControlPlane, *args: str) -> int:
    return main(
        [
            "audit",
            *args,
            "--distro",
            "openshift",
            "--kubeconfig",
            str(plane.kubeconfig(ADMIN_USER)),
            "--output",
            "json",
        ]
    )


@pytest.mark.parametrize(
    "audit",
    [
        None,
        {"profile": "Default"},
        {
            "profile": "Default",
            "customRules": [{"group": "system:authenticated:oauth", "profile": "AllRequestBodies"}],
        },
    ],
    ids=["unset", "default", "default-with-custom-rules"],
)
def test_default_moves_to_write_request_bodies_and_back(
    plane: ControlPlane,
    objects: Any,
    audit: dict[str, Any] | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Default (also when unset, which the CRD defaults to Default) becomes WriteRequestBodies
    with the previous value recorded; customRules stay; rollback puts Default back."""
    _create(objects, audit)
    before = _read(objects)["spec"]

    assert 1 == _audit(plane, "status")
    capsys.readouterr()
    assert 0 == _audit(plane, "enable")
    report = json.loads(capsys.readouterr().out)
    after = _read(objects)

    assert ("enabled", "Default") == (report["action"], report["previousProfile"])
    assert "WriteRequestBodies" == after["spec"]["audit"]["profile"]
    assert before["audit"].get("customRules") == after["spec"]["audit"].get("customRules")
    assert 0 == _audit(plane, "status")
    assert 0 == _audit(plane, "rollback")
    assert before == _read(objects)["spec"]
    assert openshift.PREVIOUS_ANNOTATION not in (
        _read(objects)["metadata"].get("annotations") or {}
    )


@pytest.mark.parametrize("profile", ["WriteRequestBodies", "AllRequestBodies", "None"])
def test_other_profiles_are_left_alone(
    plane: ControlPlane, objects: Any, profile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A profile the operator chose stays; enable reports it and exits 0."""
    _create(objects, {"profile": profile})
    version = _read(objects)["metadata"]["resourceVersion"]

    code = _audit(plane, "enable")
    report = json.loads(capsys.readouterr().out)

    assert ("unchanged", profile) == (report["action"], report["profile"])
    assert 0 == code
    assert version == _read(objects)["metadata"]["resourceVersion"]


def test_rollback_refuses_a_profile_changed_since(
    plane: ControlPlane, objects: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone set AllRequestBodies after enable: rollback refuses (exit 1); --force restores."""
    _create(objects, {"profile": "Default"})
    _audit(plane, "enable")
    changed = _read(objects)
    changed["spec"]["audit"]["profile"] = "AllRequestBodies"
    objects.replace_cluster_custom_object(
        openshift.GROUP, openshift.VERSION, openshift.PLURAL, "cluster", changed
    )

    assert 1 == _audit(plane, "rollback")
    assert "AllRequestBodies" == _read(objects)["spec"]["audit"]["profile"]
    assert 0 == _audit(plane, "rollback", "--force")
    assert "Default" == _read(objects)["spec"]["audit"]["profile"]


class _RacingObjects:
    """The real CustomObjectsApi, with a second writer that changes the resource between
    enable's read and its first write: the server answers that write 409 Conflict."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.raced = False

    def get_cluster_custom_object(self, *args: Any) -> Any:
        return self.api.get_cluster_custom_object(*args)

    def replace_cluster_custom_object(self, *args: Any) -> Any:
        if not self.raced:
            self.raced = True
            rival = self.api.get_cluster_custom_object(*args[:4])
            rival["spec"]["additionalCORSAllowedOrigins"] = ["//console.example.com"]
            self.api.replace_cluster_custom_object(*args[:4], rival)
        return self.api.replace_cluster_custom_object(*args)


def test_concurrent_writer_conflict_is_retried(objects: Any) -> None:
    """enable's write based on a stale resourceVersion gets 409; it reads again and writes
    once more, keeping the other writer's change."""
    _create(objects, {"profile": "Default"})

    outcome = openshift.enable(_RacingObjects(objects))
    after = _read(objects)

    assert (1, "enabled") == (outcome.conflicts, outcome.action)
    assert "WriteRequestBodies" == after["spec"]["audit"]["profile"]
    assert ["//console.example.com"] == after["spec"]["additionalCORSAllowedOrigins"]
