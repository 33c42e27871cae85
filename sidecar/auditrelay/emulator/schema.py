"""Stream declarations and the per-row checks a data collection rule applies.

A stream declaration is the DCR's ``streamDeclarations`` entry: column names and their JSON
types (string, int, long, real, boolean, datetime, dynamic). The service answers 204 for a
body whatever its rows look like and drops, silently, the rows that do not fit; the emulator
drops them too and says why in its error log, so tests can see what the service would hide.

TimeGenerated: every row that reaches the table needs one. A row without it is dropped
(unless the emulator stands in for a rule whose transformation supplies it); a value more
than 2 days in the past or 1 day in the future is replaced by the time of receipt, as the
service does. String values longer than 64 KB are cut to 64 KB, also as the service does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

COLUMN_TYPES = ("string", "int", "long", "real", "boolean", "datetime", "dynamic")
TIME_GENERATED = "TimeGenerated"
MAX_FIELD_BYTES = 64 * 1024
PAST_LIMIT = timedelta(days=2)
FUTURE_LIMIT = timedelta(days=1)
RESERVED_COLUMNS = frozenset(
    {"_ResourceId", "id", "_SubscriptionId", "TenantId", "Type", "UniqueId", "Title"}
)
DEPLOYED_TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "auditrelay.json"
DCR_RESOURCE_TYPE = "Microsoft.Insights/dataCollectionRules"
_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,44}$")

_NUMBER = (int, float)


class DeclarationError(ValueError):
    """A stream declaration the service would refuse; the message names the column."""


@dataclass(frozen=True, slots=True)
class StreamDeclaration:
    """The declared columns of one DCR stream, checked like the service checks them."""

    name: str
    columns: Mapping[str, str]
    audit_id_column: str | None = field(default=None)

    def __post_init__(self) -> None:
        for column, column_type in self.columns.items():
            if not _COLUMN_NAME.match(column):
                raise DeclarationError(
                    f"stream {self.name}: column {column!r} must start with a letter and have "
                    "at most 45 letters, digits or _"
                )
            if column in RESERVED_COLUMNS:
                raise DeclarationError(f"stream {self.name}: column {column!r} is a reserved name")
            if column_type not in COLUMN_TYPES:
                raise DeclarationError(
                    f"stream {self.name}: column {column!r} has type {column_type!r}, expected "
                    f"one of {', '.join(COLUMN_TYPES)}"
                )
        if self.audit_id_column is None:
            found = next((c for c in self.columns if c.lower() == "auditid"), None)
            object.__setattr__(self, "audit_id_column", found)


def shipped_declarations() -> dict[str, StreamDeclaration]:
    """The streams the deployed data collection rule declares.

    Read from the ARM template an operator deploys (deploy/azure/auditrelay.json, shipped in the
    package as ``data/auditrelay.json``), never from the row encoder's own column table: a row
    the encoder writes with a wrong type is then dropped here, as the service would drop it,
    instead of being agreed with.
    """
    return load_declarations(DEPLOYED_TEMPLATE)


def load_declarations(path: Path) -> dict[str, StreamDeclaration]:
    """Stream declarations from a JSON file.

    Accepts an ARM template holding one data collection rule, a whole DCR resource
    (``properties.streamDeclarations``), a ``streamDeclarations`` object, or a plain
    ``{stream: {column: type}}`` mapping.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DeclarationError(f"{path}: cannot read stream declarations: {error}") from error
    return parse_declarations(document, source=str(path))


def parse_declarations(document: Any, source: str = "declaration") -> dict[str, StreamDeclaration]:
    """See ``load_declarations``; ``document`` is the parsed JSON."""
    if isinstance(document, dict) and isinstance(document.get("resources"), list):
        document = _the_rule(document["resources"], source)
    if isinstance(document, dict) and "properties" in document:
        document = document["properties"]
    if isinstance(document, dict) and "streamDeclarations" in document:
        document = document["streamDeclarations"]
    if not isinstance(document, dict) or not document:
        raise DeclarationError(f"{source}: expected an object of stream declarations")
    declarations: dict[str, StreamDeclaration] = {}
    for stream, body in document.items():
        declarations[stream] = StreamDeclaration(stream, _columns_of(stream, body, source))
    return declarations


def _the_rule(resources: list[Any], source: str) -> Any:
    rules = [
        resource
        for resource in resources
        if isinstance(resource, dict) and resource.get("type") == DCR_RESOURCE_TYPE
    ]
    if len(rules) != 1:
        raise DeclarationError(
            f"{source}: expected one {DCR_RESOURCE_TYPE} resource in the template, "
            f"found {len(rules)}"
        )
    return rules[0]


