"""`{base_url}plexus/api/tasks`: the REST face of TaskManager (same filters, cursors and errors as MCP)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tornado import web

from ..core.batches import BatchOperations, batch_uri, operation_report
from ..core.errors import NotFound, PlexusError
from ..core.requests import (
    BulkRequest,
    CancelTasks,
    DispatchBatch,
    DispatchTask,
    GetTask,
    ListTasks,
    RetryTasks,
    SetTaskPriority,
    paged,
)
from .base import BodyHandler, BodylessHandler, http_error


class TasksHandler(BodyHandler):
    async def get(self) -> None:
        """List tasks: ?status=RUNNING,QUEUED&type=demo&since=ISO&batch=...&limit=20&cursor=... (ListTasks, as MCP's
        list_tasks takes them; a list also as repeated parameters)."""
        manager = self.runtime.manager
        try:
            request = self.query_request(paged(ListTasks, manager.max_page_size))
            _, rows, next_cursor = await manager.alist_rows(request, self.principal.viewer)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply({"tasks": rows, "next_cursor": next_cursor})

    async def post(self) -> None:
        """Dispatch a task: {"type": "demo", "params": {...}, "priority": 0}. 201 with the task.

        Or a batch: {"tasks": [spec, ...]}. 201 with {batch_id, task_ids}; nothing is stored if a spec is bad.
        """
        self.require("dispatch")
        body = await self.json_body()
        if "tasks" in body:
            await self._dispatch_batch(body)
            return
        try:
            request = DispatchTask.parse({"type": "demo", **body})  # REST's type defaults to demo
            task = await self.runtime.manager.adispatch(
                request.type,
                request.params,
                priority=request.priority,
                owner=self.identity,
                description=request.description,
                role=self.principal.role.value,
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.set_header("Location", self.request.path.rstrip("/") + "/" + task.id)
        self.reply(task.to_dict(), status=201)

    async def _dispatch_batch(self, body: dict[str, Any]) -> None:
        """The body is a `DispatchBatch`, as MCP's dispatch_batch takes it (the same words for a bad spec); a batch
        over max_batch_size is refused before its specs are parsed."""
        specs = body["tasks"]
        self.audit_details.update(operation="dispatch", tasks=len(specs) if isinstance(specs, list) else None)
        batches = BatchOperations(self.runtime.manager)
        try:
            if isinstance(specs, list):
                batches.check_count(len(specs))
            request = DispatchBatch.parse(body)
            tasks = await batches.dispatch(request.tasks, self.principal.actor)
        except PlexusError as exc:
            raise http_error(exc) from None
        batch_id = tasks[0].batch_id or ""
        self.audit_details.update(batch_id=batch_id, count=len(tasks))
        self.reply(
            {
                "batch_id": batch_id,
                "task_ids": [t.id for t in tasks],
                "status": "QUEUED",
                "resource_uri": batch_uri(batch_id),
            },
            status=201,
        )


class TaskHandler(BodylessHandler):
    async def get(self, task_id: str) -> None:
        """One task; ?history=true&history_limit=100 adds its progress history (GetTask, as MCP's get_task)."""
        manager = self.runtime.manager
        try:
            request = self.query_request(GetTask, task_id=task_id)
            task = await manager.aget(task_id, self.principal.viewer)
            data = {**task.to_dict(), **await manager.queue_fields(task)}
            if request.history:
                samples, total = await manager.ahistory(task_id, request.history_limit)
                data["history"] = [s.to_dict() for s in samples]
                data["history_total"] = total
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply(data)


class TaskCancelHandler(BodylessHandler):
    async def post(self, task_id: str) -> None:
        """Cancel one task. 404 if it does not exist; a finished task answers 200 with outcome already_finished."""
        principal = self.require("cancel_own")
        outcome = self.runtime.manager.cancel([task_id], viewer=principal.viewer, others=principal.may("cancel_any"))[0]
        if outcome.outcome == "forbidden":
            raise web.HTTPError(403, outcome.message)
        if outcome.outcome == "not_found":
            raise http_error(NotFound(outcome.message))
        self.reply(outcome.to_dict())


class BulkTasksHandler(BodyHandler):
    """POST plexus/api/tasks/{cancel,retry,priority}: the body is the operation's request model (core/requests.py,
    as MCP's tools take it): {"task_ids": [...]} or a filter (status, type, owner, created_after, created_before,
    batch), and "dry_run": true to count first. The answer is MCP's OperationResult: {dry_run, matched, sample,
    results, max_per_call}."""

    request_model: type[BulkRequest] = CancelTasks
    action = "cancel_own"

    async def post(self) -> None:
        actor = self.require(self.action).actor
        body = await self.json_body()
        batches = BatchOperations(self.runtime.manager)
        try:
            request = self.request_model.parse(body)
            self.audit_details.update(request.audit_fields())
            if request.dry_run:
                found = await batches.preview(request, actor, request.operation)
                self.audit_details.update(count=found.count)
                self.reply(operation_report(batches.bound, preview=found))
                return
            outcomes = await batches.apply(request, actor)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.audit_details.update(count=len(outcomes), outcomes=dict(Counter(o.outcome for o in outcomes)))
        self.reply(operation_report(batches.bound, outcomes))


class CancelTasksHandler(BulkTasksHandler):
    pass


class RetryTasksHandler(BulkTasksHandler):
    request_model, action = RetryTasks, "dispatch"


class TaskPriorityHandler(BulkTasksHandler):
    request_model = SetTaskPriority


class BatchHandler(BodylessHandler):
    async def get(self, batch_id: str) -> None:
        """A batch: counts by status, aggregated progress, estimated end (as plexus://batches/{batch_id})."""
        try:
            self.reply(await BatchOperations(self.runtime.manager).status(batch_id, self.principal.viewer))
        except PlexusError as exc:
            raise http_error(exc) from None
