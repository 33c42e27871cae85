"""``auditrelay spool``: the pipelines' spools on disk, and what to do with an orphaned one.

auditrelay spool list [--state-dir DIR] [--output json]
auditrelay spool drain SPOOL --to-pipeline ID [--state-dir DIR]
auditrelay spool discard SPOOL --yes [--state-dir DIR]

A spool is orphaned when no pipeline of the running (or the last) ``serve`` owns it, e.g. after
the pipeline's ``dcr_id`` changed. ``list`` exits 1 when an orphaned spool holds rows.
``drain`` moves an orphan's pending rows, in order, into the spool of pipeline ID (an existing
spool): with ``serve`` stopped it does so at once; while ``serve`` runs (it holds ID's spool),
it leaves a request beside the orphan and the running ``serve`` moves the rows within seconds
(log line ``spool_drained``). ``discard`` deletes an orphan and needs ``--yes``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from auditrelay.cli import EXIT_FINDING, add_output_option, missing_action, plain
from auditrelay.config import ServerSettings
from auditrelay.errors import ConfigError, PropertyProblem
from auditrelay.spool import Spool, in_use
from auditrelay.spools import (
    SpoolInfo,
    describe,
    discard,
    inspect,
    inventory,
    move_pending,
    read_owners,
    request_drain,
)


def add_parser(subparsers: Any) -> None:
    """Registers ``auditrelay spool`` and its actions."""
    parser = subparsers.add_parser(
        "spool",
        help="list the pipelines' spools; drain or discard an orphaned one",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run, action=None)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    listing = actions.add_parser("list", help="every spool: id, destination, bytes, events, state")
    _common(listing)

    drain = actions.add_parser("drain", help="move an orphan's pending rows to a pipeline")
    _common(drain)
    drain.add_argument("spool", metavar="SPOOL", help="The orphaned spool's id.")
    drain.add_argument(
        "--to-pipeline", required=True, metavar="ID", help="The pipeline that delivers them."
    )

    gone = actions.add_parser("discard", help="delete an orphaned spool and its rows")
    _common(gone)
    gone.add_argument("spool", metavar="SPOOL", help="The orphaned spool's id.")
    gone.add_argument("--yes", action="store_true", help="Really delete its undelivered rows.")


def _common(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(ServerSettings.env_name("state_dir")) or ServerSettings().state_dir
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(default),
        help=f"serve's state directory (env AUDITRELAY_STATE_DIR; default: {default})",
    )
    add_output_option(parser)


def run(args: argparse.Namespace) -> int:
    """Dispatches to the action."""
    actions = {"list": _list, "drain": _drain, "discard": _discard}
    if args.action is None:
        return missing_action("spool", actions)
    root = args.state_dir / "spool"
    if not root.is_dir():
        raise ConfigError(
            [PropertyProblem("--state-dir", str(args.state_dir), "a state directory with spool/")]
        )
    code: int = actions[args.action](args, root)
    return code


def _list(args: argparse.Namespace, root: Path) -> int:
    owners = read_owners(root)
    found = inventory(root, count_rows=True)
    stranded = [info for info in found if info.pipeline_id not in owners and info.pending_bytes]
    if args.output == "json":
        shown = []
        for info in found:
            entry = info.as_json(owned=info.pipeline_id in owners)
            entry["in_use"] = in_use(info.directory)
            shown.append(entry)
        print(json.dumps({"spools": shown}, indent=2))
    else:
        for info in found:
            _print_info(info, info.pipeline_id in owners)
        if not found:
            print(f"no spools under {root}")
    return EXIT_FINDING if stranded else 0


def _print_info(info: SpoolInfo, owned: bool) -> None:
    state = "owned" if owned else "orphaned"
    if in_use(info.directory):
        state += ", in use"
    print(
        f"{info.pipeline_id}  [{state}]  {info.pending_bytes} bytes, "
        f"{info.pending_rows} events pending  -> {describe(info.destination)}"
    )


def _spool_dir(root: Path, name: str, what: str) -> Path:
    directory = root / name
    if "/" in name or name in ("", ".", "..") or not directory.is_dir():
        raise ConfigError([PropertyProblem(what, name, f"the id of a spool under {root}")])
    return directory


def _orphan(root: Path, name: str) -> Path:
    directory = _spool_dir(root, name, "SPOOL")
    if in_use(directory) or name in read_owners(root):
        raise ConfigError(
            [
                PropertyProblem(
                    "SPOOL", name, "an orphaned spool; serve's pipeline delivers this one"
                )
            ]
        )
    return directory


def _drain(args: argparse.Namespace, root: Path) -> int:
    source = _orphan(root, args.spool)
    target = _spool_dir(root, args.to_pipeline, "--to-pipeline")
    if source == target:
        raise ConfigError(
            [PropertyProblem("--to-pipeline", args.to_pipeline, "another pipeline than SPOOL")]
        )
    before = inspect(source, count_rows=True)
    if in_use(target):
        request_drain(source, args.to_pipeline)
        _report(args, "queued", before, args.to_pipeline)
        return 0
    spool = Spool(target, limit_bytes=2**62)  # the pipeline's own limit applies when it runs
    try:
        moved = move_pending(source, spool.append)
    finally:
        spool.close()
    _report(args, "drained", before, args.to_pipeline, moved)
    return 0


def _report(
    args: argparse.Namespace, outcome: str, info: SpoolInfo, target: str, moved: int | None = None
) -> None:
    if args.output == "json":
        answer: dict[str, Any] = {
            "outcome": outcome,
            "spool": info.pipeline_id,
            "to_pipeline": target,
        }
        answer.update({"pending_bytes": info.pending_bytes, "events_moved": moved})
        print(json.dumps(answer))
    elif outcome == "queued":
        print(
            f"{info.pipeline_id}: serve is running and holds {target}'s spool; it moves the "
            f"{info.pending_rows} pending events there within seconds (log line spool_drained); "
            "`auditrelay spool list` shows the orphan gone when done"
        )
    else:
        print(f"{info.pipeline_id}: {moved} events moved to {target}; the orphan is removed")


def _discard(args: argparse.Namespace, root: Path) -> int:
    source = _orphan(root, args.spool)
    if not args.yes:
        info = inspect(source, count_rows=True)
        raise ConfigError(
            [
                PropertyProblem(
                    "--yes",
                    "",
                    f"to confirm: discarding {info.pipeline_id} deletes {info.pending_rows} "
                    f"undelivered events for {describe(info.destination)}",
                )
            ]
        )
    info = discard(source)
    if args.output == "json":
        print(json.dumps({"outcome": "discarded", **info.as_json(owned=False)}))
    else:
        print(f"{info.pipeline_id}: discarded {info.pending_rows} undelivered events")
    return 0
