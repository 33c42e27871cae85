"""``auditrelay emulator``: serve in its own process, inject faults, query the store."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import auditrelay
import pytest
from auditrelay.cli import build_parser, main
from auditrelay.cli.emulator import settings_from
from auditrelay.emulator import BodyMode, Fault, FaultKind, StoreMode

STREAM = "Custom-KubeAudit_CL"
COLUMNS = {"TimeGenerated": "datetime", "auditID": "string", "code": "int"}


@pytest.fixture
def streams_file(tmp_path: Path) -> Path:
    path = tmp_path / "streams.json"
    path.write_text(json.dumps({STREAM: COLUMNS}))
    return path


def test_serve_flags_become_emulator_settings(tmp_path: Path, streams_file: Path) -> None:
    """Every serve flag lands in the matching EmulatorSettings field."""
    args = build_parser().parse_args(
        [
            "emulator",
            "serve",
            "--state-dir",
            str(tmp_path),
            "--streams",
            str(streams_file),
            "--port",
            "8443",
            "--max-body-bytes",
            "64k",
            "--requests-per-minute",
            "10",
            "--bytes-per-minute",
            "1M",
            "--no-retry-after",
            "--strict-body",
            "--store",
            "ids",
            "--token-lifetime",
            "5",
            "--fill-time-generated",
            "--fault",
            "503:count=2",
            "--fault",
            "slow:delay=1",
        ]
    )
    settings = settings_from(args)

    assert (8443, 65536, 10, 1 << 20, False) == (
        settings.port,
        settings.max_body_bytes,
        settings.requests_per_minute,
        settings.bytes_per_minute,
        settings.throttle_retry_after,
    )
    assert (BodyMode.STRICT, StoreMode.IDS, 5.0, True) == (
        settings.body_mode,
        settings.store_mode,
        settings.token_lifetime,
        settings.fill_time_generated,
    )
    assert (
        Fault(FaultKind.STATUS, 503, count=2),
        Fault(FaultKind.SLOW, delay=1.0),
    ) == settings.faults
    assert COLUMNS == dict(settings.declarations()[STREAM].columns)


@pytest.mark.parametrize(
    ("flags", "max_raw_bytes"),
    [
        ([], 64 << 20),
        (["--limits", "wire"], 64 << 20),
        (["--limits", "uncompressed"], 1_048_576),
        (["--limits", "uncompressed", "--max-raw-bytes", "2M"], 2 << 20),
    ],
)
def test_the_limits_preset_sets_the_decompressed_limit(
    tmp_path: Path, flags: list[str], max_raw_bytes: int
) -> None:
    """--limits wire keeps the 64M bomb guard; uncompressed caps the decompressed body at
    1 MiB like the wire; an explicit --max-raw-bytes wins over either."""
    args = build_parser().parse_args(["emulator", "serve", "--state-dir", str(tmp_path), *flags])

    assert (1_048_576, max_raw_bytes) == (
        settings_from(args).max_body_bytes,
        settings_from(args).max_raw_bytes,
    )


def test_unreadable_stream_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing --streams file exits 2 naming the flag and the file."""
    missing = tmp_path / "nope.json"
    code = main(["emulator", "serve", "--state-dir", str(tmp_path), "--streams", str(missing)])

    assert 2 == code
    assert f"--streams: got '{missing}'" in capsys.readouterr().err


def test_rows_help_states_its_default_limit(capsys: pytest.CaptureFixture[str]) -> None:
    """rows prints 20 rows unless told otherwise, and its help says so."""
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["emulator", "rows", "--help"])

    assert 0 == raised.value.code
    assert "At most this many rows (default: 20)." in " ".join(capsys.readouterr().out.split())
    assert 20 == build_parser().parse_args(["emulator", "rows", "--state-dir", "x"]).limit


def test_bad_fault_flag_is_refused_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown fault kind stops the command with the reason."""
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(
            ["emulator", "serve", "--state-dir", str(tmp_path), "--fault", "teapot"]
        )

    assert 2 == raised.value.code
    assert "unknown fault kind 'teapot'" in capsys.readouterr().err


PACKAGE_ROOT = str(Path(auditrelay.__file__).resolve().parents[1])  # this checkout's sidecar/
PRINTED_KEYS = {"endpoint", "authority_host", "ca_file", "dcr_id", "streams", "database"}


@dataclass
class Served:
    """A running ``auditrelay emulator serve`` process and what it printed."""

    process: asyncio.subprocess.Process
    printed: dict[str, str]


@pytest.fixture
async def serving(tmp_path: Path, streams_file: Path) -> AsyncIterator[Served]:
    """``auditrelay emulator serve`` in its own process."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "auditrelay",
        "emulator",
        "serve",
        "--state-dir",
        str(tmp_path / "state"),
        "--streams",
        str(streams_file),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    printed: dict[str, str] = {}
    async with asyncio.timeout(30):
        while (line := (await process.stdout.readline()).decode()) != "ready\n":
            assert line, "the emulator exited before it was ready"
            key, _, value = line.partition(":")
            if key in PRINTED_KEYS:
                printed[key] = value.strip()
    printed["state_dir"] = str(tmp_path / "state")
    try:
        yield Served(process, printed)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.communicate(), 30)


@pytest.fixture
def served(serving: Served) -> dict[str, str]:
    return serving.printed


