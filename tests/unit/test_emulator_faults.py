"""Fault descriptions (command line and admin JSON) and the plan that picks them."""

from __future__ import annotations

import pytest
from auditrelay.emulator.faults import (
    DEFAULT_TIMEOUT_DELAY,
    Fault,
    FaultError,
    FaultKind,
    FaultPlan,
    parse_fault,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("503", Fault(FaultKind.STATUS, status=503)),
        ("429:retry_after=2,count=5", Fault(FaultKind.STATUS, 429, retry_after=2.0, count=5)),
        ("slow:delay=1.5", Fault(FaultKind.SLOW, delay=1.5)),
        ("timeout_after_store", Fault(FaultKind.TIMEOUT_AFTER_STORE, delay=DEFAULT_TIMEOUT_DELAY)),
        ("drop_before_body:probability=0.25", Fault(FaultKind.DROP_BEFORE_BODY, probability=0.25)),
        ("drop_after_body:count=1", Fault(FaultKind.DROP_AFTER_BODY, count=1)),
        ("DROP_AFTER_STORE", Fault(FaultKind.DROP_AFTER_STORE)),
    ],
)
def test_command_line_faults_parse(text: str, expected: Fault) -> None:
    """Every documented command-line form gives the fault it names."""
    assert expected == parse_fault(text)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("teapot", "unknown fault kind 'teapot'"),
        ("200", "HTTP status from 400 to 599"),
        ("503:count=0", "count must be at least 1"),
        ("503:probability=1.5", r"probability must be in \(0, 1\]"),
        ("503:every=2", "unknown options every"),
        ("503:count", "expected key=value"),
        ("503:count=many", "'503:count=many'"),
    ],
)
def test_bad_command_line_faults_say_what_was_expected(text: str, complaint: str) -> None:
    """A fault that cannot be understood is refused with a specific message."""
    with pytest.raises(FaultError, match=complaint):
        parse_fault(text)


def test_admin_json_round_trips() -> None:
    """A fault shown by the admin endpoint reads back as the same fault."""
    fault = Fault(FaultKind.STATUS, 429, retry_after=1.0, count=3, probability=0.5)

    assert {"kind": "429", "retry_after": 1.0, "count": 3, "probability": 0.5} == fault.to_json()
    assert fault == Fault.from_json(fault.to_json())
    assert Fault(FaultKind.STATUS, 502) == Fault.from_json({"kind": "status", "status": 502})


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ({"count": 1}, 'with a "kind"'),
        ({"kind": "503", "times": 1}, "unknown fault fields: times"),
        ({"kind": "503", "count": "x"}, "bad fault value"),
    ],
)
def test_bad_admin_json_is_refused(document: dict[str, object], complaint: str) -> None:
    """Admin JSON with a missing kind, an unknown field or a bad value is refused."""
    with pytest.raises(FaultError, match=complaint):
        Fault.from_json(document)


def test_counted_fault_strikes_exactly_that_many_requests() -> None:
    """A fault with count=N hits the next N requests, then is gone."""
    plan = FaultPlan([parse_fault("503:count=2")])

    picked = [plan.pick() for _ in range(3)]

    assert [503, 503, None] == [fault.status if fault else None for fault in picked]
    assert [] == plan.active()


def test_first_fault_in_order_wins_and_the_next_takes_over() -> None:
    """Faults apply in the order added; when one is used up the next one applies."""
    plan = FaultPlan([parse_fault("500:count=1"), parse_fault("502")])

    assert ["500", "502", "502"] == [plan.pick().name for _ in range(3)]  # type: ignore[union-attr]


def test_probabilistic_fault_strikes_about_that_share_of_requests() -> None:
    """probability=0.25 hits about a quarter of requests (seeded, so the count is fixed)."""
    plan = FaultPlan([parse_fault("503:probability=0.25")], seed=1)

    hits = sum(plan.pick() is not None for _ in range(1000))

    assert 200 <= hits <= 300


def test_clear_removes_every_fault() -> None:
    """clear() leaves the plan empty: requests are served normally again."""
    plan = FaultPlan([parse_fault("503"), parse_fault("slow:delay=1")])
    plan.clear()

    assert plan.pick() is None
