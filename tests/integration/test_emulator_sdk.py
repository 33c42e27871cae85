"""The real Azure SDK (azure-monitor-ingestion, azure-identity) over HTTPS against the emulator."""

from __future__ import annotations

import gzip
import io
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from auditrelay.emulator import (
    Emulator,
    EmulatorSettings,
    Fault,
    FaultKind,
    StoreMode,
    parse_fault,
    running_in_thread,
)
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity import (
    CertificateCredential,
    ClientSecretCredential,
    WorkloadIdentityCredential,
)
from azure.identity.aio import ClientSecretCredential as AsyncClientSecretCredential
from azure.identity.aio import WorkloadIdentityCredential as AsyncWorkloadIdentityCredential
from azure.monitor.ingestion import LogsIngestionClient
from azure.monitor.ingestion.aio import LogsIngestionClient as AsyncLogsIngestionClient
from fixtures.certs import app_registration_certificate

STREAM = "Custom-KubeAudit_CL"
COLUMNS = {
    "TimeGenerated": "datetime",
    "auditID": "string",
    "verb": "string",
    "code": "int",
    "latency": "real",
    "objectRef": "dynamic",
}
TENANT = "72f988bf-0000-0000-0000-000000000001"
CLIENT = "0a1b2c3d-0000-0000-0000-000000000002"


def make_rows(count: int, start: int = 0) -> list[MutableMapping[str, Any]]:
    now = datetime.now(UTC).isoformat()
    return [
        {
            "TimeGenerated": now,
            "auditID": f"audit-{index}",
            "verb": "get",
            "code": 200,
            "latency": 0.5,
            "objectRef": {"resource": "pods", "namespace": "default", "index": index},
        }
        for index in range(start, start + count)
    ]


def settings(state_dir: Path, **overrides: Any) -> EmulatorSettings:
    return EmulatorSettings(state_dir=state_dir, streams={STREAM: COLUMNS}, **overrides)


def secret_credential(emulator: Emulator) -> ClientSecretCredential:
    return ClientSecretCredential(
        TENANT,
        CLIENT,
        "not-a-real-secret",
        authority=emulator.authority_host,
        disable_instance_discovery=True,
        connection_verify=str(emulator.ca_file),
    )


def sync_client(emulator: Emulator, credential: Any, **kwargs: Any) -> LogsIngestionClient:
    return LogsIngestionClient(
        emulator.endpoint, credential, connection_verify=str(emulator.ca_file), **kwargs
    )


def headers_of(error: HttpResponseError) -> Any:
    """The response headers of an SDK error (typed loosely by azure-core)."""
    response: Any = error.response
    assert response is not None
    return response.headers


class StaticCredential:
    """A credential that always hands out one given token (to send tokens the SDK would not)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    with running_in_thread(settings(tmp_path / "emulator")) as running:
        yield running


@pytest.fixture
def service_account_token(tmp_path: Path) -> Path:
    """A projected service-account token as the kubelet writes it for workload identity."""
    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:kube-system:auditrelay",
        "aud": ["api://AzureADTokenExchange"],
        "exp": int(time.time()) + 3600,
        "iat": int(time.time()),
    }
    path = tmp_path / "azure-identity-token"
    path.write_text(jwt.encode(claims, "cluster-signing-key-of-32-bytes-at-least!"))
    return path


# --- identity ---------------------------------------------------------------------------------


def test_client_secret_credential_uploads_and_rows_are_stored(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ClientSecretCredential, pointed here by AZURE_AUTHORITY_HOST, gets a token from the
    emulator's Entra (OpenID discovery, then the grant); the rows are stored."""
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", emulator.authority_host)
    credential = ClientSecretCredential(
        TENANT,
        CLIENT,
        "not-a-real-secret",
        disable_instance_discovery=True,  # MSAL would ask login.microsoftonline.com otherwise
        connection_verify=str(emulator.ca_file),
    )
    with credential, sync_client(emulator, credential) as client:
        client.upload(emulator.dcr_id, STREAM, make_rows(25))

    assert 25 == emulator.store.count()
    stored = emulator.store.rows(audit_id="audit-7")
    assert [make_rows(1, 7)[0]["objectRef"]] == [row.row["objectRef"] for row in stored if row.row]
    grants = emulator.store.token_requests()
    assert [("client_secret", CLIENT, "https://monitor.azure.com/.default")] == [
        (grant.method, grant.client_id, grant.scope) for grant in grants
    ]


