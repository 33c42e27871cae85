"""The emulator's token authority: client-credentials grants checked, tokens issued and verified.

azure-identity's credentials (ClientSecretCredential, ClientCertificateCredential,
WorkloadIdentityCredential) point at the emulator through ``AZURE_AUTHORITY_HOST`` (or the
``authority=`` argument) and run unchanged: MSAL-based ones first read
``/{tenant}/v2.0/.well-known/openid-configuration``, then everyone posts a client-credentials
grant to ``/{tenant}/oauth2/v2.0/token``. The answer is a signed JWT (HS256, key kept in the
state directory) carrying the audience taken from the requested scope, so the ingestion
endpoint can refuse a token meant for another resource exactly as the service does. The HTTP
paths themselves are in ``entra``.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
DEFAULT_SCOPE_SUFFIX = "/.default"
ALGORITHM = "HS256"


class TokenRejectedError(Exception):
    """A bearer token the ingestion endpoint refuses; ``code`` is the ErrorResponse code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GrantRefusedError(Exception):
    """A token request Entra would refuse, with its OAuth error and AADSTS code."""

    def __init__(self, status: int, error: str, aadsts: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.aadsts = aadsts
        self.description = description

    def body(self) -> dict[str, Any]:
        """The JSON body Entra sends with a refused grant."""
        trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
        timestamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": self.error,
            "error_description": (
                f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace_id} "
                f"Correlation ID: {correlation_id} Timestamp: {timestamp}"
            ),
            "error_codes": [self.aadsts],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
        }


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token request asked for, as far as the emulator keeps it (never a secret)."""

    tenant: str
    client_id: str
    scope: str
    method: str  # client_secret | client_certificate | federated


def load_signing_key(path: Path) -> bytes:
    """The HS256 key of this state directory, created (mode 0600) on first use."""
    if path.is_file():
        return path.read_bytes()
    key = secrets.token_bytes(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    return key


class TokenIssuer:
    """Issues and checks the emulator's access tokens.

    ``audiences`` are the audiences the ingestion endpoint accepts (with and without a
    trailing slash). ``revoke_all`` makes every token issued so far invalid, which is how a
    test makes a token expire in the middle of a stream.
    """

    def __init__(
        self,
        key: bytes,
        *,
        audience: str,
        lifetime: float,
        client_secrets: Mapping[str, str] | None = None,
        federated_audience: str = FEDERATED_AUDIENCE,
    ) -> None:
        self._key = key
        base = audience.rstrip("/")
        self.audiences = [base, base + "/"]
        self.lifetime = lifetime
        self.client_secrets = dict(client_secrets) if client_secrets is not None else None
        self.federated_audience = federated_audience
        self._lock = threading.Lock()
        self._generation = 0
        self._revoked_below = 0
        # Seconds the token authority's clock is ahead of (or, negative, behind) the real one:
        # tokens issued meanwhile are not yet valid, or already expired, where they are checked.
        self.clock_offset = 0.0

    def revoke_all(self) -> None:
        """Every token issued before this call is refused from now on."""
        with self._lock:
            self._revoked_below = self._generation + 1
            self._generation += 1

    def issue(
        self,
        *,
        tenant: str,
        client_id: str,
        audience: str,
        issuer: str,
        lifetime: float | None = None,
    ) -> tuple[str, int]:
        """A signed access token and its lifetime in whole seconds."""
        seconds = int(self.lifetime if lifetime is None else lifetime)
        now = int(time.time() + self.clock_offset)
        with self._lock:
            generation = self._generation
        claims = {
            "aud": audience,
            "iss": issuer,
            "tid": tenant,
            "appid": client_id,
            "azp": client_id,
            "sub": client_id,
            "oid": client_id,
            "iat": now,
            "nbf": now - 1 if seconds > 0 else now + seconds - 1,
            "exp": now + seconds,
            "gen": generation,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM), seconds

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """The claims of a valid ``Authorization: Bearer`` header; raises TokenRejectedError."""
        if not authorization:
            raise TokenRejectedError(
                "InvalidAuthenticationToken", "The request has no Authorization header."
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenRejectedError(
                "InvalidAuthenticationToken", "The Authorization header is not a Bearer token."
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token.strip(),
                self._key,
                algorithms=[ALGORITHM],
                audience=self.audiences,
                options={"require": ["exp", "aud", "iss", "tid"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejectedError(
                "ExpiredAuthenticationToken", "The access token expiry has passed."
            ) from None
        except jwt.InvalidAudienceError:
            raise TokenRejectedError(
                "InvalidAudience",
                "The audience of the access token is not valid for this resource; expected "
                + " or ".join(self.audiences),
            ) from None
        except jwt.PyJWTError:
            raise TokenRejectedError(
                "InvalidAuthenticationToken",
                "The access token is malformed or its signature is invalid.",
            ) from None
        with self._lock:
            revoked = claims.get("gen", -1) < self._revoked_below
        if revoked:
            raise TokenRejectedError(
                "ExpiredAuthenticationToken", "The access token expiry has passed."
            )
        return claims

    def check_grant(self, tenant: str, form: Mapping[str, str], token_endpoint: str) -> Grant:
        """Checks a client-credentials token request as Entra does; raises GrantRefusedError."""
        grant_type = form.get("grant_type", "")
        if grant_type != "client_credentials":
            raise GrantRefusedError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        client_id = form.get("client_id", "")
        if not client_id:
            raise GrantRefusedError(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            )
        scope = form.get("scope", "")
        if len(scope.split()) != 1 or not scope.endswith(DEFAULT_SCOPE_SUFFIX):
            raise GrantRefusedError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        if "client_secret" in form:
            self._check_secret(client_id, form["client_secret"])
            return Grant(tenant, client_id, scope, "client_secret")
        if "client_assertion" in form:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise GrantRefusedError(
                    400,
                    "invalid_request",
                    50027,
                    "client_assertion_type must be " + JWT_BEARER,
                )
            method = self._check_assertion(client_id, form["client_assertion"], token_endpoint)
            return Grant(tenant, client_id, scope, method)
        raise GrantRefusedError(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'.",
        )

    def _check_secret(self, client_id: str, secret: str) -> None:
        if self.client_secrets is None:
            if secret:
                return
        elif client_id not in self.client_secrets:
            raise GrantRefusedError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory.",
            )
        elif secrets.compare_digest(self.client_secrets[client_id], secret):
            return
        raise GrantRefusedError(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            "client secret value, not the client secret ID.",
        )

    def _check_assertion(self, client_id: str, assertion: str, token_endpoint: str) -> str:
        """A certificate assertion (iss = sub = client id) or a federated token; returns which."""
        try:
            header = jwt.get_unverified_header(assertion)
            claims: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise GrantRefusedError(
                400, "invalid_request", 50027, "JWT token is invalid or malformed."
            ) from None
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires <= time.time():
            raise GrantRefusedError(
                400,
                "invalid_client",
                700024,
                "Client assertion is not within its valid time range.",
            )
        audiences = claims.get("aud")
        audience_list = audiences if isinstance(audiences, list) else [audiences]
        if claims.get("iss") == client_id:
            if "x5t" not in header and "x5t#S256" not in header:
                raise GrantRefusedError(
                    401,
                    "invalid_client",
                    700027,
                    "Client assertion contains no certificate thumbprint (x5t).",
                )
            if not any(_same_endpoint(str(item), token_endpoint) for item in audience_list):
                raise GrantRefusedError(
                    401,
                    "invalid_client",
                    700021,
                    f"Client assertion audience claim does not match Realm issuer "
                    f"{token_endpoint}.",
                )
            return "client_certificate"
        if self.federated_audience not in audience_list:
            raise GrantRefusedError(
                400,
                "invalid_request",
                700212,
                "No matching federated identity record found for presented assertion audience "
                f"'{audiences}'.",
            )
        return "federated"


def _same_endpoint(left: str, right: str) -> bool:
    return left.rstrip("/").lower() == right.rstrip("/").lower()


def openid_configuration(base: str, tenant: str) -> dict[str, Any]:
    """The tenant's OpenID configuration document, as MSAL reads it before its first grant."""
    root = f"{base}/{tenant}"
    return {
        "token_endpoint": f"{root}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post",
            "private_key_jwt",
            "client_secret_basic",
        ],
        "jwks_uri": f"{base}/{tenant}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{root}/v2.0",
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{base}/oidc/userinfo",
        "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid"],
        "kerberos_endpoint": f"{root}/kerberos",
        "tenant_region_scope": None,
        "cloud_instance_name": "localhost",
        "cloud_graph_host_name": "localhost",
        "msgraph_host": "localhost",
        "rbac_url": "https://localhost",
    }
