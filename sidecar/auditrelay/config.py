"""Configuration: one typed, validated object per pipeline, built in one place.

Every setting of a pipeline is a property of the Fluent Bit ``[OUTPUT] Name auditrelay``
section. ``PROPERTIES`` is the one list of them: the plugin's Go key list and Fluent Bit
config map are generated from it (``make generate``), the docs table too, and
``PipelineSettings.from_properties`` parses and validates a Configure request against it.

The sidecar's own process settings (``ServerSettings``) come from flags or ``AUDITRELAY_*``
environment variables derived from the field names.

Names avoid the keys Fluent Bit reserves for itself (``host``, ``port``, ``tls.*``,
``workers``, ``match``, ``retry_limit``, ``storage.*``, ...); Fluent Bit would never pass
them to the plugin.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from auditrelay.errors import ConfigError, PropertyProblem
from auditrelay.property_values import (
    choice,
    int_range,
    parse_dcr_id,
    parse_https_url,
    parse_readable_file,
    parse_sidecar_address,
    parse_stream,
    parse_text,
    positive,
    size_range,
)
from auditrelay.property_values import (
    parse_bool as parse_bool,
)
from auditrelay.property_values import (
    parse_duration as parse_duration,
)
from auditrelay.property_values import (
    parse_size as parse_size,
)

BUNDLED_POLICY = Path(__file__).parent / "data" / "audit_policy.yaml"


class Owner(enum.Enum):
    """Which side acts on a property: the plugin itself, or the sidecar's pipeline."""

    PLUGIN = "plugin"
    PIPELINE = "pipeline"


class Auth(enum.Enum):
    """How the sidecar obtains tokens for the Logs Ingestion API."""

    WORKLOAD_IDENTITY = "workload_identity"
    MANAGED_IDENTITY = "managed_identity"
    CLIENT_SECRET = "client_secret"  # noqa: S105 - the name of an auth method, not a secret
    CLIENT_CERTIFICATE = "client_certificate"
    DEFAULT = "default"


class Cloud(enum.Enum):
    """The Azure cloud, which fixes the token authority and the ingestion audience."""

    PUBLIC = "public"
    USGOV = "usgov"
    CHINA = "china"


CLOUD_AUTHORITY = {
    Cloud.PUBLIC: "https://login.microsoftonline.com",
    Cloud.USGOV: "https://login.microsoftonline.us",
    Cloud.CHINA: "https://login.chinacloudapi.cn",
}
CLOUD_AUDIENCE = {
    Cloud.PUBLIC: "https://monitor.azure.com",
    Cloud.USGOV: "https://monitor.azure.us",
    Cloud.CHINA: "https://monitor.azure.cn",
}


class SpoolSync(enum.Enum):
    """When spool appends reach the disk."""

    ALWAYS = "always"  # fsync before every ACCEPTED reply: nothing acknowledged is ever lost
    INTERVAL = "interval"  # fsync every spool_sync_interval: a power loss may lose that interval


# --- the property table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Property:
    """One key of the ``[OUTPUT] Name auditrelay`` section."""

    name: str
    owner: Owner
    description: str
    default: str | None = None  # as the user would write it; None means not set
    parse: Callable[[str], Any] = parse_text
    secret: bool = False  # never logged, never echoed in an error
    # Part of where the rows go: the pipeline's id (and so its spool) is its instance and these;
    # every other property can change and the spool's backlog stays with the pipeline.
    destination: bool = False