def test_workload_identity_credential_from_environment_uploads(
    emulator: Emulator, service_account_token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WorkloadIdentityCredential configured only by AZURE_* variables exchanges the SA token."""
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", emulator.authority_host)
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", CLIENT)
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(service_account_token))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emulator.ca_file))

    with WorkloadIdentityCredential() as credential, sync_client(emulator, credential) as client:
        client.upload(emulator.dcr_id, STREAM, make_rows(3))
        client.upload(emulator.dcr_id, STREAM, make_rows(3, start=3))

    assert 6 == emulator.store.count()
    assert ["federated"] == [grant.method for grant in emulator.store.token_requests()]


def test_workload_identity_with_wrong_assertion_audience_is_refused(
    emulator: Emulator, tmp_path: Path
) -> None:
    """A service-account token not meant for Entra is refused at the token endpoint."""
    token_file = tmp_path / "wrong-audience"
    claims = {"iss": "https://k8s", "sub": "x", "aud": "https://kubernetes.default.svc"}
    claims["exp"] = int(time.time()) + 3600  # type: ignore[assignment]
    token_file.write_text(jwt.encode(claims, "cluster-signing-key-of-32-bytes-at-least!"))
    credential = WorkloadIdentityCredential(
        tenant_id=TENANT,
        client_id=CLIENT,
        token_file_path=str(token_file),
        authority=emulator.authority_host,
        connection_verify=str(emulator.ca_file),
    )
    with credential, pytest.raises(ClientAuthenticationError) as raised:
        credential.get_token("https://monitor.azure.com/.default")

    assert "AADSTS700212" in str(raised.value)


def test_certificate_credential_uploads(emulator: Emulator, tmp_path: Path) -> None:
    """CertificateCredential's signed assertion (x5t, audience = token endpoint) is accepted."""
    pem = app_registration_certificate(tmp_path / "client.pem")
    credential = CertificateCredential(
        TENANT,
        CLIENT,
        str(pem),
        authority=emulator.authority_host,
        disable_instance_discovery=True,
        connection_verify=str(emulator.ca_file),
    )
    with credential, sync_client(emulator, credential) as client:
        client.upload(emulator.dcr_id, STREAM, make_rows(2))

    assert 2 == emulator.store.count()
    assert ["client_certificate"] == [grant.method for grant in emulator.store.token_requests()]


def test_token_for_another_resource_gets_401_invalid_audience(emulator: Emulator) -> None:
    """A token whose audience is not Azure Monitor is refused with 401 InvalidAudience."""
    with (
        secret_credential(emulator) as credential,
        sync_client(
            emulator, credential, credential_scopes=["https://management.azure.com/.default"]
        ) as client,
        pytest.raises(ClientAuthenticationError) as raised,
    ):
        client.upload(emulator.dcr_id, STREAM, make_rows(1))

    assert 401 == raised.value.status_code
    assert "InvalidAudience" == raised.value.error.code  # type: ignore[union-attr]
    assert "InvalidAudience" == headers_of(raised.value)["x-ms-error-code"]
    assert 0 == emulator.store.count()


def test_expired_token_gets_401(emulator: Emulator) -> None:
    """A token past its expiry is refused with 401 and nothing is stored."""
    expired = StaticCredential(emulator.issue_token(lifetime=-60))
    with (
        sync_client(emulator, expired) as client,
        pytest.raises(ClientAuthenticationError) as raised,
    ):
        client.upload(emulator.dcr_id, STREAM, make_rows(1))

    assert "ExpiredAuthenticationToken" == raised.value.error.code  # type: ignore[union-attr]
    assert 0 == emulator.store.count()


def test_credential_fetches_a_new_token_once_the_old_one_expired(tmp_path: Path) -> None:
    """With short-lived tokens the real credential refreshes on expiry and uploads keep working."""
    with (
        running_in_thread(settings(tmp_path / "emulator", token_lifetime=3)) as emulator,
        secret_credential(emulator) as credential,
        sync_client(emulator, credential) as client,
    ):
        client.upload(emulator.dcr_id, STREAM, make_rows(1))
        first = credential.get_token("https://monitor.azure.com/.default")
        while time.time() <= first.expires_on:  # the token's own expiry, not a guess
            time.sleep(0.05)
        client.upload(emulator.dcr_id, STREAM, make_rows(1, start=1))

        assert 2 == emulator.store.count()
        assert 2 <= len(emulator.store.token_requests())
        assert {204} == {attempt.status for attempt in emulator.store.requests()}


# --- bodies -----------------------------------------------------------------------------------


def test_sdk_list_upload_is_gzip_and_plain_json_stream_is_accepted(emulator: Emulator) -> None:
    """The SDK's gzip bodies and a plain JSON stream (no Content-Encoding) both store rows."""
    plain = io.BytesIO(json.dumps(make_rows(4, start=100)).encode())
    packed = io.BytesIO(gzip.compress(json.dumps(make_rows(5, start=200)).encode(), 1))
    with secret_credential(emulator) as credential, sync_client(emulator, credential) as client:
        client.upload(emulator.dcr_id, STREAM, make_rows(3))
        client.upload(emulator.dcr_id, STREAM, plain)
        client.upload(emulator.dcr_id, STREAM, packed)

    assert 12 == emulator.store.count()
    assert ["gzip", None, "gzip"] == [
        attempt.content_encoding for attempt in emulator.store.requests()
    ]
    assert 1 == len(emulator.store.rows(audit_id="audit-203"))


def test_object_instead_of_array_gets_204_and_an_error_log_entry(emulator: Emulator) -> None:
    """A single JSON object is answered 204, stored nowhere, and written to the error log."""
    body = io.BytesIO(json.dumps(make_rows(1)[0]).encode())
    with secret_credential(emulator) as credential, sync_client(emulator, credential) as client:
        client.upload(emulator.dcr_id, STREAM, body)

    assert 0 == emulator.store.count()
    assert ["BodyNotArray"] == [entry.kind for entry in emulator.store.errors()]


def test_rows_not_matching_the_declared_columns_get_204_and_are_dropped(
    emulator: Emulator,
) -> None:
    """Rows with an undeclared column or a wrong type are dropped with an error-log entry."""
    rows = make_rows(4)
    rows[1]["code"] = "200"
    rows[2]["extra"] = 1
    with secret_credential(emulator) as credential, sync_client(emulator, credential) as client:
        client.upload(emulator.dcr_id, STREAM, rows)

    assert ["audit-0", "audit-3"] == [row.audit_id for row in emulator.store.rows()]
    assert [("ColumnTypeMismatch", 1), ("UndeclaredColumn", 2)] == [
        (entry.kind, entry.row_index) for entry in emulator.store.errors()
    ]
    assert 2 == emulator.store.requests()[0].rows_dropped


def test_body_over_the_limit_gets_the_real_413(tmp_path: Path) -> None:
    """A body above the wire limit gets 413 ContentLengthLimitExceeded, body and header as real."""
    body = gzip.compress(json.dumps(make_rows(50)).encode())
    with (
        running_in_thread(settings(tmp_path / "emulator", max_body_bytes=len(body) - 1)) as emu,
        secret_credential(emu) as credential,
        sync_client(emu, credential) as client,
        pytest.raises(HttpResponseError) as raised,
    ):
        client.upload(emu.dcr_id, STREAM, io.BytesIO(body))

    assert 413 == raised.value.status_code
    response = raised.value.response
    assert response is not None
    assert "ContentLengthLimitExceeded" == headers_of(raised.value)["x-ms-error-code"]
    expected = {
        "error": {
            "code": "ContentLengthLimitExceeded",
            "message": f"Maximum allowed content length: {len(body) - 1} bytes "
            f"({(len(body) - 1) / 1048576:.2f} MB). Provided content length: {len(body)} bytes.",
        }
    }
    assert expected == json.loads(response.text())


# --- throttling -------------------------------------------------------------------------------


def test_requests_over_the_rule_limit_get_429_with_retry_after(tmp_path: Path) -> None:
    """Past the per-rule request limit the answer is 429 with a Retry-After in seconds."""
    with (
        running_in_thread(settings(tmp_path / "emulator", requests_per_minute=2)) as emu,
        secret_credential(emu) as credential,
        sync_client(emu, credential) as client,
    ):
        client.upload(emu.dcr_id, STREAM, make_rows(1))
        client.upload(emu.dcr_id, STREAM, make_rows(1, start=1))
        with pytest.raises(HttpResponseError) as raised:
            client.upload(emu.dcr_id, STREAM, make_rows(1, start=2), retry_total=0)

        assert 429 == raised.value.status_code
        assert 1 <= int(headers_of(raised.value)["Retry-After"]) <= 30
        assert [204, 204, 429] == [attempt.status for attempt in emu.store.requests()]


def test_bytes_over_the_rule_limit_get_429(tmp_path: Path) -> None:
    """Past the per-rule byte limit the answer is 429, also without Retry-After if so set."""
    body = json.dumps(make_rows(5)).encode()
    emulator_settings = settings(
        tmp_path / "emulator", bytes_per_minute=len(body) * 3 // 2, throttle_retry_after=False
    )
    with (
        running_in_thread(emulator_settings) as emu,
        secret_credential(emu) as credential,
        sync_client(emu, credential) as client,
    ):
        client.upload(emu.dcr_id, STREAM, io.BytesIO(body))
        with pytest.raises(HttpResponseError) as raised:
            client.upload(emu.dcr_id, STREAM, io.BytesIO(body))

        assert 429 == raised.value.status_code
        assert "Retry-After" not in headers_of(raised.value)
        assert [204, 429] == [attempt.status for attempt in emu.store.requests()]


# --- faults -----------------------------------------------------------------------------------


def upload_with_fault(emulator: Emulator, fault: Fault, **upload_kwargs: Any) -> Exception | None:
    emulator.add_fault(fault)
    with secret_credential(emulator) as credential, sync_client(emulator, credential) as client:
        try:
            client.upload(emulator.dcr_id, STREAM, make_rows(2), **upload_kwargs)
        except (HttpResponseError, ServiceRequestError, ServiceResponseError) as error:
            return error
    return None


@pytest.mark.parametrize("status", [500, 503, 504])
def test_statuses_the_sdk_retries_succeed_on_the_next_attempt(
    emulator: Emulator, status: int
) -> None:
    """500/503/504 once: the SDK retries by itself and the second attempt stores the rows."""
    error = upload_with_fault(emulator, parse_fault(f"{status}:count=1"))

    assert error is None
    assert [status, 204] == [attempt.status for attempt in emulator.store.requests()]
    assert 2 == emulator.store.count()


@pytest.mark.parametrize("status", [429, 502])
def test_statuses_without_retry_after_are_not_retried_by_the_sdk(
    emulator: Emulator, status: int
) -> None:
    """429 without Retry-After and 502 reach the caller after one attempt."""
    error = upload_with_fault(emulator, parse_fault(f"{status}:count=1"))

    assert isinstance(error, HttpResponseError)
    assert status == error.status_code
    assert [(status, str(status))] == [
        (attempt.status, attempt.fault) for attempt in emulator.store.requests()
    ]
    assert 0 == emulator.store.count()


def test_429_with_retry_after_is_retried_after_that_time(emulator: Emulator) -> None:
    """429 with Retry-After: the SDK waits that long and retries."""
    error = upload_with_fault(emulator, parse_fault("429:retry_after=1,count=1"))

    assert error is None
    first, second = emulator.store.requests()
    assert (429, 204) == (first.status, second.status)
    assert second.received - first.received >= 1.0


def test_slow_answer_delays_the_response(emulator: Emulator) -> None:
    """A slow fault answers normally, only later."""
    started = time.monotonic()
    error = upload_with_fault(emulator, Fault(FaultKind.SLOW, delay=0.5, count=1))

    assert error is None
    assert time.monotonic() - started >= 0.5
    assert 2 == emulator.store.count()


def test_timeout_after_store_leaves_the_rows_stored(emulator: Emulator) -> None:
    """The client times out on a request whose rows were stored (the duplicate risk)."""
    error = upload_with_fault(
        emulator, parse_fault("timeout_after_store:delay=3,count=1"), read_timeout=0.5
    )

    assert isinstance(error, ServiceResponseError)
    assert 2 == emulator.store.count()
    assert ["timeout_after_store"] == [attempt.fault for attempt in emulator.store.requests()]


@pytest.mark.parametrize(
    ("kind", "stored"),
    [("drop_before_body", 0), ("drop_after_body", 0), ("drop_after_store", 2)],
)
def test_dropped_connection_fails_the_request(emulator: Emulator, kind: str, stored: int) -> None:
    """A dropped connection gives no answer; rows are stored only when dropped after the store."""
    error = upload_with_fault(emulator, parse_fault(f"{kind}:count=1"))

    assert isinstance(error, ServiceRequestError | ServiceResponseError)
    assert stored == emulator.store.count()
    assert [(kind, 0)] == [(attempt.fault, attempt.status) for attempt in emulator.store.requests()]


def test_probabilistic_fault_hits_some_requests(tmp_path: Path) -> None:
    """A fault with a probability strikes only part of the requests (seeded: repeatable)."""
    emulator_settings = settings(
        tmp_path / "emulator", faults=(parse_fault("502:probability=0.5"),), fault_seed=7
    )
    with (
        running_in_thread(emulator_settings) as emu,
        secret_credential(emu) as credential,
        sync_client(emu, credential) as client,
    ):
        outcomes: list[int | None] = []
        for index in range(20):
            try:
                client.upload(emu.dcr_id, STREAM, make_rows(1, start=index))
                outcomes.append(204)
            except HttpResponseError as error:
                outcomes.append(error.status_code)

    assert {204, 502} == set(outcomes)
    assert outcomes.count(204) == emu.store.count()


# --- the async client -------------------------------------------------------------------------


@pytest.fixture
async def async_emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    async with Emulator(settings(tmp_path / "emulator", store_mode=StoreMode.FULL)) as running:
        yield running


async def test_async_client_with_workload_identity_on_one_tls_session(
    async_emulator: Emulator, service_account_token: Path
) -> None:
    """The aio client and aio WorkloadIdentityCredential upload through one shared session."""
    emulator = async_emulator
    context = ssl.create_default_context(cafile=str(emulator.ca_file))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context), auto_decompress=False
    ) as session:
        credential = AsyncWorkloadIdentityCredential(
            tenant_id=TENANT,
            client_id=CLIENT,
            token_file_path=str(service_account_token),
            authority=emulator.authority_host,
            transport=AioHttpTransport(session=session, session_owner=False),
        )
        client = AsyncLogsIngestionClient(
            emulator.endpoint,
            credential,
            transport=AioHttpTransport(session=session, session_owner=False),
        )
        async with credential, client:
            await client.upload(emulator.dcr_id, STREAM, make_rows(10))
            body = io.BytesIO(gzip.compress(json.dumps(make_rows(10, start=10)).encode()))
            await client.upload(emulator.dcr_id, STREAM, body)

    await emulator.wait_for_rows(20)
    assert 20 == emulator.store.count()
    assert {f"audit-{index}": 1 for index in range(20)} == emulator.store.audit_id_counts()


