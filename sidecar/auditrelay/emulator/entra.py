"""The Microsoft Entra side of the emulator: the token endpoint and the OpenID configuration.

azure-identity with ``AZURE_AUTHORITY_HOST`` pointed at the emulator asks here for tokens:
``POST /{tenant}/oauth2/v2.0/token`` (client credentials: secret, certificate or federated
assertion, checked by ``tokens.TokenIssuer``) and ``GET /{tenant}/v2.0/.well-known/openid-
configuration``. Every token request, granted or refused, is recorded without its secret.
"""

from __future__ import annotations

import time

from aiohttp import web

from auditrelay.emulator.context import EmulatorContext
from auditrelay.emulator.store import TokenRecord
from auditrelay.emulator.tokens import GrantRefusedError, openid_configuration


class EntraEndpoint:
    """The token endpoint and the OpenID configuration of one emulator."""

    def __init__(self, context: EmulatorContext) -> None:
        self._context = context

    def add_routes(self, app: web.Application) -> None:
        """Registers the Entra paths."""
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid)

    async def _openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        return web.json_response(openid_configuration(self._context.authority_host, tenant))

    async def _token(self, request: web.Request) -> web.Response:
        context = self._context
        tenant = request.match_info["tenant"]
        form = {key: str(value) for key, value in (await request.post()).items()}
        endpoint = f"{context.authority_host}/{tenant}/oauth2/v2.0/token"
        client_id, scope = form.get("client_id", ""), form.get("scope", "")
        try:
            grant = context.tokens.check_grant(tenant, form, endpoint)
        except GrantRefusedError as refused:
            await self._record(
                TokenRecord(
                    time.time(), tenant, client_id, scope, "", refused.status, refused.error
                )
            )
            return web.json_response(refused.body(), status=refused.status)
        token, seconds = context.tokens.issue(
            tenant=tenant,
            client_id=grant.client_id,
            audience=grant.scope.removesuffix("/.default"),
            issuer=f"{context.authority_host}/{tenant}/v2.0",
        )
        await self._record(
            TokenRecord(time.time(), tenant, grant.client_id, grant.scope, grant.method, 200, None)
        )
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": seconds,
                "ext_expires_in": seconds,
                "access_token": token,
            }
        )

    async def _record(self, record: TokenRecord) -> None:
        await self._context.in_store_thread(self._context.store.record_token, record)
