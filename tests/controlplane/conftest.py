"""Fixtures that start the real control plane (see cluster.py) and run the scenario against it.

Build the binaries first: ``python3 tests/controlplane/build.py`` (cached). The policy under test
is, in order: ``$AUDITRELAY_CONTROLPLANE_POLICY``, the repository's ``audit_policy.yaml``, or
Defender's published policy from ``tests/data/reference-policies`` as a stand-in.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from controlplane import scenario
from controlplane.build import Binaries, BuildError, cached_binaries
from controlplane.cluster import AuditSettings, ControlPlane, running
from controlplane.harness import (
    VERBOSE_POLICY_TEXT,
    ScenarioLog,
    StartControlPlane,
    policy_under_test,
)


@pytest.fixture(scope="session")
def controlplane_binaries() -> Binaries:
    try:
        return cached_binaries()
    except BuildError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def start_control_plane(
    controlplane_binaries: Binaries, tmp_path_factory: pytest.TempPathFactory
) -> StartControlPlane:
    """Factory: ``with start_control_plane(AuditSettings(...), name="x") as plane:`` starts
    etcd, kube-apiserver, kube-controller-manager and kube-scheduler, awaits readiness, and
    stops them on exit (failing if one ignored SIGTERM)."""

    def start(
        audit: AuditSettings, *, name: str = "controlplane", controllers: bool = True
    ) -> AbstractContextManager[ControlPlane]:
        workdir = tmp_path_factory.mktemp(name)
        return running(controlplane_binaries, workdir, audit, controllers=controllers)

    return start


def _scenario_log(
    start_control_plane: StartControlPlane, binaries: Binaries, policy: Path, name: str
) -> ScenarioLog:
    with start_control_plane(AuditSettings(policy=policy), name=name) as plane:
        outcome = scenario.run(plane, binaries.kubectl)
    return ScenarioLog(
        policy=policy,
        workdir=plane.workdir,
        files=plane.audit_files(),
        events=plane.audit_events(),
        run=outcome,
    )


@pytest.fixture(scope="session")
def policy_scenario_log(
    start_control_plane: StartControlPlane, controlplane_binaries: Binaries
) -> ScenarioLog:
    """The scenario run once against kube-apiserver started with the policy under test."""
    return _scenario_log(
        start_control_plane, controlplane_binaries, policy_under_test(), "policy-run"
    )


@pytest.fixture(scope="session")
def verbose_scenario_log(
    start_control_plane: StartControlPlane,
    controlplane_binaries: Binaries,
    tmp_path_factory: pytest.TempPathFactory,
) -> ScenarioLog:
    """The same scenario with everything recorded at RequestResponse and no stage omitted."""
    policy = tmp_path_factory.mktemp("verbose-policy") / "verbose.yaml"
    policy.write_text(VERBOSE_POLICY_TEXT, encoding="utf-8")
    return _scenario_log(start_control_plane, controlplane_binaries, policy, "verbose-run")
