"""audit_policy.yaml in a real kube-apiserver: accepted at start-up, records what Defender needs
at the level it promises, keeps secrets out of the log, and drops the noise."""

from __future__ import annotations

import pytest

from controlplane import scenario
from controlplane.cluster import AuditSettings, ControlPlaneError
from controlplane.harness import (
    ScenarioLog,
    StartControlPlane,
    policy_under_test,
    stand_in_under_test,
)

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(900)]

# Gaps of Defender's published policy that audit_policy.yaml closes (docs/policy.md). They are
# expected failures only while the stand-in is under test; xfail_strict turns a pass into an error.
STAND_IN_GAPS = {
    "kube-system DNS change": "Defender's policy records the coredns ConfigMap only at Metadata",
    "service-account token": "Defender's policy records issued tokens in response bodies",
    "lease renewals": "Defender's policy keeps lease traffic",
    "event writes": "Defender's policy drops core events but keeps events.k8s.io ones",
    "health endpoints": "Defender's policy drops /healthz* but keeps /livez and /readyz",
}
EXPECTATIONS = [e for step in scenario.build_steps("unused") for e in step.expectations]


def _stand_in_gap(name: str) -> list[pytest.MarkDecorator]:
    if stand_in_under_test() and name in STAND_IN_GAPS:
        return [pytest.mark.xfail(reason=STAND_IN_GAPS[name], strict=True)]
    return []


def test_kube_apiserver_starts_with_the_policy(policy_scenario_log: ScenarioLog) -> None:
    """kube-apiserver loads the policy at start-up and audits through it (a log is written)."""
    assert policy_under_test() == policy_scenario_log.policy
    assert [] != policy_scenario_log.events
    assert {"audit.k8s.io/v1"} == {e["apiVersion"] for e in policy_scenario_log.events}


def test_kube_apiserver_refuses_an_invalid_policy(
    start_control_plane: StartControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The start-up check above can fail: a policy with an unknown level stops kube-apiserver."""
    policy = tmp_path_factory.mktemp("invalid-policy") / "policy.yaml"
    policy.write_text(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n  - level: Everything\n",
        encoding="utf-8",
    )
    with (
        pytest.raises(ControlPlaneError, match=r"kube-apiserver exited with status"),
        start_control_plane(AuditSettings(policy=policy), name="invalid", controllers=False),
    ):
        pass


@pytest.mark.parametrize(
    "expectation",
    [pytest.param(e, id=e.describe(), marks=_stand_in_gap(e.need)) for e in EXPECTATIONS],
)
def test_detection_need_is_recorded_at_the_promised_level(
    policy_scenario_log: ScenarioLog, expectation: scenario.Expectation
) -> None:
    """Each request Defender needs reaches the real audit log, at least at the level its
    detection needs (a request body for workloads, bindings and DNS changes) and never above
    the level the policy allows (Metadata for secrets)."""
    levels = sorted(
        {e["level"] for e in policy_scenario_log.events if expectation.matches(e)},
        key=scenario.level_rank,
    )
    assert [] != levels, f"no audit event for {expectation.describe()}"
    low, high = scenario.level_rank(levels[0]), scenario.level_rank(levels[-1])
    wanted = (
        scenario.level_rank(expectation.min_level),
        scenario.level_rank(expectation.max_level),
    )
    assert (True, True) == (low >= wanted[0], high <= wanted[1]), (
        f"levels {levels} outside [{expectation.min_level}, {expectation.max_level}]"
    )


def test_secret_values_never_reach_the_log(policy_scenario_log: ScenarioLog) -> None:
    """The Secret's value the scenario stored never appears in any audit file."""
    written = b"".join(path.read_bytes() for path in policy_scenario_log.files)
    value = policy_scenario_log.run.secret_values["db-password"]
    assert 0 == written.count(value.encode())


@pytest.mark.parametrize(
    "secret", [pytest.param("service-account token", marks=_stand_in_gap("service-account token"))]
)
def test_issued_service_account_tokens_never_reach_the_log(
    policy_scenario_log: ScenarioLog, secret: str
) -> None:
    """A token from serviceaccounts/token is a credential: it must not be written to the log."""
    written = b"".join(path.read_bytes() for path in policy_scenario_log.files)
    token = policy_scenario_log.run.secret_values[secret]
    assert token.count(".") == 2, "the scenario did not capture a JWT"
    assert 0 == written.count(token.encode())


@pytest.mark.parametrize(
    "noise", [pytest.param(n, id=n.name, marks=_stand_in_gap(n.name)) for n in scenario.NOISE]
)
def test_noise_is_dropped(policy_scenario_log: ScenarioLog, noise: scenario.Noise) -> None:
    """Background traffic that Defender does not use costs nothing: the policy drops it."""
    kept = [e["requestURI"] for e in policy_scenario_log.events if noise.matches(e)]
    assert [] == kept[:5]


@pytest.mark.parametrize("noise", [pytest.param(n, id=n.name) for n in scenario.NOISE])
def test_noise_really_happened(verbose_scenario_log: ScenarioLog, noise: scenario.Noise) -> None:
    """The noise test above means something: with everything recorded, each kind of noise is in
    the log of the same scenario."""
    assert any(noise.matches(e) for e in verbose_scenario_log.events)
