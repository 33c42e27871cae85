"""The emulator's HTTP contract, byte for byte: status codes, error bodies, headers, admin API."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import socket
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from auditrelay import stream
from auditrelay.emulator import (
    ADMIN_HEADER,
    BodyMode,
    Emulator,
    EmulatorSettings,
    Fault,
    FaultKind,
    SizeLimits,
    StoreMode,
    running_in_thread,
    shipped_declarations,
)

STREAM = "Custom-KubeAudit_CL"
COLUMNS = {"TimeGenerated": "datetime", "auditID": "string", "code": "int"}


def rows(count: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    return [{"TimeGenerated": now, "auditID": f"a-{i}", "code": 200} for i in range(count)]


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorSettings(state_dir=tmp_path, streams={STREAM: COLUMNS})) as emu:
        yield emu


@pytest.fixture
async def session(emulator: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:
        yield client


async def post(
    session: aiohttp.ClientSession,
    emulator: Emulator,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    url: str | None = None,
    gzip_body: bool = True,
) -> tuple[int, dict[str, str], bytes]:
    """POSTs a body as the SDK would (gzip, JSON, bearer token) unless told otherwise."""
    sent = {
        "Authorization": f"Bearer {emulator.issue_token()}",
        "Content-Type": "application/json",
        "x-ms-client-request-id": "req-1",
    }
    if gzip_body:
        sent["Content-Encoding"] = "gzip"
        body = gzip.compress(body)
    sent.update(headers or {})
    target = url or emulator.ingestion_url(STREAM)
    async with session.post(target, data=io.BytesIO(body), headers=sent) as r:
        return r.status, dict(r.headers), await r.read()


def error_of(body: bytes) -> tuple[str, str]:
    error = json.loads(body)["error"]
    return error["code"], error["message"]


async def test_accepted_body_gets_204_with_an_empty_body(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Success is 204 with no body (anything else makes the SDK raise); the rows are stored."""
    status, _, body = await post(session, emulator, json.dumps(rows(3)).encode())

    assert (204, b"") == (status, body)
    assert 3 == emulator.store.count()
    assert ["req-1"] == [attempt.client_request_id for attempt in emulator.store.requests()]


