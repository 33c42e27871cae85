"""``auditrelay emulator``: run the local Logs Ingestion endpoint, inject faults, query what it got.

auditrelay emulator serve --state-dir DIR [--port N] [--limits uncompressed] [--fault 503:count=3] ...
auditrelay emulator count --state-dir DIR [--output text|json]
auditrelay emulator rows --state-dir DIR [--audit-id ID] [--limit N (default 20)] [--output text|json]
auditrelay emulator errors --state-dir DIR [--output text|json]
auditrelay emulator requests --state-dir DIR [--output text|json]
auditrelay emulator fault --state-dir DIR [429:retry_after=2,count=5 ...] [--clear] [--output text|json]

rows, errors and requests print one compact JSON object per line with --output text (one per
row, entry or attempt, for grep) and one JSON document, a list, with --output json; count
prints the number, or {"rows": N}; fault prints the faults now active.

serve prints endpoint:, authority_host:, ca_file:, dcr_id:, streams: and database: lines, then
"ready"; the same facts are in DIR/emulator.json while it runs. Point the SDK at the endpoint,
trust ca_file, and set AZURE_AUTHORITY_HOST to authority_host.

--limits picks which bytes the 1 MiB limit of a call counts, since Azure's documentation and
the 413 observed read differently: wire (the default: the body as sent, gzip'd) or
uncompressed (the body as sent and the decompressed JSON, 1 MiB each, as the documentation
reads). --max-raw-bytes, when given, overrides the decompressed limit of either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import urllib.request
from pathlib import Path
from typing import Any

from auditrelay.cli import (
    EXIT_FINDING,
    EXIT_OK,
    add_output_option,
    emulator_store,
    missing_action,
    plain,
    print_json,
)
from auditrelay.config import parse_size
from auditrelay.emulator import (
    ADMIN_HEADER,
    DEFAULT_DCR_ID,
    BodyMode,
    DeclarationError,
    Emulator,
    EmulatorSettings,
    FaultError,
    SizeLimits,
    Store,
    StoreMode,
    load_declarations,
    parse_fault,
    shipped_declarations,
)
from auditrelay.emulator.server import INFO_FILE
from auditrelay.errors import ConfigError, PropertyProblem


def add_parser(subparsers: Any) -> None:
    """Registers ``auditrelay emulator`` and its sub-commands."""
    parser = subparsers.add_parser(
        "emulator",
        help="a local Azure Monitor Logs Ingestion endpoint (HTTPS, Entra tokens, SQLite store)",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run, action=None)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    serve = actions.add_parser("serve", help="run the emulator until interrupted")
    _add_state_dir(serve)
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    serve.add_argument("--port", type=int, default=0, help="TCP port (0: any free port).")
    serve.add_argument(
        "--streams",
        type=Path,
        help="JSON stream declarations (a DCR, its streamDeclarations, or {stream: {column: "
        "type}}); default: the stream auditrelay ships.",
    )
    serve.add_argument("--dcr-id", default=DEFAULT_DCR_ID, help="Immutable id of the rule.")
    serve.add_argument(
        "--max-body-bytes", type=parse_size, default="1048576", help="Largest body on the wire."
    )
    serve.add_argument(
        "--limits",
        choices=[limits.value for limits in SizeLimits],
        default=SizeLimits.WIRE.value,
        help="Which bytes the 1 MiB limit counts: wire (as sent; decompressed up to 64M) or "
        "uncompressed (as sent and decompressed, 1 MiB each).",
    )
    serve.add_argument(
        "--max-raw-bytes",
        type=parse_size,
        help="Largest decompressed body (default: 64M, or 1048576 with --limits uncompressed).",
    )
    serve.add_argument("--requests-per-minute", type=int, default=12_000)
    serve.add_argument("--bytes-per-minute", type=parse_size, default="2G")
    serve.add_argument(
        "--no-retry-after",
        action="store_true",
        help="Answer throttled requests without Retry-After.",
    )
    serve.add_argument(
        "--strict-body",
        action="store_true",
        help="Answer 400 to a body that is not a JSON array (the service answers 204 and "
        "drops it).",
    )
    serve.add_argument(
        "--store",
        choices=[mode.value for mode in StoreMode],
        default=StoreMode.FULL.value,
        help="full: check and keep each row; ids: only scan bodies for auditIDs and keep those, "
        "without column checks (benchmarks).",
    )
    serve.add_argument("--token-lifetime", type=float, default=3600.0, help="Seconds.")
    serve.add_argument(
        "--fill-time-generated",
        action="store_true",
        help="Give rows without TimeGenerated the time received (a rule whose transformation "
        "adds it).",
    )
    serve.add_argument(
        "--fault",
        action="append",
        default=[],
        type=_fault_argument,
        help="KIND[:count=N,probability=P,retry_after=S,delay=S]; KIND is an HTTP status or "
        "slow, timeout_after_store, drop_before_body, drop_after_body, drop_after_store. "
        "Repeatable.",
    )
    serve.add_argument("--fault-seed", type=int, help="Seed for probabilistic faults.")

    count = actions.add_parser("count", help="how many rows were accepted")
    add_output_option(count)
    _add_state_dir(count)
    count.add_argument("--dcr-id")
    count.add_argument("--stream")

    rows = actions.add_parser("rows", help="accepted rows, one JSON object each")
    add_output_option(rows)
    _add_state_dir(rows)
    rows.add_argument("--audit-id", help="Only the rows of this auditID.")
    rows.add_argument(
        "--limit", type=int, default=20, help="At most this many rows (default: %(default)s)."
    )

    errors = actions.add_parser("errors", help="the DCR error log (rows dropped or changed)")
    add_output_option(errors)
    _add_state_dir(errors)
    errors.add_argument("--limit", type=int, help="At most this many entries (default: all).")

    requests = actions.add_parser("requests", help="every ingestion attempt, with its status")
    add_output_option(requests)
    _add_state_dir(requests)
    requests.add_argument("--limit", type=int, help="At most this many attempts (default: all).")

    fault = actions.add_parser("fault", help="change the faults of a running emulator")
    add_output_option(fault)
    _add_state_dir(fault)
    fault.add_argument("faults", nargs="*", type=_fault_argument, help="Faults to add.")
    fault.add_argument("--clear", action="store_true", help="Remove every fault first.")


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="The emulator's directory: certificates, keys, SQLite store, emulator.json.",
    )


def _fault_argument(text: str) -> Any:
    try:
        return parse_fault(text)
    except FaultError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """Runs the chosen action."""
    actions = {
        "serve": _serve,
        "count": _count,
        "rows": _rows,
        "errors": _errors,
        "requests": _requests,
        "fault": _fault,
    }
    if args.action is None:
        return missing_action("emulator", actions)
    return actions[args.action](args)


def settings_from(args: argparse.Namespace) -> EmulatorSettings:
    """The emulator settings the ``serve`` flags describe."""
    try:
        declarations = load_declarations(args.streams) if args.streams else shipped_declarations()
    except DeclarationError as error:
        shown = str(args.streams) if args.streams else ""
        expected = f"stream declarations in JSON ({error})"
        raise ConfigError([PropertyProblem("--streams", shown, expected)]) from None
    return EmulatorSettings(
        state_dir=args.state_dir,
        streams=declarations,
        dcr_id=args.dcr_id,
        host=args.host,
        port=args.port,
        token_lifetime=args.token_lifetime,
        max_body_bytes=args.max_body_bytes,
        max_raw_bytes=args.max_raw_bytes or SizeLimits(args.limits).max_raw_bytes,
        requests_per_minute=args.requests_per_minute,
        bytes_per_minute=args.bytes_per_minute,
        throttle_retry_after=not args.no_retry_after,
        body_mode=BodyMode.STRICT if args.strict_body else BodyMode.REALISTIC,
        store_mode=StoreMode(args.store),
        fill_time_generated=args.fill_time_generated,
        faults=tuple(args.fault),
        fault_seed=args.fault_seed,
    )


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        asyncio.run(_serve_until_stopped(settings))
    except OSError as error:
        where = f"{settings.host}:{settings.port}"
        expected = f"an address and port this process can listen on ({error.strerror})"
        raise ConfigError([PropertyProblem("--host/--port", where, expected)]) from None
    return 0


async def _serve_until_stopped(settings: EmulatorSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Emulator(settings) as emulator:
        print(f"endpoint:       {emulator.endpoint}")
        print(f"authority_host: {emulator.authority_host}")
        print(f"ca_file:        {emulator.ca_file}")
        print(f"dcr_id:         {emulator.dcr_id}")
        print(f"streams:        {', '.join(sorted(emulator.declarations))}")
        print(f"database:       {emulator.store.path}")
        print("ready", flush=True)
        await stop.wait()


def _store(args: argparse.Namespace) -> Store:
    return emulator_store("--state-dir", args.state_dir)


def _print_items(args: argparse.Namespace, items: list[Any]) -> None:
    """One compact JSON object per line (text), or the list as one JSON document (json)."""
    if args.output == "json":
        print_json(items)
        return
    for item in items:
        print(json.dumps(item))


def _count(args: argparse.Namespace) -> int:
    count = _store(args).count(dcr=args.dcr_id, stream=args.stream)
    if args.output == "json":
        print_json({"rows": count})
    else:
        print(count)
    return EXIT_OK


def _rows(args: argparse.Namespace) -> int:
    found = _store(args).rows(audit_id=args.audit_id, limit=args.limit)
    _print_items(args, [{"id": row.id, "received": row.received, "row": row.row} for row in found])
    return EXIT_OK if found or args.audit_id is None else EXIT_FINDING


def _errors(args: argparse.Namespace) -> int:
    shown = [
        {
            "time": entry.time,
            "stream": entry.stream,
            "request": entry.client_request_id,
            "kind": entry.kind,
            "row": entry.row_index,
            "message": entry.message,
        }
        for entry in _store(args).errors(limit=args.limit)
    ]
    _print_items(args, shown)
    return EXIT_OK


def _requests(args: argparse.Namespace) -> int:
    shown = [
        {
            "received": record.received,
            "request": record.client_request_id,
            "status": record.status,
            "error": record.error_code,
            "wire_bytes": record.wire_bytes,
            "raw_bytes": record.raw_bytes,
            "rows": record.rows_stored,
            "dropped": record.rows_dropped,
            "fault": record.fault,
        }
        for record in _store(args).requests(limit=args.limit)
    ]
    _print_items(args, shown)
    return EXIT_OK


def _fault(args: argparse.Namespace) -> int:
    info_path = args.state_dir / INFO_FILE
    if not info_path.is_file():
        raise ConfigError(
            [
                PropertyProblem(
                    "--state-dir", str(args.state_dir), "the directory of a running emulator"
                )
            ]
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    key = (args.state_dir / "admin.key").read_text(encoding="utf-8").strip()
    context = ssl.create_default_context(cafile=info["ca_file"])
    url = info["endpoint"] + "/admin/faults"
    if args.clear:
        _admin_call(url, "DELETE", key, context, None)
    answer = _admin_call(
        url,
        "POST" if args.faults else "GET",
        key,
        context,
        [fault.to_json() for fault in args.faults] if args.faults else None,
    )
    if args.output == "json":
        print_json(answer)
    else:
        print(json.dumps(answer))
    return EXIT_OK


def _admin_call(url: str, method: str, key: str, context: ssl.SSLContext, document: Any) -> Any:
    data = json.dumps(document).encode() if document is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 -- https only
    request.add_header(ADMIN_HEADER, key)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())
