"""The Dask executor: tasks run on a Dask distributed cluster (a scheduler address, or a LocalCluster).

Task code is sent by import path (the task type's `target`), never pickled: the workers must have the
task's package installed, as they must for any Dask work. What travels back, and how:

- a task's messages (stages, progress, logs, requests) are buffered in its worker process and put on one
  distributed `Queue` of this server at most once per `message_interval` (all the tasks of that worker in
  one put), so a chatty task never floods the scheduler; what is left at the task's end travels back in
  the future's result, so a short task costs the scheduler nothing beyond Dask's own submit and gather;
- a request's answer (a kernel scorer's scores, `reply`) goes to a per-task `Queue` the task reads;
- cooperative cancellation is a per-task distributed `Event` the task context checks (at most once per
  `message_interval`); the forced stop cancels the future and restarts the worker running it (a thread
  cannot be stopped), which is why a worker runs one task at a time by default (`dask_local_threads`);
- a worker that dies mid-task ends the task FAILED naming the worker, or re-queued when its task type is
  idempotent (a "lost" final message, see TaskManager._finish), at most MAX_LOSSES - 1 times.

What goes on a distributed Queue is pickled first (the scheduler's msgpack would turn lists into tuples);
so are a task's call and its result (`run_on_dask` takes and returns bytes: one frame at every hop).
Nothing here runs Dask calls on the server's event loop: submit() records the task for the submitting thread;
the rest runs in this executor's threads (submitter, reader, collector, monitor, control).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .. import worker as worker_side
from ..messages import Exit, Failed, Final, FromTask, Lost, Placed, Reply, Request, Started, ToManager
from ..resources import Resources
from .base import Deliveries, Executor, ExecutorUnavailable, LoopHandoff, MessageCallback

log = logging.getLogger("plexus_mcp_jupyter")

MAX_LOSSES = 3  # an idempotent task whose workers died this many times fails instead of being re-queued again
FINAL_WAIT = 10.0  # seconds a result waits for its earlier message batches before it is delivered anyway
COLLECT_MIN, COLLECT_MAX = 0.002, 0.05  # seconds between looks at the running futures (see _collect)
COLLECT_BUSY = 0.02  # seconds at least between those looks while Dask holds a backlog of this server's tasks
SUBMIT_SPACING = 0.01  # seconds between the submitting thread's looks after a hand-over (see _submit)
SUBMIT_IDLE_PASSES = 5  # looks finding nothing after which it sleeps until a submit wakes it
MONITOR_INTERVAL = 2.0  # seconds between refreshes of the cluster's workers and capacity
OUTBOX_IDLE_EXIT = 30.0  # seconds without a task after which a worker's outbox for a server ends


# -- the worker side ---------------------------------------------------------------------------------


class _Outbox:
    """The messages of the tasks running in one Dask worker process for one server, put on that server's queue
    once per interval (one put for all of them), or at once when a task waits for an answer."""

    def __init__(self, channel: str, interval: float) -> None:
        from distributed import Queue, get_client

        # Resolved here, in a task's thread: the flushing thread is no task, and has no worker client of its own.
        self.queue = Queue(f"{channel}-out", client=get_client())
        self.interval = interval
        self.lock = threading.Lock()
        self.pending: dict[str, list[FromTask | Started]] = {}
        self.puts: dict[str, int] = {}  # batches of each task put on the queue, so the server keeps their order
        self.put_lock = threading.Lock()  # puts leave in the order their batches were taken
        self.active = 0  # tasks of this server running in this process
        self.idle_since = time.monotonic()
        self.channel = channel
        self.wake = threading.Event()
        threading.Thread(target=self._run, name="plexus-dask-outbox", daemon=True).start()

    def begin(self, task_id: str) -> None:
        with self.lock:
            self.active += 1
            self.pending[task_id] = []

    def send(self, task_id: str, message: FromTask | Started, *, urgent: bool = False) -> None:
        with self.lock:
            self.pending.setdefault(task_id, []).append(message)
        if urgent:
            self.flush()

    def take(self, task_id: str) -> tuple[list[FromTask | Started], int]:
        """A task ended: its messages not put yet (they travel in its result) and how many batches were put."""
        with self.lock:
            self.active -= 1
            self.idle_since = time.monotonic()
            return self.pending.pop(task_id, []), self.puts.pop(task_id, 0)

    def flush(self) -> None:
        with self.put_lock:
            with self.lock:
                items = [(task_id, messages) for task_id, messages in self.pending.items() if messages]
                for task_id, _ in items:
                    self.pending[task_id] = []
                    self.puts[task_id] = self.puts.get(task_id, 0) + 1
            if items:
                try:
                    self.queue.put(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))
                except Exception:  # the scheduler is gone: the server sees the tasks' ends from their futures
                    log.debug("Plexus: could not put task messages on the Dask queue", exc_info=True)

    def _run(self) -> None:
        """Flush once per interval; end once no task of this server ran here for a while (its server may be
        gone: a worker outlives the servers that used it)."""
        while True:
            self.wake.wait(self.interval)
            self.flush()
            with _OUTBOXES_LOCK, self.lock:
                if self.active or time.monotonic() - self.idle_since < OUTBOX_IDLE_EXIT:
                    continue
                _OUTBOXES.pop(self.channel, None)
            with contextlib.suppress(Exception):
                self.queue.close()
            return


_OUTBOXES: dict[str, _Outbox] = {}
_OUTBOXES_LOCK = threading.Lock()  # taken before an outbox's own lock


def _outbox(channel: str, interval: float, task_id: str) -> _Outbox:
    """This process's outbox for a server, with `task_id` counted as running in it."""
    with _OUTBOXES_LOCK:
        box = _OUTBOXES.get(channel)
        if box is None:
            box = _OUTBOXES[channel] = _Outbox(channel, interval)
        box.begin(task_id)
        return box