async def test_async_client_with_client_secret_sees_injected_503_then_succeeds(
    async_emulator: Emulator,
) -> None:
    """The aio client retries a 503 by itself; the emulator logs both attempts."""
    emulator = async_emulator
    emulator.add_fault(parse_fault("503:count=1"))
    credential = AsyncClientSecretCredential(
        TENANT,
        CLIENT,
        "not-a-real-secret",
        authority=emulator.authority_host,
        disable_instance_discovery=True,
        connection_verify=str(emulator.ca_file),
    )
    client = AsyncLogsIngestionClient(
        emulator.endpoint, credential, connection_verify=str(emulator.ca_file)
    )
    async with credential, client:
        await client.upload(emulator.dcr_id, STREAM, make_rows(3))

    assert [503, 204] == [attempt.status for attempt in emulator.store.requests()]
    assert 3 == emulator.store.count()


def test_endpoint_down_then_back_on_the_same_port_keeps_ca_tokens_and_rows(
    tmp_path: Path,
) -> None:
    """Stopped, the endpoint refuses connections; restarted on its port and state directory it
    serves the same CA, accepts the token issued before, and still holds the earlier rows."""
    with running_in_thread(settings(tmp_path / "emulator")) as first:
        credential = secret_credential(first)
        port, ca = first.port, first.ca_file.read_bytes()
        with sync_client(first, credential) as client:
            client.upload(first.dcr_id, STREAM, make_rows(2))
    try:
        with sync_client(first, credential) as client, pytest.raises(ServiceRequestError):
            client.upload(first.dcr_id, STREAM, make_rows(1, start=2))
        again = settings(tmp_path / "emulator", port=port)
        with running_in_thread(again) as second, sync_client(second, credential) as client:
            client.upload(second.dcr_id, STREAM, make_rows(2, start=3))

            assert ca == second.ca_file.read_bytes()
            assert 4 == second.store.count()
            assert 1 == len(second.store.token_requests())
    finally:
        credential.close()
