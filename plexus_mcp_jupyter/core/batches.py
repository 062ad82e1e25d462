"""Operations on many tasks at once: dispatch a batch; cancel, retry or re-prioritise tasks chosen by ids or by
a filter (with a dry run); a batch's counts and aggregated progress. The same for MCP, REST, the CLI and the
notebook, which only parse their input into a request model (core/requests.py: `CancelTasks`, `RetryTasks`,
`SetTaskPriority`, each a `Selection`; `DispatchTask`) and call these.

Every call is bounded by `max_batch_size` and is refused whole, naming the count and the bound, rather than
done in part; a batch's specs are all valid or nothing is stored; a non-admin's filter only ever matches its
own tasks. Writes are bulk: a batch is one INSERT transaction, a cancel or re-prioritisation one UPDATE of the
tasks still waiting (the status condition is in the UPDATE, so a task started meanwhile is left to the
per-task path).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.engine import Connection

from .errors import InvalidArgument, NotFound, PlexusError
from .manager import MAX_PRIORITY, MIN_PRIORITY, CancelOutcome, TaskManager
from .models import FINAL_STATUSES, Task, TaskStatus, iso, now, parse_iso
from .ownership import owner_visible
from .requests import SAMPLE_SIZE, BulkRequest, CancelTasks, DispatchTask, Selection, SetTaskPriority
from .retention import expired_message
from .store import TaskFilter
from .tasks import get_task_type

# What a filter acts on when it names no status: what the operation can change.
DEFAULT_STATUSES = {
    "cancel": (TaskStatus.QUEUED, TaskStatus.RUNNING),
    "retry": (TaskStatus.FAILED, TaskStatus.CANCELLED),
    "set_priority": (TaskStatus.QUEUED,),
}
_WAITING = frozenset({TaskStatus.QUEUED})
_CANCELLED_WAITING = "cancelled before it started"


@dataclass(frozen=True)
class Actor:
    """Who asks: the owner recorded on new tasks, the role whose priority ceiling applies, and whether it may
    act on tasks of others (admins; security/identity.py decides, the faces pass it on)."""

    owner: str | None
    role: str | None
    admin: bool

    @property
    def viewer(self) -> str | None:
        """TaskFilter.viewer: None (everything) for an admin, else the caller's owner."""
        return None if self.admin else (self.owner or "")


@dataclass(frozen=True)
class PlannedSpec:
    """What the service of an internal task type (evaluations) made of one batch spec's params: the task's
    real params and description, and the record it keeps beside the task (`record(task, conn)` writes it in
    the transaction that stores the task: never a task without its record)."""

    params: dict[str, Any]
    description: str
    record: Callable[[Task, Connection], None]


# An internal type's checks of one spec's params, for a caller (off the loop where they read files).
SpecPlanner = Callable[[Mapping[str, Any], "Actor"], Awaitable[PlannedSpec]]


@dataclass
class Preview:
    """What an operation would act on: how many tasks, and the first few ids."""

    count: int
    sample: list[str] = field(default_factory=list)


def operation_report(
    bound: int, outcomes: Sequence[CancelOutcome] = (), preview: Preview | None = None
) -> dict[str, Any]:
    """The answer of a bulk operation on every face (MCP OperationResult, REST): per-task outcomes, or the
    count and sample of a dry run."""
    if preview is not None:
        return {
            "dry_run": True,
            "matched": preview.count,
            "sample": preview.sample,
            "results": [],
            "max_per_call": bound,
        }
    return {
        "dry_run": False,
        "matched": len(outcomes),
        "sample": [],
        "results": [o.to_dict() for o in outcomes],
        "max_per_call": bound,
    }