class _EventFlag:
    """Cancellation of one task: the server sets a distributed Event; checked at most once per interval
    (a check is a round trip to the scheduler, and a task checks at every `advance()`)."""

    def __init__(self, name: str, interval: float) -> None:
        self.name = name
        self.interval = interval
        self.next_check = time.monotonic() + interval  # a task cancelled before it started is never submitted
        self.set = False

    def is_set(self) -> bool:
        if not self.set and time.monotonic() >= self.next_check:
            from distributed import Event

            with contextlib.suppress(Exception):  # the scheduler is unreachable: look again later
                self.set = bool(Event(self.name).is_set())
            self.next_check = time.monotonic() + self.interval
        return self.set


class _Inbox:
    """Answers to one task's requests, from its own queue (created on its first request), looked at once per
    interval: a blocking `Queue.get(timeout=...)` that times out is logged as an error by the scheduler."""

    def __init__(self, name: str, interval: float) -> None:
        self.name = name
        self.interval = interval
        self.queue: Any = None
        self.held: list[Any] = []

    def __call__(self, timeout: float) -> Any:
        from distributed import Queue

        if self.queue is None:
            self.queue = Queue(self.name)
        if not self.held:
            with contextlib.suppress(Exception):  # the scheduler is unreachable: the request times out
                self.held = [pickle.loads(item) for item in self.queue.get(batch=True)]
        if self.held:
            return self.held.pop(0)
        time.sleep(max(timeout, self.interval))
        return None

    def close(self) -> None:
        if self.queue is not None:
            with contextlib.suppress(Exception):
                self.queue.close()


