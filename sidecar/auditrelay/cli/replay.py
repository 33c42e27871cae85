"""``auditrelay replay AUDIT_LOG...``: backfill audit log files through a pipeline.

The pipeline is configured with the same properties as the ``[OUTPUT] Name auditrelay``
section: ``--config`` reads them from a Fluent Bit configuration file (classic or YAML; the keys
Fluent Bit keeps for itself are ignored; ``--fluent-bit-output`` picks one of several auditrelay
outputs), and ``--property key=value`` adds or overrides one.
Without an ``endpoint`` the rows go to the bundled emulator in ``STATE_DIR/emulator``.

Exit codes: 0 every line read and every row delivered; 1 finished, but lines were not audit
events, rows were refused, or delivery did not finish within ``--deliver-timeout``; 2 bad input
or configuration; 130 interrupted (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from auditrelay.cli import (
    EXIT_BAD_INPUT,
    EXIT_FINDING,
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_output_option,
    plain,
    print_json,
)
from auditrelay.config import LogFormat, ServerSettings, parse_duration
from auditrelay.errors import ConfigError, PropertyProblem
from auditrelay.fluentbit_conf import select_output
from auditrelay.logs import LEVELS, configure_logging
from auditrelay.malloc import limit_arenas
from auditrelay.replay import Replay, ReplayOptions, ReplayResult, summary_lines


def default_state_dir() -> Path:
    """$AUDITRELAY_STATE_DIR, else $XDG_STATE_HOME/auditrelay (~/.local/state/auditrelay)."""
    configured = os.environ.get(ServerSettings.env_name("state_dir"))
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "auditrelay"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `replay`."""
    help_text = "backfill audit log files (plain or .gz) through a pipeline, resumably"
    parser = subparsers.add_parser(
        "replay",
        help=help_text,
        description=plain(__doc__).split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="AUDIT_LOG")
    parser.add_argument(
        "--config",
        type=Path,
        help="Fluent Bit configuration (classic .conf or .yaml) with the auditrelay [OUTPUT]",
    )
    parser.add_argument(
        "--fluent-bit-output",
        metavar="NAME",
        help="which auditrelay output of --config: its Alias or auditrelay.N (default: the only one)",
    )
    parser.add_argument(
        "-p",
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a pipeline property, as in the [OUTPUT] section; repeatable; wins over --config",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="spool, checkpoints and dead letters of the replay; keep it to resume "
        "(default: $AUDITRELAY_STATE_DIR, else ~/.local/state/auditrelay)",
    )
    parser.add_argument(
        "--deliver-timeout",
        default=None,
        metavar="DURATION",
        help="stop waiting for delivery after this long (e.g. 10m); default: until delivered",
    )
    parser.add_argument(
        "--progress-interval",
        default=None,
        metavar="DURATION",
        help="seconds between progress lines when stderr is not a terminal (default 5s)",
    )
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default="warning",
        help="log level (default: warning)",
    )
    add_output_option(parser)
    parser.set_defaults(run=run)


def properties_from(args: argparse.Namespace) -> dict[str, str]:
    """The pipeline properties: the --config section, then each --property."""
    properties: dict[str, str] = {}
    if args.config is not None:
        section = select_output(args.config, args.fluent_bit_output, "--fluent-bit-output")
        properties.update(section.properties())
    elif args.fluent_bit_output is not None:
        raise ConfigError(
            [PropertyProblem("--fluent-bit-output", args.fluent_bit_output, "--config as well")]
        )
    problems = []
    for item in args.property:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(PropertyProblem("--property", item, "KEY=VALUE"))
            continue
        properties[key.strip().lower()] = value.strip()
    if problems:
        raise ConfigError(problems)
    return properties


def _duration(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(parse_duration(text))
    except ValueError as error:
        raise ConfigError([PropertyProblem(flag, text, str(error))]) from None


def options_from(args: argparse.Namespace) -> ReplayOptions:
    """The run's options, every problem named."""
    return ReplayOptions(
        files=list(args.files),
        properties=properties_from(args),
        state_dir=args.state_dir or default_state_dir(),
        deliver_timeout=_duration("--deliver-timeout", args.deliver_timeout),
        progress_interval=_duration("--progress-interval", args.progress_interval),
    )


def run(args: argparse.Namespace) -> int:
    """Replays the files; prints the summary on stdout, progress on stderr."""
    limit_arenas()  # before any thread starts: see auditrelay.malloc
    options = options_from(args)
    try:
        configure_logging(LogFormat.AUTO, args.log_level, stream=sys.stderr)
    except ValueError as error:
        raise ConfigError([PropertyProblem("--log-level", args.log_level, str(error))]) from None
    try:
        result = asyncio.run(_replay(options))
    except OSError as error:  # an unwritable state directory, a file that went away
        where = error.filename if error.filename is not None else options.state_dir
        print(f"auditrelay replay: {where}: {error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.output == "json":
        print_json(result_document(result))
    else:
        for line in summary_lines(result):
            print(line)
    return exit_code(result)


def result_document(result: ReplayResult) -> dict[str, Any]:
    """The run's outcome as JSON: the totals, delivery, and every invalid line reported."""
    document = asdict(result)
    document["totals"]["invalid_lines"] = [
        {"path": str(line.path), "line": line.line, "reason": line.reason}
        for line in result.totals.invalid_lines
    ]
    document["exit_code"] = exit_code(result)
    return document


def exit_code(result: ReplayResult) -> int:
    """0, 1 or 130, as the module's docstring says."""
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.totals.invalid or result.refused or result.undelivered_bytes:
        return EXIT_FINDING
    return EXIT_OK


async def _replay(options: ReplayOptions) -> Any:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        return await Replay(options, stop, sys.stderr).run()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
