"""TaskManager: dispatch, scheduling, progress, cancellation and restart recovery (docs/architecture.md).

It is the only writer of task state. Every change goes: TaskManager -> Store (persisted) ->
EventBus (published once). It runs on the server's event loop and never runs task code there:
task functions run in an Executor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import resources as res
from .creates import Create, CreateGroups
from .errors import Expired, InvalidArgument, NotFound, PlexusError
from .events import Event, EventBus
from .executors.base import Executor
from .leases import MACHINE
from .listing_cache import PageCache
from .messages import Cancelled, Done, Ending, Exit, Failed, Log, Lost, Placed, Progress, Reply, Request, ToManager
from .messages import Stage as StageBegun
from .models import FINAL_STATUSES, Moment, ProgressSample, Stage, StageStatus, Task, TaskStatus, iso, now, parse_iso
from .ownership import is_key_owner, owner_visible
from .progress import ProgressDecision, ProgressTracker
from .queue import FAIRNESS_MODES, FairClock, Group, QueuedInfo, QueuePolicy, QueueWindow, weight
from .queue import plan as queue_plan
from .requests import HISTORY_MAX, MAX_PRIORITY, MIN_PRIORITY, ListTasks
from .retention import RetentionPolicy, RetentionPruner, expired_message
from .store import (
    Claim,
    ProgressWrite,
    Store,
    TaskFilter,
    decode_cursor,
    encode_cursor,
    tasks_table,
    values_with_prefix,
)
from .store_calls import StoreCalls, store_unavailable
from .tasks import get_task_type, task_type_names, type_text

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .store import PendingEnds

log = logging.getLogger("plexus_mcp_jupyter")

FINISHED_CACHE_SIZE = 1024
RECOVERY_EVERY = 10  # maintenance ticks between checks for tasks of servers that died
SCHEDULE_WINDOW = 200  # most queued tasks one scheduling pass reads
WINDOW_SPARE = 32  # tasks per group a read takes beyond a pass's need, for the next passes (QueueWindow)
# A shared queue (several servers claiming from one store's head): for this long after a claim found tasks of the
# head taken by another server, a pass looks at twice the head per group (`TaskManager._head`).
CONTENDED_SECONDS = 10.0
QUEUE_LOOKAHEAD = 200  # most queued tasks whose exact position get_task computes (beyond: by priority and age)
DURATIONS_KEPT = 20  # recent run times per task type behind estimated starts
HOST = os.uname().nodename if hasattr(os, "uname") else "localhost"


@dataclass(slots=True)
class ListedPage:
    """A page of a listing as the store answered it (kept by the listing cache while it holds), with its stored
    tasks' listing rows (`Task.list_row`) once asked for."""

    tasks: tuple[Task, ...]
    next_cursor: str | None
    _rows: list[dict[str, Any]] | None = None

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = [list_row(task) for task in self.tasks]
        return self._rows


def list_row(task: Task) -> dict[str, Any]:
    return task.list_row(type_text(task.type))


@dataclass
class CancelOutcome:
    """What an operation on one task did: cancelling it, or (core/batches.py) retrying or re-prioritising it."""

    task_id: str
    outcome: str  # cancelled | cancelling | already_finished | not_found | forbidden (and batches.py's own)
    status: str | None
    message: str
    new_task_id: str | None = None  # a retry's new attempt

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "outcome": self.outcome,
            "status": self.status,
            "message": self.message,
            "new_task_id": self.new_task_id,
        }


RequestHandler = Callable[[Task, Any], Awaitable[Any]]  # answers a task's TaskContext.request of one kind
# What `_read_plan_claim` reads besides the queue: the policy, the running tasks, the fair clock, the window's view, the
# one group the queue holds (`TaskManager._single`).
PassInputs = tuple[
    QueuePolicy, list[Task], FairClock, tuple[list[Task], dict[Group, int]] | None, tuple[Group, list[Task]] | None
]


@dataclass
class _RunState:
    task: Task
    tracker: ProgressTracker
    final: Ending | None = None
    cancel_requested: bool = False
    kill_timer: asyncio.TimerHandle | None = None
    log_tail: list[str] = field(default_factory=list)
    requests: set[asyncio.Future[Any]] = field(default_factory=set)  # the task's requests being served
    exited: int | None = None  # the worker's exit code, once it has ended
    closing: ProgressDecision | None = None  # the final stage change, computed once


@dataclass
class _PendingWrite:
    """What the next batched write stores for one running task, and the events it publishes once committed."""

    task: Task
    stages: dict[int, Stage] = field(default_factory=dict)  # by order: the latest state of each changed stage
    samples: list[ProgressSample] = field(default_factory=list)
    events: list[tuple[str, Moment]] = field(default_factory=list)  # (kind, the task when it happened)
    final: bool = False
    changes: int = 0  # decisions added so far: a write that started after the last one wrote everything

    def add(self, decision: ProgressDecision) -> None:
        self.changes += 1
        for stage in decision.changed_stages:
            self.stages[stage.order] = stage
        if decision.sample is not None:
            self.samples.append(decision.sample)


