"""Streaming a task's progress to an MCP caller that sent a progress token.

The call then stays open until the task ends, sending `notifications/progress` as the task advances
(coalesced: at most one per bus event, and only when the count moved), and the client's
`notifications/cancelled` for that call cancels the task itself.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio
from mcp.server.mcpserver import Context

from ..core.manager import TaskManager
from ..core.models import Task, TaskStatus, iso
from .schemas import task_uri
from .task_logs import TaskLogs

log = logging.getLogger("plexus_mcp_jupyter")


def progress_token(ctx: Context | None) -> str | int | None:
    """The caller's progress token, or None when it asked for no progress."""
    if ctx is None:
        return None
    try:
        meta = ctx.request_context.meta
    except ValueError:
        return None
    if not meta:
        return None
    token = meta.get("progress_token", meta.get("progressToken"))  # type: ignore[call-overload]
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None


def overall_progress(task: Task) -> tuple[float, float | None, str]:
    """Steps done, steps known so far, and a one-line message.

    A step is an item of any stage, plus one for the task's end, so that the last notification (at
    total) is sent when the task completes, not when its last item is done. Finished stages count in
    full, so the figure never decreases as stages change; the total grows as stages become known,
    and is None while a stage's size is unknown (progress must never exceed total).
    """
    done = sum(float(stage.processed_items) for stage in task.stages)
    known: float | None = None
    if all(stage.total_items is not None for stage in task.stages):
        known = sum(float(stage.total_items or 0) for stage in task.stages) + 1
    if task.status == TaskStatus.COMPLETED:
        done = known if known is not None else done + 1
    stage = task.stages[-1] if task.stages else None
    if task.status.is_final:
        message = task.status.value + (f": {task.error_message}" if task.error_message else "")
    elif stage is None:
        message = task.status.value
    else:
        message = f"{stage.name}: {stage.processed_items}/{stage.total_items if stage.total_items is not None else '?'}"
        if task.estimated_completion_at is not None:
            message += f", ETA {iso(task.estimated_completion_at)}"
        if stage.status_message:
            message += f" - {stage.status_message}"
    return done, known, message


async def follow_to_end(ctx: Context, manager: TaskManager, task_id: str, logs: TaskLogs | None = None) -> Task:
    """Report progress until the task ends and return it; cancelling the call cancels the task. With `logs`,
    a 2026-era call that opted in to log messages also gets the task's log lines on its stream."""
    subscription = manager.bus.subscribe(lambda e: e.entity_type == "task" and e.entity_id == task_id)
    call_log = logs.follow_call(ctx, task_id) if logs is not None else None
    last = -math.inf
    try:
        task = await manager.aget(task_id)
        while True:
            done, total, message = overall_progress(task)
            if done > last:  # the spec wants progress to increase with every notification
                await ctx.report_progress(done, total, message)
                last = done
            if task.status.is_final:
                if call_log is not None:  # its last lines before the answer, which ends the call's stream
                    await call_log.drain()
                return task
            await subscription.next_batch()
            task = await manager.aget(task_id)
    except anyio.get_cancelled_exc_class():
        # The client cancelled the call (notifications/cancelled) or went away: stop the work too,
        # unless it is the server shutting down, which records its tasks itself.
        if not manager.stopping:
            try:
                manager.cancel([task_id])
            except Exception:
                log.exception("Plexus: could not cancel task %s after its call was cancelled", task_id)
        raise
    finally:
        subscription.close()
        if call_log is not None:
            call_log.stop()


def final_summary(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.id,
        "type": task.type,
        "status": task.status,
        "priority": task.priority,
        "created_at": iso(task.created_at),
        "resource_uri": task_uri(task.id),
        "output": task.output,
        "error_message": task.error_message,
    }
