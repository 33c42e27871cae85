"""Every program the chart runs in the auditrelay image is in that image.

The chart's containers that use the auditrelay image (the plugin and state init containers, the
sidecar, the audit-setup Jobs, the helm test pod) run ``auditrelay`` (the package's console
script), ``python3`` (the base image's, in the helm test pod), ``cp`` and ``install``
(coreutils) and, in the k3s/RKE2 audit-setup Job, ``nsenter``
(util-linux) to run ``systemctl`` in the host's namespaces. This reads the Dockerfile's runtime
stage and the rendered commands of every distribution's chart, and checks that each program is
installed by that stage: a program added to a template without the image providing it fails here,
not on a control-plane node.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from helm.conftest import Render, ci_file

REPO = Path(__file__).resolve().parents[2]
IMAGE_REPOSITORY = "ghcr.io/auditrelay/auditrelay"
# Which Debian package of the runtime stage provides each program the chart runs.
DEBIAN_PACKAGE = {"cp": "coreutils", "install": "coreutils", "nsenter": "util-linux"}
# What the runtime stage's base image itself provides (the official Python images: python3).
BASE_IMAGE_PROGRAMS = {"python:3": {"python3"}}
DISTRIBUTIONS = [
    ("default-values", {"auditSetup.nodes": "{cp-1}"}),
    ("default-values", {"auditSetup.nodes": "{cp-1}", "auditLog.distro": "k3s"}),
    ("rke2-values", {"auditSetup.nodes": "{cp-1}"}),
    ("openshift-values", {}),
]


def _runtime_stage() -> str:
    """The Dockerfile's last stage, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    return stages[-1]


def _base_programs(stage: str) -> set[str]:
    base = stage.split(maxsplit=1)[0]
    return {
        p for prefix, found in BASE_IMAGE_PROGRAMS.items() if base.startswith(prefix) for p in found
    }


def _debian_packages(stage: str) -> set[str]:
    packages: set[str] = set()
    for found in re.finditer(r"apt-get install ([^&\n]+)", stage):
        packages |= {word for word in found.group(1).split() if not word.startswith("-")}
    return packages


def _console_scripts(stage: str) -> set[str]:
    """The package's console scripts, when the stage installs its wheel."""
    if not re.search(r"pip install [^\n]*\.whl", stage):
        return set()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return set(project["project"]["scripts"])


def _entrypoint(stage: str) -> list[str]:
    found = re.search(r"^ENTRYPOINT (\[.*\])", stage, flags=re.MULTILINE)
    assert found, "the Dockerfile's runtime stage has no ENTRYPOINT"
    return [word.strip(' "') for word in found.group(1).strip("[]").split(",")]


def _programs(container: dict[str, Any], entrypoint: list[str]) -> list[str]:
    """The programs a container runs in its own image: its command's first word, and the
    first word of a --restart-command (what follows nsenter's ``--`` runs on the host)."""
    command = [str(word) for word in container.get("command") or entrypoint]
    programs = [command[0]]
    for word in command:
        if word.startswith("--restart-command="):
            restart = shlex.split(word.partition("=")[2])
            programs.append(restart[0])
            if restart[0] == "nsenter":
                assert ["--target", "1", "--mount"] == restart[1:4], restart
    return programs


def _image_containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for item in objects:
        spec = item.get("spec", {})
        pod = spec.get("template", {}).get("spec") or (spec if item["kind"] == "Pod" else {})
        found.extend(
            container
            for container in pod.get("containers", []) + pod.get("initContainers", [])
            if str(container.get("image", "")).startswith(IMAGE_REPOSITORY)
        )
    return found


@pytest.mark.parametrize(
    ("values", "settings"), DISTRIBUTIONS, ids=["kubeadm", "k3s", "rke2", "openshift"]
)
def test_every_program_the_chart_runs_is_in_the_image(
    render: Render, values: str, settings: dict[str, str]
) -> None:
    """Each program run in the auditrelay image is its console script or comes from a Debian
    package the Dockerfile's runtime stage installs."""
    stage = _runtime_stage()
    installed = (
        _base_programs(stage)
        | _console_scripts(stage)
        | {
            program
            for program, package in DEBIAN_PACKAGE.items()
            if package in _debian_packages(stage)
        }
    )
    rendered = render(ci_file(values), set_values=settings)
    containers = _image_containers(rendered.objects)

    run = {p for c in containers for p in _programs(c, _entrypoint(stage))}

    assert containers, "no container of the chart uses the auditrelay image"
    assert set() == run - installed, f"run by the chart, not installed by the Dockerfile: {run}"


def test_the_rancher_setup_job_needs_nsenter() -> None:
    """The check above is not vacuous: the k3s/RKE2 Job's restart command is nsenter's."""
    template = (REPO / "helm/auditrelay/templates/audit-setup.yaml").read_text(encoding="utf-8")

    assert "--restart-command=nsenter --target 1 --mount" in template
    assert "util-linux" in _debian_packages(_runtime_stage())
