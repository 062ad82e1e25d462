"""The MCP face of batch operations (core/batches.py): dispatch_batch, cancel_tasks, retry_tasks,
set_task_priority and the resource plexus://batches/{batch_id}.

The three bulk tools' arguments are their request models (core/requests.py: `CancelTasks`, `RetryTasks`,
`SetTaskPriority`, each a `Selection` with dry_run), the ones REST, the CLI and the notebook use; what they record
in the audit log is the filter and the counts, never every id.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.types import CallToolResult, ToolAnnotations

from ..core.batches import Actor, BatchOperations, batch_uri, operation_report
from ..core.errors import NotFound
from ..core.manager import CancelOutcome, TaskManager
from ..core.models import TaskStatus
from ..core.requests import BulkRequest, CancelTasks, DispatchBatch, RetryTasks, SetTaskPriority, takes
from ..security.audit import note_for_audit
from .principal import current_principal
from .schemas import BatchDispatchResult, OperationResult
from .task_logs import TaskLogs
from .tools import client_errors, result


def register_batch_tools(server: MCPServer, manager: TaskManager, logs: TaskLogs | None = None) -> None:
    batches = BatchOperations(manager)
    changes = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

    async def bulk(request: BulkRequest) -> CallToolResult:
        """The three bulk tools: note the call for the audit log (the filter, or how many ids) before anything
        can fail, then count (a dry run) or act."""
        note_for_audit(**request.audit_fields())
        actor = current_principal().actor
        if request.dry_run:
            return await preview(request, actor)
        return outcome(await batches.apply(request, actor))

    async def preview(request: BulkRequest, actor: Actor) -> CallToolResult:
        found = await batches.preview(request, actor, request.operation)
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
    @takes(DispatchBatch)
    @client_errors
    async def dispatch_batch(ctx: Context, **fields: Any) -> Annotated[CallToolResult, BatchDispatchResult]:
        tasks = DispatchBatch(**fields).tasks
        note_for_audit(operation="dispatch", tasks=len(tasks), types=dict(Counter(t.type for t in tasks)))
        created = await batches.dispatch(tasks, current_principal().actor)
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
    @takes(CancelTasks)  # the tool's arguments are the request model's fields
    @client_errors
    async def cancel_tasks(**fields: Any) -> Annotated[CallToolResult, OperationResult]:
        return await bulk(CancelTasks.parse(fields))

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
    @takes(RetryTasks)
    @client_errors
    async def retry_tasks(**fields: Any) -> Annotated[CallToolResult, OperationResult]:
        return await bulk(RetryTasks.parse(fields))

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
    @takes(SetTaskPriority)
    @client_errors
    async def set_task_priority(**fields: Any) -> Annotated[CallToolResult, OperationResult]:
        return await bulk(SetTaskPriority.parse(fields))

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
