"""Reading a Fluent Bit configuration, classic or YAML: its sections and its auditrelay outputs.

``auditrelay replay --config`` takes its pipeline properties from here, and the tests read the
shipped configurations (``fluent-bit/conf/``, the README) and the chart's rendered one with the
same reader, so that what the tests check is what replay would read.

Classic format: ``[SECTION]`` headers, ``Key Value`` lines (keys are case-insensitive and read
lower-cased), ``#`` comments, ``@SET name=value``, ``@INCLUDE pattern`` (relative to the file)
and ``${NAME}``, which Fluent Bit replaces by a @SET variable, else the environment, else
nothing. YAML format: ``service:`` and ``pipeline: inputs/filters/outputs:`` with ``env:``
variables; its values read as the text Fluent Bit makes of them (booleans as on/off).

A section is ``(NAME, {key: value})``, the name upper-cased as in the classic format (SERVICE,
INPUT, FILTER, OUTPUT, PLUGINS, ...). Text given without a file is read as written: no
variables are expanded and no file is included, which is how a test checks what a file says.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from auditrelay.errors import ConfigError, PropertyProblem

Section = tuple[str, dict[str, str]]

# Keys Fluent Bit keeps for itself in an [OUTPUT] section; they never reach the plugin.
FLUENT_BIT_OUTPUT_KEYS: Final = frozenset(
    {"name", "match", "match_regex", "alias", "log_level", "log_suppress_interval",
     "retry_limit", "workers", "host", "port", "event_type", "processors"}
)  # fmt: skip
FLUENT_BIT_OUTPUT_PREFIXES: Final = ("tls", "net.", "storage.")
MAX_INCLUDE_DEPTH: Final = 8
_VARIABLE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_YAML_SECTIONS: Final = (("inputs", "INPUT"), ("filters", "FILTER"), ("outputs", "OUTPUT"))


def plugin_properties(keys: Mapping[str, str]) -> dict[str, str]:
    """The keys of an [OUTPUT] section that Fluent Bit hands to the plugin."""
    return {
        key: value
        for key, value in keys.items()
        if key not in FLUENT_BIT_OUTPUT_KEYS and not key.startswith(FLUENT_BIT_OUTPUT_PREFIXES)
    }


@dataclass(frozen=True, slots=True)
class OutputSection:
    """One ``[OUTPUT] Name auditrelay`` section: its instance name and its keys."""

    instance_name: str  # auditrelay.N in the order Fluent Bit creates them
    alias: str | None
    keys: dict[str, str]

    def properties(self) -> dict[str, str]:
        """The plugin's properties: the section without the keys Fluent Bit keeps."""
        return plugin_properties(self.keys)


# --- the classic format ------------------------------------------------------------------------


class _Classic:
    """One reading of a classic-format file and what it includes."""

    def __init__(self, directory: Path | None, variables: dict[str, str] | None) -> None:
        self.directory = directory  # None: text only, @INCLUDE is not followed
        self.variables = variables  # None: ${NAME} is left as written
        self.sections: list[Section] = []

    def expand(self, value: str) -> str:
        if self.variables is None:
            return value
        variables = self.variables
        return _VARIABLE.sub(
            lambda found: variables.get(found[1], os.environ.get(found[1], "")), value
        )

    def read(self, text: str, where: str, depth: int = 0) -> None:
        current: dict[str, str] | None = None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("@SET "):
                key, _, value = line[5:].strip().partition("=")
                if self.variables is not None:
                    self.variables[key.strip()] = self.expand(value.strip())
            elif line.startswith("@INCLUDE "):
                self.include(line[9:].strip(), where, depth)
                current = None
            elif line.startswith("["):
                if not line.endswith("]"):
                    raise _problem(where, f"a [SECTION] header on line {number}, got {line!r}")
                current = {}
                self.sections.append((line[1:-1].strip().upper(), current))
            elif current is not None:
                key, _, value = line.replace("\t", " ").partition(" ")
                current[key.lower()] = self.expand(value.strip())
            else:
                raise _problem(where, f"a [SECTION] before line {number}, got {line!r}")

    def include(self, pattern: str, where: str, depth: int) -> None:
        if self.directory is None:
            return
        if depth >= MAX_INCLUDE_DEPTH:
            raise _problem(where, f"an @INCLUDE chain of at most {MAX_INCLUDE_DEPTH} files")
        for included in sorted(self.directory.glob(pattern)) or [self.directory / pattern]:
            self.read(_read_text(included), str(included), depth + 1)


