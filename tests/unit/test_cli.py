"""Every ``auditrelay`` command speaks the same way: ``--output text|json`` wherever results are
printed, the same exit codes, every choice listed in ``--help``, help text without markup."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
from collections.abc import Iterator

import pytest
from auditrelay import cli
from auditrelay.cli import EXIT_BAD_INPUT, EXIT_FINDING, EXIT_INTERRUPTED, EXIT_OK, build_parser

# Commands that print no results: they run until stopped and log (serve), or change state and
# say so in one line.
NO_RESULTS = {
    "serve": "runs until stopped; its output is its JSON log",
    "emulator serve": "runs until stopped; prints where it listens",
}
# Commands whose results are JSON unless asked for text: filters in a shell pipe.
JSON_BY_DEFAULT = {"policy eval": "answers JSON lines on stdin with JSON lines"}
MARKUP = re.compile(r"``|\*\*|`|\[/?(bold|italic|red|green)\]|<[a-z]+>")


def commands(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and sub-command parser, by its words after ``auditrelay``."""
    if path:
        yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}".strip())


def leaves() -> list[tuple[str, argparse.ArgumentParser]]:
    """The commands a user runs (those without sub-commands of their own)."""
    return [
        (path, parser)
        for path, parser in commands(build_parser())
        if not any(isinstance(action, argparse._SubParsersAction) for action in parser._actions)
    ]


LEAVES = leaves()


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((action for action in parser._actions if flag in action.option_strings), None)


def test_the_walk_finds_every_command() -> None:
    """The walk reaches every sub-command module and their own sub-commands."""
    names = {path.split()[0] for path, _ in LEAVES}
    modules = {found.name for found in pkgutil.iter_modules(cli.__path__)}
    assert modules == names
    assert {"policy verify", "audit status", "emulator rows", "spool list"} <= {
        p for p, _ in LEAVES
    }


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=[path for path, _ in LEAVES])
def test_results_can_be_had_as_json(path: str, parser: argparse.ArgumentParser) -> None:
    """Every command that prints results takes --output {text,json}, text by default but for
    the filters in JSON_BY_DEFAULT."""
    if path in NO_RESULTS:
        assert option(parser, "--output") is None, path
        return
    output = option(parser, "--output")
    assert output is not None, f"auditrelay {path} has no --output"
    default = "json" if path in JSON_BY_DEFAULT else "text"
    assert (["text", "json"], default) == (list(output.choices or ()), output.default)


@pytest.mark.parametrize(("path", "parser"), LEAVES, ids=[path for path, _ in LEAVES])
def test_choices_are_listed_in_help(path: str, parser: argparse.ArgumentParser) -> None:
    """An option with a fixed set of values names every one of them in --help."""
    text = parser.format_help()
    for action in parser._actions:
        if action.choices is None or isinstance(action, argparse._SubParsersAction):
            continue
        missing = [str(choice) for choice in action.choices if str(choice) not in text]
        assert [] == missing, f"auditrelay {path} {action.option_strings}"


@pytest.mark.parametrize(
    ("path", "parser"), list(commands(build_parser())), ids=lambda x: str(x)[:30]
)
def test_help_has_no_markup(path: str, parser: argparse.ArgumentParser) -> None:
    """--help is read in a terminal: no reStructuredText, Markdown or rich markup in it."""
    texts = [parser.description or ""] + [action.help or "" for action in parser._actions]
    texts += [  # the one-line help of each sub-command, as the parent's --help lists it
        choice.help or ""
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    ]
    marked = [text for text in texts if MARKUP.search(text.replace("%(default)s", ""))]
    assert [] == marked, f"auditrelay {path}"


def test_exit_codes_are_the_same_everywhere() -> None:
    """Every command module's exit codes are the shared ones: 0 ok, 1 a finding, 2 bad input,
    130 interrupted."""
    allowed = {EXIT_OK, EXIT_FINDING, EXIT_BAD_INPUT, EXIT_INTERRUPTED}
    found = {}
    for module in pkgutil.iter_modules(cli.__path__):
        loaded = importlib.import_module(f"auditrelay.cli.{module.name}")
        for name, value in vars(loaded).items():
            if name.startswith("EXIT_") and isinstance(value, int) and value not in allowed:
                found[f"{module.name}.{name}"] = value
    assert {} == found


@pytest.mark.parametrize(
    ("path", "parser"), list(commands(build_parser())), ids=lambda x: str(x)[:30]
)
def test_sub_commands_are_listed_alike(path: str, parser: argparse.ArgumentParser) -> None:
    """The COMMAND list of --help reads as one list: each line a lower-case phrase, no full stop."""
    lines = [
        choice.help or ""
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    ]
    odd = [line for line in lines if not line[:1].islower() or line.endswith(".")]
    assert [] == odd, f"auditrelay {path}"
