"""The emulator's Entra: client-credentials grants and the bearer-token check."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from auditrelay.emulator.tokens import (
    FEDERATED_AUDIENCE,
    JWT_BEARER,
    GrantRefusedError,
    TokenIssuer,
    TokenRejectedError,
    load_signing_key,
    openid_configuration,
)

KEY = b"k" * 32
AUDIENCE = "https://monitor.azure.com"
TOKEN_ENDPOINT = "https://127.0.0.1:8443/tenant-1/oauth2/v2.0/token"
SCOPE = "https://monitor.azure.com/.default"
OTHER_KEY = "another-signing-key-of-32-bytes-or-more"


def issuer(**kwargs: Any) -> TokenIssuer:
    return TokenIssuer(KEY, audience=AUDIENCE, lifetime=3600, **kwargs)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def issue(tokens: TokenIssuer, **kwargs: Any) -> str:
    arguments: dict[str, Any] = {
        "tenant": "tenant-1",
        "client_id": "client-1",
        "audience": AUDIENCE,
    }
    arguments.update(kwargs)
    token, _ = tokens.issue(issuer="https://127.0.0.1:8443/tenant-1/v2.0", **arguments)
    return token


def assertion(**claims: Any) -> str:
    body = {"exp": int(time.time()) + 600, "aud": FEDERATED_AUDIENCE, "iss": "https://k8s"}
    body.update(claims)
    return jwt.encode(body, OTHER_KEY)


def test_issued_token_carries_audience_tenant_and_expiry() -> None:
    """A token issued for the monitor audience verifies and carries aud, tid, exp."""
    tokens = issuer()
    claims = tokens.verify(bearer(issue(tokens)))

    assert (AUDIENCE, "tenant-1", "client-1") == (claims["aud"], claims["tid"], claims["appid"])
    assert 3590 <= claims["exp"] - time.time() <= 3600


def test_audience_with_trailing_slash_is_accepted() -> None:
    """Both spellings of the audience (with and without '/') are valid, as in the service."""
    tokens = issuer()
    tokens.verify(bearer(issue(tokens, audience=AUDIENCE + "/")))


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "InvalidAuthenticationToken"),
        ("Basic dXNlcjpwYXNz", "InvalidAuthenticationToken"),
        ("Bearer not-a-jwt", "InvalidAuthenticationToken"),
    ],
)
def test_missing_or_malformed_authorization_is_rejected(header: str | None, code: str) -> None:
    """No header, another scheme, or a non-JWT: InvalidAuthenticationToken."""
    with pytest.raises(TokenRejectedError) as raised:
        issuer().verify(header)
    assert code == raised.value.code


def test_token_signed_by_someone_else_is_rejected() -> None:
    """A well-formed JWT not signed by the emulator is refused."""
    forged = jwt.encode(
        {"aud": AUDIENCE, "exp": time.time() + 60, "iss": "x", "tid": "t"}, OTHER_KEY
    )
    with pytest.raises(TokenRejectedError) as raised:
        issuer().verify(bearer(forged))
    assert "InvalidAuthenticationToken" == raised.value.code


def test_wrong_audience_is_rejected_as_invalid_audience() -> None:
    """A token for another resource gets InvalidAudience."""
    tokens = issuer()
    with pytest.raises(TokenRejectedError) as raised:
        tokens.verify(bearer(issue(tokens, audience="https://management.azure.com")))
    assert "InvalidAudience" == raised.value.code


def test_expired_and_revoked_tokens_are_rejected_as_expired() -> None:
    """A token past exp, or issued before revoke_all(), is ExpiredAuthenticationToken."""
    tokens = issuer()
    expired = issue(tokens, lifetime=-10)
    before = issue(tokens)
    tokens.revoke_all()
    after = issue(tokens)

    for token in (expired, before):
        with pytest.raises(TokenRejectedError) as raised:
            tokens.verify(bearer(token))
        assert "ExpiredAuthenticationToken" == raised.value.code
    tokens.verify(bearer(after))


def test_signing_key_is_created_private_and_then_reused(tmp_path: Path) -> None:
    """The key file is mode 0600 and the same key comes back on the next start."""
    path = tmp_path / "token.key"
    first = load_signing_key(path)

    assert first == load_signing_key(path)
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)


def grant(form: dict[str, str], tokens: TokenIssuer | None = None) -> str:
    base = {"grant_type": "client_credentials", "client_id": "client-1", "scope": SCOPE}
    base.update(form)
    return (tokens or issuer()).check_grant("tenant-1", base, TOKEN_ENDPOINT).method


def refusal(form: dict[str, str], tokens: TokenIssuer | None = None) -> GrantRefusedError:
    with pytest.raises(GrantRefusedError) as raised:
        grant(form, tokens)
    return raised.value


def test_client_secret_grant_is_accepted() -> None:
    """Any non-empty secret is accepted when no secrets are registered."""
    assert "client_secret" == grant({"client_secret": "s"})


def test_registered_secrets_are_checked() -> None:
    """With registered secrets, a wrong one is AADSTS7000215 and an unknown client 700016."""
    tokens = issuer(client_secrets={"client-1": "right"})

    assert "client_secret" == grant({"client_secret": "right"}, tokens)
    assert (401, 7000215) == _status_code(refusal({"client_secret": "wrong"}, tokens))
    assert (400, 700016) == _status_code(
        refusal({"client_secret": "right", "client_id": "client-2"}, tokens)
    )


def _status_code(refused: GrantRefusedError) -> tuple[int, int]:
    return refused.status, refused.aadsts


def test_federated_assertion_for_the_exchange_audience_is_accepted() -> None:
    """A workload-identity token for api://AzureADTokenExchange is a valid credential."""
    form = {"client_assertion": assertion(), "client_assertion_type": JWT_BEARER}
    assert "federated" == grant(form)