class TaskManager:
    """Owns the lifecycle of every task on one store."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        executor: Executor,
        *,
        max_concurrency: int = 4,
        max_concurrency_per_owner: int = 0,
        key_slot_share: float = 1.0,
        max_priority_by_role: Mapping[str, int] | None = None,
        cancel_grace_seconds: float = 5.0,
        progress_write_interval: float = 1.0,
        max_page_size: int = 100,
        max_output_bytes: int = 65_536,
        poll_interval: float = 1.0,
        worker_environment: Mapping[str, Any] | None = None,
        calls: StoreCalls | None = None,
        request_handlers: Mapping[str, RequestHandler] | None = None,
        max_unfinished_per_key: int = 0,
        max_batch_size: int = 1000,
        lease_seconds: float | None = None,
    ) -> None:
        self.store = store
        # Store calls made from async code run here, off the event loop, each with a timeout (core/store_calls.py);
        # the runtime gives the one sized by db_pool_size and db_pool_timeout_seconds.
        self.calls = calls or StoreCalls(4, 30.0)
        self._owns_calls = calls is None  # closed at stop; the runtime closes the one it gives
        self.worker_environment = dict(worker_environment or {})
        # Handlers of requests tasks send to the server (TaskContext.request), by kind.
        self.request_handlers: dict[str, RequestHandler] = dict(request_handlers or {})
        # The services of internal task types that check a batch spec's params for a caller (core/batches.py
        # SpecPlanner: the evaluation service registers "evaluation"), by task type.
        self.spec_planners: dict[str, Callable[[Mapping[str, Any], Any], Awaitable[Any]]] = {}
        # 0: no cap; API keys (owners key:<id>) may have at most this many unfinished tasks.
        self.max_unfinished_per_key = max_unfinished_per_key
        self.max_batch_size = max_batch_size  # most tasks one batch call may touch (core/batches.py)
        self.bus = bus
        # Listing pages read from the store, served again while no write and no event could have changed them
        # (core/listing_cache.py), by (filter, limit, position).
        self._pages: PageCache[ListedPage] = PageCache(self._listing_generation)
        self.executor = executor
        self.max_concurrency = max_concurrency
        self.max_concurrency_per_owner = max_concurrency_per_owner
        # One API key's share of the slots (owners key:<id>), so that no key holds every slot.
        self.key_slot_share = key_slot_share
        # The highest priority a caller of each role may set (a role not named has the full range).
        self.max_priority_by_role = dict(max_priority_by_role or {})
        self.cancel_grace_seconds = cancel_grace_seconds
        self.progress_write_interval = progress_write_interval
        self.max_page_size = max_page_size
        self.max_output_bytes = max_output_bytes
        self.poll_interval = poll_interval
        # Who claims a task: executor, host, process id and a per-start instance id, so a restarted
        # server that got the same process id (PID 1 in a container) still sees its old claims as gone.
        self.instance, self.server_id = self._new_claimant()
        self._running: dict[str, _RunState] = {}
        self._finished: OrderedDict[str, Task] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._schedule_pending = False
        self._queue_empty = False  # the last read of the queue found nothing left to start
        self._queue_version = 0  # counts the changes that may have queued tasks (`_queue_changed`)
        self._window: QueueWindow | None = None  # the queue's head as the last read saw it, less what started
        # PostgreSQL: the one (priority, owner) group the queue held at the last read, nothing queued since in another
        # (`_queue_changed`), and that read's head of it (what a plan of its next starts looks like): passes then
        # claim the group's first tasks without reading the queue (`Store.claim_group_head`).
        self._single: tuple[Group, list[Task]] | None = None
        # Planned starts another server claimed first, a pass planned again for each (only the claims a SQLite
        # store commits with a batched write, `_pass_after`: a pass's own claims plan around what others took,
        # Store.claim_planned); and the tasks of the head those claims found gone.
        self.claims_lost = 0
        self.claims_gone = 0
        self._contended_at = float("-inf")  # when a claim last found tasks of the head gone (monotonic)
        # Writes of running tasks gathered during one turn of the loop, committed together (_flush).
        self._pending: dict[str, _PendingWrite] = {}
        self._flush_scheduled = False
        self._maintenance: asyncio.Task[None] | None = None
        self._stopping = False
        self.started = False
        # The queue model (core/queue.py), resources and retention; configure_queue / configure_retention.
        self.type_caps: dict[str, int] = {}
        self.fairness = "round_robin"
        self.role_weights: dict[str, float] = {}
        self.configured_resources: res.Resources = {}
        self.retention = RetentionPolicy()
        # Told (on the retention thread, so quickly) the ids of tasks retention removed: what lives beside
        # the store (an evaluation's item files) follows them.
        self.pruned_listeners: list[Callable[[list[str]], None]] = []
        self.pruner: RetentionPruner | None = None
        self._durations: dict[str, deque[float]] = {}
        self._fair = FairClock()  # how owners have shared the starts so far
        self._queue_info: tuple[dict[str, QueuedInfo], dict[str, int]] | None = None  # per scheduling pass
        # How long a claim holds a RUNNING task without a heartbeat (core/leases.py renews it); None: no lease,
        # a task of a gone server is recovered by process id on its host only.
        self.lease_seconds = lease_seconds
        # A networked store (PostgreSQL): the scheduler's and the batched writes' store calls run on one writer
        # thread, in order, off the event loop (SQLite, a local file, answers in microseconds: they stay on it).
        self.offload = store.engine.dialect.name != "sqlite"
        self._direct_claims = store.engine.dialect.name == "postgresql"
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._scheduling = False  # a scheduling pass is reading or claiming on the writer thread
        self._starting: dict[str, Task] = {}  # started at once by adispatch, their insert under way
        # adispatch's creates, stored a group at a time (core/creates.py)
        self._creates = CreateGroups(self._store_creates, self._created, self._write if self.offload else None)
        self._counting = threading.Lock()  # one create's store work at a time: a group's, or dispatch's
        self._flushing = False  # a batched write is being committed on the writer thread
        self._flush_held = False  # a write that ends tasks waits for the pass under way, to carry the next one
        self._requeueing: set[str] = set()  # ended tasks whose re-queue is under way on the writer thread
        self._recovering: asyncio.Task[None] | None = None  # a lease keeper's recovery under way (recover_soon)
        self._recover_again = False  # asked for again while it ran
        # Called with (task id, level, line) for each line a task logs (ctx.log, its warnings), on the loop.
        self.log_listeners: list[Callable[[str, str, str], None]] = []

    def _new_claimant(self) -> tuple[str, str]:
        """A fresh instance id and the server id that claims tasks with it (executor, host, process, instance)."""
        instance = uuid.uuid4().hex[:12]
        claimant = f"{self.executor.name}:{HOST}:{os.getpid()}:{instance}"
        return instance, f"{claimant}:{MACHINE}" if MACHINE else claimant

    def configure_queue(
        self,
        *,
        type_caps: Mapping[str, int] | None = None,
        fairness: str = "round_robin",
        role_weights: Mapping[str, float] | None = None,
        resources: Mapping[str, int] | None = None,
    ) -> None:
        """Set the queue model: per-type caps, how owners share a priority, and the executor's capacity
        overrides (`executor_resources`). See core/queue.py."""
        if fairness not in FAIRNESS_MODES:
            raise InvalidArgument(f"queue_fairness must be one of {', '.join(FAIRNESS_MODES)}, not {fairness!r}")
        self.type_caps = dict(type_caps or {})
        self.fairness = fairness
        self.role_weights = dict(role_weights or {})
        self.configured_resources = dict(resources or {})

    def configure_retention(self, policy: RetentionPolicy, *, interval: float = 60.0, batch: int = 500) -> None:
        """Keep finished tasks as `policy` says; prune every `interval` seconds, `batch` tasks at a time."""
        if self.pruner is not None:
            self.pruner.stop()
        self.retention = policy
        self.pruner = RetentionPruner(
            self.store.prune_expired, policy, interval=interval, batch=batch, on_pruned=self._forget_pruned
        )
        if self.started:
            self.pruner.start()

    def _forget_pruned(self, ids: list[str]) -> None:
        # Called on the pruning thread: the finished-task cache belongs to the loop.
        for listener in list(self.pruned_listeners):
            listener(ids)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._drop_finished, ids)

    def _drop_finished(self, ids: list[str]) -> None:
        for task_id in ids:
            self._finished.pop(task_id, None)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from an earlier crash, then start scheduling. Idempotent."""
        if self.started:
            return
        self.started = True
        self._stopping = False
        self.instance, self.server_id = self._new_claimant()  # per start: a restart of this object is a new claimant
        self._loop = asyncio.get_running_loop()
        self.executor.size_for(self.max_concurrency)
        self.executor.start(self._loop)
        await self.arecover()
        self._maintenance = self._loop.create_task(self._maintain(), name="plexus-task-maintenance")
        if self.pruner is not None:
            self.pruner.start()
        self._schedule()

    @property
    def stopping(self) -> bool:
        """True once the server began to stop: running tasks end as FAILED (or re-queued), not cancelled."""
        return self._stopping

    def begin_stop(self) -> None:
        """Mark the shutdown before the faces close, so that calls cut short by it do not cancel tasks."""
        self._stopping = True

    async def stop(self) -> None:
        """Stop every running task (cooperatively, then forcibly) and record why."""
        if not self.started:
            return
        self._stopping = True
        if self._maintenance is not None:
            self._maintenance.cancel()
        if self.pruner is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pruner.stop)
        await self.executor.shutdown(self.cancel_grace_seconds)
        # Let the executor's final callbacks run, then resolve anything that did not report.
        for _ in range(10):
            if not self._running:
                break
            await asyncio.sleep(0.01)
        for task_id in list(self._running):
            self._finish(task_id, exitcode=None)
        self._flush()
        if self.offload:  # the final writes commit on the writer thread: wait for them (bounded)
            deadline = time.monotonic() + 10
            while (
                self._pending or self._flushing or self._requeueing or self._recovering
            ) and time.monotonic() < deadline:
                if not self._flushing:
                    self._flush()
                await asyncio.sleep(0.01)
        if self._writer is not None:
            self._writer.shutdown(wait=False)
            self._writer = None
        if self._owns_calls:
            self.calls.close()
        self.started = False

    def recover(self, running: Sequence[Task] | None = None) -> None:
        """Resolve tasks left RUNNING by a server that is gone: fail them, or re-queue idempotent ones, here on
        the calling thread. `running`: the RUNNING tasks, when the caller read them; else they are read here.
        The server itself calls `arecover` (off the loop on a networked store)."""
        self._recovered(self._take_over_gone(running, set(self._running)))

    async def arecover(self) -> None:
        """`recover`, with its store calls (the RUNNING read and the take-overs) on the writer thread on a
        networked store, so the loop never waits for PostgreSQL (a lock, a slow disk); announced on the loop."""
        if not self.offload:
            self.recover()
            return
        self._recovered(await self._write(self._take_over_gone, None, set(self._running)))

    def recover_soon(self) -> None:
        """Run `arecover` once the current work is done (the lease keeper's call, on the loop); one at a time,
        and one more after it when asked for meanwhile (the servers it found gone may have left more)."""
        if self._recovering is not None:
            self._recover_again = True
            return
        if self._loop is None or self._stopping:
            return
        self._recovering = self._loop.create_task(self._recover_in_turn(), name="plexus-recover")

    async def _recover_in_turn(self) -> None:
        try:
            await self.arecover()
        except Exception as exc:
            unavailable = store_unavailable(exc)
            if unavailable is None:
                log.exception("Plexus: recovering the tasks of a gone server failed; the next heartbeat retries")
            else:
                log.warning(
                    "Plexus: recovering the tasks of a gone server: %s; the next heartbeat retries", unavailable
                )
        finally:
            self._recovering = None
        if self._recover_again:
            self._recover_again = False
            self.recover_soon()

    def _take_over_gone(self, running: Sequence[Task] | None, here: set[str]) -> list[tuple[Task, bool, Task | None]]:
        """The store side of recovery (any thread: it reads only its arguments, the store and this server's
        ids): take over each RUNNING task whose server is gone and resolve it in the same transaction. `here`:
        the ids running on this server. Returns each task taken over, whether it was re-queued, and (re-queued)
        the row as it is now, to announce."""
        outcomes: list[tuple[Task, bool, Task | None]] = []
        for task in self.store.tasks_with_status(TaskStatus.RUNNING) if running is None else running:
            if task.id in here or not _owner_gone(task.worker, self.instance, task.lease_expires_at):
                continue
            # Several servers may notice the same gone server: only the one whose conditional take-over wins
            # resolves the task (a task re-queued twice could run twice), in the take-over's own transaction.
            previous, at = task.worker, now()
            requeue = self._idempotent(task.type) and not task.cancel_requested
            final = None if requeue else self._ended_elsewhere(task, at)
            if self.store.take_over(
                task.id,
                previous=previous,
                worker=self.server_id,
                lease_expires_at=self._lease_end(at),
                requeue=requeue,
                final=final,
            ):
                outcomes.append((task, requeue, self.store.get_task(task.id) if requeue else None))
        return outcomes

    def _recovered(self, outcomes: list[tuple[Task, bool, Task | None]]) -> None:
        """Announce the tasks recovery took over (`_take_over_gone`), on the loop."""
        for task, requeued, now_queued in outcomes:
            if requeued:
                self._requeued(task.id, "left running by a stopped server", now_queued)
                continue
            log.warning("Plexus: task %s left RUNNING by a stopped server is now %s", task.id, task.status.value)
            self.bus.publish(_final_kind(task.status), "task", task.id, task.summary())

    def _ended_elsewhere(self, task: Task, at: float) -> ProgressWrite:
        """The final write of a task whose server is gone, as this server (taking it over) records it; its
        `worker` stays the gone server's claim, which ran it."""
        for stage in task.stages:
            if stage.status == StageStatus.RUNNING:
                stage.status = StageStatus.FAILED
                stage.completed_at = at
        task.status = TaskStatus.CANCELLED if task.cancel_requested else TaskStatus.FAILED
        task.completed_at = at
        task.estimated_completion_at = None
        task.error_message = (
            "cancelled: the server stopped before the task ended"
            if task.cancel_requested
            else "server restarted while the task was running"
        )
        return ProgressWrite(task, task.stages, [], final=True)

    def _lease_end(self, at: float) -> float | None:
        """Until when a task this server claims at `at` is held before its heartbeat renews it (core/leases.py)."""
        return at + self.lease_seconds if self.lease_seconds else None

    def _requeue_ended(self, task_id: str, why: str) -> None:
        """Re-queue a task whose run here ended (`_finish`: this server stops, or its Dask worker died) and drop
        its run state once that committed. On a networked store the re-queue runs on the writer thread, after
        the writes asked before it (`_requeue_off_loop`); until it commits the task keeps its slot. If the
        store fails, the task keeps its slot and `_maintain` retries (at shutdown its lease runs out instead)."""
        self._pending.pop(task_id, None)  # its progress would write a worker and stages over the re-queued row
        if self.offload:
            if task_id not in self._requeueing and self._loop is not None:
                self._requeueing.add(task_id)
                self._loop.create_task(self._requeue_off_loop(task_id, why), name="plexus-requeue")
            return
        try:
            held, task = self._requeue_and_read(task_id)
        except Exception:
            log.exception("Plexus: could not re-queue task %s", task_id)
            return
        self._requeue_done(task_id, why, held, task)

    async def _requeue_off_loop(self, task_id: str, why: str) -> None:
        try:
            held, task = await self._write(self._requeue_and_read, task_id)
        except Exception as exc:
            unavailable = store_unavailable(exc)
            if unavailable is None:
                log.exception("Plexus: could not re-queue task %s", task_id)
            else:
                log.warning("Plexus: could not re-queue task %s (%s)", task_id, unavailable)
            return
        finally:
            self._requeueing.discard(task_id)
        self._requeue_done(task_id, why, held, task)

    def _requeue_and_read(self, task_id: str) -> tuple[bool, Task | None]:
        """The store side of `_requeue_ended` (any thread): re-queue the task while this server holds it (another
        server may have taken it over meanwhile: `_taken_over`), and read the re-queued row to announce."""
        if not self.store.requeue(task_id, holder=self.server_id):
            return False, None
        return True, self.store.get_task(task_id)

    def _requeue_done(self, task_id: str, why: str, held: bool, task: Task | None) -> None:
        """After `_requeue_and_read`, on the loop: release the task's slot and announce it, or stop it here if
        another server holds it now."""
        if not held:
            self._taken_over(task_id)
            return
        self._running.pop(task_id, None)
        self._requeued(task_id, why, task)

    def _taken_over(self, task_id: str) -> None:
        """Another server took this task over: this server's lease on it ran out (it stalled, or lost the store,
        for longer than server_lease_seconds), so the row is that server's now. The run here is stopped, and
        nothing more of it is written (writes are conditional on the holder) or announced."""
        self._pending.pop(task_id, None)
        state = self._running.pop(task_id, None)
        log.warning(
            "Plexus: task %s was taken over by another server (this server's lease on it ran out): its "
            "run here is stopped and not recorded",
            task_id,
        )
        if state is None:
            return
        for request in state.requests:
            request.cancel()
        if state.kill_timer is not None:
            state.kill_timer.cancel()
        if state.exited is None:
            self.executor.request_cancel(task_id)
            if self._loop is not None:
                self._loop.call_later(self.cancel_grace_seconds, self.executor.kill, task_id)
        self._schedule_soon(slot_freed=True)

    def _requeued(self, task_id: str, why: str, task: Task | None) -> None:
        """Announce a task just put back in the queue (`task`: its row as re-queued, None if it is gone
        meanwhile), and let the scheduler look at the queue."""
        self._finished.pop(task_id, None)
        log.warning("Plexus: re-queued task %s (%s)", task_id, why)
        if task is not None:
            self.bus.publish("task.updated", "task", task.id, task.summary())
        self._schedule_soon()

    # -- queries -------------------------------------------------------------------------------

    def get(self, task_id: str, viewer: str | None = None) -> Task:
        """The task with live progress (running tasks are read from memory, fresher than the store).

        With `viewer` (a non-admin caller's owner), a task it may not see is NotFound, like a missing one.
        A task pruned by retention is Expired (a NotFound that says when), if the caller could see it.
        This reads the store on the calling thread: the faces use `aget`, which reads it off the loop.
        """
        task = self._in_memory(task_id)
        if task is None:
            task = self._from_store(task_id, *self._read_stored(task_id), viewer)
        return self._visible(task, viewer)

    async def ids_with_prefix(self, prefix: str, viewer: str | None, limit: int, *, batch: bool = False) -> list[str]:
        """Task ids (or batch ids) starting with `prefix` that `viewer` may see, newest first (completion), read off
        the event loop."""
        t = tasks_table
        column = t.c.batch_id if batch else t.c.id
        return await self.calls.run(
            values_with_prefix, self.store.engine, column, t.c.owner, t.c.created_at, prefix, viewer, limit
        )

    async def aget(self, task_id: str, viewer: str | None = None) -> Task:
        """`get` for the faces: a task that is not in memory is read from the store off the event loop
        (`calls`: StoreUnavailable when the database does not answer in time)."""
        task = self._in_memory(task_id)
        if task is None:
            stored, tombstone = await self.calls.run(self._read_stored, task_id)
            # It may have started (or ended) on this server while the store was read: memory is fresher.
            task = self._in_memory(task_id) or self._from_store(task_id, stored, tombstone, viewer)
        return self._visible(task, viewer)

    def task_in_memory(self, task_id: str) -> Task | None:
        """The task as this server holds it (running, or recently finished here), without a store read; None
        otherwise. For listeners of the bus that need more than an event carries (telemetry)."""
        return self._in_memory(task_id)

    def _in_memory(self, task_id: str) -> Task | None:
        state = self._running.get(task_id)
        if state is not None:
            return state.task
        task = self._finished.get(task_id)
        if task is not None:
            self._finished.move_to_end(task_id)
        return task

    def _read_stored(self, task_id: str) -> tuple[Task | None, dict[str, Any] | None]:
        """The stored task, or the tombstone retention left of it (store reads only: any thread)."""
        task = self.store.get_task(task_id)
        return task, (self.store.tombstone(task_id) if task is None else None)

    def _from_store(
        self, task_id: str, task: Task | None, tombstone: dict[str, Any] | None, viewer: str | None
    ) -> Task:
        if task is None:
            if tombstone is not None and owner_visible(tombstone["owner"], viewer):
                raise Expired(expired_message(task_id, tombstone))
            raise NotFound(f"no task with id {task_id!r}; list_tasks shows the ids that exist")
        if task.status.is_final:
            self._remember_finished(task)
        return task

    @staticmethod
    def _visible(task: Task, viewer: str | None) -> Task:
        if not owner_visible(task.owner, viewer):
            raise NotFound(f"no task with id {task.id!r}; list_tasks shows the ids that exist")
        return task

    def _remember_finished(self, task: Task) -> None:
        # A task in a final state never changes again, so it can be served from memory: assistants
        # poll get_task on finished tasks often, and the store read dominated that call.
        self._finished[task.id] = task
        self._finished.move_to_end(task.id)
        while len(self._finished) > FINISHED_CACHE_SIZE:
            self._finished.popitem(last=False)

    def build_filter(
        self,
        status: str | Sequence[str] | None = None,
        type_names: str | Sequence[str] | None = None,
        since: str | None = None,
        owner: str | None = None,
        viewer: str | None = None,
        batch: str | None = None,
        before: str | None = None,
    ) -> TaskFilter:
        """Validate raw filter values (from MCP, REST or a URI) into a TaskFilter."""
        statuses = tuple(TaskStatus.parse(s) for s in _as_list(status))
        known = task_type_names()
        types = tuple(_as_list(type_names))
        for t in types:
            if t not in known:
                raise InvalidArgument(f"unknown task type {t!r}; expected one of {', '.join(known)}")
        return TaskFilter(
            statuses=statuses,
            types=types,
            since=parse_iso(since) if since else None,
            owner=owner,
            viewer=viewer,
            batch_id=batch or None,
            before=parse_iso(before, "created_before") if before else None,
        )

    def task_filter(self, request: ListTasks, viewer: str | None) -> TaskFilter:
        """The filter of a ListTasks request as `viewer` may see it; its task types checked against the registered
        ones, its time parsed (InvalidArgument names what is wrong)."""
        return self.build_filter(
            status=list(request.status),
            type_names=list(request.type),
            since=request.since,
            viewer=viewer,
            batch=request.batch,
        )

    def parse_limit(self, text: str | None) -> int | None:
        """A page size given as text (URI and query parameters); None when absent."""
        if text is None or text == "":
            return None
        if not (text.isascii() and text.isdigit()):
            raise InvalidArgument(f"limit must be a whole number from 1 to {self.max_page_size}, not {text!r}")
        return self.check_limit(int(text))

    @staticmethod
    def check_history_limit(limit: int) -> int:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= HISTORY_MAX:
            raise InvalidArgument(f"history_limit must be a whole number from 1 to {HISTORY_MAX}, not {limit!r}")
        return limit

    def check_limit(self, limit: int | None, default: int = 20) -> int:
        if limit is None:
            return min(default, self.max_page_size)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= self.max_page_size:
            raise InvalidArgument(f"limit must be a whole number from 1 to {self.max_page_size}, not {limit!r}")
        return limit

    def list_tasks(
        self, flt: TaskFilter, *, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[Task], str | None]:
        """One page of tasks, newest first, and the cursor of the next page (None on the last). Reads the store
        on the calling thread: the faces use `alist_tasks`."""
        limit = self.check_limit(limit)
        after = decode_cursor(cursor, flt) if cursor else None
        return self._merge_page(flt, *self.store.list_tasks(flt, limit=limit, after=after))

    async def alist_tasks(
        self, flt: TaskFilter, *, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[Task], str | None]:
        """`list_tasks` for the faces: the page is read off the event loop (or served again while nothing could
        have changed it: core/listing_cache.py), then merged with the running tasks (fresher in memory) on it."""
        page = await self._listed(flt, limit, cursor)
        return self._with_running(page.tasks), page.next_cursor

    async def alist_rows(
        self, request: ListTasks, viewer: str | None
    ) -> tuple[list[Task], list[dict[str, Any]], str | None]:
        """One page of a ListTasks request (the list_tasks tool, the tasks resource, the REST list): its tasks and
        each one's listing row (`Task.list_row`). A stored task's row is made once per kept page (the summaries were
        about 70% of the tool's own time when made on every call); a running task's, from memory, on every call.
        The rows are shared between calls: not to be changed."""
        page = await self._listed(self.task_filter(request, viewer), request.limit, request.cursor)
        tasks = self._with_running(page.tasks)
        rows = [
            kept if task is stored else list_row(task)
            for task, stored, kept in zip(tasks, page.tasks, page.rows(), strict=True)
        ]
        return tasks, rows, page.next_cursor

    async def _listed(self, flt: TaskFilter, limit: int | None, cursor: str | None) -> ListedPage:
        limit = self.check_limit(limit)
        after = decode_cursor(cursor, flt) if cursor else None
        key = (flt, limit, after)
        page = self._pages.get(key)
        if page is None:
            read_at = self._pages.generation()
            read = functools.partial(self.store.list_tasks, flt, limit=limit, after=after)
            stored, next_key = await self.calls.run(read)
            page = ListedPage(tuple(stored), encode_cursor(next_key, flt) if next_key else None)
            self._pages.put(key, read_at, page)
        return page

    def _listing_generation(self) -> tuple[int, int]:
        """What moves whenever a listing may have changed: a write to the store from this process, an event
        (which is how other servers' changes arrive)."""
        return self.store.writes.value, self.bus.last_seq

    def current(self, task_id: str, stored: Task | None) -> Task:
        """The task as it is now: its copy in memory (a running task's is fresher than the store), else `stored`
        (read by the caller, off the loop); NotFound when neither exists."""
        task = self._in_memory(task_id) or stored
        if task is None:
            raise NotFound(f"no task with id {task_id!r}; list_tasks shows the ids that exist")
        return task

    def _merge_page(
        self, flt: TaskFilter, page: list[Task], next_key: tuple[float, str] | None
    ) -> tuple[list[Task], str | None]:
        return self._with_running(page), (encode_cursor(next_key, flt) if next_key else None)

    def _with_running(self, page: Sequence[Task]) -> list[Task]:
        running = self._running
        return [running[t.id].task if t.id in running else t for t in page]

    async def ahistory(self, task_id: str, limit: int) -> tuple[list[ProgressSample], int]:
        """A task's most recent progress samples (at most `limit`) and how many there are, read off the loop.

        A task running here may have samples not written yet (a batched write waits, or is under way on the
        writer thread) while `aget` already shows its state from memory: they are added, so that the history
        agrees with the task. Taken before the read, and those the read already found are left out."""
        limit = self.check_history_limit(limit)
        pending = self._pending.get(task_id)
        unwritten = list(pending.samples) if pending is not None else []
        samples, total = await self.calls.run(functools.partial(self.store.history, task_id, limit=limit))
        if unwritten:
            stored = {(s.at, s.stage, s.processed) for s in samples}
            extra = [s for s in unwritten if (s.at, s.stage, s.processed) not in stored]
            samples, total = (samples + extra)[-limit:], total + len(extra)
        return samples, total

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in TaskStatus}
        counts.update(self.store.counts_by_status())
        return counts

    # -- commands ------------------------------------------------------------------------------

    def dispatch(
        self,
        type_name: str,
        params: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        owner: str | None = None,
        description: str | None = None,
        internal: bool = False,
        role: str | None = None,
        record: Callable[[Task, Any], None] | None = None,
        checked: bool = False,
    ) -> Task:
        """Create a task, QUEUED, and return it at once; the scheduler starts it when a slot is free.

        Internal task types (evaluations) are refused unless `internal`: only their service creates them.
        `role` is the dispatching caller's role: a priority above its ceiling (`max_priority_by_role`) is
        refused. None is the server's own work, with the full range. `record(task, connection)` writes what
        must exist before the task can start (an evaluation's record) in the transaction that stores it.
        `checked`: `params` are the type's validator's output already (run_demo_task parsed them).

        For in-process callers, on the loop or before it runs (the faces call `adispatch`). Its key-cap count and
        insert are the group commit's own (`_store_creates`), in line with a group written off the loop: this
        call waits for it, holding the loop meanwhile when called on it (docs/architecture.md, "A group commit of
        concurrent creates"): on a running loop, prefer `await adispatch(...)`.
        """
        task = self.new_task(
            type_name,
            params,
            priority=priority,
            owner=owner,
            description=description,
            internal=internal,
            role=role,
            checked=checked,
        )
        created = self._claim_at_once(task) if self._starts_at_once(task) else None
        entry = Create([task], self._also(task, record), created, None)
        (outcome,) = self._store_creates([entry])
        return self._created(entry, outcome)

    async def adispatch(self, type_name: str, params: Mapping[str, Any] | None = None, **options: Any) -> Task:
        """`dispatch` (same arguments) for the faces: it returns once the row exists (a `get_task` right after
        finds it). Concurrent calls are stored together (core/creates.py, a group commit): those that arrive in
        one turn of the loop, or while the group before them is written, share one transaction, each answered
        with its own task or refusal. On a networked store the group's key-cap counts and its insert, with each
        `record` written in its transaction, run on the writer thread (after the writes asked before it). A task
        started at once holds its slot meanwhile (`_starting`), so no other start takes it, and starts only once
        its row and record exist. Before `start` too (Jupyter Server listens before it starts its extensions):
        a call then waits in line with the group written meanwhile, as any other."""
        record = options.pop("record", None)
        task = self.new_task(type_name, params, **options)
        created = None
        if self._starts_at_once(task):
            created = self._claim_at_once(task)
            self._starting[task.id] = task  # holds its slot until stored and started (`_created`)
        else:
            self.queue_changing()  # a pass planned while the insert waits must read it, not a kept window
        return await self._creates.add([task], self._also(task, record), created)

    async def acreate_batch(self, tasks: list[Task], also: Callable[[Any], None] | None = None) -> None:
        """Store validated QUEUED tasks (`new_task`'s: a batch, retries) all or none, `also(connection)` written in
        their transaction, then announce them. They go in a group of concurrent creates (core/creates.py), so the
        key cap is counted for all of them in the group's store work, with the other creates of their keys: two
        batches, or a batch and single dispatches, of one key never pass it together. Refused whole, naming the
        key's count and the batch's size."""
        if not tasks:
            return
        self.queue_changing()
        await self._creates.add(tasks, also, None)

    def _store_creates(self, group: list[Create]) -> list[BaseException | None]:
        """A group of creates' store work (CreateGroups; the loop on SQLite, the writer thread on a networked
        store): each one's outcome, None when its tasks are stored. The key caps first, in the group's order (one
        count per key, a batch counted whole), then the accepted tasks in one transaction, or each create alone
        if that fails (so a failure is only its own create's). One call at a time (`_counting`): a group written
        off the loop and `dispatch` on it never count between the other's count and insert."""
        with self._counting:
            return self._count_and_insert(group)

    def _count_and_insert(self, group: list[Create]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = [None] * len(group)
        counts: dict[str | None, int] = {}  # each capped key's unfinished tasks, with the creates accepted so far
        for index, entry in enumerate(group):
            # A plain dict, not a Counter: Counter(iterable) checks isinstance(iterable, Mapping), an ABC check that
            # costs ~0.1 ms the first time, on the first create's loop.
            adding: dict[str | None, int] = {}
            for task in entry.tasks:
                if self._key_capped(task.owner):
                    adding[task.owner] = adding.get(task.owner, 0) + 1
            for owner, n in adding.items():
                if owner not in counts:
                    counts[owner] = self.unfinished_of(owner)
                outcomes[index] = outcomes[index] or self.key_cap_error(counts[owner], n)
            if outcomes[index] is None:
                for owner, n in adding.items():
                    counts[owner] += n
        accepted = [entry for entry, outcome in zip(group, outcomes, strict=True) if outcome is None]
        if len(accepted) > 1:
            try:
                self._insert_creates(accepted)
                return outcomes
            except Exception:
                log.debug("Plexus: a group of %d creates failed; each is tried alone", len(accepted), exc_info=True)
        for index, entry in enumerate(group):
            if outcomes[index] is None:
                try:
                    self._insert_creates([entry])
                except Exception as exc:
                    outcomes[index] = exc
        return outcomes

    def _insert_creates(self, entries: list[Create]) -> None:
        """The tasks of `entries` in one transaction: their rows, then each create's `also`."""
        self.store.create_group([task for entry in entries for task in entry.tasks], [entry.also for entry in entries])

    def _created(self, entry: Create, outcome: BaseException | None) -> Task:
        """On the loop, once a create's group is written: its task announced (and started, if it was to start at
        once), or its refusal raised."""
        task, created = entry.task, entry.created
        if created is not None:
            self._starting.pop(task.id, None)  # held by adispatch; `dispatch` stores at once
        if outcome is not None:
            if created is not None:  # its slot was held for nothing: a pass may fill it
                self._schedule_soon(slot_freed=True)
            raise outcome
        if created is not None:
            return self._started_at_once(task, created)
        self.announce(entry.tasks)
        return task

    @staticmethod
    def _also(task: Task, record: Callable[[Task, Any], None] | None) -> Callable[[Any], None] | None:
        """What `create_task` writes in the task's own transaction: `record(task, connection)`, if any."""
        return (lambda conn: record(task, conn)) if record is not None else None

    def _starts_at_once(self, task: Task) -> bool:
        """True when a scheduling pass right now would start `task` and nothing else: nothing is queued (the
        last pass started every queued task), a slot is free, and the queue model lets it run (its owner's and
        its type's caps, its resources). The common case of a server that keeps up with its callers."""
        if self._loop is None or self._stopping or not self._queue_empty or self._scheduling:
            return False
        if len(self._running) + len(self._starting) >= self.max_concurrency:
            return False
        running = self._running_tasks()
        return bool(queue_plan([task], running, self._policy(), clock=self._fair).starts)

    def _running_tasks(self) -> list[Task]:
        """The tasks running here, and those being stored already started (`adispatch`): what a plan counts."""
        return [state.task for state in self._running.values()] + list(self._starting.values())

    def _claim_at_once(self, task: Task) -> Task:
        """Make `task` claimed by this server, to be stored so (one insert, no queue read and no claim); returns
        it as it was created (QUEUED: what the caller asked for)."""
        created = dataclasses.replace(task)
        self._mark_claimed(task, now())
        return created

    def _started_at_once(self, task: Task, created: Task) -> Task:
        """Once `task` is stored claimed (with its record, if any): announce it as created and started, and
        start it."""
        self.bus.publish("task.created", "task", task.id, created.summary())
        self._fair.commit(task.owner, weight(task, self._policy()))
        self._queue_info = None
        self._start(task)
        return created

    def _mark_claimed(self, task: Task, at: float) -> None:
        """The in-memory task as this server's claim stores it (Store.claim_many, or an insert already claimed)."""
        task.status, task.started_at, task.worker = TaskStatus.RUNNING, at, self.server_id
        task.lease_expires_at = self._lease_end(at)

    def _key_capped(self, owner: str | None) -> bool:
        return bool(self.max_unfinished_per_key and is_key_owner(owner))

    def unfinished_of(self, owner: str | None) -> int:
        """The owner's QUEUED and RUNNING tasks in the store."""
        return self.store.count_tasks(TaskFilter(statuses=(TaskStatus.QUEUED, TaskStatus.RUNNING), owner=owner))

    def key_cap_error(self, unfinished: int, adding: int) -> InvalidArgument | None:
        """The refusal of `adding` more tasks for a key that has `unfinished`, if that is over max_tasks_per_key."""
        if unfinished + adding <= self.max_unfinished_per_key:
            return None
        asked = "" if adding == 1 else f" and asks for {adding} more"
        return InvalidArgument(
            f"this API key has {unfinished} unfinished tasks{asked}, more than the "
            f"{self.max_unfinished_per_key} allowed (max_tasks_per_key): wait for some to finish, or cancel "
            "some, before starting more"
        )

    def new_task(
        self,
        type_name: str,
        params: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        owner: str | None = None,
        description: str | None = None,
        internal: bool = False,
        role: str | None = None,
        batch_id: str | None = None,
        retry_of: str | None = None,
        checked: bool = False,
    ) -> Task:
        """A validated QUEUED task, not yet stored (dispatch stores one; core/batches.py many at once).
        `checked`: `params` are the type's validator's output already."""
        task_type = get_task_type(type_name)
        if task_type.internal and not internal:
            raise InvalidArgument(
                f"{type_name} tasks are created by {task_type.created_by or 'their own service'}, "
                "not dispatched directly"
            )
        params = dict(params or {})
        if task_type.validate is not None and not checked:
            params = task_type.validate(params)
        if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidArgument(
                f"priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} (higher runs first), "
                f"not {priority!r}"
            )
        self.check_priority(priority, role)
        self.check_fits(task_type.name)
        return Task(
            id=str(uuid.uuid4()),
            type=task_type.name,
            status=TaskStatus.QUEUED,
            priority=priority,
            owner=owner,
            params=params,
            description=description or task_type.description,
            owner_role=role,
            batch_id=batch_id,
            retry_of=retry_of,
        )

    def announce(self, tasks: Iterable[Task], kind: str = "task.created") -> None:
        """Publish one event per task changed by a bulk write, then let the scheduler look at the queue."""
        groups = set()
        for task in tasks:
            self.bus.publish(kind, "task", task.id, task.summary())
            groups.add((task.priority, task.owner))
        single = self._single
        self.queue_changed()
        if single is not None and groups <= {single[0]}:
            self._single = single  # the queue still holds that group alone (`_read_plan_claim`)

    def check_priority(self, priority: int, role: str | None) -> None:
        """InvalidArgument when `priority` is above the ceiling of `role` (refused, never clamped: the caller
        learns that its task would not have run as early as it asked)."""
        ceiling = self.max_priority_by_role.get(role) if role is not None else None
        if ceiling is not None and priority > ceiling:
            raise InvalidArgument(
                f"priority {priority} is above {ceiling}, the highest a caller with the {role} role may set "
                f"(setting max_priority_{role}); give a priority from {MIN_PRIORITY} to {ceiling}, or ask an admin, "
                f"who may use up to {MAX_PRIORITY}"
            )

    # -- the queue model: resources, caps, positions (core/queue.py) -----------------------------

    def capacity(self) -> res.Resources:
        """What this server may run at once: the executor's capacity, `executor_resources` over it, and
        `max_concurrency` worker slots (fewer if `executor_resources` names fewer)."""
        total = {**self.executor.capacity(), **self.configured_resources}
        total["slots"] = min(self.max_concurrency, self.configured_resources.get("slots", self.max_concurrency))
        return total

    @staticmethod
    def needs(task_type: str) -> dict[str, int]:
        """What one task of this type needs (its registry entry; one slot when the type is gone)."""
        try:
            return dict(get_task_type(task_type).resources)
        except InvalidArgument:
            return dict(res.DEFAULT_NEEDS)

    def check_fits(self, task_type: str) -> None:
        """InvalidArgument when one task of this type needs more than the whole capacity: it could never start.

        Slots count only when max_concurrency > 0 (0 pauses the queue; it does not make every task too big).
        """
        capacity = self.capacity()
        if self.max_concurrency == 0:
            capacity["slots"] = max(capacity["slots"], self.configured_resources.get("slots", 1) or 1)
        short = res.shortfall(self.needs(task_type), capacity)
        if short:
            detail = "; ".join(
                f"{name}: needs {need}, the executor has {have} in all" for name, (need, have) in sorted(short.items())
            )
            raise InvalidArgument(
                f"a {task_type} task needs more than this server can ever give it ({detail}): it would wait "
                "forever, so it is refused; raise the capacity (executor_resources, max_concurrency) or run it "
                "where there is more"
            )

    def _policy(self) -> QueuePolicy:
        return QueuePolicy(
            capacity=self.capacity(),
            needs=self.needs,
            slot_cap=self.slot_cap,
            type_caps=self.type_caps,
            fairness=self.fairness,
            weights=self.role_weights,
        )

    async def queue_info(self, task: Task) -> QueuedInfo | None:
        """Where a QUEUED task stands: position, why it waits, estimated start (None for other statuses).

        Computed once per scheduling pass for the first QUEUE_LOOKAHEAD queued tasks (one bounded read
        and an O(n log n) plan), then served from memory; a task beyond them gets its position by
        priority and age from one indexed count.
        """
        if task.status is not TaskStatus.QUEUED:
            return None
        if self._queue_info is None:
            read = functools.partial(self.store.queue_window, per_owner=QUEUE_LOOKAHEAD, limit=QUEUE_LOOKAHEAD)
            window, cut = await self.calls.run(read)
            running = [state.task for state in self._running.values()]  # after the read: the plan is of now
            durations = {t: sum(d) / len(d) for t, d in self._durations.items() if d}
            planned = queue_plan(window, running, self._policy(), clock=self._fair, durations=durations, at=now())
            # A group read only in part has unread tasks that start after its last one read: from there on,
            # positions count the unread tasks of higher priorities and are marked inexact (a lower bound).
            last = {(t.priority, t.owner): i for i, t in enumerate(planned.order)}

            def exact_until(group: tuple[int, str | None]) -> int:
                if group in last:
                    return last[group]
                # Not read at all: it comes after everything of a higher priority.
                return next((i - 1 for i, t in enumerate(planned.order) if t.priority <= group[0]), len(planned.order))

            exact = min((exact_until(group) for group in cut), default=len(planned.order))
            waiting = dict(planned.waiting)
            for i, task_ahead in enumerate(planned.order[exact + 1 :], exact + 2):
                info = waiting.get(task_ahead.id)
                if info is not None:
                    unread = sum(n for (priority, _), n in cut.items() if priority > task_ahead.priority)
                    waiting[task_ahead.id] = dataclasses.replace(
                        info, position=i + unread, estimated_start_at=None, exact=False
                    )
            started = {t.id for t in planned.starts}
            starting = {t.id: i for i, t in enumerate(planned.order, 1) if t.id in started}
            self._queue_info = (waiting, starting)
        waiting, starting = self._queue_info
        info = waiting.get(task.id)
        if info is not None:
            return info
        if task.id in starting:
            return QueuedInfo(
                starting[task.id], "starting", "capacity is free: it starts in the scheduler's next pass", now()
            )
        ahead = await self.calls.run(self.store.queued_ahead, task)
        return QueuedInfo(
            ahead + 1,
            "no_slot",
            f"{ahead} queued tasks have a higher priority or are older; it "
            f"starts when they have (position by priority and age: beyond the first {QUEUE_LOOKAHEAD} "
            "tasks the scheduler plans)",
            None,
            exact=False,
        )

    async def queue_fields(self, task: Task) -> dict[str, Any]:
        """The queue and retention fields of a task's detail: `queue` (QUEUED only), `expires_at` (finished
        only), `retention_seconds` (how long it is kept once finished) and `dashboard_url` (running only)."""
        info = await self.queue_info(task)
        return {
            "queue": info.to_dict() if info is not None else None,
            "retention_seconds": self.retention.for_task(task),
            "expires_at": iso(self.retention.expires_at(task)) if task.status.is_final else None,
            # The executor's view of a running task (Dask's dashboard); None elsewhere. Last, as in TaskDetail.
            "dashboard_url": self.executor.dashboard_link(task.id) if task.id in self._running else None,
        }

    def set_retention(self, task_id: str, seconds: float) -> None:
        """Keep this task `seconds` once it has finished (a client's MCP ttl, already bounded)."""
        self.store.update_task(task_id, retention_seconds=seconds)
        for copy in (self._running[task_id].task if task_id in self._running else None, self._finished.get(task_id)):
            if copy is not None:
                copy.retention_seconds = seconds

    def slot_cap(self, owner: str | None) -> int:
        """The most tasks of `owner` that may run at once here (0: no cap but max_concurrency).

        An API key gets `key_slot_share` of the slots (at least 1), so one key never holds all of them;
        `max_concurrency_per_owner` caps every owner. Decided by the owner alone, which the store keeps
        with each task: it holds across restarts and for every face.
        """
        caps = [self.max_concurrency_per_owner] if self.max_concurrency_per_owner else []
        if is_key_owner(owner) and self.key_slot_share < 1:
            caps.append(max(1, int(self.key_slot_share * self.max_concurrency)))
        return min(caps, default=0)

    def cancel(self, task_ids: Iterable[str], *, viewer: str | None = None, others: bool = True) -> list[CancelOutcome]:
        """Cancel tasks: queued ones at once, running ones cooperatively then forcibly after the grace.

        With `viewer` (a non-admin caller's owner), tasks it may not see are not_found; without `others`,
        visible tasks owned by someone else are refused (forbidden).
        """
        outcomes = []
        for task_id in dict.fromkeys(task_ids):
            if viewer is not None or not others:
                try:
                    task = self.get(task_id, viewer)
                except NotFound as exc:
                    outcomes.append(CancelOutcome(task_id, "not_found", None, str(exc)))
                    continue
                if not others and task.owner != viewer:
                    outcomes.append(
                        CancelOutcome(
                            task_id,
                            "forbidden",
                            task.status.value,
                            f"permission denied: you may cancel only your own tasks (this one belongs to "
                            f"{task.owner or 'the local user'}); an admin may cancel it",
                        )
                    )
                    continue
            outcomes.append(self._cancel_one(task_id))
        return outcomes

    async def wait_final(self, task_ids: Iterable[str], timeout: float) -> None:
        """Wait until every given task is in a final state (or unknown), or `timeout` seconds pass."""
        pending = set(task_ids)
        done = asyncio.Event()

        def on_event(event: Event) -> None:
            if event.entity_type == "task" and event.entity_id in pending and event.data["status"] in _FINAL_NAMES:
                pending.discard(event.entity_id)
                if not pending:
                    done.set()

        remove = self.bus.add_listener(on_event)
        try:
            for task_id in list(pending):
                try:
                    # A running task's status turns final in memory before its end is stored: it counts once
                    # its final write committed (it left `_running`; the event listener hears that commit).
                    if (await self.aget(task_id)).status.is_final and task_id not in self._running:
                        pending.discard(task_id)
                except NotFound:
                    pending.discard(task_id)
            if pending:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout)
        finally:
            remove()

    # -- scheduling ----------------------------------------------------------------------------

    def queue_changed(self) -> None:
        """Call after changing the queue in the store (a task added, cancelled, re-prioritised): the queue
        positions are planned afresh and a scheduling pass follows on the loop."""
        self._queue_info = None
        self._schedule_soon()

    def queued_elsewhere(self, groups: Mapping[Group, float] | None) -> None:
        """Another server on the shared store queued tasks (their task.created events), in these (priority, owner)
        groups, each with the oldest creation time of its new tasks (None: not known): a pass follows. The kept
        window of the queue's head stays kept when it shows tasks of every such group, all older than its new ones
        (which then come after them in their group: `QueueWindow.holds`), now knowing those groups have more; else
        it is read again (`queue_changed`): a task whose create committed late, older than one the window shows,
        is started before it (FIFO within (priority, owner)). Either way the queue's version moves, so a pass under
        way that read the queue before (it may not have seen the new tasks) neither keeps its read nor takes the
        queue for empty."""
        window = self._window
        keep = groups is not None and window is not None and window.version == self._queue_version
        single = self._single
        self._queue_info = None
        self._queue_changed()
        if single is not None and groups is not None and set(groups) <= {single[0]}:
            self._single = single  # more of the one group: its first tasks are claimed in its order all the same
        if keep and window is not None and groups is not None and window.holds(groups):
            window.more(groups)
            window.version = self._queue_version
            self._window = window
        self._schedule_soon(slot_freed=True)  # (the queue is no longer known to be empty: _queue_changed)

    def queue_changing(self) -> None:
        """Call before queueing or re-prioritising tasks from another thread: until the change is announced
        (`announce`, `queue_changed`), scheduling passes read the queue instead of planning on the window they
        kept (QueueWindow), so a pass that runs after the write commits sees it."""
        self._queue_changed()

    def _queue_changed(self) -> None:
        """Tasks may have been queued: the queue is no longer known to be empty (see `_schedule_soon`)."""
        self._queue_empty = False
        self._queue_version += 1
        self._window = None
        self._single = None

    def _schedule_soon(self, *, slot_freed: bool = False) -> None:
        """Run the scheduler once the current work is done. `slot_freed`: only a slot came free (a task ended),
        nothing was queued, so a queue seen empty since is not read again (the maintenance tick still reads it,
        for tasks other servers queue on a shared store)."""
        if not slot_freed:
            self._queue_changed()
        if self._loop is None or self._schedule_pending:
            return
        self._schedule_pending = True
        self._loop.call_soon(self._schedule)

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the writer thread (networked stores): one thread, so the scheduler's claims and the
        batched progress writes commit in the order they were asked for, each on its own pooled connection."""
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="plexus-store-writer")
        return await asyncio.wrap_future(self._writer.submit(fn, *args))

    async def _store(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A store call of the manager's own upkeep: on the writer thread for a networked store, else here."""
        return await self._write(fn, *args) if self.offload else fn(*args)

    def _schedule(self) -> None:
        """One scheduling pass: start what the queue model (core/queue.py) says may start now. On a networked
        store the pass reads and claims on the writer thread (`_schedule_off_loop`); one pass at a time."""
        self._schedule_pending = False
        self._queue_info = None  # positions change with every pass
        if (
            self._stopping
            or self._loop is None
            or self._queue_empty
            or self.max_concurrency - len(self._running) - len(self._starting) <= 0
        ):
            return
        if self.offload:
            if self._scheduling:  # the pass under way ends with another one
                self._schedule_pending = True
                return
            self._scheduling = True
            self._loop.create_task(self._schedule_off_loop(), name="plexus-schedule")
            return
        policy = self._policy()
        running = self._running_tasks()
        read, window, cut, starts, won, started_at, gone, _ = self._read_plan_claim(
            policy, running, self._fair, self._window_view(policy), None, self._queue_version
        )
        self._start_claimed(policy, read, window, cut, starts, won, started_at, exhausted=True, gone=gone)

    def _window_view(self, policy: QueuePolicy) -> tuple[list[Task], dict[Group, int]] | None:
        """What the last read of the queue still shows, if it is still the queue's head (QueueWindow)."""
        window = self._window
        if window is None or window.version != self._queue_version:
            return None
        return window.view(self._head(policy))

    def _read_plan_claim(
        self,
        policy: QueuePolicy,
        running: list[Task],
        clock: FairClock,
        view: tuple[list[Task], dict[Group, int]] | None,
        single: tuple[Group, list[Task]] | None,
        version: int,
        conn: Connection | PendingEnds | None = None,
    ) -> tuple[QueueWindow | None, list[Task], dict[Group, int], list[Task], set[str], float, set[str], bool | None]:
        """A scheduling pass's store work and plan (any thread: it reads only its arguments and the store): the
        queue's head (`view`, else a read of the store, returned to be kept), what starts, which of those this
        server won the claim of (one transaction), and which tasks of the head were found gone meanwhile.

        The claim is planned against what is still claimable (`Store.claim_planned`): on a shared PostgreSQL a
        task another server took or is taking is left out and the pass planned again without it, in the claim's
        transaction, so servers planning from the same head claim different tasks and none reads the queue again
        for a lost claim. `conn`: the transaction to claim in (a write's, `Store.save_progress_then`).

        `single` (PostgreSQL; `_single`): the queue holds that one group, so the pass claims its first tasks, as many
        as a plan of the head last read starts (when that plan leaves some of the head queued, so that the slots,
        not the read, bound it), without reading the queue (`Store.claim_group_head`): two servers
        then read no queue row the other claims, nor plan again around what it took. The last item says how that
        went: None (not tried), True (claimed as many as planned), False (fewer, or the plan refused the tasks
        found: then the pass read the queue as usual)."""
        direct = None
        if single is not None:
            group, head = single
            want = _starts_of_head(head, running, policy, clock)
            # A plan that starts every task of the head was bound by what the last read found, not by the slots
            # free: more may be queued since (by another server, in this group), so the pass reads the queue.
            if 0 < want < len(head):
                types = {task.type for task in head}

                def accept(tasks: list[Task]) -> bool:
                    # Tasks of the head's one type: the plan of the head started `want` such tasks of the group.
                    if len(types) == 1 and all(task.type in types for task in tasks):
                        return True
                    return len(queue_plan(tasks, running, policy, clock=clock, reasons=False).starts) == len(tasks)

                started_at = now()
                got = self.store.claim_group_head(
                    group,
                    want,
                    accept,
                    worker=self.server_id,
                    started_at=started_at,
                    lease_expires_at=self._lease_end(started_at),
                    conn=conn,
                    kind=next(iter(types)) if len(types) == 1 else None,  # what `accept` takes unplanned
                )
                if got:  # fewer than planned: the group ran short, these start and the next pass reads the queue
                    return None, got, {group: 1}, got, {task.id for task in got}, started_at, set(), len(got) == want
                direct, view = False, None  # (a kept window does not show what other servers claimed since)
        read, window, cut, planned = self._read_plan(policy, running, clock, view, version, whole=True)
        starts = planned.starts
        started_at = now()
        if not starts:
            return read, window, cut, starts, set(), started_at, set(), direct
        by_id = {task.id: task for task in window}

        def replan(gone: set[str]) -> list[str]:
            if not gone:
                return [task.id for task in starts]
            left = [task for task in window if task.id not in gone]
            return [task.id for task in queue_plan(left, running, policy, clock=clock, reasons=False).starts]

        ids, won, gone = self.store.claim_planned(
            replan,
            worker=self.server_id,
            started_at=started_at,
            lease_expires_at=self._lease_end(started_at),
            order=[task.id for task in planned.order],
            conn=conn,
        )
        return read, window, cut, [by_id[task_id] for task_id in ids], won, started_at, gone, direct

    def _read_plan(
        self,
        policy: QueuePolicy,
        running: list[Task],
        clock: FairClock,
        view: tuple[list[Task], dict[Group, int]] | None,
        version: int,
        *,
        whole: bool = False,
    ) -> tuple[QueueWindow | None, list[Task], dict[Group, int], Any]:
        """The queue's head (`view`, else a read of the store, returned to be kept) and what starts from it (with
        `whole`: the plan, its start order too)."""
        read = None
        if view is None:
            head = self._head(policy)
            tasks, cut = self.store.queue_window(per_owner=head + WINDOW_SPARE, limit=SCHEDULE_WINDOW, exact=False)
            read = QueueWindow(version, tasks, cut)
            view = read.view(head) or (tasks, cut)
        window, cut = view
        planned = queue_plan(window, running, policy, clock=clock, reasons=False)
        return read, window, cut, planned if whole else planned.starts

    def _head(self, policy: QueuePolicy) -> int:
        """How deep passes look into the queue (tasks per group): deeper while other servers claim from the same head
        (CONTENDED_SECONDS). Any thread."""
        return _pass_head(policy, contended=time.monotonic() - self._contended_at < CONTENDED_SECONDS)

    def _claim_of(self, starts: list[Task]) -> Claim:
        started_at = now()
        return Claim([t.id for t in starts], self.server_id, started_at, self._lease_end(started_at))

    async def _schedule_off_loop(self) -> None:
        """`_schedule` on a networked store: read, plan and claim on the writer thread (one hop, with a copy of
        the owners' fair clock and of the running tasks), start on the loop. A pass asked for meanwhile runs
        right after; one that fails is retried by `_maintain`."""
        version = self._queue_version
        try:
            policy = self._policy()
            running = self._running_tasks()
            planned = await self._write(
                self._read_plan_claim,
                policy,
                running,
                self._fair.copy(),
                self._window_view(policy),
                self._single,
                version,
            )
            await self._start_planned(policy, planned, version)
        except Exception as exc:
            _log_failed_pass(exc)
        finally:
            self._pass_done()

    async def _start_planned(self, policy: QueuePolicy, planned: tuple[Any, ...], version: int) -> None:
        """On the loop: start what a pass of the writer thread (`_read_plan_claim`) claimed."""
        read, window, cut, starts, won, started_at, gone, direct = planned
        if self._stopping:  # claimed for nothing: back to the queue, for the next server
            for task_id in won:
                await self._write(self.store.requeue, task_id)
            return
        # Tasks queued while the pass ran were not in its window: the queue is not known to be empty.
        self._start_claimed(
            policy,
            read,
            window,
            cut,
            starts,
            won,
            started_at,
            exhausted=self._queue_version == version,
            gone=gone,
            direct=direct,
        )

    def _pass_done(self) -> None:
        self._scheduling = False
        if self._flush_held:  # the write held for this pass goes now, and plans the next pass with it
            self._flush_held = False
            self._flush()
            if self._scheduling:  # the pass it carries is planned after any asked for meanwhile: it is that one
                self._schedule_pending = False
                return
        if self._schedule_pending:
            self._schedule_pending = False
            self._schedule()

    def _start_claimed(
        self,
        policy: QueuePolicy,
        read: QueueWindow | None,
        window: list[Task],
        cut: Mapping[Any, int],
        starts: list[Task],
        won: set[str],
        started_at: float,
        *,
        exhausted: bool,
        gone: set[str] | None = None,
        direct: bool | None = None,
    ) -> None:
        """Start the tasks of a pass this server won. `gone`: tasks of the head the claim found taken (by another
        server, or cancelled) and planned without: they leave the kept window, which stays the queue's head.
        `direct`: how a claim of the one group's first tasks went (`_read_plan_claim`)."""
        if direct is not None:  # a kept window does not show what other servers claimed since: read again
            self._window = None
        if direct is False:  # the group ran short, or the plan refused its first tasks: passes read the queue
            self._single = None
        if read is not None:
            self._window = read
            if direct is None and self._direct_claims and read.version == self._queue_version:
                groups = {(task.priority, task.owner) for task in window} | set(cut)
                self._single = (groups.pop(), list(window)) if window and len(groups) == 1 else None
        if self._window is not None:
            self._window.taken({task.id for task in starts} | (gone or set()))  # one not won makes it stale (below)
        started = 0
        for task in starts:
            if task.id not in won:
                self.claims_lost += 1
                self._schedule_soon()  # another server on this store took it: plan again without it
                continue
            self._fair.commit(task.owner, weight(task, policy))
            self._mark_claimed(task, started_at)
            self._start(task)
            started += 1
        self.claims_gone += len(gone or ())
        if gone:
            self._contended_at = time.monotonic()
        if (gone or direct is False) and not self._schedule_pending:
            # The pass was planned without what others took: slots may be left that the queue's unread tail (or
            # a read of it) fills. Another pass on the kept window, which reads again if it ran short.
            self._schedule_soon(slot_freed=True)
        self._queue_info = None
        # Every queued task was read and started: until something is queued again, an ending task need not
        # read the queue (see _schedule_soon).
        self._queue_empty = exhausted and not cut and started == len(window) < SCHEDULE_WINDOW

    def _start(self, task: Task) -> None:
        state = _RunState(task, ProgressTracker(task, write_interval=self.progress_write_interval))
        self._running[task.id] = state
        self.bus.publish("task.updated", "task", task.id, task.summary())
        try:
            task_type = get_task_type(task.type)
            worker = self.executor.submit(
                task.id,
                task_type.target,
                task.params,
                lambda msg: self._on_message(task.id, msg),
                max_output_bytes=self.max_output_bytes,
                environment=self.worker_environment,
                isolated=task_type.isolated,
                resources=task_type.resources,
            )
        except Exception as exc:
            state.final = Failed(f"the task could not be started: {exc}")
            self._finish(task.id, exitcode=None)
            return
        # Stored with the task's first progress write (a small task's is its final one): the claim already
        # recorded this server (what recovery needs); the worker's own id is for people, and a running task is
        # read from memory meanwhile. A write of its own would cost a row and often a transaction per task.
        task.worker = f"{self.server_id}/{worker}"

    async def _maintain(self) -> None:
        """Periodic upkeep: cancellations and tasks from other servers on the store, retried final
        writes, and (every RECOVERY_EVERY ticks) tasks of servers on this host that died meanwhile."""
        tick = 0
        while True:
            await asyncio.sleep(self.poll_interval)
            tick += 1
            try:
                self._flush()  # retries a batched write that failed
                for task_id, state in list(self._running.items()):
                    if state.exited is not None and task_id not in self._pending:
                        self._finish(task_id, state.exited)  # its end was not recorded
                local = [tid for tid, s in self._running.items() if not s.cancel_requested]
                for task_id in await self._store(self.store.cancel_requested_ids, local):
                    self._request_stop(task_id)
                if tick % RECOVERY_EVERY == 0:
                    await self.arecover()
                self._queue_changed()  # other servers sharing the store may have queued tasks
                self._schedule()
            except Exception as exc:
                unavailable = store_unavailable(exc)
                if unavailable is None:
                    log.exception("Plexus: task maintenance failed; retrying")
                else:  # one line per tick while the database is gone, not a traceback
                    log.warning("Plexus: task maintenance: %s; retrying", unavailable)

    # -- worker messages -----------------------------------------------------------------------

    def _on_message(self, task_id: str, msg: ToManager) -> None:
        """One message of a running task (core/messages.py), on the loop."""
        state = self._running.get(task_id)
        if state is None:
            return
        match msg:
            case StageBegun() | Progress() if state.final is not None:
                return  # after the task's end (an executor delivering late): its final state stands
            case StageBegun(name, total, message):
                self._apply(state, state.tracker.begin_stage(str(name), total, now(), message), "task.stage")
            case Progress(processed, message):
                self._apply(state, state.tracker.advance_to(int(processed), now(), message), "task.updated")
            case Log(text, level):
                line = str(text)
                state.log_tail.append(line)
                del state.log_tail[:-50]
                for listener in self.log_listeners:  # e.g. MCP log messages (endpoint/task_logs.py)
                    try:
                        listener(task_id, str(level), line)
                    except Exception:
                        log.exception("Plexus: a task log listener failed")
            case Done() | Failed() | Cancelled() | Lost():
                if state.final is None:  # the first word on how it ended stands (an executor may repeat itself)
                    state.final = msg
            case Placed(worker):  # the executor placed it (a Dask worker's address): shown by get_task
                state.task.worker = f"{self.server_id}/{worker}"
            case Request(request_id, kind, payload):
                self._loop_task(self._serve_request(state.task, request_id, str(kind), payload), state)
            case Exit(exitcode):
                self._finish(task_id, exitcode=exitcode)
            case _:
                log.warning("Plexus: task %s sent an unknown message %s; ignored", task_id, type(msg).__name__)

    async def _serve_request(self, task: Task, request_id: int, kind: str, payload: Any) -> None:
        """Answer a task's request (TaskContext.request) with the handler registered for its kind."""
        handler = self.request_handlers.get(kind)
        try:
            if handler is None:
                raise InvalidArgument(f"this server does not serve {kind!r} requests from tasks")
            reply = Reply(request_id, True, await handler(task, payload))
        except PlexusError as exc:
            reply = Reply(request_id, False, str(exc))
        except Exception as exc:
            log.exception("Plexus: the %r request of task %s failed", kind, task.id)
            reply = Reply(request_id, False, f"the server could not serve {kind!r}: {type(exc).__name__}: {exc}")
        # A large answer to a worker that stopped reading would block a plain send: off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.executor.reply, task.id, reply)

    def _loop_task(self, coro: Any, state: _RunState) -> None:
        """Run a request's handler; it is cancelled when its task ends (nobody waits for the answer then)."""
        task = asyncio.ensure_future(coro)
        state.requests.add(task)
        task.add_done_callback(state.requests.discard)

    def _apply(self, state: _RunState, decision: ProgressDecision, kind: str) -> None:
        """Record a progress change: a write to persist joins the next batched write, and its event waits for
        that commit (store, then bus); an event behind a pending write of the same task waits too (order)."""
        task = state.task
        pending = self._pending_for(task) if decision.write else self._pending.get(task.id)
        if pending is None:
            self.bus.publish(kind, "task", task.id, task.summary())
            return
        pending.add(decision)
        pending.events.append((kind, task.moment()))  # made a summary when published (`_committed`)
        self._flush_soon()

    def _pending_for(self, task: Task) -> _PendingWrite:
        pending = self._pending.get(task.id)
        if pending is None:
            pending = self._pending[task.id] = _PendingWrite(task)
        return pending

    def _flush_soon(self) -> None:
        """Write what is pending once the loop has handled what is ready now (the messages the reader thread
        handed over in one go, other tasks' starts): their writes share one transaction."""
        if self._flush_scheduled or self._loop is None:
            return
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Commit every pending write in one transaction, then publish their events and release ended tasks.

        If the store fails, everything stays pending (ended tasks keep their slots) and `_maintain` retries.
        On a networked store the transaction commits on the writer thread (`_flush_off_loop`), one at a time;
        what is added meanwhile stays pending for the next one.
        """
        self._flush_scheduled = False
        if not self._pending:
            return
        if self.offload:
            if self._flushing or self._loop is None:
                return
            if self._scheduling and not self._stopping and any(p.final for p in self._pending.values()):
                # A pass is under way: its claims are not known here yet, so this write could not plan the pass
                # its ends call for, which would then make a hop of its own, and keep the next write from riding
                # too. It goes when that pass lands (`_pass_done`), carrying the next pass.
                self._flush_held = True
                return
            self._flushing = True
            batch = [(p, p.changes, len(p.samples), len(p.events), p.final) for p in self._pending.values()]
            riding = self._pass_with_write({p.task.id for p, *_, final in batch if final})
            self._loop.create_task(self._flush_off_loop(batch, riding), name="plexus-flush")
            return
        batch = [(p, p.changes, len(p.samples), len(p.events), p.final) for p in self._pending.values()]
        try:
            then = self._pass_after({p.task.id for p, *_, final in batch if final})
        except Exception:  # the write goes ahead alone; the pass its ends ask for runs after it (`_committed`)
            log.exception("Plexus: could not plan the scheduling pass with a batched write; it runs after it")
            then = None
        claim = then[-1] if then is not None else None
        try:
            writes = [self._write_of(p) for p, *_ in batch]
            lost = self.store.save_progress_many(writes, holder=self.server_id, claim=claim)
        except Exception:
            log.exception("Plexus: could not record the progress of %d tasks; retrying", len(batch))
            return
        self._committed(batch, lost)
        if then is not None and claim is not None:
            policy, read, window, cut, starts, _ = then
            self._start_claimed(policy, read, window, cut, starts, claim.won, claim.started_at, exhausted=True)

    def _pass_after(
        self, ending: set[str]
    ) -> tuple[QueuePolicy, QueueWindow | None, list[Task], dict[Group, int], list[Task], Claim] | None:
        """The scheduling pass that the end of the `ending` tasks calls for, planned now so that its claims
        commit with their final writes (one transaction: `_flush`); None when there is nothing to plan (no
        task ends, the queue is known to be empty, no slot would be free). Local store only: on a networked
        one it runs in the write's writer-thread hop, right after it commits (`_flush_off_loop`)."""
        if not ending or self._stopping or self._loop is None or self._queue_empty:
            return None
        running = [task for task in self._running_tasks() if task.id not in ending]
        if len(running) >= self.max_concurrency:
            return None
        policy = self._policy()
        read, window, cut, starts = self._read_plan(
            policy, running, self._fair, self._window_view(policy), self._queue_version
        )
        return policy, read, window, cut, starts, self._claim_of(starts)

    @staticmethod
    def _write_of(pending: _PendingWrite) -> ProgressWrite:
        return ProgressWrite(pending.task, list(pending.stages.values()), list(pending.samples), pending.final)

    async def _flush_off_loop(
        self,
        batch: list[tuple[_PendingWrite, int, int, int, bool]],
        riding: PassInputs | None,
    ) -> None:
        """`_flush` on a networked store. When the write ends tasks, the scheduling pass their slots call for runs in
        the same writer-thread hop and the same transaction, after the write (`Store.save_progress_then`: one
        commit; a pass that fails leaves the write committed alone): one hop and one loop turn per small task's end
        and its successor's start, not two."""
        writes = [self._write_of(p) for p, *_ in batch]
        version = self._queue_version

        def write_then_pass() -> tuple[set[str], Any]:
            if riding is None:
                return self.store.save_progress_many(writes, holder=self.server_id), None
            return self.store.save_progress_then(
                writes, holder=self.server_id, then=lambda conn: self._read_plan_claim(*riding, version, conn)
            )

        try:
            try:
                lost, planned = await self._write(write_then_pass)
            except Exception as exc:
                unavailable = store_unavailable(exc)
                if unavailable is None:
                    log.exception("Plexus: could not record the progress of %d tasks; retrying", len(batch))
                else:
                    log.warning(
                        "Plexus: could not record the progress of %d tasks (%s); retrying", len(batch), unavailable
                    )
                return
            finally:
                self._flushing = False
            self._committed(batch, lost, schedule=riding is None)  # else the pass for the freed slots ran with it
            if riding is not None:
                try:
                    if isinstance(planned, Exception):
                        raise planned
                    await self._start_planned(riding[0], planned, version)
                except Exception as exc:
                    _log_failed_pass(exc)
        finally:
            if riding is not None:
                self._pass_done()
        if self._pending:
            self._flush_soon()

    def _pass_with_write(self, ending: set[str]) -> PassInputs | None:
        """What `_read_plan_claim` needs for the pass that the end of the `ending` tasks calls for, taken now on the
        loop (the pass is then under way: `_scheduling`); None when no pass is called for or one is under way."""
        if not ending or self._scheduling or self._stopping or self._loop is None or self._queue_empty:
            return None
        running = [task for task in self._running_tasks() if task.id not in ending]
        if len(running) >= self.max_concurrency:
            return None
        self._scheduling = True
        policy = self._policy()
        return policy, running, self._fair.copy(), self._window_view(policy), self._single

    def _committed(
        self, batch: list[tuple[_PendingWrite, int, int, int, bool]], lost: set[str], *, schedule: bool = True
    ) -> None:
        """After a batched write committed: drop what it wrote from the pending writes (what was added while it
        was written stays, for the next one), publish its events in order, release the tasks that ended (and with
        `schedule`, pass for their slots). The `lost` tasks were not written: another server holds them now
        (`_taken_over`)."""
        ended = False
        for pending, changes, samples, events, final in batch:
            task = pending.task
            if task.id in lost:
                self._taken_over(task.id)
                continue
            if final:  # nothing is written after the final write: what came meanwhile goes out with it
                events = len(pending.events)
            written, pending.events[:events] = pending.events[:events], []
            if final or (pending.changes == changes and not pending.events):
                if self._pending.get(task.id) is pending:
                    del self._pending[task.id]
            else:
                del pending.samples[:samples]  # its stages are written again next time: an idempotent upsert
            if final:
                self._running.pop(task.id, None)
                self._remember_finished(task)
                ended = True
                # Its end supersedes what it reported since the last write (a small task: all of its run): those
                # moments are past by now, and the end event carries the final state, stages and all.
                written = written[-1:]
            for kind, moment in written:
                self.bus.publish(kind, "task", task.id, task.summary_at(moment))
        if ended and schedule:
            self._schedule_soon(slot_freed=True)

    def _finish(self, task_id: str, exitcode: int | None) -> None:
        """Record how a task ended. The final write joins the next batched write (`_flush`); the run state
        is dropped only once it committed: if the store fails, the task keeps its slot and `_flush` is retried."""
        state = self._running.get(task_id)
        if state is not None:
            for request in state.requests:
                request.cancel()
        pending = self._pending.get(task_id)
        if state is None or (pending is not None and pending.final):
            return
        state.exited = exitcode if exitcode is not None else -1
        if state.kill_timer is not None:
            state.kill_timer.cancel()
            state.kill_timer = None
        task = state.task
        final = state.final
        if self._stopping and not state.cancel_requested and (final is None or isinstance(final, Cancelled)):
            # Our own shutdown stopped it (its worker reports "cancelled" to the shutdown's request, or
            # nothing when killed). A result or an error it produced meanwhile is kept as reported.
            if self._idempotent(task.type):
                self._requeue_ended(task_id, "the server stopped while it was running")
                return
            final = None
        if (
            isinstance(final, Lost)
            and final.requeue
            and self._idempotent(task.type)
            and not state.cancel_requested
            and not self._stopping
        ):
            # Its worker died (a Dask worker, executors/dask.py), and its type says a re-run is safe.
            self._requeue_ended(task_id, str(final.message))
            return
        tails: Mapping[str, Any] = {}
        match final:
            case Lost(message):
                task.status = TaskStatus.FAILED
                task.error_message = str(message)
            case Done(output, done_tails):
                task.status = TaskStatus.COMPLETED
                task.output = output  # bounded and made plain JSON by the worker (Executor contract)
                tails = done_tails or {}
            case Cancelled(cancelled_tails):
                task.status = TaskStatus.CANCELLED
                task.error_message = "cancelled at the task's request check"
                tails = cancelled_tails or {}
            case Failed(message, details, failed_tails):
                task.status = TaskStatus.FAILED
                task.error_message = str(message)[:2000]
                task.error_details = dict(details) if details is not None else None
                tails = failed_tails or {}
            case None if state.cancel_requested:
                task.status = TaskStatus.CANCELLED
                task.error_message = (
                    f"cancelled: the worker was stopped after the {self.cancel_grace_seconds:g}s grace period"
                )
            case None if self._stopping:
                task.status = TaskStatus.FAILED
                task.error_message = "the server stopped while the task was running"
            case _:
                task.status = TaskStatus.FAILED
                task.error_message = f"the worker process exited unexpectedly (exit code {exitcode})"
        task.completed_at = task.completed_at or now()
        if task.status is TaskStatus.COMPLETED and task.started_at is not None:
            self._durations.setdefault(task.type, deque(maxlen=DURATIONS_KEPT)).append(
                task.completed_at - task.started_at
            )
        task.stdout_tail = tails.get("stdout")
        task.stderr_tail = tails.get("stderr") or ("\n".join(state.log_tail) or None)
        stage_status = {
            TaskStatus.COMPLETED: StageStatus.COMPLETED,
            TaskStatus.CANCELLED: StageStatus.CANCELLED,
        }.get(task.status, StageStatus.FAILED)
        if state.closing is None:
            state.closing = state.tracker.finish(stage_status, task.completed_at, task.error_message)
        pending = self._pending_for(task)
        pending.add(state.closing)
        pending.final = True
        pending.events.append((_final_kind(task.status), task.moment()))
        self._flush_soon()

    @staticmethod
    def _idempotent(task_type: str) -> bool:
        try:
            return get_task_type(task_type).idempotent
        except InvalidArgument:
            return False

    # -- cancellation --------------------------------------------------------------------------

    def _cancel_one(self, task_id: str) -> CancelOutcome:
        if task_id in self._running:
            already = self._running[task_id].cancel_requested
            self._request_stop(task_id)
            return CancelOutcome(
                task_id,
                "cancelling",
                TaskStatus.RUNNING.value,
                "cancellation was already requested; the task is stopping"
                if already
                else f"cancellation requested; the task stops at its next check, or is stopped within "
                f"{self.cancel_grace_seconds:g}s",
            )
        task = self.store.get_task(task_id)
        if task is None:
            tombstone = self.store.tombstone(task_id)
            return CancelOutcome(
                task_id,
                "not_found",
                None,
                expired_message(task_id, tombstone) if tombstone else f"no task with id {task_id!r}",
            )
        if task.status.is_final:
            return CancelOutcome(
                task_id,
                "already_finished",
                task.status.value,
                f"the task already ended as {task.status.value}; nothing to cancel",
            )
        if task.status is TaskStatus.QUEUED:
            at = now()
            if self.store.update_task(
                task_id,
                only_if_status=(TaskStatus.QUEUED,),
                status=TaskStatus.CANCELLED,
                completed_at=at,
                cancel_requested=True,
                error_message="cancelled before it started",
            ):
                task.status, task.completed_at, task.cancel_requested = TaskStatus.CANCELLED, at, True
                task.error_message = "cancelled before it started"
                self.queue_changed()
                self.bus.publish("task.cancelled", "task", task_id, task.summary())
                return CancelOutcome(task_id, "cancelled", task.status.value, "cancelled before it started")
            return self._cancel_one(task_id)  # it started meanwhile: cancel it as a running task
        # RUNNING on another server sharing this store: it applies the request at its next poll.
        self.store.update_task(task_id, cancel_requested=True)
        return CancelOutcome(
            task_id,
            "cancelling",
            task.status.value,
            "cancellation requested from the server running this task",
        )

    def _request_stop(self, task_id: str) -> None:
        state = self._running.get(task_id)
        if state is None or state.cancel_requested:
            return
        state.cancel_requested = True
        state.task.cancel_requested = True
        self.store.update_task(task_id, cancel_requested=True)
        self.executor.request_cancel(task_id)
        if self._loop is not None:
            state.kill_timer = self._loop.call_later(self.cancel_grace_seconds, self.executor.kill, task_id)
        self.bus.publish("task.updated", "task", task_id, state.task.summary())


