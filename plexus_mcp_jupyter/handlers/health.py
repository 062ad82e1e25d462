"""`{base_url}plexus/api/health`: liveness for anyone, details for authenticated callers; and the 503 that
every Plexus route answers while the extension's settings are invalid."""

from __future__ import annotations

import json

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler

from .._version import __version__
from .base import BodylessHandler

AUTH_DISABLED_WARNING = (
    "Jupyter authentication is disabled, so the MCP endpoint accepts anyone who can reach this server. "
    "Set a token or password to protect it."
)


class HealthHandler(BodylessHandler):
    require_auth = False

    @allow_unauthenticated  # also with ServerApp.allow_unauthenticated_access=False: liveness needs no credential
    async def get(self) -> None:
        if self.current_user is None:
            self.reply({"status": "ok"})
            return
        if not self.principal.is_admin:
            # Details (the store, counts of everyone's tasks) are for the notebook user and admin keys.
            self.reply(
                {"status": "ok", "authenticated": True, "version": __version__, "role": self.principal.role.value}
            )
            return
        details = await self.runtime.health()
        details["role"] = self.principal.role.value  # the lab disables what the caller may not do
        details["auth"] = {"enabled": bool(self.identity_provider.auth_enabled)}
        if not self.identity_provider.auth_enabled:
            details["auth"]["warning"] = AUTH_DISABLED_WARNING
        self.reply(details)


class UnavailableHandler(APIHandler):
    """Every Plexus route while the extension cannot run: 503 naming the setting, for anyone.

    `message` holds only setting names, values and what is allowed, which say nothing about the data; `detail`
    adds what only the notebook user may read (a database's or a scheduler's address, a store's revisions):
    it is shown to a caller Jupyter authenticates."""

    def initialize(self, message: str, detail: str | None = None) -> None:  # type: ignore[override]
        self.message = message
        self.detail = detail or message

    async def prepare(self) -> None:  # type: ignore[override]
        try:
            await super().prepare()  # Jupyter resolves who is asking (or refuses, e.g. a bad XSRF token)
            authenticated = bool(self.current_user)
        except Exception:
            authenticated = False
        self.clear()
        self.set_status(503)
        self.set_header("Content-Type", "application/json")
        message = self.detail if authenticated else self.message
        self.finish(json.dumps({"error": {"status": 503, "message": message}}))