def test_certificate_assertion_for_the_token_endpoint_is_accepted() -> None:
    """iss = sub = client id, an x5t header and aud = token endpoint: a certificate assertion."""
    signed = jwt.encode(
        {"iss": "client-1", "sub": "client-1", "aud": TOKEN_ENDPOINT, "exp": time.time() + 600},
        OTHER_KEY,
        headers={"x5t": "abc"},
    )
    form = {"client_assertion": signed, "client_assertion_type": JWT_BEARER}
    assert "client_certificate" == grant(form)


@pytest.mark.parametrize(
    ("form", "error", "aadsts"),
    [
        ({"grant_type": "password"}, "unsupported_grant_type", 70003),
        ({"client_id": ""}, "invalid_request", 900144),
        ({"scope": "https://monitor.azure.com/user_impersonation"}, "invalid_scope", 1002012),
        ({}, "invalid_client", 7000218),
        (
            {"client_assertion": "abc", "client_assertion_type": JWT_BEARER},
            "invalid_request",
            50027,
        ),
        ({"client_assertion": "abc", "client_assertion_type": "other"}, "invalid_request", 50027),
    ],
)
def test_malformed_grants_are_refused_with_the_entra_error(
    form: dict[str, str], error: str, aadsts: int
) -> None:
    """Unsupported grant, no client id, a scope without /.default, no credential, a non-JWT."""
    refused = refusal(form)
    assert (error, aadsts) == (refused.error, refused.aadsts)
    assert f"AADSTS{aadsts}" in refused.body()["error_description"]


def test_expired_or_misdirected_assertions_are_refused() -> None:
    """An expired assertion is AADSTS700024, one for another audience AADSTS700212."""
    expired = {"client_assertion": assertion(exp=int(time.time()) - 1)}
    elsewhere = {"client_assertion": assertion(aud="https://kubernetes.default.svc")}
    for form in (expired, elsewhere):
        form["client_assertion_type"] = JWT_BEARER

    assert 700024 == refusal(expired).aadsts
    assert 700212 == refusal(elsewhere).aadsts


def test_openid_configuration_points_at_the_tenant_token_endpoint() -> None:
    """MSAL reads the token endpoint and issuer of the tenant from the discovery document."""
    document = openid_configuration("https://127.0.0.1:8443", "tenant-1")

    assert TOKEN_ENDPOINT == document["token_endpoint"]
    assert "https://127.0.0.1:8443/tenant-1/v2.0" == document["issuer"]
    assert (
        "https://127.0.0.1:8443/tenant-1/oauth2/v2.0/authorize"
        == document["authorization_endpoint"]
    )
