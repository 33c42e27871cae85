"""The pipeline's identity towards Microsoft Entra: the azure-identity credential its ``auth``
property selects, built on the transport (and TLS context) its delivery shares.

azure-identity refuses incomplete settings with ValueError; that is a configuration error of
``auth`` and reported as one. A private authority (the bundled emulator, a proxy) has no
instance metadata to discover, so discovery is turned off for it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import (
    CertificateCredential,
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)

from auditrelay.config import CLOUD_AUTHORITY, Auth, PipelineSettings
from auditrelay.errors import ConfigError, PropertyProblem

_T = TypeVar("_T")


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system trust store, plus ``ca_file`` when given (the emulator's CA, a proxy's)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


CredentialFactory = Callable[[AioHttpTransport], AsyncTokenCredential]


def credential_factory_for(settings: PipelineSettings) -> CredentialFactory:
    """Builds the pipeline's credential on the transport the client hands it."""
    return lambda transport: build_credential(settings, transport)


def _required(value: _T | None, name: str, auth: Auth) -> _T:
    if value is None:
        raise ConfigError([PropertyProblem(name, "", f"a value for auth {auth.value}")])
    return value


def secret_credential_factory(
    authority_host: str, tenant_id: str, client_id: str, client_secret: str
) -> CredentialFactory:
    """A client-secret credential at a given authority (the bundled emulator's, for instance)."""
    return lambda transport: ClientSecretCredential(
        tenant_id,
        client_id,
        client_secret,
        authority=authority_host,
        transport=transport,
        disable_instance_discovery=True,
    )


def build_credential(
    settings: PipelineSettings, transport: AioHttpTransport
) -> AsyncTokenCredential:
    """The azure-identity credential the ``auth`` property selects, on the shared transport.

    azure-identity refuses incomplete settings with ValueError (workload identity without
    AZURE_TENANT_ID, say); that is a configuration error of ``auth``, named as such.
    """
    try:
        return _credential_for(settings, transport)
    except ValueError as error:
        expected = f"settings azure-identity can use for it: {error}"
        raise ConfigError([PropertyProblem("auth", settings.auth.value, expected)]) from error


def _credential_for(
    settings: PipelineSettings, transport: AioHttpTransport
) -> AsyncTokenCredential:
    common: dict[str, Any] = {"authority": settings.authority_host, "transport": transport}
    if settings.authority_host not in CLOUD_AUTHORITY.values():
        # A private authority (the emulator, a proxy) has no instance metadata to discover.
        common["disable_instance_discovery"] = True
    if settings.auth is Auth.WORKLOAD_IDENTITY:
        token_file = settings.federated_token_file
        return WorkloadIdentityCredential(
            tenant_id=settings.tenant_id,
            client_id=settings.client_id,
            token_file_path=str(token_file) if token_file else None,
            **common,
        )
    if settings.auth is Auth.MANAGED_IDENTITY:
        return ManagedIdentityCredential(client_id=settings.client_id, transport=transport)
    if settings.auth is Auth.CLIENT_SECRET:
        return ClientSecretCredential(
            _required(settings.tenant_id, "tenant_id", settings.auth),
            _required(settings.client_id, "client_id", settings.auth),
            _required(settings.client_secret, "client_secret", settings.auth),
            **common,
        )
    if settings.auth is Auth.CLIENT_CERTIFICATE:
        certificate = _required(settings.client_certificate, "client_certificate", settings.auth)
        return CertificateCredential(
            _required(settings.tenant_id, "tenant_id", settings.auth),
            _required(settings.client_id, "client_id", settings.auth),
            certificate_path=str(certificate),
            **common,
        )
    return DefaultAzureCredential(
        authority=settings.authority_host,
        managed_identity_client_id=settings.client_id,
        workload_identity_client_id=settings.client_id,
        workload_identity_tenant_id=settings.tenant_id,
    )