async def test_body_over_1_mb_gets_the_services_413(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """A 1,068,792-byte body gets the exact 413 body and x-ms-error-code of the real service."""
    body = b"[" + b" " * (1_068_792 - 2) + b"]"
    status, headers, answer = await post(session, emulator, body, gzip_body=False)

    expected = {
        "error": {
            "code": "ContentLengthLimitExceeded",
            "message": "Maximum allowed content length: 1048576 bytes (1 MB). "
            "Provided content length: 1068792 bytes.",
        }
    }
    assert (413, expected) == (status, json.loads(answer))
    assert "ContentLengthLimitExceeded" == headers["x-ms-error-code"]
    assert 0 == emulator.store.count()


async def test_chunked_body_over_the_limit_gets_413_with_its_real_size(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """A body without Content-Length is measured as it arrives."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * 400_000

    headers = {
        "Authorization": f"Bearer {emulator.issue_token()}",
        "Content-Type": "application/json",
    }
    url = emulator.ingestion_url(STREAM)
    async with session.post(url, data=chunks(), headers=headers) as response:
        assert 413 == response.status
        assert "Provided content length: 1200000 bytes." in error_of(await response.read())[1]


@pytest.mark.parametrize(
    ("query", "code"),
    [("", "MissingApiVersionParameter"), ("?api-version=2020-01-01", "InvalidApiVersionParameter")],
)
async def test_api_version_is_required(
    emulator: Emulator, session: aiohttp.ClientSession, query: str, code: str
) -> None:
    """A missing or unknown api-version is 400 with its code."""
    url = f"{emulator.endpoint}/dataCollectionRules/{emulator.dcr_id}/streams/{STREAM}{query}"
    status, headers, body = await post(session, emulator, b"[]", url=url)

    assert (400, code, code) == (status, error_of(body)[0], headers["x-ms-error-code"])


async def test_older_preview_api_version_is_accepted(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """2021-11-01-preview (still used by Fluent Bit) is served like 2023-01-01."""
    url = emulator.ingestion_url(STREAM).replace("2023-01-01", "2021-11-01-preview")
    status, _, _ = await post(session, emulator, json.dumps(rows(1)).encode(), url=url)
    assert 204 == status


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Authorization": ""}, 401, "InvalidAuthenticationToken"),
        ({"Content-Type": "text/plain"}, 415, "UnsupportedMediaType"),
        ({"Content-Encoding": "br"}, 415, "UnsupportedContentEncoding"),
    ],
)
async def test_bad_request_headers_are_refused(
    emulator: Emulator,
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """No token, a non-JSON content type, an unknown encoding: refused with the code."""
    answer = await post(session, emulator, json.dumps(rows(1)).encode(), headers=headers)

    assert (status, code) == (answer[0], error_of(answer[2])[0])
    assert [(status, code)] == [(a.status, a.error_code) for a in emulator.store.requests()]


async def test_unknown_rule_and_stream_are_404(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """A rule or stream the emulator does not have is 404 in the ErrorResponse shape."""
    other_rule = emulator.ingestion_url(STREAM, dcr_id="dcr-" + "1" * 32)
    other_stream = emulator.ingestion_url("Custom-Other_CL")

    rule = await post(session, emulator, b"[]", url=other_rule)
    stream = await post(session, emulator, b"[]", url=other_stream)

    assert (404, "InvalidDataCollectionRule") == (rule[0], error_of(rule[2])[0])
    assert (404, "InvalidStream") == (stream[0], error_of(stream[2])[0])


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\x1f\x8b\x08\x00garbage", "InvalidContentEncoding"),
        (gzip.compress(b"[]")[:-9], "InvalidContentEncoding"),
    ],
)
async def test_corrupt_or_truncated_gzip_is_400(
    emulator: Emulator, session: aiohttp.ClientSession, body: bytes, code: str
) -> None:
    """A body declared gzip that does not inflate is 400."""
    status, _, answer = await post(
        session, emulator, body, gzip_body=False, headers={"Content-Encoding": "gzip"}
    )
    assert (400, code) == (status, error_of(answer)[0])


@pytest.mark.parametrize("body", [b'[{"code": NaN}]', b"[1,", b'["\xff"]'])
async def test_json_that_is_not_strict_json_is_400(
    emulator: Emulator, session: aiohttp.ClientSession, body: bytes
) -> None:
    """NaN (which json.dumps writes), truncated JSON and invalid UTF-8 are refused."""
    status, _, answer = await post(session, emulator, body)
    assert (400, "InvalidJson") == (status, error_of(answer)[0])


async def test_several_gzip_members_are_one_body(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Concatenated gzip members inflate to one body, as gzip readers do."""
    text = json.dumps(rows(2)).encode()
    body = gzip.compress(text[:10]) + gzip.compress(text[10:])
    status, _, _ = await post(
        session, emulator, body, gzip_body=False, headers={"Content-Encoding": "gzip"}
    )
    assert (204, 2) == (status, emulator.store.count())


async def test_decompressed_size_is_capped(tmp_path: Path) -> None:
    """A small gzip body that inflates past max_raw_bytes is 413 (decompression-bomb guard)."""
    settings = EmulatorSettings(state_dir=tmp_path, streams={STREAM: COLUMNS}, max_raw_bytes=1000)
    async with Emulator(settings) as emulator:
        connector = aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            status, _, answer = await post(session, emulator, b"[" + b" " * 5000 + b"]")

    assert (413, "ContentLengthLimitExceeded") == (status, error_of(answer)[0])


def body_of_raw_size(size: int) -> bytes:
    """A JSON array of valid rows padded with whitespace to exactly ``size`` bytes."""
    text = json.dumps(rows(3)).encode()
    return text[:-1] + b" " * (size - len(text)) + b"]"


@pytest.mark.parametrize(
    ("limits", "statuses"),
    [(SizeLimits.WIRE, (204, 204)), (SizeLimits.UNCOMPRESSED, (204, 413))],
)
async def test_the_limits_preset_decides_whether_uncompressed_bytes_count(
    tmp_path: Path, limits: SizeLimits, statuses: tuple[int, int]
) -> None:
    """Two gzip bodies, a few KB on the wire, of 1,048,576 and 1,048,577 bytes decompressed:
    the wire reading takes both; the uncompressed reading takes the first and refuses the
    second with the service's 413 code."""
    settings = EmulatorSettings(
        state_dir=tmp_path, streams={STREAM: COLUMNS}, max_raw_bytes=limits.max_raw_bytes
    )
    async with Emulator(settings) as emulator:
        connector = aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            at_limit = await post(session, emulator, body_of_raw_size(1_048_576))
            over = await post(session, emulator, body_of_raw_size(1_048_577))

    assert statuses == (at_limit[0], over[0])
    if over[0] == 413:
        assert "ContentLengthLimitExceeded" == error_of(over[2])[0]
    assert all(request.wire_bytes < 10_000 for request in emulator.store.requests())


async def test_strict_mode_refuses_an_object_body(tmp_path: Path) -> None:
    """In strict mode a body that is not an array is 400 instead of 204-and-drop."""
    settings = EmulatorSettings(
        state_dir=tmp_path, streams={STREAM: COLUMNS}, body_mode=BodyMode.STRICT
    )
    async with Emulator(settings) as emulator:
        connector = aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            status, _, answer = await post(session, emulator, json.dumps(rows(1)[0]).encode())

    assert (400, "InvalidPayload") == (status, error_of(answer)[0])


async def test_ids_mode_stores_the_audit_ids_found_in_the_body(tmp_path: Path) -> None:
    """The benchmark mode keeps each auditID in the body, and still drops an object body."""
    settings = EmulatorSettings(
        state_dir=tmp_path, streams={STREAM: COLUMNS}, store_mode=StoreMode.IDS
    )
    async with Emulator(settings) as emulator:
        connector = aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            await post(session, emulator, json.dumps(rows(3)).encode())
            await post(session, emulator, json.dumps(rows(1)[0]).encode())

        assert {"a-0": 1, "a-1": 1, "a-2": 1} == emulator.store.audit_id_counts()
        assert ["BodyNotArray"] == [entry.kind for entry in emulator.store.errors()]


async def test_token_endpoint_refusal_is_an_entra_error_and_is_logged(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """A grant without a credential gets Entra's JSON error; the attempt is in the token log."""
    url = f"{emulator.authority_host}/tenant-1/oauth2/v2.0/token"
    form = {
        "grant_type": "client_credentials",
        "client_id": "c",
        "scope": "https://monitor.azure.com/.default",
    }
    async with session.post(url, data=form) as response:
        answer = await response.json()

    assert (401, "invalid_client", [7000218]) == (
        response.status,
        answer["error"],
        answer["error_codes"],
    )
    assert [(401, "invalid_client")] == [
        (token.status, token.error) for token in emulator.store.token_requests()
    ]


async def test_openid_configuration_is_served_per_tenant(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """MSAL's discovery document names this emulator's token endpoint for the tenant."""
    url = f"{emulator.authority_host}/tenant-1/v2.0/.well-known/openid-configuration"
    async with session.get(url) as response:
        document = await response.json()

    assert f"{emulator.authority_host}/tenant-1/oauth2/v2.0/token" == document["token_endpoint"]


async def test_admin_endpoint_needs_the_admin_key(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Without the admin key, or with an ingestion token instead, the admin API refuses."""
    url = f"{emulator.endpoint}/admin/faults"
    bearer = {"Authorization": f"Bearer {emulator.issue_token()}"}
    async with session.post(url, json={"kind": "503"}) as anonymous:
        pass
    async with session.post(url, json={"kind": "503"}, headers=bearer) as with_token:
        pass

    assert (403, 403) == (anonymous.status, with_token.status)
    assert [] == emulator.faults.active()


async def test_admin_endpoint_adds_lists_and_clears_faults(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Faults posted to the admin API apply to the next ingestion requests."""
    url = f"{emulator.endpoint}/admin/faults"
    admin = {ADMIN_HEADER: emulator.admin_key}
    async with session.post(url, json=[{"kind": "503", "count": 1}], headers=admin) as added:
        assert {"faults": [{"kind": "503", "count": 1}]} == await added.json()
    async with session.post(url, json={"kind": "teapot"}, headers=admin) as refused:
        assert (400, "InvalidFault") == (refused.status, error_of(await refused.read())[0])

    first = await post(session, emulator, json.dumps(rows(1)).encode())
    second = await post(session, emulator, json.dumps(rows(1)).encode())

    async with session.post(url, json={"kind": "502"}, headers=admin):
        pass
    async with session.delete(url, headers=admin) as cleared:
        assert {"faults": []} == await cleared.json()
    assert (503, "ServiceUnavailable") == (first[0], first[1]["x-ms-error-code"])
    assert 204 == second[0]


async def test_revoked_tokens_are_refused_until_a_new_one_is_issued(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """POST /admin/tokens/revoke makes every token issued so far expired."""
    old = emulator.issue_token()
    async with session.post(
        f"{emulator.endpoint}/admin/tokens/revoke", headers={ADMIN_HEADER: emulator.admin_key}
    ) as revoked:
        assert 200 == revoked.status

    refused = await post(
        session, emulator, json.dumps(rows(1)).encode(), headers={"Authorization": f"Bearer {old}"}
    )
    accepted = await post(session, emulator, json.dumps(rows(1)).encode())

    assert (401, "ExpiredAuthenticationToken") == (refused[0], error_of(refused[2])[0])
    assert 204 == accepted[0]


async def test_state_directory_describes_the_running_emulator(tmp_path: Path) -> None:
    """emulator.json tells other processes where it listens; admin.key is private; both go."""
    async with Emulator(EmulatorSettings(state_dir=tmp_path, streams={STREAM: COLUMNS})) as emu:
        info = json.loads((tmp_path / "emulator.json").read_text())
        key_mode = stat.S_IMODE((tmp_path / "admin.key").stat().st_mode)

        assert (emu.endpoint, str(emu.ca_file), emu.dcr_id) == (
            info["endpoint"],
            info["ca_file"],
            info["dcr_id"],
        )
        assert 0o600 == key_mode
    assert not (tmp_path / "emulator.json").exists()


async def test_waiting_for_rows_that_never_come_times_out(emulator: Emulator) -> None:
    """wait_for_rows raises TimeoutError instead of hanging when the rows do not arrive."""
    with pytest.raises(TimeoutError):
        await emulator.wait_for_rows(1, within=0.05)


async def test_waiting_for_rows_returns_once_they_are_stored(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """wait_for_rows returns as soon as the store holds the rows."""
    await post(session, emulator, json.dumps(rows(2)).encode())
    await emulator.wait_for_rows(2, within=5)


async def test_refused_token_carries_a_bearer_challenge(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """A 401 names the authority in WWW-Authenticate, as Azure resource providers do."""
    status, headers, _ = await post(
        session, emulator, b"[]", headers={"Authorization": "Bearer x.y.z"}
    )

    assert 401 == status
    assert headers["WWW-Authenticate"].startswith(
        f'Bearer authorization_uri="{emulator.authority_host}/common", error="invalid_token"'
    )


async def test_client_without_access_to_the_rule_gets_403(tmp_path: Path) -> None:
    """With allowed_clients set, another client's valid token gets 403 OperationFailed."""
    settings = EmulatorSettings(
        state_dir=tmp_path, streams={STREAM: COLUMNS}, allowed_clients=frozenset({"sidecar"})
    )
    async with Emulator(settings) as emulator:
        connector = aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            body = json.dumps(rows(1)).encode()
            stranger = await post(session, emulator, body)
            allowed = await post(
                session,
                emulator,
                body,
                headers={"Authorization": f"Bearer {emulator.issue_token(client_id='sidecar')}"},
            )

    code, message = error_of(stranger[2])
    assert (403, "OperationFailed") == (stranger[0], code)
    assert f"immutable Id '{emulator.dcr_id}' PipelineAccessResult: AccessGranted: False" in message
    assert 204 == allowed[0]


async def test_injected_403_speaks_like_a_missing_role_assignment(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """A 403 fault has the service's OperationFailed body (role assignment not yet effective)."""
    emulator.add_fault(Fault(FaultKind.STATUS, status=403, count=1))
    status, headers, body = await post(session, emulator, json.dumps(rows(1)).encode())

    assert (403, "OperationFailed") == (status, headers["x-ms-error-code"])
    assert "does not have access to ingest data" in error_of(body)[1]


async def test_default_settings_serve_the_stream_auditrelay_ships(tmp_path: Path) -> None:
    """EmulatorSettings(state_dir) alone declares the shipped stream (the embedded default)."""
    async with Emulator(EmulatorSettings(state_dir=tmp_path)) as emulator:
        assert shipped_declarations().keys() == emulator.declarations.keys()


async def test_a_row_the_encoder_types_wrongly_is_dropped_by_the_deployed_declaration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator checks rows against the deployed rule, not against the encoder's own table:
    an encoder that wrongly takes `stage` for a dynamic column writes an object there, and the
    emulator drops that row with a ColumnTypeMismatch instead of agreeing with the encoder."""
    monkeypatch.setitem(stream.COLUMN_TYPES, "stage", "dynamic")
    monkeypatch.setitem(stream._EVENT_FITS, "stage", (dict,))
    now = datetime.now(UTC).isoformat()
    encoder = stream.RowEncoder("prod", "")
    good = encoder.reserialize(
        {"auditID": "good", "stage": "ResponseComplete", "stageTimestamp": now}
    )
    wrong = encoder.reserialize({"auditID": "wrong", "stage": {"name": "x"}, "stageTimestamp": now})
    assert {"name": "x"} == json.loads(wrong)["stage"], "the encoder did write the wrong type"

    async with Emulator(EmulatorSettings(state_dir=tmp_path)) as emulator:
        connector = aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:
            body = b"[" + good + b"," + wrong + b"]"
            status, _, _ = await post(client, emulator, body)
        await emulator.wait_for_rows(1)
        stored = [row.audit_id for row in emulator.store.rows()]
        errors = [(e.kind, e.row_index) for e in emulator.store.errors()]

    assert 204 == status
    assert ["good"] == stored
    assert ("ColumnTypeMismatch", 1) in errors


async def test_concurrent_uploads_are_each_stored_once(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    """Twenty requests in flight at once: every row stored once, every attempt logged."""

    async def upload(batch: int) -> int:
        now = datetime.now(UTC).isoformat()
        body = [{"TimeGenerated": now, "auditID": f"b{batch}-{i}", "code": i} for i in range(50)]
        return (await post(session, emulator, json.dumps(body).encode()))[0]

    answers = await asyncio.gather(*(upload(batch) for batch in range(20)))

    assert [204] * 20 == answers
    counts = emulator.store.audit_id_counts()
    assert (1000, {1}) == (len(counts), set(counts.values()))
    assert 20 == len(emulator.store.requests())


def test_running_in_thread_reports_a_failed_start(tmp_path: Path) -> None:
    """A background emulator that cannot listen raises in the caller's thread."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        settings = EmulatorSettings(
            state_dir=tmp_path, streams={STREAM: COLUMNS}, port=taken.getsockname()[1]
        )
        with pytest.raises(OSError, match="in use"), running_in_thread(settings):
            pass
