"""The bare SDK peer of bench_tools_call.py: the `mcp` SDK's own MCPServer on uvicorn, nothing of Plexus.

It serves `get_task` and `list_tasks` with the same input and output schemas as Plexus's tools (their
request models, published by `@takes`, and output models are imported, so the SDK validates the same arguments
and the same structured content, and a client validates the same result), each returning a constant: the CallToolResult
our server answered for the same call (read from a JSON file the benchmark writes). No store, no auth, no
audit, no Jupyter; the SDK's defaults for its Streamable HTTP app (stateful sessions, SSE responses in the
2025-11-25 era). So it is the floor of the serving stack: what any MCP server built on the SDK pays per call.

    python _bare_sdk_peer.py PORT RESULTS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult

from plexus_mcp_jupyter.core.requests import GetTask, ListTasks, paged, takes
from plexus_mcp_jupyter.endpoint.schemas import TaskDetail, TaskPage, lean_output_schema


class LeanSchemaServer(MCPServer):
    """Publishes its output schemas as Plexus does (schemas.lean_output_schema), so that a client validating each
    result does the same work against both servers."""

    async def list_tools(self) -> list[Any]:
        tools = await super().list_tools()
        for tool in tools:
            if tool.output_schema is not None:
                tool.output_schema = lean_output_schema(tool.output_schema)
        return tools


def main() -> None:
    port, results_file = int(sys.argv[1]), Path(sys.argv[2])
    results = {name: CallToolResult.model_validate(data) for name, data in json.loads(results_file.read_text()).items()}
    server = LeanSchemaServer(name="bare", log_level="WARNING")

    @server.tool(description="A constant task detail (same shape as Plexus's get_task).")
    @takes(GetTask)
    async def get_task(**fields: Any) -> Annotated[CallToolResult, TaskDetail]:
        return results["get_task"]

    @server.tool(description="A constant page of tasks (same shape as Plexus's list_tasks).")
    @takes(paged(ListTasks, 100))
    async def list_tasks(**fields: Any) -> Annotated[CallToolResult, TaskPage]:
        return results["list_tasks"]

    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