def run_on_dask(call: bytes) -> bytes:
    """What a Dask worker runs for one task: the task function by its import path, with a context whose
    messages go through this worker's outbox. `call`: (task_id, target, params, max_output_bytes, environment,
    channel, interval) pickled; returns (worker address, messages not put yet, batches put, final message)
    pickled.

    Both ends are pickled here, in the task's thread, rather than left to Dask: a tuple of objects is walked on
    the client to find dependencies, unpickled by the scheduler with the graph, measured by the worker's
    `sizeof` and serialized object by object on its event loop when gathered, all per task; bytes are one frame
    that every hop passes as it is."""
    from distributed import get_worker

    task_id, target, params, max_output_bytes, environment, channel, interval = pickle.loads(call)
    address = str(get_worker().address)
    box = _outbox(channel, interval, task_id)
    box.send(task_id, Started(address))
    inbox = _Inbox(f"{channel}-in-{task_id}", interval)

    def send(message: FromTask) -> None:
        box.send(task_id, message, urgent=isinstance(message, Request))

    try:
        final = worker_side.run_task(
            task_id,
            target,
            params,
            send,
            _EventFlag(f"{channel}-cancel-{task_id}", interval),
            max_output_bytes,
            environment,
            inbox,
        )
    finally:
        inbox.close()
        rest, puts = box.take(task_id)
    return pickle.dumps((address, rest, puts, final), protocol=pickle.HIGHEST_PROTOCOL)


# -- the server side ---------------------------------------------------------------------------------


@dataclass
class _Run:
    task_id: str
    key: str  # the Dask key of its future
    on_message: MessageCallback
    call: bytes  # run_on_dask's argument, until submitted
    needs: tuple[tuple[str, int], ...]  # its Dask resources
    future: Any = None  # once submitted
    address: str | None = None  # the worker running it, once it said so
    received: int = 0  # message batches of this task taken from the queue
    result: tuple[str, list[FromTask | Started], int, Final] | None = None  # run_on_dask's, waiting for earlier batches
    result_at: float = 0.0
    cancel_set: bool = False
    inbox_used: bool = False
    killed: bool = False
    ended: bool = False


