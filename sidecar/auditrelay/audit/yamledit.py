"""Insertions into YAML text that keep every other byte: comments, order, quoting, layout.

The text is composed (parsed to nodes with positions, never re-dumped); each change is an
insertion at a position computed from those nodes, copying the indentation of the lines around
it. Only block-style collections are edited; a flow-style one (``[a, b]``) is refused with its
line number, since inserting into it would mean rewriting it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from auditrelay.audit.errors import AuditSetupError

_ITEM_PREFIX = re.compile(r"^( *)- +$")


@dataclass(frozen=True, slots=True)
class Insertion:
    """``text`` to insert at character ``offset`` of the document, replacing up to ``end``."""

    offset: int
    text: str
    end: int | None = None


def compose(text: str, source: str) -> yaml.Node:
    """The document's node tree; AuditSetupError naming the file and line when it is not YAML."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise AuditSetupError(
            f"{source}: not valid YAML: {' '.join(str(error).split())}"
        ) from error
    if node is None:
        raise AuditSetupError(f"{source}: the file is empty")
    return node


def get(node: yaml.Node, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a mapping node, or None."""
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            found: yaml.Node = value
            return found
    return None


def line_of(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def apply(text: str, insertions: Sequence[Insertion]) -> str:
    """``text`` with every insertion made (later offsets first, so earlier ones stay valid)."""
    for insertion in sorted(insertions, key=lambda each: each.offset, reverse=True):
        added = insertion.text
        if insertion.offset == len(text) and text and not text.endswith("\n"):
            added = "\n" + added
        end = insertion.offset if insertion.end is None else insertion.end
        text = text[: insertion.offset] + added + text[end:]
    return text


def replace_scalar(node: yaml.Node, value: str) -> Insertion:
    """A scalar's text replaced by ``value`` (plain or double-quoted, as ``scalar`` decides)."""
    if not isinstance(node, yaml.ScalarNode) or node.style in ("|", ">"):
        raise AuditSetupError(f"line {line_of(node)}: expected a one-line value here")
    return Insertion(node.start_mark.index, scalar(value), end=node.end_mark.index)


def set_scalar_key(text: str, mapping: yaml.Node, key: str, value: str, source: str) -> Insertion:
    """``key: value`` in a block mapping: the value replaced when the key is there, else the
    pair appended after the last entry, at the column of the mapping's keys."""
    existing = get(mapping, key)
    if existing is not None:
        return replace_scalar(existing, value)
    if not isinstance(mapping, yaml.MappingNode) or not mapping.value:
        raise AuditSetupError(f"{source}:{line_of(mapping)}: expected a non-empty mapping here")
    _refuse_flow(mapping, source)
    column = mapping.value[0][0].start_mark.column
    line = " " * column + f"{scalar(key)}: {scalar(value)}\n"
    return Insertion(_after(text, mapping.value[-1][1]), line)


def scalar(value: str) -> str:
    """``value`` as a plain scalar when that reads back as the same string, else double-quoted."""
    try:
        plain_reads_back = yaml.safe_load(value) == value and "\n" not in value and "#" not in value
    except yaml.YAMLError:
        plain_reads_back = False
    return value if plain_reads_back and value == value.strip() else json.dumps(value)


def append_to_sequence(
    text: str, sequence: yaml.Node, items: Sequence[str | Mapping[str, Any]], source: str
) -> Insertion:
    """Items appended after the last item of a non-empty block sequence, indented like it."""
    if not isinstance(sequence, yaml.SequenceNode) or not sequence.value:
        raise AuditSetupError(f"{source}:{line_of(sequence)}: expected a non-empty list here")
    _refuse_flow(sequence, source)
    first = sequence.value[0]
    prefix = _item_prefix(text, first, source)
    lines = [_item_lines(prefix, item) for item in items]
    return Insertion(_after(text, sequence.value[-1]), "".join(lines))


def add_key(text: str, mapping: yaml.Node, key: str, block: str, source: str) -> Insertion:
    """``key:`` plus ``block`` (already indented relative to the key, no leading newline)
    appended after the last entry of a block mapping, at the column of its keys."""
    if not isinstance(mapping, yaml.MappingNode) or not mapping.value:
        raise AuditSetupError(f"{source}:{line_of(mapping)}: expected a non-empty mapping here")
    _refuse_flow(mapping, source)
    column = mapping.value[0][0].start_mark.column
    indented = "".join(" " * column + line + "\n" for line in block.splitlines())
    return Insertion(_after(text, mapping.value[-1][1]), " " * column + f"{key}:\n" + indented)


def sequence_block(items: Sequence[str | Mapping[str, Any]]) -> str:
    """A block sequence (``- item`` lines, mapping items' further keys indented by two)."""
    return "".join(_item_lines("- ", item) for item in items)


def _item_lines(prefix: str, item: str | Mapping[str, Any]) -> str:
    if isinstance(item, str):
        return f"{prefix}{scalar(item)}\n"
    inner = " " * len(prefix)
    lines = []
    for index, (key, value) in enumerate(item.items()):
        lead = prefix if index == 0 else inner
        if isinstance(value, Mapping):
            lines.append(f"{lead}{key}:\n")
            lines += [f"{inner}  {sub}: {_value(v)}\n" for sub, v in value.items()]
        else:
            lines.append(f"{lead}{key}: {_value(value)}\n")
    return "".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return scalar(str(value))


def _item_prefix(text: str, item: yaml.Node, source: str) -> str:
    start = item.start_mark.index
    line_start = text.rfind("\n", 0, start) + 1
    prefix = text[line_start:start]
    if _ITEM_PREFIX.match(prefix) is None:
        raise AuditSetupError(
            f"{source}:{line_of(item)}: list item laid out in a way this tool does not edit "
            f"({prefix!r} before it); edit the file by hand"
        )
    return prefix


def _refuse_flow(node: yaml.Node, source: str) -> None:
    if isinstance(node, yaml.CollectionNode) and node.flow_style:
        raise AuditSetupError(
            f"{source}:{line_of(node)}: flow-style collection ([...] or {{...}}) here; "
            "this tool edits only block style, edit the file by hand"
        )


def _last_scalar(node: yaml.Node) -> yaml.Node:
    if isinstance(node, yaml.SequenceNode) and node.value:
        return _last_scalar(node.value[-1])
    if isinstance(node, yaml.MappingNode) and node.value:
        return _last_scalar(node.value[-1][1])
    return node


def _after(text: str, node: yaml.Node) -> int:
    """The start of the line after the one where ``node``'s last scalar ends."""
    end = _last_scalar(node).end_mark.index
    if end > 0 and text[end - 1] == "\n":  # a block scalar ends at the start of the next line
        return int(end)
    newline = text.find("\n", end)
    return len(text) if newline < 0 else newline + 1
