"""What the control-plane tests share besides fixtures: the policy under test and a finished run."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane import scenario
from controlplane.cluster import ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_POLICY = REPO_ROOT / "audit_policy.yaml"
STAND_IN_POLICY = REPO_ROOT / "tests/data/reference-policies/azure-defender-arc-audit-policy.yaml"
VERBOSE_POLICY_TEXT = """\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: RequestResponse
"""


def policy_under_test() -> Path:
    chosen = os.environ.get("AUDITRELAY_CONTROLPLANE_POLICY")
    if chosen:
        return Path(chosen).resolve()
    return REPO_POLICY if REPO_POLICY.is_file() else STAND_IN_POLICY


def stand_in_under_test() -> bool:
    """True while the repository has no audit_policy.yaml and Defender's original is tested."""
    return policy_under_test() == STAND_IN_POLICY


@dataclass(frozen=True)
class ScenarioLog:
    """A finished run: the scenario's outcome and everything kube-apiserver wrote to its log.

    The control plane is stopped, so ``files`` are complete and closed; they stay on disk in
    ``workdir`` for the rest of the session (the end-to-end test feeds them to Fluent Bit).
    """

    policy: Path
    workdir: Path
    files: list[Path]
    events: list[dict[str, Any]]
    run: scenario.ScenarioRun


StartControlPlane = Callable[..., AbstractContextManager[ControlPlane]]
