"""Builds the MCP server (the official SDK's MCPServer) over a TaskManager."""

from __future__ import annotations

import logging

from mcp.server.mcpserver import MCPServer

from .._version import __version__
from ..core.manager import TaskManager
from .resources import register_resources
from .tools import register_tools

INSTRUCTIONS = (
    "Plexus runs long tasks in the user's Jupyter server. Tools return at once: start work with "
    "run_demo_task, then follow it with get_task (or read plexus://tasks/{task_id}) and stop it with "
    "cancel_tasks. Lists are paginated: pass next_cursor back as cursor."
)


def build_mcp_server(manager: TaskManager) -> MCPServer:
    server: MCPServer = MCPServer(
        name="plexus",
        title="Plexus tasks and evaluations",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level="WARNING",
    )
    # The SDK's logging setup installs its own handler at the given level; keep its loggers quiet
    # so they neither slow the hot path nor write to stdout in stdio mode.
    for name in ("mcp", "mcp.server", "mcp.shared", "sse_starlette"):
        logging.getLogger(name).setLevel(logging.WARNING)
    register_tools(server, manager)
    register_resources(server, manager)
    return server
