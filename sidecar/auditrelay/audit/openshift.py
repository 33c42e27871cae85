"""OpenShift: the audit profile of ``apiservers.config.openshift.io/cluster``.

OpenShift's API servers always write audit logs; what the operator chooses is the profile.
``Default`` (or unset) records metadata only, so Defender sees no request bodies; ``enable``
moves it to ``WriteRequestBodies`` and nothing else: ``AllRequestBodies``, ``None`` and any
``customRules`` are the operator's choice, reported and left alone. The previous value is kept
in an annotation on the resource itself, so a rollback works from any machine (the chart's
uninstall hook runs in a fresh pod). Every write carries the resourceVersion it was based on;
a 409 Conflict (someone else wrote in between) means reading again and deciding again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from auditrelay.audit.errors import AuditSetupError, RollbackRefusedError

GROUP: Final = "config.openshift.io"
VERSION: Final = "v1"
PLURAL: Final = "apiservers"
NAME: Final = "cluster"
WANTED: Final = "WriteRequestBodies"
PREVIOUS_ANNOTATION: Final = "auditrelay.io/previous-audit-profile"
UNSET: Final = "(unset)"
ATTEMPTS: Final = 5


class CustomObjects(Protocol):
    """The two calls of kubernetes.client.CustomObjectsApi this module makes."""

    def get_cluster_custom_object(
        self, group: str, version: str, plural: str, name: str
    ) -> Any: ...

    def replace_cluster_custom_object(
        self, group: str, version: str, plural: str, name: str, body: Any
    ) -> Any: ...


def connect(kubeconfig: Path | None) -> CustomObjects:
    """A CustomObjectsApi from ``kubeconfig``, the pod's service account, or ~/.kube/config."""
    try:
        if kubeconfig:
            config.load_kube_config(config_file=str(kubeconfig))
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
    except (config.ConfigException, OSError) as error:
        raise AuditSetupError(f"cannot reach the cluster: {error}") from error
    api: CustomObjects = client.CustomObjectsApi()
    return api


@dataclass
class ProfileOutcome:
    """What a run found and did to the APIServer resource."""

    action: str
    profile: str
    previous: str | None = None
    custom_rules: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    conflicts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "distro": "openshift",
            "target": f"{PLURAL}.{GROUP}/{NAME}",
            "profile": self.profile,
            "previousProfile": self.previous,
            "customRules": self.custom_rules,
            "notes": self.notes,
            "conflicts": self.conflicts,
        }


def _read(api: CustomObjects) -> dict[str, Any]:
    try:
        found: dict[str, Any] = api.get_cluster_custom_object(GROUP, VERSION, PLURAL, NAME)
    except ApiException as error:
        raise AuditSetupError(
            f"{PLURAL}.{GROUP}/{NAME}: cannot read it ({error.status} {error.reason}); "
            "is this an OpenShift cluster, and may this identity get apiservers?"
        ) from error
    return found


def profile_of(resource: dict[str, Any]) -> str:
    """The profile in force: an unset profile is OpenShift's default, ``Default``."""
    audit = (resource.get("spec") or {}).get("audit") or {}
    return str(audit.get("profile") or "Default")


def _raw_profile(resource: dict[str, Any]) -> str:
    audit = (resource.get("spec") or {}).get("audit") or {}
    return str(audit.get("profile") or UNSET)


def _custom_rules(resource: dict[str, Any]) -> list[dict[str, Any]]:
    audit = (resource.get("spec") or {}).get("audit") or {}
    return list(audit.get("customRules") or [])


def status(api: CustomObjects) -> ProfileOutcome:
    resource = _read(api)
    outcome = ProfileOutcome("status", profile_of(resource), custom_rules=_custom_rules(resource))
    annotations = (resource.get("metadata") or {}).get("annotations") or {}
    outcome.previous = annotations.get(PREVIOUS_ANNOTATION)
    return outcome


