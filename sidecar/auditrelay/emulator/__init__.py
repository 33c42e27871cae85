"""A faithful local Azure Monitor Logs Ingestion endpoint, with its own Microsoft Entra.

For development, demos, tests and benchmarks: the real ``azure-monitor-ingestion`` client and
the real ``azure-identity`` credentials talk to it over real HTTPS. See ``server.Emulator``.
"""

from auditrelay.emulator.faults import Fault, FaultError, FaultKind, parse_fault
from auditrelay.emulator.schema import (
    DeclarationError,
    StreamDeclaration,
    load_declarations,
    shipped_declarations,
)
from auditrelay.emulator.server import (
    ADMIN_HEADER,
    DEFAULT_DCR_ID,
    BodyMode,
    Emulator,
    EmulatorSettings,
    SizeLimits,
    running_in_thread,
)
from auditrelay.emulator.store import ErrorEntry, RequestRecord, Store, StoredRow, StoreMode

__all__ = [
    "ADMIN_HEADER",
    "DEFAULT_DCR_ID",
    "BodyMode",
    "DeclarationError",
    "Emulator",
    "EmulatorSettings",
    "ErrorEntry",
    "Fault",
    "FaultError",
    "FaultKind",
    "RequestRecord",
    "SizeLimits",
    "Store",
    "StoreMode",
    "StoredRow",
    "StreamDeclaration",
    "load_declarations",
    "parse_fault",
    "running_in_thread",
    "shipped_declarations",
]
