"""What the emulator's request handlers share: the running emulator's parts (``server.Emulator``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from auditrelay.emulator.faults import FaultPlan
from auditrelay.emulator.settings import EmulatorSettings
from auditrelay.emulator.store import Store
from auditrelay.emulator.tokens import TokenIssuer

T = TypeVar("T")


class EmulatorContext(Protocol):
    """The parts of a started emulator that ingestion, Entra and the admin API use."""

    @property
    def settings(self) -> EmulatorSettings:
        """How the emulator behaves."""

    @property
    def store(self) -> Store:
        """Its database: requests, rows, the error log, token requests."""

    @property
    def faults(self) -> FaultPlan:
        """The faults injected into ingestion."""

    @property
    def admin_key(self) -> str:
        """The key the admin API requires."""

    @property
    def tokens(self) -> TokenIssuer:
        """The token authority."""

    @property
    def authority_host(self) -> str:
        """The Microsoft Entra authority URL."""

    async def in_store_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Runs ``function`` on the one store thread, in arrival order."""

    async def notify(self) -> None:
        """Wakes the ``wait_*`` callers: something was stored."""
