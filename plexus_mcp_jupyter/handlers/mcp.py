"""The MCP endpoint handler: authenticate with Jupyter's rules, then bridge to the SDK."""

from __future__ import annotations

import logging
from typing import Any

from ..endpoint.transport import MCPBridge
from ..security.http import jsonrpc_error
from .base import PlexusHandler


class MCPHandler(PlexusHandler):
    """`{base_url}plexus/mcp`: Streamable HTTP (POST messages, GET the SSE stream, DELETE the session)."""

    _bridge: MCPBridge | None = None

    async def _serve(self) -> None:
        self._bridge = MCPBridge(self, self.runtime.endpoint)
        await self._bridge.serve({"plexus.identity": self.identity})

    async def post(self) -> None:
        await self._serve()

    async def get(self) -> None:
        await self._serve()

    async def delete(self) -> None:
        await self._serve()

    def _log(self) -> None:
        # Jupyter logs successful requests at debug level only; skipping that work for every MCP
        # message (a measurable share of a call) loses nothing unless debug logging is on.
        if self.get_status() < 300 and not self.log.isEnabledFor(logging.DEBUG):
            return
        super()._log()

    def on_connection_close(self) -> None:
        if self._bridge is not None:
            self._bridge.disconnected.set()

    def error_body(self, status_code: int, message: str) -> dict[str, Any]:
        return jsonrpc_error(status_code, message)
