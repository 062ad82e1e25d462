"""The MCP endpoint handler: authenticate with Jupyter's rules, then bridge to the SDK."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from jupyter_server.log import log_request

from ..endpoint.transport import MCPBridge
from ..security.http import jsonrpc_error
from .base import BodyHandler
from .jupyter_compat import CachedDateHeader, SkippableRequestLog, record_request_metrics


def debug_emitted(logger: logging.Logger) -> bool:
    """Whether a DEBUG record on this logger would reach a handler that prints it.

    `isEnabledFor(DEBUG)` alone is not the answer under Jupyter: traitlets sets its loggers to DEBUG and
    applies `log_level` on the handlers.
    """
    if not logger.isEnabledFor(logging.DEBUG):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(handler.level <= logging.DEBUG for handler in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return logging.lastResort is not None and logging.lastResort.level <= logging.DEBUG


class MCPHandler(SkippableRequestLog, CachedDateHeader, BodyHandler):  # type: ignore[misc]  # (as BodyHandler)
    """`{base_url}plexus/mcp`: Streamable HTTP (POST messages, GET the SSE stream, DELETE the session)."""

    _bridge: MCPBridge | None = None
    audit_mutations = False  # tool calls are recorded by the MCP server, with their names and outcomes

    async def _serve(self) -> None:
        # A response may stay open (the session's GET stream, a call streaming progress, tasks/result,
        # subscriptions/listen): when its API key is revoked, it ends.
        forget = self.runtime.track_stream(self.principal, self._end_stream)
        try:
            self.request.body = self.body  # (read as it arrived, within its bounds: BodyHandler)
            self._bridge = MCPBridge(self, self.runtime.endpoint)
            await self._bridge.serve(self.principal)
        finally:
            forget()

    async def post(self) -> None:
        await self._serve()

    async def get(self) -> None:
        await self._serve()

    def _end_stream(self) -> None:
        if self._bridge is not None:
            self._bridge.end()

    async def delete(self) -> None:
        await self._serve()

    def skip_request_log(self) -> bool:
        # Jupyter's log_request logs successful requests at debug level only; formatting that line for
        # every MCP message (a measurable share of a call) is skipped when no handler would print it.
        # Its request metrics (prometheus) are still recorded, as log_request would.
        if self.get_status() < 300:
            log_function = self.settings.get("log_function")
            if isinstance(log_function, partial) and log_function.func is log_request and not debug_emitted(self.log):
                if log_function.keywords.get("record_prometheus_metrics", True):
                    record_request_metrics(self)  # what prometheus_log_method records
                return True
        return False

    def on_connection_close(self) -> None:
        if self._bridge is not None:
            self._bridge.disconnected.set()

    def error_body(self, status_code: int, message: str) -> dict[str, Any]:
        return jsonrpc_error(status_code, message)
