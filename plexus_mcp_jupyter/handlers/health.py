"""`{base_url}plexus/api/health`: liveness for anyone, details for authenticated callers."""

from __future__ import annotations

from .._version import __version__
from .base import PlexusHandler

AUTH_DISABLED_WARNING = (
    "Jupyter authentication is disabled, so the MCP endpoint accepts anyone who can reach this server. "
    "Set a token or password to protect it."
)


class HealthHandler(PlexusHandler):
    require_auth = False

    async def get(self) -> None:
        if self.current_user is None:
            self.reply({"status": "ok"})
            return
        if not self.principal.is_admin:
            # Details (the store, counts of everyone's tasks) are for the notebook user and admin keys.
            self.reply({"status": "ok", "authenticated": True, "version": __version__})
            return
        details = self.runtime.health()
        details["auth"] = {"enabled": bool(self.identity_provider.auth_enabled)}
        if not self.identity_provider.auth_enabled:
            details["auth"]["warning"] = AUTH_DISABLED_WARNING
        self.reply(details)

    # Jupyter's authenticated-by-default check looks for this marker on handler methods.
    get.__allow_unauthenticated = True  # type: ignore[attr-defined]

