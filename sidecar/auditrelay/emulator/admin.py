"""The emulator's admin API: inject and clear faults, revoke tokens, while it runs.

``/admin/faults`` (GET lists, POST adds one fault or a list, DELETE clears) and
``POST /admin/tokens/revoke`` require the ``x-auditrelay-admin-key`` header, whose value is in
``admin.key`` of the state directory, so nothing meant for ingestion can reach them.
"""

from __future__ import annotations

import secrets

import orjson
from aiohttp import web

from auditrelay.emulator.context import EmulatorContext
from auditrelay.emulator.faults import Fault, FaultError
from auditrelay.emulator.responses import error_response
from auditrelay.emulator.settings import ADMIN_HEADER


class AdminApi:
    """The admin paths of one emulator."""

    def __init__(self, context: EmulatorContext) -> None:
        self._context = context

    def add_routes(self, app: web.Application) -> None:
        """Registers the admin paths."""
        app.router.add_get("/admin/faults", self._list_faults)
        app.router.add_post("/admin/faults", self._add_faults)
        app.router.add_delete("/admin/faults", self._clear_faults)
        app.router.add_post("/admin/tokens/revoke", self._revoke)

    def _allowed(self, request: web.Request) -> bool:
        given = request.headers.get(ADMIN_HEADER, "")
        return bool(given) and secrets.compare_digest(given, self._context.admin_key)

    def _active_faults(self) -> web.Response:
        faults = [fault.to_json() for fault in self._context.faults.active()]
        return web.json_response({"faults": faults})

    async def _list_faults(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return _refused()
        return self._active_faults()

    async def _add_faults(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return _refused()
        try:
            document = await request.json(loads=orjson.loads)
            items = document if isinstance(document, list) else [document]
            faults = [Fault.from_json(item) for item in items]
        except (orjson.JSONDecodeError, FaultError) as error:
            return error_response(400, "InvalidFault", str(error))
        for fault in faults:
            self._context.faults.add(fault)
        return self._active_faults()

    async def _clear_faults(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return _refused()
        self._context.faults.clear()
        return web.json_response({"faults": []})

    async def _revoke(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return _refused()
        self._context.tokens.revoke_all()
        return web.json_response({"revoked": True})


def _refused() -> web.Response:
    return error_response(403, "AdminKeyRequired", f"Send the {ADMIN_HEADER} header.")