def parse_classic(text: str) -> list[Section]:
    """The sections of classic-format text, as written (no variables, no includes)."""
    reading = _Classic(None, None)
    reading.read(text, "<text>")
    return reading.sections


# --- the YAML format ---------------------------------------------------------------------------


def parse_yaml(text: str, *, expand: bool = False, where: str = "<text>") -> list[Section]:
    """The sections of YAML-format text: SERVICE, then every INPUT, FILTER and OUTPUT;
    with ``expand``, ${NAME} is replaced from ``env:`` and the environment."""
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise _problem(where, f"a YAML Fluent Bit configuration ({error})") from None
    if not isinstance(document, dict):
        raise _problem(where, "a YAML mapping with pipeline: outputs:")
    reading = _Classic(None, _yaml_mapping(document.get("env")) if expand else None)
    sections: list[Section] = []
    if isinstance(document.get("service"), dict):
        sections.append(("SERVICE", _yaml_keys(document["service"], reading)))
    pipeline = document.get("pipeline") or {}
    if not isinstance(pipeline, dict):
        raise _problem(where, "pipeline: as a mapping of inputs, filters and outputs")
    for key, name in _YAML_SECTIONS:
        entries = pipeline.get(key) or []
        sections += [
            (name, _yaml_keys(entry, reading)) for entry in entries if isinstance(entry, dict)
        ]
    return sections


def _yaml_mapping(value: Any) -> dict[str, str]:
    return {str(key): _yaml_text(item) for key, item in (value or {}).items()}


def _yaml_keys(entry: dict[Any, Any], reading: _Classic) -> dict[str, str]:
    return {str(key).lower(): reading.expand(_yaml_text(value)) for key, value in entry.items()}


def _yaml_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# --- a file ------------------------------------------------------------------------------------


def read_sections(path: Path) -> list[Section]:
    """The sections of a configuration file as Fluent Bit reads it: YAML by its ``.yaml`` /
    ``.yml`` suffix, else classic with @INCLUDE followed and variables expanded."""
    text = _read_text(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return parse_yaml(text, expand=True, where=str(path))
    reading = _Classic(path.parent, {})
    reading.read(text, str(path))
    return reading.sections


def output_sections(path: Path) -> list[OutputSection]:
    """Every auditrelay output of a Fluent Bit configuration file."""
    ours = [
        keys
        for name, keys in read_sections(path)
        if name == "OUTPUT" and keys.get("name", "").lower() == "auditrelay"
    ]
    return [
        OutputSection(f"auditrelay.{index}", keys.get("alias"), keys)
        for index, keys in enumerate(ours)
    ]


def select_output(path: Path, wanted: str | None, flag: str) -> OutputSection:
    """The one auditrelay output of the file, or the one named by ``flag`` (its Alias or
    auditrelay.N)."""
    sections = output_sections(path)
    names = ", ".join(section.alias or section.instance_name for section in sections)
    if wanted is not None:
        for section in sections:
            if wanted in (section.alias, section.instance_name):
                return section
        raise ConfigError(
            [PropertyProblem(flag, wanted, f"one of the auditrelay outputs: {names}")]
        )
    if len(sections) != 1:
        found = f"{len(sections)}: {names}" if sections else "none"
        raise _problem(
            str(path), f"exactly one [OUTPUT] Name auditrelay, or {flag} (found {found})"
        )
    return sections[0]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise _problem(
            str(path), f"a readable Fluent Bit configuration ({error.strerror})"
        ) from None


def _problem(where: str, expected: str) -> ConfigError:
    return ConfigError([PropertyProblem("--config", where, expected)])