class BatchOperations:
    """Batch dispatch and bulk operations over one TaskManager (stateless: build one where needed)."""

    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager

    @property
    def bound(self) -> int:
        return self.manager.max_batch_size

    # -- dispatch ------------------------------------------------------------------------------------

    def prepare(
        self,
        specs: Sequence[Mapping[str, Any] | DispatchTask],
        actor: Actor,
        planned: Mapping[int, PlannedSpec] | None = None,
    ) -> list[Task]:
        """Validate every spec (all or nothing) into QUEUED tasks sharing a new batch id; nothing is stored.
        `planned`: the specs of internal types (evaluations), by index, as their services made them (`plan`).

        An error names the index of the first bad spec and what was wrong with it.
        """
        self._check_specs(specs)
        batch_id = str(uuid.uuid4())
        tasks = []
        for index, spec in enumerate(specs):
            try:
                tasks.append(self._task(spec, actor, batch_id, (planned or {}).get(index)))
            except InvalidArgument as exc:
                raise InvalidArgument(f"tasks[{index}]: {exc}; nothing was dispatched") from None
        return tasks

    def _check_specs(self, specs: Sequence[Mapping[str, Any] | DispatchTask]) -> None:
        if not isinstance(specs, Sequence) or isinstance(specs, str | bytes) or not specs:
            raise InvalidArgument("tasks must be a non-empty list of task specs {type, params, priority, description}")
        self.check_count(len(specs))

    def check_count(self, count: int) -> None:
        """Refuse a batch of more than max_batch_size tasks, naming the count and the bound."""
        if count > self.bound:
            raise InvalidArgument(
                f"the batch has {count} tasks, more than the {self.bound} one call may dispatch "
                "(setting max_batch_size): split it into several batches"
            )

    def _task(
        self, spec: Mapping[str, Any] | DispatchTask, actor: Actor, batch_id: str, planned: PlannedSpec | None
    ) -> Task:
        request = parse_spec(spec)
        if planned is not None:
            return self.manager.new_task(
                request.type,
                planned.params,
                priority=request.priority,
                owner=actor.owner,
                description=request.description or planned.description,
                role=actor.role,
                batch_id=batch_id,
                internal=True,
            )
        return self.manager.new_task(
            request.type,
            request.params,
            priority=request.priority,
            owner=actor.owner,
            description=request.description,
            role=actor.role,
            batch_id=batch_id,
        )

    async def plan(self, specs: Sequence[Mapping[str, Any] | DispatchTask], actor: Actor) -> dict[int, PlannedSpec]:
        """The specs of internal types whose service plans them (manager.spec_planners: an evaluation per
        dataset or per scorer), checked by that service one after the other; the first bad one is refused
        with its index, before anything is stored."""
        self._check_specs(specs)
        planners = self.manager.spec_planners
        planned: dict[int, PlannedSpec] = {}
        for index, spec in enumerate(specs):
            try:
                request = parse_spec(spec)
                planner = planners.get(request.type)
                if planner is not None:
                    self.manager.check_priority(request.priority, actor.role)
                    planned[index] = await planner(request.params, actor)
            except PlexusError as exc:  # an unknown dataset is NotFound for create_evaluation, a bad spec here
                raise InvalidArgument(f"tasks[{index}]: {exc}; nothing was dispatched") from None
        return planned

    async def dispatch(self, specs: Sequence[Mapping[str, Any] | DispatchTask], actor: Actor) -> list[Task]:
        """Validate (internal types by their services), then store every task and their services' records in
        one transaction, the key cap counted for the whole batch in that store work (`acreate_batch`: with the
        concurrent creates of the key, on the writer thread on a networked store), then announce them."""
        planned = await self.plan(specs, actor)
        tasks = self.prepare(specs, actor, planned)

        def records(conn: Connection) -> None:
            for index, spec in planned.items():
                spec.record(tasks[index], conn)

        await self.manager.acreate_batch(tasks, records if planned else None)
        return tasks

    # -- selection -----------------------------------------------------------------------------------

    def task_filter(self, selection: Selection, actor: Actor, operation: str) -> TaskFilter:
        """The filter of a selection as this caller may use it: a non-admin's reaches only its own tasks."""
        owner = selection.owner
        if not actor.admin:
            if owner is not None and owner != actor.owner:
                raise InvalidArgument(
                    f"permission denied: you may {operation.replace('_', ' ')} only your own tasks "
                    f"(owner {actor.owner}); leave owner out, or ask an admin"
                )
            owner = actor.owner or ""
        if selection.created_after:
            parse_iso(selection.created_after, "created_after")  # the error names the argument given
        flt = self.manager.build_filter(
            status=list(selection.status),
            type_names=list(selection.type),
            since=selection.created_after,
            owner=owner,
            viewer=actor.viewer,
            batch=selection.batch,
            before=selection.created_before,
        )
        if not flt.statuses:
            flt = replace(flt, statuses=DEFAULT_STATUSES[operation])
        return flt

    def _check_shape(self, selection: Selection) -> None:
        if bool(selection.task_ids) == bool(selection.filter_fields):
            raise InvalidArgument(
                "give either task_ids (a list of ids) or a filter (status, type, owner, "
                "created_after, created_before, batch), not both or neither"
            )

    async def preview(self, selection: Selection, actor: Actor, operation: str) -> Preview:
        """How many tasks the operation would act on, and the first SAMPLE_SIZE ids (a dry run), read off the
        event loop."""
        return await self.manager.calls.run(self._preview, selection, actor, operation)

    def _preview(self, selection: Selection, actor: Actor, operation: str) -> Preview:
        self._check_shape(selection)
        if selection.task_ids:
            ids = list(dict.fromkeys(selection.task_ids))
            return Preview(len(ids), ids[:SAMPLE_SIZE])
        flt = self.task_filter(selection, actor, operation)
        store = self.manager.store
        return Preview(store.count_tasks(flt), store.find_task_ids(flt, limit=SAMPLE_SIZE))

    def select(self, selection: Selection, actor: Actor, operation: str) -> list[str]:
        """The ids an operation acts on; refused whole when more than max_batch_size."""
        self._check_shape(selection)
        verb = operation.replace("_", " ").replace("set priority", "re-prioritise")
        if selection.task_ids:
            ids = list(dict.fromkeys(selection.task_ids))
            if len(ids) > self.bound:
                raise InvalidArgument(
                    f"{len(ids)} task ids given, more than the {self.bound} one call may {verb} "
                    "(setting max_batch_size): split them into several calls"
                )
            return ids
        flt = self.task_filter(selection, actor, operation)
        ids = self.manager.store.find_task_ids(flt, limit=self.bound + 1)
        if len(ids) > self.bound:
            count = self.manager.store.count_tasks(flt)
            raise InvalidArgument(
                f"the filter matches {count} tasks, more than the {self.bound} one call may {verb} "
                "(setting max_batch_size): narrow it (type, created_before, batch) or call again "
                "after this part is done; dry_run shows the count"
            )
        return ids

    def _missing(self, task_id: str, actor: Actor) -> str:
        """Why a task is not there: it expired (when the caller could have seen it), or no such task."""
        tombstone = self.manager.store.tombstone(task_id)
        if tombstone is not None and owner_visible(tombstone["owner"], actor.viewer):
            return expired_message(task_id, tombstone)
        return f"no task with id {task_id!r}"

    def _resolve(self, ids: Sequence[str], actor: Actor, operation: str) -> tuple[list[Task], list[CancelOutcome]]:
        """The tasks of `ids` this caller may act on, and the outcomes of those it may not (not found, or
        another's). One read for all of them."""
        found = {t.id: t for t in self.manager.store.tasks_by_ids(ids)}
        tasks, refused = [], []
        for task_id in ids:
            task = found.get(task_id)
            if task is None or not owner_visible(task.owner, actor.viewer):
                refused.append(CancelOutcome(task_id, "not_found", None, self._missing(task_id, actor)))
            elif not actor.admin and task.owner != actor.owner:
                refused.append(
                    CancelOutcome(
                        task_id,
                        "forbidden",
                        task.status.value,
                        f"permission denied: you may {operation.replace('_', ' ')} only your own tasks "
                        f"(this one belongs to {task.owner or 'the local user'}); an admin may",
                    )
                )
            else:
                tasks.append(task)
        return tasks, refused

    # -- operations ----------------------------------------------------------------------------------

    async def apply(self, request: BulkRequest, actor: Actor) -> list[CancelOutcome]:
        """Carry out a bulk request on the tasks it selects (a dry run is `preview`)."""
        if isinstance(request, SetTaskPriority):
            return await self.set_priority(request, request.priority, actor)
        if isinstance(request, CancelTasks):
            return await self.cancel(request, actor, request.wait_seconds)
        return await self.retry(request, actor)

    async def cancel(self, selection: Selection, actor: Actor, wait_seconds: float = 0) -> list[CancelOutcome]:
        """Cancel: waiting tasks in one UPDATE, running ones cooperatively (TaskManager.cancel). The reads and
        the UPDATE run off the event loop; events and running tasks are handled on it. With `wait_seconds`, the
        answer waits up to that long for the running ones to end, and says how they did."""
        at = now()

        def work() -> tuple[list[str], list[Task], list[CancelOutcome], set[str]]:
            ids = self.select(selection, actor, "cancel")
            tasks, outcomes = self._resolve(ids, actor, "cancel")
            done = set(
                self.manager.store.update_queued(
                    [t.id for t in tasks if t.status in _WAITING],
                    status=TaskStatus.CANCELLED,
                    completed_at=at,
                    cancel_requested=True,
                    error_message=_CANCELLED_WAITING,
                )
            )
            return ids, tasks, outcomes, done

        ids, tasks, outcomes, done = await asyncio.to_thread(work)
        cancelled = []
        for task in tasks:
            if task.id in done:
                task.status, task.completed_at, task.cancel_requested = TaskStatus.CANCELLED, at, True
                task.error_message = _CANCELLED_WAITING
                cancelled.append(task)
                outcomes.append(CancelOutcome(task.id, "cancelled", task.status.value, _CANCELLED_WAITING))
            elif task.status.is_final:
                outcomes.append(
                    CancelOutcome(
                        task.id,
                        "already_finished",
                        task.status.value,
                        f"the task already ended as {task.status.value}; nothing to cancel",
                    )
                )
            else:  # running, or started since it was read
                outcomes += self.manager.cancel([task.id])
        self.manager.announce(cancelled, "task.cancelled")
        if wait_seconds:
            await self._wait_cancelled([o for o in outcomes if o.outcome == "cancelling"], wait_seconds)
        return _in_order(ids, outcomes)

    async def _wait_cancelled(self, stopping: list[CancelOutcome], wait_seconds: float) -> None:
        await self.manager.wait_final([o.task_id for o in stopping], wait_seconds)
        for o in stopping:
            task = await self.manager.aget(o.task_id)
            if task.status is TaskStatus.CANCELLED:
                o.outcome, o.status, o.message = "cancelled", task.status.value, "stopped"
            elif task.status.is_final:  # it ended on its own before it saw the request
                o.outcome, o.status = "already_finished", task.status.value
                o.message = f"the task ended as {task.status.value} before it could be cancelled"

    async def retry(self, selection: Selection, actor: Actor) -> list[CancelOutcome]:
        """Re-run FAILED or CANCELLED tasks as new attempts: a new task (new id, `retry_of` the old one, same
        type, parameters, priority, owner and batch) per task, all stored in one transaction. A task that has
        not ended, completed, or was retried already is a per-task "not_retryable" outcome; caps and the
        priority ceiling apply to the whole call (nothing is retried if one attempt would break them; the key cap
        is counted where the attempts are stored, `acreate_batch`)."""

        def work() -> tuple[list[str], list[CancelOutcome], list[Task], list[Task]]:
            ids = self.select(selection, actor, "retry")
            tasks, outcomes = self._resolve(ids, actor, "retry")
            retried = self.manager.store.retries_of([t.id for t in tasks])
            retryable = []
            for task in tasks:
                reason = f"already retried as task {retried[task.id]}" if task.id in retried else _not_retryable(task)
                if reason:
                    outcomes.append(
                        CancelOutcome(task.id, "not_retryable", task.status.value, f"not retryable: {reason}")
                    )
                else:
                    retryable.append(task)
            attempts = []
            for task in retryable:
                try:
                    attempts.append(
                        self.manager.new_task(
                            task.type,
                            task.params,
                            priority=task.priority,
                            owner=task.owner,
                            description=task.description,
                            role=actor.role,
                            batch_id=task.batch_id,
                            retry_of=task.id,
                        )
                    )
                except InvalidArgument as exc:
                    raise InvalidArgument(f"task {task.id}: {exc}; nothing was retried") from None
            return ids, outcomes, retryable, attempts

        ids, outcomes, retryable, attempts = await asyncio.to_thread(work)
        await self.manager.acreate_batch(attempts)
        outcomes += [
            CancelOutcome(old.id, "retried", old.status.value, f"queued again as task {new.id}", new.id)
            for old, new in zip(retryable, attempts, strict=True)
        ]
        return _in_order(ids, outcomes)

    async def set_priority(self, selection: Selection, priority: int, actor: Actor) -> list[CancelOutcome]:
        """Change the priority of waiting tasks (one UPDATE, off the loop); the caller's priority ceiling applies."""
        if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidArgument(
                f"priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} (higher runs "
                f"first), not {priority!r:.40}"
            )
        self.manager.check_priority(priority, actor.role)

        def work() -> tuple[list[str], list[Task], list[CancelOutcome], set[str]]:
            ids = self.select(selection, actor, "set_priority")
            tasks, outcomes = self._resolve(ids, actor, "set_priority")
            done = set(
                self.manager.store.update_queued([t.id for t in tasks if t.status in _WAITING], priority=priority)
            )
            return ids, tasks, outcomes, done

        self.manager.queue_changing()
        ids, tasks, outcomes, done = await asyncio.to_thread(work)
        changed = []
        for task in tasks:
            if task.id in done:
                task.priority = priority
                changed.append(task)
                outcomes.append(CancelOutcome(task.id, "updated", task.status.value, f"priority is now {priority}"))
            else:
                status = "RUNNING" if task.status in _WAITING else task.status.value  # started meanwhile
                outcomes.append(
                    CancelOutcome(
                        task.id,
                        "not_queued",
                        status,
                        f"not queued: {status.lower()} (only waiting tasks can be re-prioritised)",
                    )
                )
        self.manager.announce(changed, "task.updated")
        return _in_order(ids, outcomes)

    # -- batches -------------------------------------------------------------------------------------

    async def status(self, batch_id: str, viewer: str | None = None) -> dict[str, Any]:
        """A batch's counts by status (current attempts), aggregated progress and an estimated end, read off the
        event loop (see `_status`)."""
        return await self.manager.calls.run(self._status, batch_id, viewer)

    def _status(self, batch_id: str, viewer: str | None) -> dict[str, Any]:
        """A batch's counts by status (current attempts), aggregated progress and an estimated end.

        Progress is finished tasks over all, plus items processed over items known in the stages of the
        tasks that started. The ETA extrapolates the batch's own pace: time since it was created over the
        tasks finished so far, times those left.
        """
        store = self.manager.store
        found, superseded = store.batch_counts(batch_id, viewer)
        if not found and not superseded:
            raise NotFound(
                f"no batch with id {batch_id!r}; dispatch_batch returns batch ids, and each task's "
                "batch_id names its batch"
            )
        counts = {s.value: found.get(s.value, 0) for s in TaskStatus}
        total = sum(counts.values())
        finished = sum(counts[s.value] for s in FINAL_STATUSES)
        processed, items, created, ended = store.batch_items(batch_id, viewer)
        at = now()
        eta = None
        if 0 < finished < total and created is not None:
            eta = at + (at - created) * (total - finished) / finished
        return {
            "batch_id": batch_id,
            "done": finished == total,
            "total": total,
            "counts": counts,
            "superseded": superseded,
            "progress": {
                "finished": finished,
                "total": total,
                "percent": round(100.0 * finished / total, 1) if total else None,
                "processed_items": processed,
                "total_items": items,
            },
            "created_at": iso(created),
            "completed_at": iso(ended) if finished == total else None,
            "estimated_completion_at": iso(eta),
            "tasks_uri": f"plexus://tasks?batch={batch_id}",
            "resource_uri": batch_uri(batch_id),
        }