def _columns_of(stream: str, body: Any, source: str) -> dict[str, str]:
    if isinstance(body, dict) and isinstance(body.get("columns"), list):
        columns: dict[str, str] = {}
        for entry in body["columns"]:
            if not isinstance(entry, dict) or "name" not in entry or "type" not in entry:
                raise DeclarationError(
                    f"{source}: stream {stream}: each column needs a name and a type, got {entry!r}"
                )
            columns[str(entry["name"])] = str(entry["type"]).lower()
        return columns
    if isinstance(body, dict) and all(isinstance(value, str) for value in body.values()):
        return {str(name): value.lower() for name, value in body.items()}
    raise DeclarationError(
        f"{source}: stream {stream}: expected {{'columns': [{{'name', 'type'}}]}} "
        "or {column: type}"
    )


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Why one row of a body was dropped or changed."""

    index: int
    kind: str
    message: str
    dropped: bool = True


@dataclass(slots=True)
class CheckedBody:
    """The rows of one body that the table would keep, and the problems met."""

    rows: list[dict[str, Any]]
    problems: list[RowProblem]


def _is_datetime(value: Any) -> bool:
    return isinstance(value, str) and _parse_time(value) is not None


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _type_name(value: Any) -> str:
    names = {
        str: "string",
        bool: "boolean",
        int: "long",
        float: "real",
        dict: "object",
        list: "array",
    }
    return names.get(type(value), type(value).__name__)


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "long": (int,),
    "real": (int, float),
    "boolean": (bool,),
}


class RowChecker:
    """Checks rows against one stream declaration; built once, used for every body."""

    def __init__(self, declaration: StreamDeclaration, *, fill_time_generated: bool = False):
        self.declaration = declaration
        self.fill_time_generated = fill_time_generated
        self._declared = frozenset(declaration.columns)
        self._simple = [
            (name, _SIMPLE_TYPES[kind], kind)
            for name, kind in declaration.columns.items()
            if kind in _SIMPLE_TYPES
        ]
        self._datetimes = [
            name
            for name, kind in declaration.columns.items()
            if kind == "datetime" and name != TIME_GENERATED
        ]
        self._strings = [name for name, kind in declaration.columns.items() if kind == "string"]

    def check(self, records: list[Any], received: datetime) -> CheckedBody:
        """Keeps the rows that fit; each dropped or changed row gets a RowProblem."""
        kept: list[dict[str, Any]] = []
        problems: list[RowProblem] = []
        window = (received - PAST_LIMIT, received + FUTURE_LIMIT)
        received_text = received.isoformat().replace("+00:00", "Z")
        for index, record in enumerate(records):
            problem = self._problem(index, record)
            if problem is None:
                problem = self._fix_time_generated(index, record, window, received_text)
            if problem is not None and problem.dropped:
                problems.append(problem)
                continue
            if problem is not None:
                problems.append(problem)
            problems.extend(self._truncate_long_strings(index, record))
            kept.append(record)
        return CheckedBody(kept, problems)

    def _problem(self, index: int, record: Any) -> RowProblem | None:
        if not isinstance(record, dict):
            return RowProblem(
                index, "RecordNotObject", f"record {index} is a {_type_name(record)}, not an object"
            )
        if not record.keys() <= self._declared:
            extra = sorted(set(record) - self._declared)
            return RowProblem(
                index,
                "UndeclaredColumn",
                f"record {index} has columns not declared in {self.declaration.name}: "
                + ", ".join(extra),
            )
        for name, allowed, kind in self._simple:
            value = record.get(name)
            if value is not None and (type(value) not in allowed):
                return self._mismatch(index, name, kind, value)
        for name in self._datetimes:
            value = record.get(name)
            if value is not None and not _is_datetime(value):
                return self._mismatch(index, name, "datetime", value)
        return None

    def _mismatch(self, index: int, name: str, kind: str, value: Any) -> RowProblem:
        return RowProblem(
            index,
            "ColumnTypeMismatch",
            f"record {index}: column {name} is declared {kind}, got {_type_name(value)}",
        )

    def _fix_time_generated(
        self,
        index: int,
        record: dict[str, Any],
        window: tuple[datetime, datetime],
        received_text: str,
    ) -> RowProblem | None:
        value = record.get(TIME_GENERATED)
        if value is None:
            if self.fill_time_generated:
                record[TIME_GENERATED] = received_text
                return None
            return RowProblem(index, "TimeGeneratedMissing", f"record {index} has no TimeGenerated")
        moment = _parse_time(value) if isinstance(value, str) else None
        if moment is None:
            return self._mismatch(index, TIME_GENERATED, "datetime", value)
        if not window[0] <= moment <= window[1]:
            record[TIME_GENERATED] = received_text
            return RowProblem(
                index,
                "TimeGeneratedReplaced",
                f"record {index}: TimeGenerated {value} is outside -2d/+1d of receipt; "
                "replaced by the time received",
                dropped=False,
            )
        return None

    def _truncate_long_strings(self, index: int, record: dict[str, Any]) -> list[RowProblem]:
        problems = []
        for name in self._strings:
            value = record.get(name)
            if isinstance(value, str) and len(value) > MAX_FIELD_BYTES // 4:
                encoded = value.encode("utf-8")
                if len(encoded) > MAX_FIELD_BYTES:
                    record[name] = encoded[:MAX_FIELD_BYTES].decode("utf-8", errors="ignore")
                    problems.append(
                        RowProblem(
                            index,
                            "FieldTruncated",
                            f"record {index}: column {name} has {len(encoded)} bytes; "
                            f"kept the first {MAX_FIELD_BYTES}",
                            dropped=False,
                        )
                    )
        return problems