PROPERTIES: tuple[Property, ...] = (
    # The plugin's own: how to reach the sidecar.
    Property("sidecar_address", Owner.PLUGIN,
             "Where the sidecar listens: unix:///path.sock (shared in the pod) or host:port (TLS).",
             "unix:///run/auditrelay/relay.sock", parse_sidecar_address),
    Property("sidecar_tls_ca", Owner.PLUGIN,
             "CA bundle that signed the sidecar's certificate; required for host:port addresses.",
             None, parse_readable_file),
    Property("sidecar_tls_cert", Owner.PLUGIN,
             "Client certificate the plugin presents to the sidecar (mTLS).", None, parse_readable_file),
    Property("sidecar_tls_key", Owner.PLUGIN,
             "Private key of sidecar_tls_cert.", None, parse_readable_file),
    Property("sidecar_timeout", Owner.PLUGIN,
             "Hard deadline of one Push; a flush that takes longer is retried by Fluent Bit.",
             "2s", positive(parse_duration, "duration")),
    Property("sidecar_wait", Owner.PLUGIN,
             "How long init waits for the sidecar to come up before Fluent Bit gives up.",
             "30s", positive(parse_duration, "duration")),
    # The pipeline's: where the events go.
    Property("endpoint", Owner.PIPELINE,
             "Logs ingestion endpoint of the DCR or its DCE. Unset: the bundled local emulator, "
             "and the other Azure properties are ignored.",
             None, parse_https_url, destination=True),
    Property("endpoint_ca", Owner.PIPELINE,
             "Extra CA bundle to trust for the endpoint (the emulator's CA, a TLS-inspecting proxy).",
             None, parse_readable_file),
    Property("dcr_id", Owner.PIPELINE,
             "Immutable id of the data collection rule (dcr-...). Required with endpoint; "
             "ignored without it.",
             None, parse_dcr_id, destination=True),
    Property("stream", Owner.PIPELINE,
             "Stream of the data collection rule that receives the rows.",
             "Custom-KubeAudit_CL", parse_stream, destination=True),
    Property("auth", Owner.PIPELINE,
             "How to get tokens: workload_identity, managed_identity, client_secret, "
             "client_certificate or default (DefaultAzureCredential).",
             "workload_identity", choice(Auth)),
    Property("cloud", Owner.PIPELINE,
             "Azure cloud: public, usgov or china; sets the token authority and audience.",
             "public", choice(Cloud)),
    Property("authority_host", Owner.PIPELINE,
             "Overrides the Microsoft Entra authority of the cloud (https URL).",
             None, parse_https_url),
    Property("tenant_id", Owner.PIPELINE, "Microsoft Entra tenant id.", None),
    Property("client_id", Owner.PIPELINE,
             "Application (client) id, or the user-assigned managed identity's client id.", None),
    Property("client_secret", Owner.PIPELINE,
             "Client secret for auth client_secret. Prefer an environment reference: ${VAR}.",
             None, secret=True),
    Property("client_certificate", Owner.PIPELINE,
             "PEM file with the certificate and private key for auth client_certificate.",
             None, parse_readable_file),
    Property("federated_token_file", Owner.PIPELINE,
             "Projected service-account token for workload_identity "
             "(default: $AZURE_FEDERATED_TOKEN_FILE).", None, parse_readable_file),
    Property("cluster_name", Owner.PIPELINE,
             "Cluster name written into every row (Cluster_Name).", None),
    Property("cluster_id", Owner.PIPELINE,
             "Cluster identity written into every row (Cluster_Id), e.g. the Arc resource id.", None),
    Property("policy", Owner.PIPELINE,
             "Audit policy file applied to every event (default: the bundled Defender policy).",
             None, parse_readable_file),
    Property("compression_level", Owner.PIPELINE,
             "gzip level of request bodies, 1 (fastest) to 9 (smallest).", "1", int_range(1, 9)),
    Property("max_request_raw_bytes", Owner.PIPELINE,
             "Largest uncompressed body of one request (64K to 32M). The wire size stays under "
             "1 MiB whatever this says; after a 413 that only the uncompressed size explains, "
             "the pipeline lowers it to 1M by itself (docs/azure.md, Requests).",
             "32M", size_range(64 << 10, 32 << 20)),
    Property("batch_interval", Owner.PIPELINE,
             "Longest time a row waits for its batch to fill before it is sent.",
             "1s", positive(parse_duration, "duration")),
    Property("max_concurrency", Owner.PIPELINE,
             "Requests in flight to the endpoint at once.", "2", int_range(1, 64)),
    Property("request_timeout", Owner.PIPELINE,
             "Deadline of one request to the endpoint.", "30s", positive(parse_duration, "duration")),
    Property("spool_limit", Owner.PIPELINE,
             "Disk the pipeline's spool may use; when full, Fluent Bit is asked to retry later.",
             "1G", positive(parse_size, "size")),
    Property("spool_sync", Owner.PIPELINE,
             "always: fsync before acknowledging a chunk; interval: every spool_sync_interval "
             "(a power loss may lose that interval).", "always", choice(SpoolSync)),
    Property("spool_sync_interval", Owner.PIPELINE,
             "fsync period when spool_sync is interval.", "1s", positive(parse_duration, "duration")),
    Property("not_ready_after", Owner.PIPELINE,
             "How long delivery may fail before /readyz reports not ready.",
             "5m", positive(parse_duration, "duration")),
)  # fmt: skip

