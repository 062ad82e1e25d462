"""The MCP resources: tasks as JSON documents, with templates, filters and cursors."""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS

from ..core.errors import InvalidArgument, NotFound
from ..core.manager import TaskManager
from ..core.requests import ListTasks, paged, query_of
from ..telemetry import Telemetry
from .principal import current_principal
from .tools import task_detail

JSON = "application/json"


def _dump(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)


def register_resources(server: MCPServer, manager: TaskManager) -> None:
    listing = paged(ListTasks, manager.max_page_size if manager is not None else 100)

    async def task_page(query: dict[str, list[str]]) -> str:
        try:
            request = listing.from_query(query)
            _, rows, next_cursor = await manager.alist_rows(request, current_principal().viewer)
        except InvalidArgument as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return _dump({"tasks": rows, "next_cursor": next_cursor})

    @server.resource(
        "plexus://tasks{?status,type,since,batch,limit,cursor}",
        name="tasks",
        title="Tasks",
        description=(
            "Tasks, newest first, as list_tasks' compact rows. status and type take comma-separated names; since an "
            "ISO 8601 time; batch a batch id; limit 1 to max_page_size; cursor is the next_cursor of the previous page."
        ),
        mime_type=JSON,
    )
    async def tasks_resource(
        status: str | None = None,
        type: str | None = None,  # the URI's variable (the SDK passes variables by name)
        since: str | None = None,
        batch: str | None = None,
        limit: str | None = None,
        cursor: str | None = None,
    ) -> str:
        return await task_page(query_of(status=status, type=type, since=since, batch=batch, limit=limit, cursor=cursor))

    @server.resource(
        "plexus://tasks",
        name="recent-tasks",
        title="Recent tasks",
        description="The 20 most recent tasks (the first page of plexus://tasks{?...}).",
        mime_type=JSON,
    )
    async def recent_tasks() -> str:
        return await task_page({})

    @server.resource(
        "plexus://tasks/{task_id}",
        name="task",
        title="Task detail",
        description="One task: status, stages, progress history (most recent 200 samples), output and metadata.",
        mime_type=JSON,
    )
    async def task_resource(task_id: str) -> str:
        try:
            task = await manager.aget(task_id, current_principal().viewer)
        except NotFound as exc:
            raise ResourceNotFoundError(str(exc)) from None
        detail = await task_detail(manager, task, history=True, history_limit=200)
        return detail.model_dump_json()


def register_metrics_resource(server: MCPServer, telemetry: Telemetry) -> None:
    @server.resource(
        "plexus://metrics",
        name="metrics",
        title="Service metrics",
        description="The server's figures (as on Jupyter's /metrics): tool calls by tool and outcome "
        "with latency percentiles, tasks by status and type, queue depth, running tasks, evaluation "
        "items per second, open sessions and subscriptions, update latency (event to notification), "
        "memory and CPU. Callers that are not admins get only queue depth, running tasks and resource "
        "use (the rest shows other users' activity).",
        mime_type=JSON,
    )
    async def metrics_resource() -> str:
        principal = current_principal()
        return _dump(telemetry.snapshot(await telemetry.fresh_counts(), activity=principal.is_admin))
