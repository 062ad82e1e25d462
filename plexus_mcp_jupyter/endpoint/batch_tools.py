"""The MCP face of batch operations (core/batches.py): dispatch_batch, cancel_tasks, retry_tasks,
set_task_priority and the resource plexus://batches/{batch_id}.

The three bulk tools take the same selection (task_ids, or a filter) and dry_run, spelled once here; what
they record in the audit log is the filter and the counts, never every id.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import BeforeValidator, Field, WithJsonSchema

from ..core.batches import SAMPLE_SIZE, Actor, BatchOperations, Selection, batch_uri, operation_report
from ..core.errors import NotFound
from ..core.manager import MAX_PRIORITY, MIN_PRIORITY, CancelOutcome, TaskManager
from ..core.models import TaskStatus
from ..core.requests import DispatchTask
from ..security.audit import note_for_audit
from .arguments import STATUS_NAMES, StatusName, comma_list, names_schema
from .principal import current_principal
from .schemas import BatchDispatchResult, OperationResult
from .task_logs import TaskLogs
from .tools import client_errors, result

# The selection every bulk tool takes.
TaskIds = Annotated[
    list[str] | None,
    BeforeValidator(comma_list),
    WithJsonSchema(
        names_schema("Ids of the tasks to act on (full ids, as list_tasks shows them; at most max_batch_size)")
    ),
]
Statuses = Annotated[
    list[StatusName] | None,
    BeforeValidator(comma_list),
    WithJsonSchema(
        names_schema("Filter: only tasks with these statuses (default: those the operation can change)", STATUS_NAMES)
    ),
]
Types = Annotated[
    list[str] | None, BeforeValidator(comma_list), WithJsonSchema(names_schema("Filter: only tasks of these types"))
]
Owner = Annotated[
    str | None,
    Field(
        max_length=128,
        description="Filter: only this owner's tasks (admins; others always act on their own tasks only)",
    ),
]
CreatedAfter = Annotated[str | None, Field(max_length=64, description="Filter: created at or after this ISO 8601 time")]
CreatedBefore = Annotated[str | None, Field(max_length=64, description="Filter: created before this ISO 8601 time")]
Batch = Annotated[str | None, Field(max_length=64, description="Filter: only the tasks of this batch")]
DryRun = Annotated[
    bool, Field(description=f"Only count what would be acted on (and show up to {SAMPLE_SIZE} ids); change nothing")
]


def selection_of(
    task_ids: list[str] | None,
    status: list[str] | None,
    type: list[str] | None,
    owner: str | None,
    created_after: str | None,
    created_before: str | None,
    batch: str | None,
) -> Selection:
    return Selection(
        task_ids=tuple(task_ids or ()),
        status=tuple(TaskStatus.parse(s).value for s in status or ()),
        type=tuple(type or ()),
        owner=owner or None,
        created_after=created_after or None,
        created_before=created_before or None,
        batch=batch or None,
    )


def register_batch_tools(server: MCPServer, manager: TaskManager, logs: TaskLogs | None = None) -> None:
    batches = BatchOperations(manager)
    changes = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

    def start(operation: str, selection: Selection, dry_run: bool, **extra: Any) -> Actor:
        """Note the call for the audit log (the filter, or how many ids) before anything can fail."""
        note_for_audit(operation=operation, dry_run=dry_run, **selection.audit_fields(), **extra)
        return current_principal().actor

    async def preview(operation: str, selection: Selection, actor: Actor) -> CallToolResult:
        found = await batches.preview(selection, actor, operation)
        note_for_audit(count=found.count)
        over = (
            f"; more than the {batches.bound} one call may change (max_batch_size)"
            if found.count > batches.bound
            else ""
        )
        out = operation_report(batches.bound, preview=found)
        return result(f"Dry run: {found.count} task(s) would be affected{over}.", out)

    def outcome(outcomes: list[CancelOutcome]) -> CallToolResult:
        counts = Counter(o.outcome for o in outcomes)
        note_for_audit(count=len(outcomes), outcomes=dict(counts))
        text = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items()) or "no task matched"
        return result(text[0].upper() + text[1:] + ".", operation_report(batches.bound, outcomes))

    @server.tool(
        title="Dispatch a batch of tasks",
        description=(
            "Start many tasks in one call: a list of task specs {type, params, priority, description} of the "
            'registered task types, or evaluations: {type: "evaluation", params: <create_evaluation\'s arguments>} '
            "(an evaluation per dataset or per scorer). All are validated first: one invalid spec and nothing is "
            "dispatched (the error "
            "names its index). They are stored QUEUED in one transaction, share a batch_id, and the answer gives the "
            "batch id and the task ids. Follow the batch with plexus://batches/{batch_id} (counts by status, "
            "progress; subscribable) or list_tasks(batch=...). At most max_batch_size tasks per call; an API key's "
            "max_tasks_per_key and priority ceiling apply to the whole batch. Next: read "
            'plexus://batches/{batch_id} until done, then list_tasks(batch=..., status="FAILED") and retry_tasks.'
        ),
        annotations=changes,
    )
    @client_errors
    async def dispatch_batch(
        ctx: Context,
        tasks: Annotated[list[DispatchTask], Field(min_length=1, description="The task specs, in order")],
    ) -> Annotated[CallToolResult, BatchDispatchResult]:
        note_for_audit(operation="dispatch", tasks=len(tasks), types=dict(Counter(t.type for t in tasks)))
        created = await batches.dispatch([t.model_dump() for t in tasks], current_principal().actor)
        batch_id = created[0].batch_id or ""
        if logs is not None:
            logs.started(ctx, [t.id for t in created])
        note_for_audit(batch_id=batch_id, count=len(created))
        out = {
            "batch_id": batch_id,
            "task_ids": [t.id for t in created],
            "status": TaskStatus.QUEUED.value,
            "resource_uri": batch_uri(batch_id),
        }
        return result(f"Queued {len(created)} task(s) as batch {batch_id}; follow it at {batch_uri(batch_id)}.", out)

    @server.tool(
        title="Cancel tasks",
        description=(
            "Cancel tasks by id, or every task matching a filter (status, type, owner, created_after, "
            "created_before, batch; without status: the unfinished ones). Queued tasks are cancelled at once; "
            "running ones stop at their next check or are stopped after a grace period; a finished task is a no-op "
            "that says so. dry_run counts first. A filter matching more than max_batch_size tasks is refused with "
            "the count; one matching nothing is a zero. Non-admins act only on their own tasks. Returns one "
            "outcome per task (cancelled, cancelling, already_finished, not_found). Next: get_task or list_tasks "
            "to see them end."
        ),
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    @client_errors
    async def cancel_tasks(
        task_ids: TaskIds = None,
        status: Statuses = None,
        type: Types = None,
        owner: Owner = None,
        created_after: CreatedAfter = None,
        created_before: CreatedBefore = None,
        batch: Batch = None,
        dry_run: DryRun = False,
        wait_seconds: Annotated[
            float,
            Field(
                ge=0, le=30, description="Wait up to this long (0 to 30 s) for running tasks to end before answering"
            ),
        ] = 0,
    ) -> Annotated[CallToolResult, OperationResult]:
        selection = selection_of(task_ids, status, type, owner, created_after, created_before, batch)
        actor = start("cancel", selection, dry_run)
        if dry_run:
            return await preview("cancel", selection, actor)
        outcomes = await batches.cancel(selection, actor)
        if wait_seconds:
            await manager.wait_final([o.task_id for o in outcomes if o.outcome == "cancelling"], wait_seconds)
            for o in outcomes:
                if o.outcome != "cancelling":
                    continue
                task = await manager.aget(o.task_id)
                if task.status is TaskStatus.CANCELLED:
                    o.outcome, o.status, o.message = "cancelled", task.status.value, "stopped"
                elif task.status.is_final:  # it ended on its own before it saw the request
                    o.outcome, o.status = "already_finished", task.status.value
                    o.message = f"the task ended as {task.status.value} before it could be cancelled"
        return outcome(outcomes)

    @server.tool(
        title="Retry tasks",
        description=(
            "Run FAILED or CANCELLED tasks again, by id or by filter (without status: the failed and cancelled "
            "ones). Each becomes a new QUEUED task (new_task_id; same type, parameters, priority, owner and batch; "
            "its retry_of names the old one, which is kept as it ended). A task still queued or running, or "
            "completed, is reported not_retryable, not an error. dry_run counts first; at most max_batch_size "
            "per call. Returns one outcome per task with new_task_id. Next: get_task(new_task_id)."
        ),
        annotations=changes,
    )
    @client_errors
    async def retry_tasks(
        task_ids: TaskIds = None,
        status: Statuses = None,
        type: Types = None,
        owner: Owner = None,
        created_after: CreatedAfter = None,
        created_before: CreatedBefore = None,
        batch: Batch = None,
        dry_run: DryRun = False,
    ) -> Annotated[CallToolResult, OperationResult]:
        selection = selection_of(task_ids, status, type, owner, created_after, created_before, batch)
        actor = start("retry", selection, dry_run)
        if dry_run:
            return await preview("retry", selection, actor)
        return outcome(await batches.retry(selection, actor))

    @server.tool(
        title="Change the priority of queued tasks",
        description=(
            "Set the priority of tasks that have not started, by id or by filter (without status: the queued "
            "ones); the scheduler starts higher priorities first. A running or finished task is reported "
            "not_queued. Operator keys may set at most max_priority_operator. dry_run counts first; at most "
            "max_batch_size per call. Returns one outcome per task. Next: get_task shows the new queue position."
        ),
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
        ),
    )
    @client_errors
    async def set_task_priority(
        priority: Annotated[
            int,
            Field(ge=MIN_PRIORITY, le=MAX_PRIORITY, description=f"The new priority, {MIN_PRIORITY} to {MAX_PRIORITY}"),
        ],
        task_ids: TaskIds = None,
        status: Statuses = None,
        type: Types = None,
        owner: Owner = None,
        created_after: CreatedAfter = None,
        created_before: CreatedBefore = None,
        batch: Batch = None,
        dry_run: DryRun = False,
    ) -> Annotated[CallToolResult, OperationResult]:
        selection = selection_of(task_ids, status, type, owner, created_after, created_before, batch)
        actor = start("set_priority", selection, dry_run, priority=priority)
        if dry_run:
            return await preview("set_priority", selection, actor)
        return outcome(await batches.set_priority(selection, priority, actor))

    @server.resource(
        "plexus://batches/{batch_id}",
        name="batch",
        title="Batch",
        description="A batch of tasks (dispatch_batch): counts by status, aggregated progress (tasks finished, items "
        "processed) and an estimated end. Subscribable: any change to one of its tasks announces it.",
        mime_type="application/json",
    )
    async def batch_resource(batch_id: str) -> str:
        try:
            status = await batches.status(batch_id, current_principal().viewer)
        except NotFound as exc:
            raise ResourceNotFoundError(str(exc)) from None
        return json.dumps(status, separators=(",", ":"))