_FINAL_NAMES = frozenset(s.value for s in FINAL_STATUSES)


def _final_kind(status: TaskStatus) -> str:
    return {
        TaskStatus.COMPLETED: "task.completed",
        TaskStatus.FAILED: "task.failed",
        TaskStatus.CANCELLED: "task.cancelled",
    }[status]


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in (part.strip() for part in value.split(",")) if v]
    return [str(v) for v in value]


def _owner_gone(worker: str | None, own_instance: str, lease_expires_at: float | None = None) -> bool:
    """True when the server that claimed a task (recorded in `worker`) is no longer alive.

    `worker` is "executor:host:pid:instance[:machine][/worker-id]". A claim by this very server (same instance)
    is alive; a claim whose lease ran out (its server's heartbeat stopped: core/leases.py) is gone, on any
    host. A valid lease means a live server, unless the claim is provably from this machine and process-id
    namespace (`machine` is ours: core/leases.py MACHINE) and its process id says otherwise: two containers
    may share a store, a host name and PID 1, so a host name alone proves nothing. For a claim without a lease
    (an older release, or a manager without leases) the process id of a claim on this host decides, unless the
    claim names another machine. The process id: another instance with our process id is an earlier life of
    this process id (a restart that got the same pid, as PID 1 in a container does), a process id that no
    longer exists a crashed server (recovered at once, not a lease later).
    """
    if not worker:
        return True
    parts = worker.split("/", 1)[0].split(":")
    if len(parts) < 3:
        return True
    host, pid_text = parts[1], parts[2]
    instance = parts[3] if len(parts) > 3 else None
    machine = parts[4] if len(parts) > 4 else None
    if instance == own_instance:
        return False
    here = bool(MACHINE) and machine == MACHINE  # its process ids are ours to check
    if lease_expires_at is not None:
        if lease_expires_at < now():
            return True
        if not here:
            return False  # a valid lease of a server not provably here: a live server, whatever its host says
    elif machine is not None and not here:
        return False  # no lease, and another machine or namespace: left to its own server
    if host != HOST:
        return False
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _log_failed_pass(exc: Exception) -> None:
    unavailable = store_unavailable(exc)
    if unavailable is None:
        log.error("Plexus: a scheduling pass failed; the next maintenance tick retries", exc_info=exc)
    else:
        log.warning("Plexus: a scheduling pass could not read the queue: %s", unavailable)


