"""Generate helm/auditrelay/values.schema.json from the comments and defaults of values.yaml.

Every value in values.yaml has a comment above it: a full sentence that becomes the value's
``description``. The value's type comes from its default (string, integer, number, boolean,
array, object). A mapping whose keys are all commented is a group of values: an object with
``additionalProperties: false``, so a misspelt value fails ``helm install`` at once. A line
``# @schema {...}`` in the comment adds JSON-schema keywords (``enum``, ``pattern``,
``additionalProperties: true`` for a free-form mapping such as ``resources``, ...); the value below
such a free-form mapping is not looked into.

values.yaml is where the chart's values are declared, and its comments are their declaration
(what ``helm show values`` prints to a user): the generator reads them with the strict rules above
and fails, naming the line, on a value without a sentence. ``make generate`` writes the schema;
tests/unit/test_codegen.py fails while the committed one is stale.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VALUES_FILE = Path("helm/auditrelay/values.yaml")
SCHEMA_FILE = Path("helm/auditrelay/values.schema.json")

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?:\s|$)")
_COMMENT_LINE = re.compile(r"^(?P<indent> *)#(?: (?P<text>.*))?$")
_SCHEMA_MARK = "@schema "
_SENTENCE = re.compile(r"^[A-Z`\[].*[.)]$")


class ValuesDocError(Exception):
    """values.yaml breaks the commenting rules the schema is generated from."""


@dataclass
class Documented:
    """What the comment above one value says: its description and extra schema keywords."""

    description: str
    keywords: dict[str, Any] = field(default_factory=dict)


def _parse_comment(lines: list[str], line_number: int, path: str) -> Documented:
    sentences: list[str] = []
    keywords: dict[str, Any] = {}
    for text in lines:
        if text.startswith(_SCHEMA_MARK):
            try:
                keywords.update(json.loads(text[len(_SCHEMA_MARK) :]))
            except json.JSONDecodeError as error:
                raise ValuesDocError(
                    f"values.yaml line {line_number}: {path}: @schema is not JSON: {error}"
                ) from error
        else:
            sentences.append(text)
    description = " ".join(sentences).strip()
    if not _SENTENCE.match(description):
        raise ValuesDocError(
            f"values.yaml line {line_number}: {path}: expected a comment above the value,"
            f" a full sentence starting with a capital and ending with a full stop;"
            f" found {description!r}"
        )
    return Documented(description, keywords)


def _value_at(values: dict[str, Any], path: str) -> Any:
    value: Any = values
    for key in path.split("."):
        value = value[key]
    return value


def read_comments(text: str, values: dict[str, Any]) -> dict[str, Documented]:
    """The comment of every value, by dotted path, in the order of the file.

    Lines inside a value that is not a group (block strings, lists, free-form mappings) are
    skipped: they are the value, not more values.
    """
    documented: dict[str, Documented] = {}
    parents: list[tuple[int, str]] = []  # (indent, path) of the groups around the current line
    pending: list[str] = []
    pending_indent = -1
    skip_deeper_than: int | None = None
    for line_number, line in enumerate(text.splitlines(), start=1):
        indent = len(line) - len(line.lstrip(" "))
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not line.strip():
            pending, pending_indent = [], -1
            continue
        comment = _COMMENT_LINE.match(line)
        if comment:
            if pending_indent not in (-1, indent):
                pending = []
            pending.append(comment.group("text") or "")
            pending_indent = indent
            continue
        key_line = _KEY_LINE.match(line)
        if not key_line:
            raise ValuesDocError(f"values.yaml line {line_number}: expected `key:`, found {line!r}")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join(
            [parents[-1][1], key_line.group("key")] if parents else [key_line.group("key")]
        )
        if pending_indent != indent:
            pending = []
        documented[path] = _parse_comment(pending, line_number, path)
        pending, pending_indent = [], -1
        opens_group = (
            isinstance(_value_at(values, path), dict)
            and "additionalProperties" not in documented[path].keywords
        )
        if opens_group:
            parents.append((indent, path))
        else:
            skip_deeper_than = indent
    return documented


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise ValuesDocError(f"a default of type {type(value).__name__} ({value!r}) has no schema type")


def _schema_of(
    path: str, value: Any, documented: dict[str, Documented], *, top: bool = False
) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    if not top:
        note = documented.get(path)
        if note is None:
            raise ValuesDocError(f"values.yaml: {path}: expected a comment above the value")
        schema["description"] = note.description
        schema["type"] = _type_of(value)
        schema.update(note.keywords)
    is_group = isinstance(value, dict) and "additionalProperties" not in schema
    if is_group:
        schema["type"] = "object"
        schema["additionalProperties"] = False
        schema["properties"] = {
            key: _schema_of(f"{path}.{key}" if path else key, child, documented)
            for key, child in value.items()
        }
    return schema


def generate(values_text: str) -> dict[str, Any]:
    """The JSON schema of a values.yaml text."""
    values = yaml.safe_load(values_text)
    if not isinstance(values, dict):
        raise ValuesDocError("values.yaml: expected a mapping at the top")
    documented = read_comments(values_text, values)
    schema = {"$schema": "https://json-schema.org/draft-07/schema#"}
    schema.update(_schema_of("", values, documented, top=True))
    return schema


def render(schema: dict[str, Any]) -> str:
    """The schema as the file holds it."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def render_values_schema(values_text: str) -> str:
    """values.schema.json as committed, from the text of values.yaml."""
    return render(generate(values_text))
