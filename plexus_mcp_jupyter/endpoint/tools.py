"""The MCP tools: a small catalogue over TaskManager. Each returns in milliseconds.

Every tool returns `structuredContent` validated against its `outputSchema` (endpoint/schemas.py)
plus a one-line text summary for clients that only show text. Core errors (bad values, unknown
ids) become tool errors whose message says what was wrong and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import sqlalchemy as sa
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel

from ..core import demo
from ..core.errors import PlexusError, bounded
from ..core.manager import TaskManager
from ..core.models import Task, TaskStatus, iso, now
from ..core.requests import GetTask, ListTasks, paged, takes
from ..core.store_calls import store_unavailable
from .principal import current_principal
from .progress import final_summary, follow_to_end, progress_token
from .schemas import DispatchResult, TaskDetail, TaskPage, task_uri
from .task_logs import TaskLogs

F = TypeVar("F", bound=Callable[..., Any])


def short(value: Any, limit: int = 60, *, quote: bool = True) -> str:
    """A value as a client may see it in a message: one line, at most `limit` characters."""
    text = repr(value) if quote else str(value).encode("unicode_escape").decode("ascii", "replace")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_arguments(name: str, given: Any, allowed: Any) -> str | None:
    """What to say of arguments a tool or prompt does not have (pydantic would drop them silently: a misspelt
    argument must not run with its default); None when there are none."""
    allowed = set(allowed)
    unknown = sorted(set(given) - allowed)
    if not unknown:
        return None
    shown = ", ".join(short(u, 40, quote=False) for u in unknown[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    listed = ", ".join(sorted(allowed)) or "none"
    return f"invalid arguments for {name}: unknown argument(s) {shown}{more}; allowed: {listed}"


def client_errors(fn: F) -> F:
    """Turn core errors into tool errors, whose messages reach the client (bounded: they quote input)."""

    @wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except PlexusError as exc:
            raise ToolError(bounded(str(exc))) from None
        except sa.exc.SQLAlchemyError as exc:  # the store's database is unreachable: say so, try again later
            unavailable = store_unavailable(exc)
            if unavailable is None:
                raise
            raise ToolError(str(unavailable)) from None

    return wrapper  # type: ignore[return-value]


def result(summary: str, model: BaseModel | dict[str, Any]) -> CallToolResult:
    """The tool result: a text line plus structured content.

    The structured content may be given as the JSON-ready dict a model would dump to (what
    `Task.summary()` / `Task.to_dict()` produce, in the models' field order): the SDK validates
    structured content against the tool's output model on every call anyway, so validating it
    here first, then dumping it again, only did the same work twice.
    """
    return CallToolResult(
        content=[TextContent(type="text", text=summary)],
        structured_content=model if isinstance(model, dict) else model.model_dump(mode="json"),
    )


async def task_detail_data(manager: TaskManager, task: Task, *, history: bool, history_limit: int) -> dict[str, Any]:
    """A task as TaskDetail's JSON form (same keys, same order), without building the model; its store reads
    (history, queue position) run off the event loop."""
    data = task.to_dict()
    if history:
        samples, total = await manager.ahistory(task.id, history_limit)
        data["history"] = [s.to_dict() for s in samples]
        data["history_total"] = total
    else:
        data["history"] = None
        data["history_total"] = None
    data["resource_uri"] = task_uri(task.id)
    data.update(await manager.queue_fields(task))
    return data


async def task_detail(manager: TaskManager, task: Task, *, history: bool, history_limit: int) -> TaskDetail:
    return TaskDetail.model_validate(
        await task_detail_data(manager, task, history=history, history_limit=history_limit)
    )


def describe(task: Task) -> str:
    """One line a person can read: what, where it is, how far, and when it should end."""
    p = task.progress
    text = f"Task {task.id} ({task.type}) is {task.status.value}"
    if p["stage"]:
        text += f", stage {p['stage']} {p['processed']}/{p['total'] if p['total'] is not None else '?'}"
        if p["percent"] is not None:
            text += f" ({p['percent']}%)"
    if task.estimated_completion_at is not None and not task.status.is_final:
        left = max(0.0, task.estimated_completion_at - now())
        text += f", ETA {iso(task.estimated_completion_at)} (in about {_duration(left)})"
    if task.error_message:
        text += f": {task.error_message}"
    return text + "."


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def outcome_result(task: Task) -> CallToolResult:
    """What a task tool answers once its task has ended: the outcome, an error result unless it completed.

    The same result whether the call waited (progress token) or the task is fetched later (MCP tasks).
    """
    call_result = result(describe(task), DispatchResult.model_validate(final_summary(task)))
    call_result.is_error = task.status is not TaskStatus.COMPLETED
    return call_result


TASK_TOOLS = ("run_demo_task",)  # tools whose result names the task they started: they can run as MCP tasks


def register_tools(server: MCPServer, manager: TaskManager, logs: TaskLogs | None = None) -> None:
    max_page = manager.max_page_size if manager is not None else 100
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(
        title="Run a demo task",
        description=(
            "Start a simulated long-running task (stages Setup, Processing, Finalizing) and return its id at "
            "once, status QUEUED. Follow it with get_task or the resource plexus://tasks/{task_id}. "
            "Use fail or fail_at to rehearse failure handling. If the request carries a progress token "
            "(_meta.progressToken), the call instead stays open, sends notifications/progress (items done over "
            "all stages, the stage and ETA in the message) until the task ends, and returns its outcome; "
            "cancelling the call cancels the task. It can also run as an MCP task (tasks/get, tasks/result). "
            "Returns task_id, status and resource_uri. Next: get_task(task_id)."
        ),
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False),
    )
    @takes(demo.RunDemo)  # the tool's arguments are the request model's fields
    @client_errors
    async def run_demo_task(ctx: Context, **fields: Any) -> Annotated[CallToolResult, DispatchResult]:
        request = demo.RunDemo.parse(fields)
        principal = current_principal()
        task = await manager.adispatch(
            "demo",
            demo.checked_params(request),
            priority=request.priority,
            owner=principal.owner,
            role=principal.role.value,
            checked=True,
        )
        if logs is not None:
            logs.started(ctx, [task.id])
        if progress_token(ctx) is not None:
            # The caller asked for progress: stream it until the task ends (cancelling the call
            # cancels the task), then answer with the outcome.
            return outcome_result(await follow_to_end(ctx, manager, task.id, logs))
        # DispatchResult's JSON form; the SDK validates it against DispatchResult (see result()).
        out = {**final_summary(task), "status": task.status.value}
        return result(f"Queued demo task {task.id} ({request.items} items); follow it with get_task.", out)

    @server.tool(
        title="List tasks",
        description=(
            "List tasks, newest first, optionally filtered by status, type, creation time and batch. Returns at most "
            "`limit` compact task rows (full task_id, type, status, progress; null fields and a description that is "
            "the type's own text left out) and a next_cursor to continue; the text lists the full ids. Next: "
            "get_task(task_id) for every field of one task, cancel_tasks or retry_tasks to act on them."
        ),
        annotations=read_only,
    )
    @takes(paged(ListTasks, max_page))  # the request model, its limit bounded by this server's max_page_size
    @client_errors
    async def list_tasks(**fields: Any) -> Annotated[CallToolResult, TaskPage]:
        request = paged(ListTasks, max_page).parse(fields)
        tasks, rows, next_cursor = await manager.alist_rows(request, current_principal().viewer)
        # TaskPage's JSON form; the SDK validates it against TaskPage (see result()).
        page = {"tasks": rows, "next_cursor": next_cursor}
        lines = "; ".join(f"{t.id} {t.type} {t.status.value}" for t in tasks[:10])
        more = " (more: pass next_cursor)" if next_cursor else ""
        return result(f"{len(tasks)} task(s){more}" + (f": {lines}" if lines else ""), page)

    @server.tool(
        title="Get a task",
        description=(
            "Everything about one task: status, stages with item counts and ETA, queue position, output, error, log "
            "tails; with history=true also its progress history. The text says the status, progress and ETA. Next: "
            "call again (or subscribe to plexus://tasks/{task_id}) until it ends; cancel_tasks to stop it, "
            "retry_tasks once it failed."
        ),
        annotations=read_only,
    )
    @takes(GetTask)
    @client_errors
    async def get_task(**fields: Any) -> Annotated[CallToolResult, TaskDetail]:
        request = GetTask.parse(fields)
        task = await manager.aget(request.task_id, current_principal().viewer)
        detail = await task_detail_data(manager, task, history=request.history, history_limit=request.history_limit)
        text = describe(task)
        if detail["queue"] is not None:
            text += f" Queue position {detail['queue']['position']}: {detail['queue']['message']}."
        return result(text, detail)