class DaskExecutor(Executor):
    name = "dask"

    def __init__(
        self,
        scheduler_address: str = "",
        *,
        local_workers: int = 2,
        local_threads: int = 1,
        local_memory_mb: int = 0,
        worker_resources: Mapping[str, int] | None = None,
        connect_timeout: float = 10.0,
        message_interval: float = 0.1,
    ) -> None:
        """Connect now (a scheduler at `scheduler_address`, or a LocalCluster of `local_workers` processes of
        `local_threads` threads and `local_memory_mb` MB each, 0: Dask's share of this machine); raise
        ExecutorUnavailable saying what to change when that fails."""
        self.scheduler_address = scheduler_address
        self.message_interval = message_interval
        self.channel = f"plexus-{uuid.uuid4().hex[:12]}"
        self.cluster: Any = None
        self.client: Any = None
        self._loop: Any = None
        self._handoff = LoopHandoff()
        self._runs: dict[str, _Run] = {}
        self._by_key: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._losses: dict[str, int] = {}
        self._release: list[Any] = []  # futures of ended tasks, released by the collector in one go
        self._collect_wake = threading.Event()  # tasks were handed to Dask: look for ends often again
        self._closing = False
        self._stop = threading.Event()  # wakes the monitor and the reader at shutdown
        self._submitted_event = threading.Event()  # wakes an idle reader
        self._submit_wake = threading.Event()  # wakes the submitting thread
        self._handed_at = 0.0  # when the submitting thread last took tasks to hand over (monotonic)
        self._outgoing: list[_Run] = []  # started, not handed to Dask yet
        self._threads: list[threading.Thread] = []
        self._control = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plexus-dask-control")
        self._capacity: Resources = {}
        self._dashboard: str | None = None
        self._workers: dict[str, dict[str, Any]] = {}
        self._declared: set[str] = set()  # resource names some worker declares (Dask resources)
        self._submitted = 0
        try:
            import distributed  # noqa: F401 - only to say what is missing
        except ImportError:
            raise ExecutorUnavailable(
                "executor=dask needs Dask distributed: pip install 'plexus-mcp-jupyter[dask]'"
            ) from None
        try:
            self._connect(local_workers, local_threads, local_memory_mb, dict(worker_resources or {}), connect_timeout)
        except ExecutorUnavailable:
            self._close_client()
            raise
        except Exception as exc:
            self._close_client()
            where = f"the Dask scheduler at {scheduler_address}" if scheduler_address else "a Dask LocalCluster"
            raise ExecutorUnavailable(f"could not connect to {where}: {type(exc).__name__}: {exc}") from None

    def _connect(self, workers: int, threads: int, memory_mb: int, resources: dict[str, int], timeout: float) -> None:
        from distributed import Client, LocalCluster

        if self.scheduler_address:
            try:
                self.client = Client(self.scheduler_address, timeout=timeout, set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise ExecutorUnavailable(
                    f"the Dask scheduler at {self.scheduler_address} did not answer within {timeout:g} s ({exc}); "
                    "start it (`dask scheduler`), fix dask_scheduler_address, or leave it empty for a LocalCluster"
                ) from None
        else:
            declared = {"slots": threads, **resources}
            if memory_mb:
                declared["memory_mb"] = memory_mb
            # allowed_failures=0: Dask must not run a task again on another worker by itself; Plexus decides
            # (idempotent task types are re-queued, the others fail naming the worker).
            self.cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                memory_limit=f"{memory_mb}MB" if memory_mb else "auto",
                resources=declared,
                dashboard_address="127.0.0.1:0",
                host="127.0.0.1",
                scheduler_kwargs={"allowed_failures": 0},
            )
            self.client = Client(self.cluster, set_as_default=False)
        self._refresh()

    def close(self) -> None:
        self._control.shutdown(wait=False)
        self._close_client()

    def _close_client(self) -> None:
        for closing in (self.client, self.cluster):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: Any) -> None:
        from distributed import Queue

        self._loop = loop
        self._closing = False
        self._stop.clear()
        self._out = Queue(f"{self.channel}-out", client=self.client)
        for target, name in (
            (self._submit, "submitter"),
            (self._read, "reader"),
            (self._collect, "collector"),
            (self._monitor, "monitor"),
        ):
            thread = threading.Thread(target=target, name=f"plexus-dask-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def shutdown(self, grace: float) -> None:
        await self.stop_and_wait(list(self._runs), lambda: bool(self._runs), grace)
        await self.stop_and_wait(list(self._runs), lambda: bool(self._runs), 5.0, force=True)
        self._closing = True
        self._stop.set()
        self._submit_wake.set()
        self._collect_wake.set()
        self._submitted_event.set()  # the idle reader waits on it (up to 1 s): it ends now, not at its next look
        await asyncio.to_thread(self._control.shutdown, True)  # a worker restart may take seconds
        await asyncio.to_thread(self._close_client)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 5)
        self._threads.clear()

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = len(self._runs)
            workers = len(self._workers)
        return {
            "name": self.name,
            "scheduler": self.scheduler_address or self._scheduler_address(),
            "local_cluster": self.cluster is not None,
            "dashboard": self.dashboard_link(),
            "running": running,
            "workers": workers,
            "capacity": dict(self._capacity),
        }

    def _scheduler_address(self) -> str | None:
        with contextlib.suppress(Exception):
            return str(self.client.scheduler.address)
        return None

    def dashboard_link(self, task_id: str | None = None) -> str | None:
        """The Dask dashboard (its status page); None without bokeh. `task_id`: only while that task runs here.
        Read by the monitor thread: asking the client is a round trip to the scheduler, never for the event loop."""
        if task_id is not None and task_id not in self._runs:
            return None
        return self._dashboard

    def capacity(self) -> Resources:
        """The cluster's: each worker's declared Dask resources summed; `slots` are its threads unless declared,
        `memory_mb` its memory limit unless declared. Refreshed every few seconds (workers come and go)."""
        return dict(self._capacity)

    def worker_addresses(self) -> frozenset[str]:
        """The cluster's workers as the monitor last saw them (no scheduler call)."""
        with self._lock:
            return frozenset(self._workers)

    def run_on_workers(self, fn: Any, *args: Any) -> dict[str, Any]:
        """`fn(*args)` on every worker (Dask's `client.run`): {address: result, or the exception it raised}. A
        round trip to every worker: for threads, never the event loop."""
        return dict(self.client.run(fn, *args, on_error="return"))

    def _refresh(self) -> None:
        info = self.client.scheduler_info(n_workers=-1)
        workers = dict(info.get("workers", {}))
        capacity: Resources = {}
        declared: set[str] = set()
        for w in workers.values():
            resources = {str(k): int(v) for k, v in (w.get("resources") or {}).items()}
            declared.update(resources)
            resources.setdefault("slots", int(w.get("nthreads") or 1))
            if w.get("memory_limit"):
                resources.setdefault("memory_mb", int(w["memory_limit"]) // 2**20)
            for name, amount in resources.items():
                capacity[name] = capacity.get(name, 0) + amount
        try:
            dashboard = self.client.dashboard_link
        except Exception:  # no bokeh: no dashboard
            dashboard = None
        with self._lock:
            self._workers = workers
            if capacity:  # none while every worker restarts: tasks are not refused for it meanwhile
                self._capacity = capacity
            self._declared = declared
            self._dashboard = str(dashboard) if dashboard else None

    # -- tasks ---------------------------------------------------------------------------------

    def submit(
        self,
        task_id: str,
        target: str,
        params: dict[str, Any],
        on_message: MessageCallback,
        *,
        max_output_bytes: int = 65_536,
        environment: Mapping[str, Any] | None = None,
        isolated: bool = False,
        resources: Mapping[str, int] | None = None,
    ) -> str:
        if self._loop is None:
            raise RuntimeError("DaskExecutor.start(loop) must be called before submit()")
        self._submitted += 1
        key = f"plexus-{task_id}-{self._submitted}"
        # Only what the workers declare as Dask resources: Dask would wait forever for a resource nobody has
        # (the manager never starts a task whose needs exceed the capacity).
        needs = tuple(
            sorted((name, amount) for name, amount in (resources or {}).items() if amount and name in self._declared)
        )
        call = (task_id, target, params, max_output_bytes, dict(environment or {}), self.channel, self.message_interval)
        run = _Run(task_id, key, on_message, pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL), needs)
        with self._lock:
            self._runs[task_id] = run
            self._by_key[key] = run
            self._outgoing.append(run)
            # The submitting thread is asleep, or looks again within SUBMIT_SPACING s (it handed tasks over
            # that recently): wake it only in the first case, and only for the first task waiting.
            wake = len(self._outgoing) == 1 and time.monotonic() - self._handed_at >= SUBMIT_SPACING
        if wake:
            self._submit_wake.set()
        if not self._submitted_event.is_set():
            self._submitted_event.set()
        return f"dask:{key}"

    def _submit(self) -> None:
        """Hand the tasks started since the last pass to Dask in one `map` per set of resources: a `submit` per
        task costs the client milliseconds, and this thread keeps that off the event loop.

        Idle, it sleeps until a submit wakes it, and hands that task over at once. After a hand-over it looks
        again every SUBMIT_SPACING s, until SUBMIT_IDLE_PASSES looks found nothing, and a submit meanwhile wakes
        nobody (`submit` wakes it only when its last hand-over is older than that): tasks dispatched one by one
        in a stream (an MCP call each) go in maps of several, not one each (a map, its graph update on the
        scheduler and its messages cost about the same for one task as for ten), and the event loop's thread
        is spared a thread switch per task; a task dispatched alone still goes at once."""
        quiet = SUBMIT_IDLE_PASSES
        while not self._closing:
            self._submit_wake.wait(1.0 if quiet >= SUBMIT_IDLE_PASSES else SUBMIT_SPACING)
            with self._lock:
                self._submit_wake.clear()  # with the take, under the lock: a submit after it sets it again
                runs, self._outgoing = self._outgoing, []
                if not runs:
                    quiet += 1
                    continue
                quiet = 0
                self._handed_at = time.monotonic()
            groups: dict[tuple[tuple[str, int], ...], list[_Run]] = {}
            for run in runs:
                groups.setdefault(run.needs, []).append(run)
            for needs, group in groups.items():
                try:
                    futures = self.client.map(
                        run_on_dask,
                        [r.call for r in group],
                        key=[r.key for r in group],
                        pure=False,
                        resources=dict(needs) or None,
                        retries=0,
                    )
                except Exception as exc:
                    deliveries: Deliveries = []
                    for run in group:
                        self._end(run, 0, deliveries, Failed(f"Dask refused the task: {exc}"))
                    self._deliver(deliveries)
                    continue
                for run, future in zip(group, futures, strict=True):
                    with self._lock:
                        run.future, run.call = future, b""
                        killed = run.killed
                    if killed:  # stopped before it was handed over
                        self._in_control(self._kill, run)
                self._collect_wake.set()

    def reply(self, task_id: str, message: Reply) -> None:
        from distributed import Queue

        run = self._runs.get(task_id)
        if run is None or run.ended:
            return
        run.inbox_used = True
        with contextlib.suppress(Exception):  # the task is gone: nobody waits for the answer
            Queue(f"{self.channel}-in-{task_id}", client=self.client).put(pickle.dumps(message), timeout=10)

    def request_cancel(self, task_id: str) -> None:
        run = self._runs.get(task_id)
        if run is None or run.cancel_set:
            return
        run.cancel_set = True
        self._in_control(self._set_event, task_id)

    def _set_event(self, task_id: str) -> None:
        from distributed import Event

        Event(f"{self.channel}-cancel-{task_id}", client=self.client).set()

    def kill(self, task_id: str) -> None:
        run = self._runs.get(task_id)
        if run is None or run.killed:
            return
        with self._lock:
            run.killed = True
        self._in_control(self._kill, run)

    def _kill(self, run: _Run) -> None:
        """Cancel the future; the worker running it (a thread cannot be stopped) is restarted by its nanny."""
        if run.future is None:
            return  # not handed to Dask yet: the submitting thread calls this again once it is
        if run.ended:
            return
        address = run.address or self._processing_worker(run.key)
        with contextlib.suppress(Exception):
            self.client.cancel([run.future], force=True)  # the collector then ends the run: no test of ended after
        if address is not None:
            log.warning("Plexus: restarting Dask worker %s to stop task %s", address, run.task_id)
            try:
                self.client.restart_workers([address], raise_for_error=False)
            except Exception:
                log.exception("Plexus: could not restart Dask worker %s", address)

    def _processing_worker(self, key: str) -> str | None:
        with contextlib.suppress(Exception):
            for address, keys in self.client.processing().items():
                if key in keys:
                    return str(address)
        return None

    def _in_control(self, fn: Any, *args: Any) -> None:
        """Run a blocking Dask call (an event to set, a worker to restart) off the event loop."""
        with contextlib.suppress(RuntimeError):  # shutting down
            self._control.submit(_logged, fn, *args)

    # -- threads -------------------------------------------------------------------------------

    def _read(self) -> None:
        """Take the message batches on the server's queue, all at once, once per interval while tasks run (a
        blocking get that times out is logged as an error by the scheduler), and deliver them."""
        while not self._closing:
            if not self._runs:
                self._submitted_event.wait(1.0)
            self._submitted_event.clear()
            try:
                items = list(self._out.get(batch=True))
            except Exception:
                if not self._closing:
                    log.debug("Plexus: reading the Dask message queue failed", exc_info=True)
                    self._stop.wait(0.5)
                continue
            if not items:
                self._stop.wait(self.message_interval)
                continue
            self._take(items)

    def _take(self, items: list[bytes]) -> None:
        """Deliver the message batches of one read, then count them as received and deliver the ends they
        completed. In that order: the collector delivers a task's end once its batches are counted, so an end
        never overtakes the messages the task sent before it (the loop runs deliveries in the order given)."""
        deliveries: Deliveries = []
        arrived: list[_Run] = []
        for batch in items:
            for task_id, messages in pickle.loads(batch):
                with self._lock:
                    run = self._runs.get(task_id)
                if run is not None:
                    self._messages(run, messages, deliveries)
                    arrived.append(run)
        self._deliver(deliveries)
        with self._lock:
            for run in arrived:
                run.received += 1
        ends: Deliveries = []
        for run in arrived:
            self._maybe_end(run, ends)
        self._deliver(ends)

    def _messages(self, run: _Run, messages: list[FromTask | Started], deliveries: Deliveries) -> None:
        for message in messages:
            if isinstance(message, Started):
                address = message.address
                if run.address is not None and run.address != address:
                    # Dask ran it again on another worker (a scheduler allowing failures): the first died.
                    self._lost(run, run.address, deliveries)
                    return
                run.address = address
                deliveries.append((run.on_message, Placed(f"dask:{address}")))
            elif not run.ended:
                deliveries.append((run.on_message, message))

    def _collect(self) -> None:
        """Find the futures that ended by a look at each one's state (a done-callback per future would cost two
        thread wake-ups per task), and gather the results of the finished ones in one call. It looks every
        COLLECT_MIN s while tasks end, backing off to COLLECT_MAX while none does; but while this server has at
        least twice the cluster's slots of tasks on Dask (the workers have a backlog: an end noticed later frees
        a slot later without idling a worker) at most every COLLECT_BUSY s, so that the gathers, the releases and
        the next starts they free go in batches, not one task each."""
        pause = COLLECT_MAX
        while not self._closing:
            if self._collect_wake.wait(pause if self._runs else 1.0):
                self._collect_wake.clear()
                pause = COLLECT_MIN
            busy = len(self._runs) >= 2 * max(1, self._capacity.get("slots", 1))
            if busy and pause < COLLECT_BUSY:
                self._stop.wait(COLLECT_BUSY - pause)
            with self._lock:
                futures = [
                    r.future
                    for r in self._runs.values()
                    if r.future is not None and r.result is None and not r.ended and r.future.done()
                ]
            pause = COLLECT_MIN if futures else min(pause * 2, COLLECT_MAX)
            if not futures:
                continue
            deliveries: Deliveries = []
            finished = [f for f in futures if f.status == "finished"]
            by_key = self._gather(finished)
            for future in futures:
                with self._lock:
                    run = self._by_key.get(future.key)
                if run is None or run.ended:
                    continue
                if future.key in by_key:
                    run.result, run.result_at = by_key[future.key], time.monotonic()
                    self._maybe_end(run, deliveries)
                else:
                    self._failed(run, future, deliveries)
            self._deliver(deliveries)
            self._release_ended()

    def _gather(self, futures: list[Any]) -> dict[str, Any]:
        """Results by key (unpickled: run_on_dask's), in one call; one by one if that fails (a worker holding a
        result died before it was fetched: that task is left out, and handled as lost)."""
        if not futures:
            return {}
        try:
            got = dict(zip([f.key for f in futures], self.client.gather(futures), strict=True))
        except Exception:
            got = {}
            for future in futures:
                with contextlib.suppress(Exception):
                    got[future.key] = future.result(timeout=5)
        return {key: _read_result(blob) for key, blob in got.items()}

    def _maybe_end(self, run: _Run, deliveries: Deliveries) -> None:
        """Deliver a task's result once every batch it put on the queue before it has arrived (or waited long).

        The reader, the collector and the monitor all call this: the look and the claim are one step under
        the lock, so exactly one of them delivers the task's end."""
        with self._lock:
            if run.result is None or run.ended:
                return
            address, rest, puts, final = run.result
            if run.received < puts and time.monotonic() - run.result_at < FINAL_WAIT:
                return
            self._claim(run)
        last: list[ToManager] = []
        if run.address is None:
            run.address = address
            last.append(Placed(f"dask:{address}"))
        last.extend(message for message in rest if not isinstance(message, Started))
        last.append(final)
        self._ended(run, 0, deliveries, last)

    def _failed(self, run: _Run, future: Any, deliveries: Deliveries) -> None:
        """The future ended without a result: cancelled (our forced stop), its worker died, or Dask failed it."""
        from distributed.scheduler import KilledWorker

        if future.status == "cancelled" or run.killed:
            self._end(run, -9, deliveries)
            return
        if future.status == "finished":  # its result was lost with its worker
            self._lost(run, run.address, deliveries)
            return
        try:
            exc = future.exception(timeout=5)
        except Exception as error:
            exc = error
        if isinstance(exc, KilledWorker):
            address = run.address
            with contextlib.suppress(Exception):
                address = address or str(exc.last_worker.address)
            self._lost(run, address, deliveries)
            return
        message = f"the Dask executor could not run the task: {type(exc).__name__}: {exc}"
        self._end(run, 0, deliveries, Failed(message, {"exception_type": type(exc).__name__}))

    def _lost(self, run: _Run, address: str | None, deliveries: Deliveries) -> None:
        """Its worker died mid-task: a Lost final (the manager re-queues an idempotent task, fails the others)."""
        with self._lock:
            if run.ended:
                return  # another thread ended it already: one loss, one end
            self._claim(run)
        losses = self._losses[run.task_id] = self._losses.get(run.task_id, 0) + 1
        where = address or "unknown address"
        message = f"the Dask worker {where} died while running the task"
        if losses >= MAX_LOSSES:
            message += f" ({losses} workers died running it: not re-queued again)"
        if not run.killed:
            run.killed = True
            with contextlib.suppress(Exception):
                self.client.cancel([run.future], force=True)
        self._ended(run, 0, deliveries, [Lost(message, losses < MAX_LOSSES)])

    def _end(self, run: _Run, exitcode: int, deliveries: Deliveries, *last: ToManager) -> None:
        """End a run with `last` (its final message, if any) and Exit, unless another thread ended it first."""
        with self._lock:
            if run.ended:
                return
            self._claim(run)
        self._ended(run, exitcode, deliveries, last)

    def _claim(self, run: _Run) -> None:
        """Mark a run ended; the caller holds the lock and saw it not ended, so it alone delivers the end."""
        run.ended = True
        self._runs.pop(run.task_id, None)
        self._by_key.pop(run.key, None)

    def _ended(self, run: _Run, exitcode: int, deliveries: Deliveries, last: Iterable[ToManager]) -> None:
        """Deliver the end of a run this thread claimed: `last`, then Exit; let Dask drop what it kept."""
        deliveries.extend((run.on_message, message) for message in last)
        deliveries.append((run.on_message, Exit(exitcode)))
        if run.cancel_set or run.inbox_used:
            self._in_control(self._forget, run)
        else:
            self._release.append(run.future)
        if exitcode == 0 and run.result is not None:
            self._losses.pop(run.task_id, None)

    def _release_ended(self) -> None:
        """Let Dask drop the results of ended tasks: one wake-up of the client's thread for all of them (a
        `release()` each from here costs a wake-up each)."""
        futures, self._release = [r for r in self._release if r is not None], []
        if futures:
            with contextlib.suppress(Exception):
                self.client.loop.add_callback(_release_all, futures)

    def _forget(self, run: _Run) -> None:
        """Remove what the scheduler keeps for an ended task: its cancel event, its answers queue."""
        from distributed import Event, Queue

        if run.cancel_set:
            Event(f"{self.channel}-cancel-{run.task_id}", client=self.client).clear()
        if run.inbox_used:
            Queue(f"{self.channel}-in-{run.task_id}", client=self.client).close()
        with contextlib.suppress(Exception):
            run.future.release()

    def _monitor(self) -> None:
        """Refresh the workers and capacity; deliver results that waited too long for their batches."""
        while not self._stop.wait(MONITOR_INTERVAL if not self._runs else 0.5):
            with contextlib.suppress(Exception):
                self._refresh()
            deliveries: Deliveries = []
            for run in list(self._runs.values()):
                self._maybe_end(run, deliveries)
            self._deliver(deliveries)

    def _deliver(self, deliveries: Deliveries) -> None:
        self._handoff.deliver(self._loop, deliveries)


def _read_result(blob: Any) -> tuple[str, list[FromTask | Started], int, Final]:
    """run_on_dask's result; one that cannot be read (a worker on another version of this package) fails its task
    rather than the collector thread."""
    try:
        return pickle.loads(blob)
    except Exception as exc:
        message = f"the Dask worker's result could not be read ({type(exc).__name__}: {exc}); do the workers run "
        return "unknown", [], 0, Failed(message + "this server's version of plexus-mcp-jupyter?")


def _release_all(futures: list[Any]) -> None:
    for future in futures:
        with contextlib.suppress(Exception):
            future.release()


def _logged(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.warning("Plexus: a Dask control call (%s) failed", getattr(fn, "__name__", fn), exc_info=True)
