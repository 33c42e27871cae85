"""Fixtures that render the real chart with the real helm (built once by tests/helm/build.py).

``render(*values_files, set_values=...)`` runs ``helm template`` and returns the manifests as a
``Rendered``: the objects, the DaemonSet's pod, its containers and the Fluent Bit configuration
parsed into sections, so tests read like what an operator checks with kubectl.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from auditrelay.fluentbit_conf import parse_classic

from helm import build

CHART = Path(__file__).resolve().parents[2] / "helm" / "auditrelay"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.34.0"  # helm built from source defaults to v1.20; the chart needs >= 1.25
RELEASE = "audit"
NAMESPACE = "logging"


class RenderError(Exception):
    """helm refused to render the chart; the message is helm's."""


@dataclass(frozen=True)
class Rendered:
    """The objects helm rendered for one set of values."""

    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [item for item in self.objects if item["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert 1 == len(found), f"expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("DaemonSet")["spec"]["template"]["spec"]
        return spec

    @property
    def pod_metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = self.one("DaemonSet")["spec"]["template"]["metadata"]
        return metadata

    def container(self, name: str) -> dict[str, Any]:
        for item in self.pod["containers"] + self.pod.get("initContainers", []):
            if item["name"] == name:
                return dict(item)
        raise AssertionError(f"no container {name!r} in the pod")

    def volume(self, name: str) -> dict[str, Any]:
        for item in self.pod["volumes"]:
            if item["name"] == name:
                return dict(item)
        raise AssertionError(f"no volume {name!r} in the pod")

    @staticmethod
    def mounts(container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """A container's volume mounts by mount path."""
        return {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}

    @staticmethod
    def env(container: Mapping[str, Any]) -> dict[str, Any]:
        """A container's environment: the literal value, or the valueFrom mapping."""
        return {
            item["name"]: item.get("value", item.get("valueFrom"))
            for item in container.get("env", [])
        }

    @property
    def config_files(self) -> dict[str, str]:
        config_maps = [
            item for item in self.all("ConfigMap") if item["metadata"]["name"].endswith("-config")
        ]
        assert 1 == len(config_maps)
        data: dict[str, str] = config_maps[0]["data"]
        return data

    @property
    def fluent_bit_sections(self) -> list[tuple[str, dict[str, str]]]:
        return parse_classic(self.config_files["fluent-bit.conf"])

    def section(self, name: str, plugin: str | None = None) -> dict[str, str]:
        """The one section called name ([SERVICE]) or, with plugin, the one of that plugin."""
        found = [
            properties
            for section, properties in self.fluent_bit_sections
            if section == name and (plugin is None or properties.get("name") == plugin)
        ]
        assert 1 == len(found), f"expected one [{name}] {plugin or ''}, found {len(found)}"
        return found[0]


def _helm_template_command(
    helm: Path, values_files: tuple[Path, ...], set_values: Mapping[str, str], kube_version: str
) -> list[str]:
    command = [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    command += ["--kube-version", kube_version]
    for path in values_files:
        command += ["--values", str(path)]
    for key, value in set_values.items():
        command += ["--set", f"{key}={value}"]
    return command


Render = Callable[..., Rendered]
RenderText = Callable[..., str]


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    try:
        return build.helm()
    except build.BuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def kubecheck_binary() -> Path:
    try:
        return build.kubecheck()
    except build.BuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def render_text(helm_binary: Path) -> RenderText:
    """Factory: ``render_text(values_file, ..., set_values={...}, kube_version=...)`` is helm
    template's output for a cluster of that Kubernetes version;
    raises RenderError with helm's message when helm refuses."""

    def run(
        *values_files: Path,
        set_values: Mapping[str, str] | None = None,
        kube_version: str = KUBE_VERSION,
    ) -> str:
        command = _helm_template_command(helm_binary, values_files, set_values or {}, kube_version)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RenderError(result.stderr)
        return result.stdout

    return run


@pytest.fixture(scope="session")
def render(render_text: RenderText) -> Render:
    """Factory: ``render(values_file, ..., set_values={...})`` -> Rendered."""

    def run(
        *values_files: Path,
        set_values: Mapping[str, str] | None = None,
        kube_version: str = KUBE_VERSION,
    ) -> Rendered:
        text = render_text(*values_files, set_values=set_values, kube_version=kube_version)
        return Rendered([item for item in yaml.safe_load_all(text) if item])

    return run


@pytest.fixture(params=CI_VALUES, ids=[path.stem for path in CI_VALUES])
def ci_values(request: pytest.FixtureRequest) -> Path:
    """Each values file of helm/auditrelay/ci/ in turn."""
    path: Path = request.param
    return path


def ci_file(stem: str) -> Path:
    path = CHART / "ci" / f"{stem}.yaml"
    assert path.exists(), path
    return path