PROPERTY_BY_NAME: dict[str, Property] = {prop.name: prop for prop in PROPERTIES}
DESTINATION_PROPERTIES: tuple[str, ...] = tuple(p.name for p in PROPERTIES if p.destination)

# Settings the emulator replaces with its own when endpoint is unset (auth and cloud too).
AZURE_ONLY_PROPERTIES = (
    "dcr_id",
    "endpoint_ca",
    "tenant_id",
    "client_id",
    "client_secret",
    "client_certificate",
    "federated_token_file",
)


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """Everything one pipeline needs, parsed and checked. Units: seconds and bytes.

    One field per pipeline property of ``PROPERTIES`` (its parsed value; the name, default, help
    and parser are declared there), plus ``instance_name`` and the cloud's ``audience``.
    """

    instance_name: str
    endpoint: str | None
    endpoint_ca: Path | None
    dcr_id: str | None
    stream: str
    auth: Auth
    cloud: Cloud
    authority_host: str
    audience: str
    tenant_id: str | None
    client_id: str | None
    client_secret: str | None
    client_certificate: Path | None
    federated_token_file: Path | None
    cluster_name: str
    cluster_id: str
    policy: Path
    compression_level: int
    max_request_raw_bytes: int
    batch_interval: float
    max_concurrency: int
    request_timeout: float
    spool_limit: int
    spool_sync: SpoolSync
    spool_sync_interval: float
    not_ready_after: float

    @property
    def uses_emulator(self) -> bool:
        """No endpoint set: the pipeline delivers to the bundled local emulator."""
        return self.endpoint is None

    @property
    def ignored_by_emulator(self) -> list[str]:
        """The Azure properties that are set but unused, because endpoint alone picks the emulator."""
        if not self.uses_emulator:
            return []
        return [name for name in AZURE_ONLY_PROPERTIES if getattr(self, name) is not None]

    def destination(self) -> dict[str, str | None]:
        """Where the rows go, as parsed (defaults applied): the destination properties' values.

        No secret is among them, so this may be logged and written beside the spool.
        """
        return {name: getattr(self, name) for name in DESTINATION_PROPERTIES}

    @classmethod
    def from_properties(
        cls, properties: Mapping[str, str], instance_name: str = "auditrelay.0"
    ) -> PipelineSettings:
        """Parses a Configure request's properties; raises ConfigError listing every problem."""
        values, problems = _parse_all(properties)
        problems += _check_combinations(values)
        if problems:
            raise ConfigError(problems)
        cloud: Cloud = values["cloud"]
        derived = {
            "instance_name": instance_name,
            "authority_host": values["authority_host"] or CLOUD_AUTHORITY[cloud],
            "audience": CLOUD_AUDIENCE[cloud],
            "cluster_name": values["cluster_name"] or "",
            "cluster_id": values["cluster_id"] or "",
            "policy": values["policy"] or BUNDLED_POLICY,
        }
        # Every pipeline property is a field of the same name (a test holds them in step).
        return cls(**{**values, **derived})


def _parse_all(properties: Mapping[str, str]) -> tuple[dict[str, Any], list[PropertyProblem]]:
    given = {key.lower(): value for key, value in properties.items()}
    values: dict[str, Any] = {}
    problems = [
        PropertyProblem(key, given[key], "a known property (see docs/configuration.md)")
        for key in sorted(set(given) - set(PROPERTY_BY_NAME))
    ]
    for prop in PROPERTIES:
        if prop.owner is Owner.PLUGIN:
            continue  # the plugin checks its own; its files live in Fluent Bit's container
        raw = given.get(prop.name, prop.default)
        if raw is None or (raw == "" and prop.default is None):
            values[prop.name] = None
            continue
        try:
            values[prop.name] = prop.parse(raw)
        except ValueError as error:
            shown = "" if prop.secret else raw
            problems.append(PropertyProblem(prop.name, shown, str(error)))
    return values, problems