def _starts_of_head(head: list[Task], running: list[Task], policy: QueuePolicy, clock: FairClock) -> int:
    """How many of `head` (one group's first queued tasks, in order) a plan starts: planned on the first free slots
    + 1 of them when they are all of one type (a one-group pass plans every pass; a plan's cost is per task, ~1.4 us
    each, and the head kept is ~40 tasks). Tasks alike start in their order until the first that cannot (its owner's
    or type's cap, or what it needs, which it then reserves): none after it can either, so when that prefix leaves
    one unstarted, it starts what the whole head would; else the whole head is planned."""
    if len({task.type for task in head}) == 1:
        prefix = head[: max(policy.capacity.get("slots", 0) - len(running), 0) + 1]
        starts = len(queue_plan(prefix, running, policy, clock=clock, reasons=False).starts)
        if starts < len(prefix) or len(prefix) == len(head):
            return starts
    return len(queue_plan(head, running, policy, clock=clock, reasons=False).starts)


def _pass_head(policy: QueuePolicy, *, contended: bool = False) -> int:
    """Tasks per (priority, owner) group a scheduling pass looks at: slots+1, enough for any owner's share of one
    pass, so one owner's flood never hides the next owner's work, and the plan stays small. `contended` (other
    servers claim from the same head): 2 x slots + 1, so that a pass whose claim finds up to a share of the head
    taken still plans enough starts for its slots, without a pass of its own for the rest."""
    slots = policy.capacity.get("slots", 0)
    return 2 * slots + 1 if contended else slots + 1