def batch_uri(batch_id: str) -> str:
    """The MCP resource of one batch."""
    return f"plexus://batches/{batch_id}"


def _not_retryable(task: Task) -> str | None:
    if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        task_type = get_task_type(task.type)
        if task_type.internal:
            by = task_type.created_by or "their own service"
            return f"{task.type} tasks are re-run by {by}, which makes their record"
        return None
    if task.status is TaskStatus.COMPLETED:
        return "completed (only FAILED or CANCELLED tasks are retried)"
    return f"{task.status.value.lower()} (it has not ended; cancel it first to run it again)"


def _in_order(ids: Sequence[str], outcomes: list[CancelOutcome]) -> list[CancelOutcome]:
    position = {task_id: i for i, task_id in enumerate(ids)}
    return sorted(outcomes, key=lambda o: position.get(o.task_id, len(position)))


def parse_spec(spec: Any) -> DispatchTask:
    """A batch's task spec as the dispatch request it is (the type's params are the type's to check); the faces
    hand over the specs their `DispatchBatch` parsed."""
    if isinstance(spec, DispatchTask):
        return spec
    if not isinstance(spec, Mapping):
        raise InvalidArgument(f"a task spec is an object {{type, params, priority, description}}, not {spec!r:.60}")
    return DispatchTask.parse(spec)