def _require(values: Mapping[str, Any], name: str, why: str) -> list[PropertyProblem]:
    if values.get(name) is None:
        return [PropertyProblem(name, "", f"a value {why}")]
    return []


def _check_combinations(values: Mapping[str, Any]) -> list[PropertyProblem]:
    problems: list[PropertyProblem] = []
    if values.get("endpoint") is not None:
        problems += _require(values, "dcr_id", "when endpoint is set")
    auth = values.get("auth")
    if values.get("endpoint") is not None and auth is Auth.CLIENT_SECRET:
        for name in ("tenant_id", "client_id", "client_secret"):
            problems += _require(values, name, "for auth client_secret")
    if values.get("endpoint") is not None and auth is Auth.CLIENT_CERTIFICATE:
        for name in ("tenant_id", "client_id", "client_certificate"):
            problems += _require(values, name, "for auth client_certificate")
    return problems


# --- the sidecar process ----------------------------------------------------------------------


class LogFormat(enum.Enum):
    """How log lines look: JSON for collectors, console for people, auto picks by the terminal."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


def _setting(default: Any, help_text: str) -> Any:
    """A ServerSettings field: its default and the help text of its flag and of the docs."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The sidecar process's own settings (flags, or AUDITRELAY_<FIELD> in the environment).

    Each field's type, default and help text are declared here once: ``auditrelay serve``'s flags
    and ``--help``, and the process table of docs/configuration.md, are made from them.
    """

    listen: str = _setting(
        "unix:///run/auditrelay/relay.sock",
        "where the plugin connects: unix:///path.sock or host:port (TLS)",
    )
    tls_cert: Path | None = _setting(None, "server certificate, required for a TCP listen address")
    tls_key: Path | None = _setting(None, "private key of the server certificate")
    tls_client_ca: Path | None = _setting(
        None, "when set, clients must present a certificate this CA signed"
    )
    state_dir: Path = _setting(
        Path("/var/lib/auditrelay"), "spools, dead letters and the emulator's CA live here"
    )
    metrics_address: str = _setting("127.0.0.1:2021", "host:port of /metrics, /healthz and /readyz")
    log_format: LogFormat = _setting(
        LogFormat.AUTO, "json for collectors, console for people, auto picks by the terminal"
    )
    log_level: str = _setting("info", "debug, info, warning, error or critical")
    max_chunk_bytes: int = _setting(
        64 << 20, "the largest Push accepted; Fluent Bit chunks are about 2 MB"
    )
    orphan_after: float = _setting(
        60.0, "seconds after start that a spool no pipeline claimed is reported as orphaned"
    )

    NOT_SET: ClassVar[str] = "(not set)"

    @staticmethod
    def env_name(field_name: str) -> str:
        """The environment variable that sets a field: AUDITRELAY_<FIELD>."""
        return f"AUDITRELAY_{field_name.upper()}"

    @staticmethod
    def flag(field_name: str) -> str:
        """The ``auditrelay serve`` flag that sets a field: --<field-with-dashes>."""
        return "--" + field_name.replace("_", "-")

    @classmethod
    def field_names(cls) -> list[str]:
        """Every setting's name, in declaration order."""
        return [item.name for item in fields(cls)]

    @classmethod
    def help_text(cls, field_name: str) -> str:
        """What a setting is for, as declared beside it."""
        return str(next(item for item in fields(cls) if item.name == field_name).metadata["help"])

    @classmethod
    def default_text(cls, field_name: str) -> str:
        """A setting's default as a user would write it."""
        default = next(item for item in fields(cls) if item.name == field_name).default
        if isinstance(default, enum.Enum):
            return str(default.value)
        return ServerSettings.NOT_SET if default is None else str(default)