def state_of(profile: str) -> str:
    """on / on-but-gaps / off, as ``auditrelay audit status`` reports them."""
    if profile in (WANTED, "AllRequestBodies"):
        return "on"
    if profile == "None":
        return "off"
    return "on-but-gaps"


def enable(api: CustomObjects, dry_run: bool = False) -> ProfileOutcome:
    """Default or unset -> WriteRequestBodies, recording the previous value; else unchanged."""
    for attempt in range(ATTEMPTS):
        resource = _read(api)
        current = profile_of(resource)
        outcome = ProfileOutcome("unchanged", current, custom_rules=_custom_rules(resource))
        outcome.conflicts = attempt
        if outcome.custom_rules:
            outcome.notes.append(
                f"customRules left as they are: {len(outcome.custom_rules)} rule(s) decide "
                "the profile for their groups"
            )
        if current != "Default":
            outcome.notes.append(f"profile {current} is left as it is (only Default is changed)")
            return outcome
        changed = copy.deepcopy(resource)
        changed.setdefault("spec", {}).setdefault("audit", {})
        if changed["spec"]["audit"] is None:
            changed["spec"]["audit"] = {}
        changed["spec"]["audit"]["profile"] = WANTED
        metadata = changed.setdefault("metadata", {})
        metadata["annotations"] = dict(metadata.get("annotations") or {})
        metadata["annotations"][PREVIOUS_ANNOTATION] = _raw_profile(resource)
        outcome = ProfileOutcome(
            "dry-run" if dry_run else "enabled",
            WANTED,
            previous=_raw_profile(resource),
            custom_rules=outcome.custom_rules,
            notes=outcome.notes,
            conflicts=attempt,
        )
        if dry_run or _replaced(api, changed):
            outcome.notes.append(
                "the kube-apiserver, openshift-apiserver and oauth-apiserver operators roll out "
                "a new revision with the new policy (several minutes)"
            )
            return outcome
    raise AuditSetupError(f"{PLURAL}.{GROUP}/{NAME}: {ATTEMPTS} writes in a row met a conflict")


def rollback(api: CustomObjects, force: bool = False) -> ProfileOutcome:
    """Puts back the profile ``enable`` recorded; refuses when it was changed since."""
    for attempt in range(ATTEMPTS):
        resource = _read(api)
        current = profile_of(resource)
        annotations = dict((resource.get("metadata") or {}).get("annotations") or {})
        previous = annotations.get(PREVIOUS_ANNOTATION)
        if previous is None:
            outcome = ProfileOutcome("nothing-to-do", current, conflicts=attempt)
            outcome.notes.append("no profile recorded by auditrelay enable: nothing to roll back")
            return outcome
        if current != WANTED and not force:
            raise RollbackRefusedError(
                f"the audit profile is {current}, not the {WANTED} enable set: someone changed "
                "it since; check it, then use --force"
            )
        changed = copy.deepcopy(resource)
        audit = changed["spec"].setdefault("audit", {}) or {}
        changed["spec"]["audit"] = audit
        if previous == UNSET:
            audit.pop("profile", None)
        else:
            audit["profile"] = previous
        del annotations[PREVIOUS_ANNOTATION]
        changed["metadata"]["annotations"] = annotations
        if _replaced(api, changed):
            return ProfileOutcome(
                "rolled-back", profile_of(changed), previous=current, conflicts=attempt
            )
    raise AuditSetupError(f"{PLURAL}.{GROUP}/{NAME}: {ATTEMPTS} writes in a row met a conflict")


def _replaced(api: CustomObjects, body: dict[str, Any]) -> bool:
    """True when written; False on 409 Conflict (the resourceVersion is stale: read again)."""
    try:
        api.replace_cluster_custom_object(GROUP, VERSION, PLURAL, NAME, body)
    except ApiException as error:
        if error.status == 409:
            return False
        raise AuditSetupError(
            f"{PLURAL}.{GROUP}/{NAME}: write refused ({error.status} {error.reason})"
        ) from error
    return True
