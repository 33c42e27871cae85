"""The ``auditrelay`` command: one sub-command per module of this package.

Each sub-command module offers ``add_parser(subparsers)`` and ``run(args) -> int``; this module
dispatches, turns errors into exit codes, and holds what every command shares: the exit codes
(0 ok, 1 the command's own "found a problem" answer, 2 bad input or configuration; 130 when
interrupted) and ``--output text|json`` for every command that prints results.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import pkgutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from auditrelay import __version__
from auditrelay.errors import AuditRelayError, ConfigError, PropertyProblem

if TYPE_CHECKING:  # the emulator loads only for the commands that read its store
    from auditrelay.emulator import Store

EXIT_OK: Final = 0
EXIT_FINDING: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_INTERRUPTED: Final = 130
OUTPUT_FORMATS: Final = ("text", "json")


def add_output_option(parser: argparse.ArgumentParser, default: str = "text") -> None:
    """``--output text|json``: results for people, or JSON for programs."""
    parser.add_argument(
        "--output",
        choices=OUTPUT_FORMATS,
        default=default,
        help=f"print the results as text for people or as JSON (default: {default})",
    )


def emulator_store(flag: str, state_dir: Path) -> Store:
    """The bundled emulator's store in ``state_dir``; bad input naming ``flag`` when there is
    none."""
    from auditrelay.emulator import Store

    store = Store.in_directory(state_dir)
    if not store.path.is_file():
        expected = f"an emulator's state directory, holding {store.path.name} (no store there)"
        raise ConfigError([PropertyProblem(flag, str(state_dir), expected)])
    return store


def read_audit_log(flag: str, path: Path) -> bytes:
    """The bytes of one audit log file, decompressed when it ends in ``.gz``; bad input naming
    ``flag`` when it cannot be read."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, gzip.BadGzipFile, EOFError) as error:
        raise ConfigError(
            [PropertyProblem(flag, str(path), f"a readable audit log ({error})")]
        ) from error


def missing_action(command: str, actions: Mapping[str, object]) -> int:
    """A command with actions called without one: says which there are; bad input."""
    print(f"auditrelay {command}: choose an action: {', '.join(actions)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def plain(docstring: str | None) -> str:
    """A module docstring as ``--help`` shows it: without its reStructuredText quoting."""
    return (docstring or "").replace("``", "")


def print_json(document: Any) -> None:
    """Prints one JSON document on stdout (paths and other objects as their text)."""
    print(json.dumps(document, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="auditrelay",
        description="Ship Kubernetes audit logs from Fluent Bit to Azure Monitor Logs Ingestion.",
    )
    parser.add_argument("--version", action="version", version=f"auditrelay {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda found: found.name):
        importlib.import_module(f"{__name__}.{module.name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except AuditRelayError as error:
        print(f"auditrelay {args.command}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
