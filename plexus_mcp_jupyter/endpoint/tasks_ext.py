"""MCP tasks: the 2025-11-25 experimental tasks and the 2026-07-28 `io.modelcontextprotocol/tasks` extension.

Both map onto the Plexus task of TaskManager: the MCP task id *is* the Plexus task id, so there is one
record of the work, one status and one result, whichever face started it. Any Plexus task can be
polled with `tasks/get` (one started by a plain call, the notebook or REST too), a result outlives the
session that asked for it, and a client that reconnects picks it up by id.

The 2025-11-25 lane (handshake sessions): a `tools/call` carrying `params.task` returns
`CreateTaskResult` at once; `tasks/get`, `tasks/result` (waits for the end), `tasks/list` and
`tasks/cancel` follow it, and the session that created a task is sent `notifications/tasks/status` when
its status changes. Tools declare `execution.taskSupport`. The SDK sieves every legacy `tools/call` result
through `CallToolResult`, so this lane answers from a server middleware, which owns its result.

The 2026-07-28 lane: a client that declares the extension in its per-request capabilities gets a task
handle (`resultType: "task"`) from a task tool instead of the queued-task summary; `tasks/get` inlines
the final `CallToolResult`; `tasks/cancel` and `tasks/update` acknowledge; `subscriptions/listen` with
`notifications.taskIds` pushes `notifications/tasks`. This lane is an SDK `Extension`.

Status mapping. Queued and running tasks are `working`. A task that failed is a tool call whose result
has `isError: true`: `failed` in 2025-11-25 (whose spec says so for tool calls) and `completed` with an
`isError` result in 2026-07-28 (whose `failed` is reserved for JSON-RPC errors).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    CallToolRequestParams,
    CallToolResult,
    PaginatedRequestParams,
    RequestParams,
    ServerTasksCapability,
    ServerTasksRequestsCapability,
    TasksCallCapability,
    TasksCancelCapability,
    TasksListCapability,
    TasksToolsCapability,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field

from ..core.errors import Expired, InvalidArgument, NotFound
from ..core.manager import TaskManager
from ..core.models import Task, TaskStatus, iso
from ..core.retention import RetentionPolicy
from ..security.audit import AuditLog
from .principal import principal_of
from .sdk_compat import connection_of
from .tools import describe

log = logging.getLogger("plexus_mcp_jupyter")

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
RELATED_TASK_META = "io.modelcontextprotocol/related-task"
POLL_INTERVAL_MS = 1000
TERMINAL = frozenset({"completed", "failed", "cancelled"})
LIST_PAGE_SIZE = 50
LEGACY_VERSIONS_ONLY = "tasks/result and tasks/list are 2025-11-25 methods"

# What a 2025-11-25 server advertises: tasks can be listed and cancelled, and tools/call can be a task.
LEGACY_CAPABILITY = ServerTasksCapability(
    list=TasksListCapability(),
    cancel=TasksCancelCapability(),
    requests=ServerTasksRequestsCapability(tools=TasksToolsCapability(call=TasksCallCapability())),
)


def is_modern(protocol_version: str | None) -> bool:
    return protocol_version in MODERN_PROTOCOL_VERSIONS


class TaskIdParams(RequestParams):
    task_id: str = Field(min_length=1, max_length=64)


class UpdateTaskParams(TaskIdParams):
    input_responses: dict[str, Any] | None = None


def mcp_status(task: Task, *, modern: bool) -> str:
    if not modern and task.cancel_requested:
        # 2025-11-25: a cancelled task is cancelled from the answer to tasks/cancel on, and stays so, even
        # if the work ended otherwise before it saw the request (its Plexus record says how it ended).
        return "cancelled"
    if not task.status.is_final:
        return "working"
    if task.status is TaskStatus.COMPLETED or (modern and task.status is TaskStatus.FAILED):
        return "completed"
    return "cancelled" if task.status is TaskStatus.CANCELLED else "failed"


def last_updated(task: Task) -> float:
    times = [task.created_at, task.started_at, task.completed_at]
    for stage in task.stages:
        times += [stage.started_at, stage.completed_at]
    return max(t for t in times if t is not None)


def task_view(task: Task, *, modern: bool, retention: RetentionPolicy) -> dict[str, Any]:
    """The MCP `Task` of a Plexus task, in the era's field names (ttl/pollInterval became ttlMs/pollIntervalMs).

    The time to live is the task's retention (core/retention.py): the ttl the client asked for, bounded, or
    its type's. It counts from the task's end, so the task is kept at least that long from its creation.
    """
    return {
        "taskId": task.id,
        "status": mcp_status(task, modern=modern),
        "statusMessage": describe(task),
        "createdAt": iso(task.created_at),
        "lastUpdatedAt": iso(last_updated(task)),
        "ttlMs" if modern else "ttl": round(retention.for_task(task) * 1000),
        "pollIntervalMs" if modern else "pollInterval": POLL_INTERVAL_MS,
    }


Outcome = Callable[[Task], CallToolResult]  # the tool result of a task that has ended


def tool_result_dict(outcome: Outcome, task: Task) -> dict[str, Any]:
    """The `CallToolResult` the task tool answers with once the task has ended, as JSON."""
    return outcome(task).model_dump(by_alias=True, mode="json", exclude_none=True)


def detailed_task(outcome: Outcome, task: Task, retention: RetentionPolicy) -> dict[str, Any]:
    """The 2026-07-28 `DetailedTask`: the task, with the final tool result inlined once it ended."""
    view = task_view(task, modern=True, retention=retention)
    if task.status.is_final and task.status is not TaskStatus.CANCELLED:
        view["result"] = tool_result_dict(outcome, task)
    return view


def _not_found(task_id: str) -> MCPError:
    return MCPError(
        INVALID_PARAMS,
        f"Failed to retrieve task: task {task_id!r} not found; task ids come from "
        "a task-augmented tools/call, list_tasks or tasks/list",
    )


def _progress_free(ctx: ServerRequestContext[Any, Any]) -> ServerRequestContext[Any, Any]:
    """The context without a progress token: a task call answers at once instead of streaming progress."""
    meta = ctx.meta
    if not meta or not ({"progressToken", "progress_token"} & set(meta)):
        return ctx
    stripped = {k: v for k, v in meta.items() if k not in ("progressToken", "progress_token")}
    return dataclasses.replace(ctx, meta=stripped)  # type: ignore[arg-type]


class PlexusTasks(Extension):
    """Serves MCP tasks from TaskManager (both eras; see the module docstring)."""

    identifier = TASKS_EXTENSION

    def __init__(
        self,
        manager: TaskManager,
        task_tools: Sequence[str],
        outcome: Outcome,
        audit: AuditLog | None = None,
        follow_status: Callable[[Any, str], None] | None = None,
    ) -> None:
        self.manager = manager
        self.outcome = outcome
        self.task_tools = frozenset(task_tools)  # tools whose result names a Plexus task (task_id)
        # Follow a task's status for a session (legacy notifications; ResourceWatch.follow_status).
        self.follow_status = follow_status
        self.audit = audit

    # -- shared ---------------------------------------------------------------------------------

    async def _task(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> Task:
        """The task, if the caller may see it (another API key's tasks are "not found", like missing ones)."""
        try:
            return await self.manager.aget(task_id, principal_of(ctx).viewer)
        except Expired as exc:
            raise MCPError(INVALID_PARAMS, f"Failed to retrieve task: {exc}") from None
        except NotFound:
            raise _not_found(task_id) from None

    async def _start(self, ctx: ServerRequestContext[Any, Any], name: str, call_next: CallNext) -> Task | HandlerResult:
        """Run the task tool (which dispatches and answers at once) and return the task it started, or the
        tool's error result (bad arguments: no task was started)."""
        outcome = await call_next(_progress_free(ctx))
        data = _as_dict(outcome)
        if data.get("isError"):
            return outcome
        task_id = (data.get("structuredContent") or {}).get("task_id")
        if not isinstance(task_id, str):
            log.error("Plexus: task tool %s returned no task_id", name)
            raise MCPError(INTERNAL_ERROR, f"{name} did not start a task")
        return await self.manager.aget(task_id)

    # -- 2026-07-28: the extension --------------------------------------------------------------

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if (
            not is_modern(ctx.protocol_version)
            or params.name not in self.task_tools
            or not self._declared(ctx)
            or (ctx.meta and ({"progressToken", "progress_token"} & set(ctx.meta)))  # asked to stream instead
        ):
            return await call_next(ctx)
        task = await self._start(ctx, params.name, call_next)
        if not isinstance(task, Task):
            return task  # the tool's own error result, as a plain call would answer
        return {"resultType": "task", **task_view(task, modern=True, retention=self.manager.retention)}

    @staticmethod
    def _declared(ctx: ServerRequestContext[Any, Any]) -> bool:
        capabilities = ctx.session.client_capabilities
        return bool(capabilities and capabilities.extensions and TASKS_EXTENSION in capabilities.extensions)

    def methods(self) -> Sequence[MethodBinding]:
        return (
            MethodBinding("tasks/get", TaskIdParams, self.get),
            MethodBinding("tasks/cancel", TaskIdParams, self.cancel),
            MethodBinding("tasks/update", UpdateTaskParams, self.update, frozenset(MODERN_PROTOCOL_VERSIONS)),
            MethodBinding("tasks/result", TaskIdParams, self.result, frozenset({"2025-11-25"})),
            MethodBinding("tasks/list", PaginatedRequestParams, self.list, frozenset({"2025-11-25"})),
        )

    async def get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        if is_modern(ctx.protocol_version):
            require_client_extension(ctx, TASKS_EXTENSION)
            return detailed_task(self.outcome, await self._task(ctx, params.task_id), self.manager.retention)
        return task_view(await self._task(ctx, params.task_id), modern=False, retention=self.manager.retention)

    async def cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        modern = is_modern(ctx.protocol_version)
        if modern:
            require_client_extension(ctx, TASKS_EXTENSION)
        task = await self._task(ctx, params.task_id)
        principal = principal_of(ctx)
        if not principal.may("cancel_any") and not (principal.may("cancel_own") and task.owner == principal.owner):
            if self.audit is not None:
                self.audit.record(principal, "tasks/cancel", target=task.id, outcome="denied")
            raise MCPError(
                INVALID_REQUEST, principal.denial("cancel_any" if principal.may("cancel_own") else "cancel_own")
            )
        if modern and task.status.is_final:  # cancellation is cooperative: an ended task is acknowledged as it is
            return {}
        if not modern and mcp_status(task, modern=False) in TERMINAL:
            raise MCPError(
                INVALID_PARAMS,
                f"Cannot cancel task {task.id!r}: already in terminal status {mcp_status(task, modern=False)!r}",
            )
        self.manager.cancel([task.id])
        if self.audit is not None:
            self.audit.record(principal, "tasks/cancel", target=task.id)
        if modern:
            return {}
        return task_view(await self.manager.aget(task.id), modern=False, retention=self.manager.retention)

    async def update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        # Plexus tasks never ask the client for input, so no response is outstanding: they are ignored.
        require_client_extension(ctx, TASKS_EXTENSION)
        await self._task(ctx, params.task_id)
        return {}

    # -- 2025-11-25 -----------------------------------------------------------------------------

    async def result(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        """`tasks/result`: the tool's result once the task has ended (the request waits until then)."""
        task = await self._task(ctx, params.task_id)
        while not task.status.is_final:
            await self.manager.wait_final([task.id], timeout=3600)
            task = await self.manager.aget(task.id)
        data = tool_result_dict(self.outcome, task)
        data["_meta"] = {**data.get("_meta", {}), RELATED_TASK_META: {"taskId": task.id}}
        return data

    async def list(self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams) -> dict[str, Any]:
        try:
            tasks, next_cursor = await self.manager.alist_tasks(
                self.manager.build_filter(viewer=principal_of(ctx).viewer), limit=LIST_PAGE_SIZE, cursor=params.cursor
            )
        except InvalidArgument as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        page: dict[str, Any] = {"tasks": [task_view(t, modern=False, retention=self.manager.retention) for t in tasks]}
        if next_cursor:
            page["nextCursor"] = next_cursor
        return page

    async def legacy_middleware(
        self, ctx: ServerRequestContext[Any, Any], call_next: Callable[[Any], Awaitable[HandlerResult]]
    ) -> HandlerResult:
        """The 2025-11-25 lane: `capabilities.tasks` in the `initialize` result (the 2026 era advertises the
        extension), and a `tools/call` with `params.task` answered `CreateTaskResult` (this middleware owns it)."""
        if ctx.method == "initialize":
            result = await call_next(ctx)
            if isinstance(result, dict):  # the wire form, already sieved for the era: the capability is added to it
                capabilities = result.setdefault("capabilities", {})
                capabilities["tasks"] = LEGACY_CAPABILITY.model_dump(by_alias=True, mode="json", exclude_none=True)
            return result
        params = ctx.params
        if ctx.method != "tools/call" or is_modern(ctx.protocol_version) or not params or "task" not in params:
            return await call_next(ctx)
        name = params.get("name")
        if name not in self.task_tools:
            raise MCPError(
                METHOD_NOT_FOUND,
                f"tool {name!r} does not run as a task (its execution.taskSupport is forbidden): call it without "
                f"`task`; tools that do: {', '.join(sorted(self.task_tools))}",
            )
        task_meta = params.get("task")
        if not isinstance(task_meta, dict) or not isinstance(task_meta.get("ttl", 0), int | None):
            raise MCPError(INVALID_PARAMS, "task must be an object with an optional integer ttl (milliseconds)")
        task = await self._start(ctx, name, call_next)
        if not isinstance(task, Task):
            # A 2025-11-25 client expects CreateTaskResult: no task was made, so the tool error is a JSON-RPC one.
            text = " ".join(c.get("text", "") for c in _as_dict(task).get("content", []) if isinstance(c, dict))
            raise MCPError(INVALID_PARAMS, text or f"{name} failed")
        ttl = task_meta.get("ttl")
        if ttl is not None:  # honoured within [1 s, max_task_ttl_seconds]; task_view reports what was kept
            task.retention_seconds = self.manager.retention.ttl_seconds(ttl)
            self.manager.set_retention(task.id, task.retention_seconds)
        if self.follow_status is not None:
            self.follow_status(connection_of(ctx.session), task.id)
        return {"task": task_view(task, modern=False, retention=self.manager.retention)}


def _as_dict(outcome: Any) -> dict[str, Any]:
    """A tools/call handler's result as its JSON (handlers return a model or an already dumped dict)."""
    if isinstance(outcome, dict):
        return outcome
    return outcome.model_dump(by_alias=True, mode="json") if isinstance(outcome, BaseModel) else {}


async def legacy_status_notification(manager: TaskManager, task_id: str) -> dict[str, Any] | None:
    """The params of `notifications/tasks/status` for a task (None when it is gone)."""
    try:
        return task_view(await manager.aget(task_id), modern=False, retention=manager.retention)
    except NotFound:
        return None
