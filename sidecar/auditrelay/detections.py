"""The detection rules: KQL over the auditrelay table, one YAML file each in ``detections/``.

A rule file has the shape of a Microsoft Sentinel scheduled analytics rule (id, name,
description, severity, tactics, relevantTechniques, query, queryFrequency, queryPeriod,
triggerOperator, triggerThreshold, entityMappings, version, kind) plus two keys of ours:

- ``defenderAlerts``: the Microsoft Defender for Containers alert types it corresponds to;
- ``auditPolicy``: what it needs of the audit policy: ``level`` (the lowest audit level its
  query can work with), ``rules`` (the audit_policy.yaml rules that record its events) and
  ``probes`` (the ``auditrelay policy verify`` request classes standing for those events).

Every query ends in rows that carry the evidence: an ``AuditIds`` column with the auditIDs of
the requests that raised it. ``load_rules`` refuses a file that misses any of this, naming the
file and the field.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from auditrelay.errors import AuditRelayError
from auditrelay.policy import Level

BUNDLED_RULES: Final = Path(__file__).parent / "data" / "detections"
EVIDENCE_COLUMN: Final = "AuditIds"
SEVERITIES: Final = ("Informational", "Low", "Medium", "High")
TRIGGER_OPERATORS: Final = ("gt", "lt", "eq", "ne")
ENTITY_TYPES: Final = frozenset({"Account", "Host", "IP", "Process", "URL", "AzureResource"})
_DURATION: Final = re.compile(r"^(\d+)([mhd])$")
_DURATION_ISO: Final = {"m": ("PT", "M"), "h": ("PT", "H"), "d": ("P", "D")}
_TECHNIQUE: Final = re.compile(r"^T\d{4}(\.\d{3})?$")


class RuleError(AuditRelayError):
    """A detection rule file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class EntityMapping:
    """One Sentinel entity: its type and which result column fills which identifier."""

    entity_type: str
    fields: tuple[tuple[str, str], ...]  # (identifier, column)


@dataclass(frozen=True, slots=True)
class PolicyNeed:
    """What a rule needs of the audit policy."""

    level: Level
    rules: tuple[int, ...]
    probes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """One detection rule as written in its file."""

    path: Path
    id: str
    name: str
    description: str
    severity: str
    query: str
    query_frequency: str
    query_period: str
    trigger_operator: str
    trigger_threshold: int
    tactics: tuple[str, ...]
    techniques: tuple[str, ...]
    entities: tuple[EntityMapping, ...]
    version: str
    defender_alerts: tuple[str, ...]
    policy: PolicyNeed

    @property
    def slug(self) -> str:
        """The file's name without ``.yaml``: a short, stable handle for tables and names."""
        return self.path.stem


def duration_minutes(text: str) -> int:
    """``5m`` -> 5, ``1h`` -> 60, ``14d`` -> 20160."""
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"expected a duration such as 5m, 1h or 14d, got {text!r}")
    return int(found.group(1)) * {"m": 1, "h": 60, "d": 1440}[found.group(2)]


def iso_duration(text: str) -> str:
    """``5m`` -> ``PT5M``, ``1h`` -> ``PT1H``, ``14d`` -> ``P14D`` (what ARM templates take)."""
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"expected a duration such as 5m, 1h or 14d, got {text!r}")
    prefix, suffix = _DURATION_ISO[found.group(2)]
    return f"{prefix}{found.group(1)}{suffix}"


