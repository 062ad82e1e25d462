"""The MCP endpoint handler: authenticate with Jupyter's rules, then bridge to the SDK."""

from __future__ import annotations

import json
from typing import Any

from ..endpoint.transport import MCPBridge
from .base import PlexusHandler


class MCPHandler(PlexusHandler):
    """`{base_url}plexus/mcp`: Streamable HTTP (POST messages, GET the SSE stream, DELETE the session)."""

    _bridge: MCPBridge | None = None

    def check_xsrf_cookie(self) -> None:
        # MCP clients authenticate with a header; a cookie-authenticated POST still needs the XSRF token.
        return super().check_xsrf_cookie()

    async def _serve(self) -> None:
        self._bridge = MCPBridge(self, self.runtime.endpoint)
        await self._bridge.serve({"plexus.identity": self.identity})

    async def post(self) -> None:
        await self._serve()

    async def get(self) -> None:
        await self._serve()

    async def delete(self) -> None:
        await self._serve()

    def on_connection_close(self) -> None:
        if self._bridge is not None:
            self._bridge.disconnected.set()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # A JSON-RPC error object, as the SDK itself answers transport-level failures.
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600 if status_code < 500
                                                                       else -32603, "message": message}}))