async def upload_through_token_endpoint(printed: dict[str, str], body: bytes) -> int:
    context = ssl.create_default_context(cafile=printed["ca_file"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        form = {
            "grant_type": "client_credentials",
            "client_id": "cli-test",
            "client_secret": "not-a-real-secret",
            "scope": "https://monitor.azure.com/.default",
        }
        async with session.post(f"{printed['authority_host']}/t/oauth2/v2.0/token", data=form) as r:
            token = (await r.json())["access_token"]
        url = (
            f"{printed['endpoint']}/dataCollectionRules/{printed['dcr_id']}/streams/{STREAM}"
            "?api-version=2023-01-01"
        )
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        }
        async with session.post(url, data=gzip.compress(body), headers=headers) as response:
            return response.status


async def test_serve_prints_where_it_listens_and_stops_on_sigterm(serving: Served) -> None:
    """serve prints endpoint, authority, CA and rule; exits 0 on SIGTERM and tidies up."""
    printed = serving.printed
    assert printed["endpoint"].startswith("https://127.0.0.1:")
    assert printed["endpoint"] == printed["authority_host"]
    assert (True, printed["endpoint"]) == state_files(printed)

    serving.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(serving.process.communicate(), 30)

    assert 0 == serving.process.returncode
    assert (True, None) == state_files(printed)


def state_files(printed: dict[str, str]) -> tuple[bool, str | None]:
    """Whether the CA file exists, and the endpoint emulator.json names (None: no file)."""
    info = Path(printed["state_dir"], "emulator.json")
    endpoint = json.loads(info.read_text())["endpoint"] if info.exists() else None
    return Path(printed["ca_file"]).is_file(), endpoint


async def test_query_commands_read_what_the_running_emulator_stored(
    served: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """count, rows --audit-id, errors and requests show what a separate emulator process got."""
    now = datetime.now(UTC).isoformat()
    rows = [
        {"TimeGenerated": now, "auditID": "a-1", "code": 200},
        {"TimeGenerated": now, "auditID": "a-2", "code": "not an int"},
    ]
    assert 204 == await upload_through_token_endpoint(served, json.dumps(rows).encode())
    state = ["--state-dir", served["state_dir"]]
    capsys.readouterr()

    assert 0 == main(["emulator", "count", *state])
    assert "1\n" == capsys.readouterr().out
    assert 0 == main(["emulator", "rows", "--audit-id", "a-1", *state])
    assert [rows[0]] == [json.loads(line)["row"] for line in capsys.readouterr().out.splitlines()]
    assert 1 == main(["emulator", "rows", "--audit-id", "a-2", *state])
    capsys.readouterr()
    assert 0 == main(["emulator", "errors", *state])
    assert ["ColumnTypeMismatch"] == [
        json.loads(line)["kind"] for line in capsys.readouterr().out.splitlines()
    ]
    assert 0 == main(["emulator", "requests", *state])
    assert [(204, 1, 1)] == [
        (shown["status"], shown["rows"], shown["dropped"])
        for shown in map(json.loads, capsys.readouterr().out.splitlines())
    ]


async def test_fault_command_changes_the_running_emulator(
    served: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`emulator fault` adds faults through the admin endpoint; --clear removes them."""
    state = ["--state-dir", served["state_dir"]]
    code = await asyncio.to_thread(main, ["emulator", "fault", *state, "503:count=1"])
    assert 0 == code
    assert {"faults": [{"kind": "503", "count": 1}]} == json.loads(capsys.readouterr().out)

    body = json.dumps([{"TimeGenerated": datetime.now(UTC).isoformat(), "auditID": "x"}]).encode()
    assert 503 == await upload_through_token_endpoint(served, body)
    assert 204 == await upload_through_token_endpoint(served, body)

    await asyncio.to_thread(main, ["emulator", "fault", *state, "502", "--clear"])
    assert {"faults": [{"kind": "502"}]} == json.loads(capsys.readouterr().out)
    await asyncio.to_thread(main, ["emulator", "fault", *state, "--clear"])
    assert {"faults": []} == json.loads(capsys.readouterr().out)


def test_fault_command_without_a_running_emulator_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pointing `emulator fault` at a directory with no running emulator exits 2."""
    assert 2 == main(["emulator", "fault", "--state-dir", str(tmp_path), "503"])
    assert "the directory of a running emulator" in capsys.readouterr().err


def test_port_already_in_use_is_a_clear_error(
    tmp_path: Path, streams_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve on a port another socket holds exits 2 naming the address."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = main(
            [
                "emulator",
                "serve",
                "--state-dir",
                str(tmp_path),
                "--streams",
                str(streams_file),
                "--port",
                str(port),
            ]
        )

    assert 2 == code
    assert f"--host/--port: got '127.0.0.1:{port}'" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["count", "rows", "errors", "requests"])
def test_query_commands_refuse_a_directory_without_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    """A mistyped --state-dir says there is no store there and exits 2, instead of answering
    as if an empty emulator were there."""
    typo = tmp_path / "emulatr"

    assert 2 == main(["emulator", action, "--state-dir", str(typo)])

    captured = capsys.readouterr()
    assert "" == captured.out
    assert f"--state-dir: got '{typo}', expected an emulator's state directory" in captured.err
    assert "no store there" in captured.err
    assert not typo.exists()
