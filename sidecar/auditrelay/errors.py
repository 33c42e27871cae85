"""The exception tree of auditrelay.

Inner code raises these typed errors; they are translated only at the boundaries: into a
gRPC status or a Push reply in ``receive``/``app``, into an exit code in ``cli``.

::

    AuditRelayError
    ├── ConfigError            a property or flag has a wrong or missing value
    ├── PolicyError            an audit policy file is not a valid audit.k8s.io Policy
    ├── DecodeError            a chunk is not a msgpack event stream at all
    ├── SpoolError             the spool cannot take or give back data
    │   ├── SpoolFullError     the byte limit is reached: answer RETRY_LATER
    │   └── SpoolCorruptError  a segment is damaged (reported and skipped, never fatal)
    └── DeliveryError          the Logs Ingestion endpoint refused or failed a request
        ├── TransientDeliveryError  worth retrying (throttling, outage, timeout, auth)
        └── PermanentDeliveryError  retrying the same rows cannot help (400 rows)
"""

from __future__ import annotations

from dataclasses import dataclass


class AuditRelayError(Exception):
    """The root of every error auditrelay raises on purpose."""


@dataclass(frozen=True, slots=True)
class PropertyProblem:
    """One rejected setting: which one, the value given, and what was expected."""

    property: str
    value: str
    expected: str

    def __str__(self) -> str:
        shown = f"{self.value!r}" if self.value else "(not set)"
        return f"{self.property}: got {shown}, expected {self.expected}"


class ConfigError(AuditRelayError):
    """A configuration that cannot be accepted; carries every problem found, not just the first."""

    def __init__(self, problems: list[PropertyProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(problem) for problem in problems))


class PolicyError(AuditRelayError):
    """An audit policy file that kube-apiserver would refuse."""


class DecodeError(AuditRelayError):
    """A chunk that is not a msgpack event stream."""


class SpoolError(AuditRelayError):
    """The spool failed to store or read data."""


class SpoolFullError(SpoolError):
    """The spool reached its byte limit; the caller should ask Fluent Bit to retry later."""


class SpoolCorruptError(SpoolError):
    """A spool segment holds a torn or corrupt record."""


class DeliveryError(AuditRelayError):
    """A request to the Logs Ingestion endpoint did not succeed."""


class TransientDeliveryError(DeliveryError):
    """A failure that may succeed later; the rows stay in the spool."""


class PermanentDeliveryError(DeliveryError):
    """A failure that the same rows will always meet; the rows are set aside."""
