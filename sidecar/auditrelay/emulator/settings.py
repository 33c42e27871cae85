"""How one emulator behaves: the service's limits and the knobs tests and demos turn."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from auditrelay.emulator.faults import Fault
from auditrelay.emulator.schema import StreamDeclaration, shipped_declarations
from auditrelay.emulator.store import StoreMode

API_VERSIONS = frozenset({"2023-01-01", "2021-11-01-preview"})
DEFAULT_DCR_ID = "dcr-00000000000000000000000000000000"
DEFAULT_AUDIENCE = "https://monitor.azure.com"
MAX_BODY_BYTES = 1_048_576
MAX_RAW_BYTES = 64 * 1_048_576
REQUESTS_PER_MINUTE = 12_000
BYTES_PER_MINUTE = 2 * 1024**3
MAX_ERRORS_PER_REQUEST = 100
ADMIN_HEADER = "x-auditrelay-admin-key"
INFO_FILE = "emulator.json"


class SizeLimits(enum.Enum):
    """Which bytes the 1 MiB limit of a call counts. Azure documents it for "both compressed
    and uncompressed data"; the 413 observed counts the bytes on the wire."""

    WIRE = "wire"  # the bytes sent; the decompressed body only has a bomb guard
    UNCOMPRESSED = "uncompressed"  # the bytes sent and the decompressed body, 1 MiB each

    @property
    def max_raw_bytes(self) -> int:
        """The largest decompressed body this reading allows."""
        return MAX_RAW_BYTES if self is SizeLimits.WIRE else MAX_BODY_BYTES


class BodyMode(enum.Enum):
    """What happens to a body whose top level is not a JSON array."""

    REALISTIC = "realistic"  # 204, nothing stored, an error-log entry (what the service does)
    STRICT = "strict"  # 400


@dataclass(frozen=True, slots=True)
class EmulatorSettings:
    """How one emulator behaves. Sizes in bytes, times in seconds.

    ``streams`` maps each stream of the rule to its declared columns (``{column: type}`` in
    the DCR's type names) or to a ``StreamDeclaration``; by default, the streams the deployed
    data collection rule declares (``shipped_declarations()``). ``client_secrets`` (client id ->
    secret) makes the token endpoint check secrets; ``allowed_clients`` makes ingestion answer
    403 to other clients, as a rule without their role assignment does.
    """

    state_dir: Path
    streams: Mapping[str, Mapping[str, str] | StreamDeclaration] = field(
        default_factory=shipped_declarations
    )
    dcr_id: str = DEFAULT_DCR_ID
    host: str = "127.0.0.1"
    port: int = 0
    audience: str = DEFAULT_AUDIENCE
    token_lifetime: float = 3600.0
    client_secrets: Mapping[str, str] | None = None
    allowed_clients: frozenset[str] | None = None  # None: every client may ingest
    max_body_bytes: int = MAX_BODY_BYTES
    max_raw_bytes: int = MAX_RAW_BYTES
    requests_per_minute: int = REQUESTS_PER_MINUTE
    bytes_per_minute: int = BYTES_PER_MINUTE
    throttle_retry_after: bool = True
    body_mode: BodyMode = BodyMode.REALISTIC
    store_mode: StoreMode = StoreMode.FULL
    fill_time_generated: bool = False
    faults: tuple[Fault, ...] = ()
    fault_seed: int | None = None

    def declarations(self) -> dict[str, StreamDeclaration]:
        """The stream declarations, whatever form they were given in."""
        return {
            name: value if isinstance(value, StreamDeclaration) else StreamDeclaration(name, value)
            for name, value in self.streams.items()
        }
