"""Failures the emulator can be told to produce, for the next N requests or by probability.

A fault is written ``KIND[:key=value,...]`` on the command line (``--fault 503:count=3``,
``--fault 429:retry_after=2``, ``--fault drop_before_body:probability=0.1``,
``--fault timeout_after_store:delay=30,count=1``) and as a JSON object on the admin endpoint
(``{"kind": "503", "count": 3}``). KIND is an HTTP status (answered with the ErrorResponse
body, and ``Retry-After`` only when ``retry_after`` is given) or one of:

- ``slow``: wait ``delay`` seconds, then handle the request normally;
- ``timeout_after_store``: store the rows, then wait ``delay`` seconds before answering, so a
  client with a shorter read timeout gives up on a request that did succeed;
- ``drop_before_body``: close the connection without reading the body or answering;
- ``drop_after_body``: read the body, store nothing, close without answering;
- ``drop_after_store``: store the rows, then close without answering.

Without ``count`` or ``probability`` a fault applies to every request until cleared.
"""

from __future__ import annotations

import enum
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

STATUS_CODES = {
    400: "BadRequest",
    403: "OperationFailed",
    404: "NotFound",
    408: "RequestTimeout",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
DEFAULT_TIMEOUT_DELAY = 30.0


class FaultKind(enum.Enum):
    """What a fault does to the request it hits."""

    STATUS = "status"
    SLOW = "slow"
    TIMEOUT_AFTER_STORE = "timeout_after_store"
    DROP_BEFORE_BODY = "drop_before_body"
    DROP_AFTER_BODY = "drop_after_body"
    DROP_AFTER_STORE = "drop_after_store"


class FaultError(ValueError):
    """A fault description that cannot be understood; the message says what was expected."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure and how often it strikes."""

    kind: FaultKind
    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    count: int | None = None
    probability: float | None = None

    def __post_init__(self) -> None:
        if self.kind is FaultKind.STATUS and (self.status is None or not 400 <= self.status < 600):
            raise FaultError(
                f"a status fault needs an HTTP status from 400 to 599, got {self.status}"
            )
        if self.count is not None and self.count < 1:
            raise FaultError(f"count must be at least 1, got {self.count}")
        if self.probability is not None and not 0.0 < self.probability <= 1.0:
            raise FaultError(f"probability must be in (0, 1], got {self.probability}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise FaultError("delay and retry_after must not be negative")

    @property
    def name(self) -> str:
        """The kind as written on the command line: ``503`` or ``slow``."""
        return str(self.status) if self.kind is FaultKind.STATUS else self.kind.value

    def to_json(self) -> dict[str, Any]:
        """The admin endpoint's form of this fault."""
        shown: dict[str, Any] = {"kind": self.name}
        for key in ("retry_after", "count", "probability"):
            if getattr(self, key) is not None:
                shown[key] = getattr(self, key)
        if self.delay:
            shown["delay"] = self.delay
        return shown

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Fault:
        """A fault from the admin endpoint's JSON object."""
        if not isinstance(document, Mapping) or "kind" not in document:
            raise FaultError('expected an object with a "kind", e.g. {"kind": "503", "count": 3}')
        unknown = set(document) - {"kind", "status", "retry_after", "delay", "count", "probability"}
        if unknown:
            raise FaultError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        try:
            return _build(
                str(document["kind"]),
                status=_optional(document.get("status"), int),
                retry_after=_optional(document.get("retry_after"), float),
                delay=_optional(document.get("delay"), float),
                count=_optional(document.get("count"), int),
                probability=_optional(document.get("probability"), float),
            )
        except (TypeError, ValueError) as error:
            if isinstance(error, FaultError):
                raise
            raise FaultError(f"bad fault value: {error}") from error


def _optional(value: Any, convert: type[int] | type[float]) -> Any:
    return None if value is None else convert(value)


def parse_fault(text: str) -> Fault:
    """A fault from its command-line form, ``KIND[:key=value,...]``."""
    kind, _, options = text.strip().partition(":")
    values: dict[str, str] = {}
    for option in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = option.partition("=")
        if not sep:
            raise FaultError(f"{text!r}: expected key=value after the kind, got {option!r}")
        values[key.strip()] = value.strip()
    unknown = set(values) - {"retry_after", "delay", "count", "probability"}
    if unknown:
        raise FaultError(
            f"{text!r}: unknown options {', '.join(sorted(unknown))}; "
            "expected retry_after, delay, count, probability"
        )
    try:
        return _build(
            kind,
            status=None,
            retry_after=float(values["retry_after"]) if "retry_after" in values else None,
            delay=float(values["delay"]) if "delay" in values else None,
            count=int(values["count"]) if "count" in values else None,
            probability=float(values["probability"]) if "probability" in values else None,
        )
    except ValueError as error:
        if isinstance(error, FaultError):
            raise
        raise FaultError(f"{text!r}: {error}") from error


def _build(
    kind: str,
    *,
    status: int | None,
    retry_after: float | None,
    delay: float | None,
    count: int | None,
    probability: float | None,
) -> Fault:
    kind = kind.strip().lower()
    if kind.isdigit():
        status, fault_kind = int(kind), FaultKind.STATUS
    else:
        try:
            fault_kind = FaultKind(kind)
        except ValueError:
            allowed = ", ".join(member.value for member in FaultKind)
            raise FaultError(
                f"unknown fault kind {kind!r}; expected an HTTP status (429, 500, 502, 503, "
                "504, ...) "
                f"or one of {allowed}"
            ) from None
    if delay is None:
        delay = DEFAULT_TIMEOUT_DELAY if fault_kind is FaultKind.TIMEOUT_AFTER_STORE else 0.0
    return Fault(fault_kind, status, retry_after, delay, count, probability)


class FaultPlan:
    """The active faults, in the order they were added; the first that strikes wins."""

    def __init__(self, faults: list[Fault] | None = None, seed: int | None = None) -> None:
        self._faults: list[Fault] = list(faults or [])
        self._random = random.Random(seed)  # noqa: S311 -- choosing failures, not secrets
        self._lock = threading.Lock()  # a test thread may change the plan while the loop reads it

    def add(self, fault: Fault) -> None:
        """Appends a fault."""
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        """Removes every fault."""
        with self._lock:
            self._faults.clear()

    def active(self) -> list[Fault]:
        """The faults still in force (``count`` shows what is left)."""
        with self._lock:
            return list(self._faults)

    def pick(self) -> Fault | None:
        """The fault for the next request, if any; counts it against its ``count``."""
        with self._lock:
            return self._pick()

    def _pick(self) -> Fault | None:
        for position, fault in enumerate(self._faults):
            if fault.probability is not None and self._random.random() >= fault.probability:
                continue
            if fault.count is not None:
                if fault.count == 1:
                    del self._faults[position]
                else:
                    self._faults[position] = replace(fault, count=fault.count - 1)
            return fault
        return None
