"""`{base_url}plexus/api/health`: liveness for anyone, details for authenticated callers."""

from __future__ import annotations

from .._version import __version__
from .base import PlexusHandler


class HealthHandler(PlexusHandler):
    require_auth = False

    async def get(self) -> None:
        if self.current_user is None:
            self.reply({"status": "ok"})
        else:
            self.reply(self.runtime.health())

    # Jupyter's authenticated-by-default check looks for this marker on handler methods.
    get.__allow_unauthenticated = True  # type: ignore[attr-defined]


__all__ = ["HealthHandler", "__version__"]