class _Fields:
    """Typed access to a rule file's mapping; every problem names the file and the key."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data

    def fail(self, key: str, expected: str, value: Any = None) -> RuleError:
        got = "nothing" if value is None else repr(value)
        return RuleError(f"{self.path}: {key}: expected {expected}, got {got:.120}")

    def text(self, key: str, data: Mapping[str, Any] | None = None) -> str:
        value = (self.data if data is None else data).get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "a non-empty string", value)
        return value

    def choice(self, key: str, allowed: Sequence[str]) -> str:
        value = self.text(key)
        if value not in allowed:
            raise self.fail(key, f"one of {', '.join(allowed)}", value)
        return value

    def texts(
        self, key: str, data: Mapping[str, Any] | None = None, empty: bool = False
    ) -> tuple[str, ...]:
        value = (self.data if data is None else data).get(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, "a list of strings", value)
        if not value and not empty:
            raise self.fail(key, "at least one entry", value)
        return tuple(value)

    def duration(self, key: str) -> str:
        value = self.text(key)
        try:
            iso_duration(value)
        except ValueError as error:
            raise self.fail(key, "a duration such as 5m, 1h or 14d", value) from error
        return value


def _entities(fields: _Fields) -> tuple[EntityMapping, ...]:
    raw = fields.data.get("entityMappings")
    if not isinstance(raw, list) or not raw:
        raise fields.fail("entityMappings", "a list of entity mappings", raw)
    entities = []
    for index, entry in enumerate(raw):
        key = f"entityMappings[{index}]"
        if not isinstance(entry, dict) or entry.get("entityType") not in ENTITY_TYPES:
            raise fields.fail(f"{key}.entityType", f"one of {sorted(ENTITY_TYPES)}", entry)
        pairs = entry.get("fieldMappings")
        if not isinstance(pairs, list) or not pairs:
            raise fields.fail(f"{key}.fieldMappings", "a list of identifier/columnName", pairs)
        mapped = []
        for position, pair in enumerate(pairs):
            where = f"{key}.fieldMappings[{position}]"
            if not isinstance(pair, dict):
                raise fields.fail(where, "identifier and columnName", pair)
            mapped.append((fields.text("identifier", pair), fields.text("columnName", pair)))
        entities.append(EntityMapping(entry["entityType"], tuple(mapped)))
    return tuple(entities)


def _policy_need(fields: _Fields) -> PolicyNeed:
    raw = fields.data.get("auditPolicy")
    if not isinstance(raw, dict):
        raise fields.fail("auditPolicy", "a mapping with level, rules and probes", raw)
    text = raw.get("level")
    level = Level.parse(text) if isinstance(text, str) else None
    if level is None or level is Level.NONE:
        raise fields.fail("auditPolicy.level", "Metadata, Request or RequestResponse", text)
    rules = raw.get("rules")
    if not isinstance(rules, list) or not rules or not all(type(r) is int for r in rules):
        raise fields.fail("auditPolicy.rules", "a list of audit_policy.yaml rule numbers", rules)
    probes = fields.texts("probes", raw)
    return PolicyNeed(level, tuple(rules), probes)


def load_rule(path: Path) -> Rule:
    """One rule file, checked; RuleError names the file and the field that is wrong."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RuleError(f"{path}: cannot read the rule: {error}") from error
    if not isinstance(data, dict):
        raise RuleError(f"{path}: expected a YAML mapping (a Sentinel analytics rule)")
    fields = _Fields(path, data)
    rule_id = fields.text("id")
    try:
        uuid.UUID(rule_id)
    except ValueError as error:
        raise fields.fail("id", "a GUID", rule_id) from error
    if fields.text("kind") != "Scheduled":
        raise fields.fail("kind", "Scheduled", data.get("kind"))
    threshold = data.get("triggerThreshold")
    if type(threshold) is not int or threshold < 0:
        raise fields.fail("triggerThreshold", "a whole number", threshold)
    techniques = fields.texts("relevantTechniques")
    for technique in techniques:
        if not _TECHNIQUE.match(technique):
            raise fields.fail("relevantTechniques", "MITRE ATT&CK ids such as T1098", technique)
    query = fields.text("query")
    if EVIDENCE_COLUMN not in query:
        raise fields.fail("query", f"a query that projects the evidence column {EVIDENCE_COLUMN}")
    return Rule(
        path=path,
        id=rule_id,
        name=fields.text("name"),
        description=fields.text("description").strip(),
        severity=fields.choice("severity", SEVERITIES),
        query=query.strip(),
        query_frequency=fields.duration("queryFrequency"),
        query_period=fields.duration("queryPeriod"),
        trigger_operator=fields.choice("triggerOperator", TRIGGER_OPERATORS),
        trigger_threshold=threshold,
        tactics=fields.texts("tactics"),
        techniques=techniques,
        entities=_entities(fields),
        version=fields.text("version"),
        defender_alerts=fields.texts("defenderAlerts", empty=True),
        policy=_policy_need(fields),
    )


def load_rules(location: Path) -> list[Rule]:
    """Every ``*.yaml`` rule in a directory (sorted by file name), or the one file given."""
    if location.is_file():
        paths = [location]
    elif location.is_dir():
        paths = sorted(location.glob("*.yaml"))
        if not paths:
            raise RuleError(f"{location}: no detection rules (*.yaml) in this directory")
    else:
        raise RuleError(f"{location}: no such file or directory")
    rules = [load_rule(path) for path in paths]
    seen: dict[str, Path] = {}
    for rule in rules:
        if rule.id in seen:
            raise RuleError(f"{rule.path}: id: {rule.id} is also the id of {seen[rule.id]}")
        seen[rule.id] = rule.path
    return rules
