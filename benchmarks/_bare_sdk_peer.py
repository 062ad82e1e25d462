"""The bare SDK peer of bench_tools_call.py: the `mcp` SDK's own MCPServer on uvicorn, nothing of Plexus.

It serves `get_task` and `list_tasks` with the same argument lists as Plexus's tools, each returning a
constant: the CallToolResult our server answered for the same call (text and structured content, read from
a JSON file the benchmark writes). No store, no auth, no audit; the SDK's defaults for its Streamable HTTP
app (stateful sessions, SSE responses in the 2025-11-25 era). So it is the floor of the serving stack: what
any MCP server built on the SDK pays per call.

    python _bare_sdk_peer.py PORT RESULTS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult


def main() -> None:
    port, results_file = int(sys.argv[1]), Path(sys.argv[2])
    results = {name: CallToolResult.model_validate(data) for name, data in json.loads(results_file.read_text()).items()}
    server = MCPServer(name="bare", log_level="WARNING")

    @server.tool(description="A constant task detail (same shape as Plexus's get_task).")
    async def get_task(task_id: str, history: bool = False, history_limit: int = 100) -> CallToolResult:
        return results["get_task"]

    @server.tool(description="A constant page of tasks (same shape as Plexus's list_tasks).")
    async def list_tasks(
        status: list[str] | None = None,
        type: list[str] | None = None,
        since: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        batch: str | None = None,
    ) -> CallToolResult:
        return results["list_tasks"]

    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
