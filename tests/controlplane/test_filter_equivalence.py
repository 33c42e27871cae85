"""The sidecar's policy filter keeps exactly what kube-apiserver itself writes.

The same scenario runs twice against real control planes: once with everything recorded at
RequestResponse (no stage omitted), once with the policy under test. The filter, applied to the
first log, must give the second: the same requests, at the same level, with the same fields.
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from auditrelay.model import AuditEvent, EventFilter

from controlplane.cluster import ADMIN_USER, DEVELOPER_USER, KUBE_PROXY_USER, NODE_USER
from controlplane.harness import ScenarioLog
from controlplane.scenario import ANONYMOUS_USERNAME

pytestmark = [pytest.mark.controlplane, pytest.mark.slow, pytest.mark.timeout(900)]

# The scenario's own identities: their requests are the same in every run. The controllers'
# requests depend on timing (lease renewals, resyncs), so they are compared where both runs have
# them, see test_filter_agrees_with_kube_apiserver_on_system_traffic. "" is the scenario's
# request whose authentication failed (no user).
SCENARIO_USERS = frozenset(
    {ADMIN_USER, DEVELOPER_USER, ANONYMOUS_USERNAME, KUBE_PROXY_USER, NODE_USER, ""}
)
# Query parameters that differ between runs of the same request.
_VOLATILE_QUERY = frozenset({"resourceVersion", "timeoutSeconds"})

Key = tuple[str | None, str | None, str, str, str, int | None]
Shape = tuple[str, frozenset[str], frozenset[str], bool, bool]


def _username(event: Mapping[str, Any]) -> str:
    return str(event.get("user", {}).get("username", ""))


def policy_filter(policy: Path) -> EventFilter:
    """The sidecar's filter stage for ``policy`` (auditrelay.filter, the policy branch's work)."""
    try:
        module = importlib.import_module("auditrelay.filter")
    except ModuleNotFoundError as error:
        missing = str(error)
    else:
        return cast(EventFilter, module.PolicyFilter.from_file(policy))
    pytest.fail(f"the sidecar's filter stage is missing: {missing}", pytrace=False)


def request_key(event: Mapping[str, Any]) -> Key:
    """Who asked for what, at which stage, with which answer: equal across runs."""
    parts = urlsplit(str(event.get("requestURI", "")))
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _VOLATILE_QUERY]
    uri = parts.path + ("?" + urlencode(query) if query else "")
    return (
        event.get("user", {}).get("username"),
        event.get("impersonatedUser", {}).get("username"),
        str(event.get("verb")),
        uri,
        str(event.get("stage")),
        event.get("responseStatus", {}).get("code"),
    )


def _has_managed_fields(body: object) -> bool:
    return isinstance(body, dict) and "managedFields" in body.get("metadata", {})


def shape(event: Mapping[str, Any]) -> Shape:
    """What the policy decides about an event: level, fields, annotations, managed fields."""
    return (
        str(event["level"]),
        frozenset(event),
        frozenset(event.get("annotations", {})),
        _has_managed_fields(event.get("requestObject")),
        _has_managed_fields(event.get("responseObject")),
    )


def by_request(events: Iterable[Mapping[str, Any]]) -> dict[Key, set[Shape]]:
    grouped: dict[Key, set[Shape]] = defaultdict(set)
    for event in events:
        grouped[request_key(event)].add(shape(event))
    return dict(grouped)


def filtered_verbose_log(log: ScenarioLog, policy: Path) -> list[dict[str, Any]]:
    """The verbose run's events, each as read from the file, through the sidecar's filter."""
    stage = policy_filter(policy)
    kept: list[dict[str, Any]] = []
    for path in log.files:
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            result = stage.apply(AuditEvent(fields=json.loads(line), raw=line))
            if result is not None:
                kept.append(result.fields)
    return kept


def _difference(expected: Mapping[Key, set[Shape]], actual: Mapping[Key, set[Shape]]) -> str:
    lines = [
        f"{key}: kube-apiserver {expected.get(key)} filter {actual.get(key)}"
        for key in sorted(set(expected) | set(actual), key=repr)
        if expected.get(key) != actual.get(key)
    ]
    return "\n".join(lines[:20])


def test_filter_keeps_what_kube_apiserver_writes_for_the_scenario(
    verbose_scenario_log: ScenarioLog, policy_scenario_log: ScenarioLog
) -> None:
    """For every request of the scenario's users, the filter applied to the everything-log
    yields the same events (level, fields, annotations, managed fields) as kube-apiserver with
    the policy, and drops exactly the ones kube-apiserver did not write."""
    policy = policy_scenario_log.policy
    filtered = by_request(
        e
        for e in filtered_verbose_log(verbose_scenario_log, policy)
        if _username(e) in SCENARIO_USERS
    )
    written = by_request(e for e in policy_scenario_log.events if _username(e) in SCENARIO_USERS)
    assert [] != list(written), "the policy run wrote nothing for the scenario's users"
    assert written == filtered, _difference(written, filtered)


def test_filter_agrees_with_kube_apiserver_on_system_traffic(
    verbose_scenario_log: ScenarioLog, policy_scenario_log: ScenarioLog
) -> None:
    """The controllers' and scheduler's requests that both runs made are kept by the filter
    exactly when, and exactly as, kube-apiserver with the policy wrote them."""
    policy = policy_scenario_log.policy
    verbose = by_request(
        e for e in verbose_scenario_log.events if _username(e) not in SCENARIO_USERS
    )
    filtered = by_request(
        e
        for e in filtered_verbose_log(verbose_scenario_log, policy)
        if _username(e) not in SCENARIO_USERS
    )
    written = by_request(
        e for e in policy_scenario_log.events if _username(e) not in SCENARIO_USERS
    )
    common = set(written) & set(verbose)
    assert len(common) > 20, "too few system requests in common to compare"
    expected = {key: written[key] for key in common}
    actual = {key: filtered[key] for key in common if key in filtered}
    assert expected == actual, _difference(expected, actual)
