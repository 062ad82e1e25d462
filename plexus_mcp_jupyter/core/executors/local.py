"""The local executor: a pool of warm worker processes, each running one task at a time.

Starting a process per task capped throughput at a few dozen small tasks per second, so workers are
started ahead (from a forkserver that pre-imported the worker and heavy task modules, never by forking
the threaded server) and reused: a worker runs a task, reports its end, and takes the next one. What a
process per task guaranteed still holds:

- a forced stop (a cancelled task that ignores the request past the grace period) kills exactly the
  worker running that task; a crash (exception aside: os._exit, a segfault, the OOM killer) ends only
  its worker; either way the task alone fails and a fresh worker takes the dead one's place;
- a worker whose task was cancelled is retired, since threads or state the task left behind must stop
  with it; so is one that ran `max_tasks_per_worker` tasks or grew past `max_worker_memory_mb`;
- a task may be isolated (`submit(isolated=True)`, a task type's `isolated` flag, or `reuse=False` for
  every task): it gets a fresh process that ends with it.

The event loop never starts a process: starting one waits for the forkserver (most of a second while it
preloads, right after the server starts) and for the warm-up thread's start in progress. A task submitted
while no warm worker is free waits in `_waiting`; the first worker that becomes free takes it (the warm-up's,
one a start thread brings up for it, or one that ended its task), and `Placed` tells the manager its pid.

One reader thread waits on every worker's pipe at once and hands what arrived to the event loop in one
callback per wake-up, instead of a thread and a loop wake-up per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import sys
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_pipes
from typing import Any

from .. import tasks, worker
from ..messages import Batch, Cancelled, End, Exit, Failed, Log, Message, Placed, Reply, Run, Stop, ToManager, ToTask
from ..pools import start_one_thread
from .base import Deliveries, Executor, LoopHandoff, MessageCallback

log = logging.getLogger("plexus_mcp_jupyter")

READ_BATCH = 256  # most messages taken from one pipe per wake-up, so a chatty worker cannot starve the others
STARTERS = 2  # threads starting workers for waiting tasks: a start mostly waits on the forkserver
SPAWN_YIELD_MAX = 10.0  # seconds the pool's warm-up lets starts for waiting tasks go first, at most, per worker
WORKER_MODULE = "plexus_mcp_jupyter.core.worker"

# The preload of a forkserver started ahead of any executor (start_forkserver_early), while it runs.
_early_preload: list[str] | None = None
_early_lock = threading.Lock()


def forkserver_preload(extra: Sequence[str]) -> list[str]:
    """What the forkserver imports before it forks a worker: the worker module, then the task modules `extra`."""
    return [WORKER_MODULE, *extra]


def start_forkserver_early(extra: Sequence[str]) -> bool:
    """Start the forkserver now, importing `forkserver_preload(extra)`, before any LocalExecutor exists.

    Its imports (pandas, pyarrow, SQLAlchemy for the evaluations: ~0.7 s of CPU, several seconds on a loaded
    machine) then overlap the server's own start, instead of delaying the first task after it. A LocalExecutor
    started later uses it when it wants the same preload, and restarts it otherwise; `stop_early_forkserver`
    ends it when no LocalExecutor will. False (nothing started) where forkserver is not available, or when this
    process runs one already (an executor's, whose preload is left as it is).
    """
    global _early_preload
    if "forkserver" not in mp.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    preload = forkserver_preload(extra)
    with _early_lock:
        if forkserver._forkserver._forkserver_pid is not None:  # type: ignore[attr-defined]
            return False
        mp.get_context("forkserver").set_forkserver_preload(preload)
        forkserver.ensure_running()
        _early_preload = preload
    return True


def stop_early_forkserver(wanted: Sequence[str] | None = None, *, now: bool = False) -> None:
    """Settle the forkserver `start_forkserver_early` started (nothing when there is none, or once settled): the
    first LocalExecutor to start adopts it when its preload is `wanted`, and it is ended otherwise (no executor:
    `wanted` None), before any worker came from it. Never blocks: the stdlib's `_stop` waits for the forkserver's
    exit, i.e. for the end of its imports. With `now` (a `plexus mcp serve` that failed to start, about to exit):
    it is terminated in its imports and reaped, and the resource tracker it shares with this process ended too, so
    that neither outlives the process holding its stdout (a stdio client's pipe: its EOF came ~0.5 s late)."""
    global _early_preload
    with _early_lock:
        early, _early_preload = _early_preload, None
    if early is None or (wanted is not None and list(wanted) == early):
        return
    from multiprocessing import forkserver, util

    # As ForkServer._stop, without its wait: the next process start starts a new one. Without its lock too: no
    # executor has used this forkserver (the first to start settles it, before it starts any process).
    server: Any = forkserver._forkserver
    pid, alive, address = server._forkserver_pid, server._forkserver_alive_fd, server._forkserver_address
    server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    if pid is None:
        return
    os.close(alive)  # its lifeline: it exits once its imports are done (no worker holds another copy)
    if address and not util.is_abstract_socket_namespace(address):
        with contextlib.suppress(OSError):
            os.unlink(address)
    if not now:
        threading.Thread(target=_reap, args=(pid,), name="plexus-forkserver-reap", daemon=True).start()
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _reap(pid)
    from multiprocessing import resource_tracker

    # As ResourceTracker._stop (nothing else runs now): its lifeline closed, the forkserver's copy gone, it exits.
    tracker: Any = resource_tracker._resource_tracker
    tracker_fd, tracker_pid = tracker._fd, tracker._pid
    if tracker_fd is not None and tracker_pid is not None:
        tracker._fd = tracker._pid = None
        os.close(tracker_fd)
        _reap(tracker_pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without re-importing the server's `__main__` in it.

    multiprocessing (forkserver and spawn) makes each child re-import the parent's main module, which
    for Jupyter is the whole `jupyter server` entry point: measured 0.6 to 1 s before a task's first
    line. Workers import their task code by path and need nothing from `__main__`, so a bare module
    stands in for it while the child's preparation data is taken (synchronously, in start()).
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


@dataclass
class _Job:
    """The task a worker is running."""

    task_id: str
    seq: int  # the worker's number for this task: cancellation and request answers name it
    on_message: MessageCallback
    cancelled: bool = False


@dataclass
class _Waiting:
    """A task submitted while no warm worker was free: what its worker will be sent, once one is."""

    task_id: str
    target: str
    params: dict[str, Any]
    max_output_bytes: int
    environment: dict[str, Any]
    on_message: MessageCallback
    single_use: bool
    cancelled: bool = False


@dataclass
class _Worker:
    process: Any
    channel: Any  # our end of the duplex pipe: the reader thread reads it, submit() and reply() write it
    cancel_seq: Any  # shared memory: the number of the task to cancel (worker.pool_main)
    single_use: bool  # isolated: ends with its task
    send_lock: threading.Lock
    job: _Job | None = None
    seq: int = 0
    tasks_run: int = 0
    retiring: bool = False  # told to stop (or killed): never given another task

    def send(self, message: Message) -> None:
        with self.send_lock:
            self.channel.send(message)

    def send_run(self, run: Run) -> None:
        """A task to run: plain data (its parameters and environment are JSON's), pickled with pickle itself, not
        multiprocessing's ForkingPickler, which `send` builds with a buffer for every message (~1 us a task)."""
        data = pickle.dumps(run, pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            self.channel.send_bytes(data)


class LocalExecutor(Executor):
    name = "local"

    def __init__(
        self,
        start_method: str | None = None,
        *,
        pool_size: int | None = None,
        reuse: bool = True,
        max_tasks_per_worker: int = 1000,
        max_worker_memory_mb: float = 1024.0,
        nice: int = 0,
        preload: Sequence[str] | None = None,
    ) -> None:
        """`pool_size` workers are kept warm (None: the manager's max_concurrency, see size_for); more start on
        demand and are retired once idle. `reuse=False` gives every task a fresh process, as before the pool.
        `preload`: modules the forkserver imports once for every worker (None: those of the task types registered
        when the executor starts that ask for it, core/tasks.py `preload_modules`)."""
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        self._mp: Any = mp.get_context(self.start_method)
        self.preload = list(preload) if preload is not None else None
        self._forkserver_preload: list[str] | None = None  # what the forkserver imports (start())
        self._pool_size_given = pool_size is not None
        self.pool_size = pool_size or 0
        self.reuse = reuse
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_worker_memory_mb = max_worker_memory_mb
        self.nice = nice
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff = LoopHandoff()
        self._workers: dict[Any, _Worker] = {}  # by our end of its pipe
        self._workers_version = 0  # moves with every change of _workers: the reader thread registers their pipes
        self._idle: list[_Worker] = []
        self._by_task: dict[str, _Worker] = {}
        self._waiting: dict[str, _Waiting] = {}  # by task id, in submission order: no worker free yet
        self._lock = threading.Lock()  # the four maps above, and the workers' jobs
        self._starter: ThreadPoolExecutor | None = None  # starts workers for waiting tasks, off the loop
        self._spawn_lock = threading.Lock()  # _main_module_hidden swaps a global
        # Start threads bringing up a worker for a waiting task (counted under it): the pool's warm-up lets them take
        # the spawn lock first (a Lock is not fair: the warm-up, re-taking it at once, passed them for each worker).
        self._task_starts = threading.Condition()
        self._task_starts_pending = 0
        self._wake_r: Any = None
        self._wake_w: Any = None
        self._reader: threading.Thread | None = None
        self._warmer: threading.Thread | None = None
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    def size_for(self, max_concurrency: int) -> None:
        if not self._pool_size_given:
            self.pool_size = max_concurrency

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self.start_method == "forkserver":
            # Before the forkserver starts (_warm_up): it imports these once, and every worker forks from it.
            extra = self.preload if self.preload is not None else tasks.preload_modules()
            self._forkserver_preload = forkserver_preload(extra)
            # One started early (start_forkserver_early) serves if it imports what this executor wants; this
            # executor adopts it, or it is ended (at once, before any worker comes from it) and replaced.
            stop_early_forkserver(self._forkserver_preload)
            self._mp.set_forkserver_preload(self._forkserver_preload)
        self._closing = False
        self._wake_r, self._wake_w = self._mp.Pipe(duplex=False)
        self._reader = threading.Thread(target=self._read, name="plexus-worker-reader", daemon=True)
        self._reader.start()
        self._starter = ThreadPoolExecutor(STARTERS, thread_name_prefix="plexus-worker-start")
        # Starting the forkserver (a fresh interpreter importing the worker module) takes most of a second,
        # and each worker some milliseconds: do it now, off the event loop, rather than in the first tasks.
        self._warmer = threading.Thread(target=self._warm_up, name="plexus-pool-warmup", daemon=True)
        self._warmer.start()

    def _warm_up(self) -> None:
        if self._starter is not None:  # an isolated task (an evaluation) is given a worker by a start thread
            start_one_thread(self._starter)
        if self._forkserver_preload is not None:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        if self.reuse:
            self._fill_pool()

    def _fill_pool(self) -> None:
        """Start workers until the pool has `pool_size` reusable ones (off the event loop)."""
        while not self._closing:
            with self._lock:
                if sum(not w.single_use and not w.retiring for w in self._workers.values()) >= self.pool_size:
                    return
            try:
                new = self._spawn(single_use=False, for_task=False)
            except Exception:
                log.exception("Plexus: could not start a warm worker; tasks will start their own")
                return
            self._became_idle(new)

    def _spawn(self, *, single_use: bool, for_task: bool = True) -> _Worker:
        """Start a worker process and register it with the reader thread; one not `for_task` (the pool's warm-up)
        waits until no start for a waiting task wants the spawn lock (right after start the first evaluation's
        worker came after one to three of the pool's, 5-15 ms each once the forkserver has preloaded)."""
        receiver, sender = self._mp.Pipe(duplex=True)  # duplex: the server answers the worker's requests on it
        cancel_seq = self._mp.RawValue("q", 0)
        process = self._mp.Process(
            target=worker.pool_main,
            # The server's environment now, not the forkserver's (which may have started before the server set
            # its own variables: start_forkserver_early).
            args=(sender, cancel_seq, self.nice, dict(os.environ)),
            name="plexus-worker",
            daemon=True,
        )
        with self._task_starts:
            if for_task:
                self._task_starts_pending += 1
            else:
                self._task_starts.wait_for(lambda: not self._task_starts_pending or self._closing, SPAWN_YIELD_MAX)
        try:
            with self._spawn_lock, _main_module_hidden():
                process.start()
        finally:
            if for_task:
                with self._task_starts:
                    self._task_starts_pending -= 1
                    self._task_starts.notify_all()
        sender.close()  # the child holds the only writer: EOF on our side means it is gone
        new = _Worker(process, receiver, cancel_seq, single_use, threading.Lock())
        with self._lock:
            self._workers[receiver] = new
            self._workers_version += 1
            # Started while shutdown retired the workers it saw (a replacement the reader thread was starting):
            # retired here, or it would live on, and the reader thread wait for its pipe, past the shutdown.
            late = self._closing and not new.retiring
        if late:
            self._retire(new)
        self._wake()
        return new

    def _wake(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._wake_w.send_bytes(b"w")

    async def shutdown(self, grace: float) -> None:
        with self._lock:
            ids = list(self._by_task)
            never_started, self._waiting = list(self._waiting.values()), {}
        # Stopped by the shutdown before any worker took them, as a running task is (the manager re-queues them).
        self._deliver([(w.on_message, msg) for w in never_started for msg in (Cancelled(), Exit(0))])
        await self.stop_and_wait(ids, lambda: bool(self._by_task), grace)
        self._closing = True
        if self._starter is not None:
            await asyncio.to_thread(self._starter.shutdown, True)
        if self._warmer is not None:
            # A worker the warm-up is starting now would be registered after the snapshot below, never be
            # retired, and keep the reader thread waiting for its pipe: let the warm-up end first.
            await asyncio.to_thread(self._warmer.join, 30)
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            self._retire(w)
        for w in workers:
            await asyncio.to_thread(w.process.join, 5)
            if w.process.is_alive():
                w.process.kill()
        self._wake()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running, workers, idle = len(self._by_task), len(self._workers), len(self._idle)
            waiting = len(self._waiting)
        return {
            "name": self.name,
            "start_method": self.start_method,
            "running": running,
            "waiting": waiting,
            "workers": workers,
            "idle_workers": idle,
            "pool_size": self.pool_size,
            "reuse": self.reuse,
        }

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
        if self._loop is None or self._starter is None:
            raise RuntimeError("LocalExecutor.start(loop) must be called before submit()")
        waiting = _Waiting(
            task_id, target, params, max_output_bytes, dict(environment or {}), on_message, isolated or not self.reuse
        )
        with self._lock:
            self._waiting[task_id] = waiting
            chosen = None if waiting.single_use else self._take_idle()
            if chosen is not None:
                self._assign(chosen, waiting)
        if chosen is not None and self._run_on(chosen, waiting):
            return f"pid={chosen.process.pid}"
        # No warm worker free (still warming up, all busy, or isolated): a start thread brings one up; the
        # first worker free takes the task (_became_idle), and Placed names it.
        self._starter.submit(self._start_for, waiting)
        return "pid=starting"

    def _take_idle(self) -> _Worker | None:
        """The warmest idle worker not retiring (under the lock)."""
        while self._idle:
            candidate = self._idle.pop()  # last in, first out: the warmest worker
            if not candidate.retiring:
                return candidate
        return None

    def _assign(self, w: _Worker, waiting: _Waiting) -> None:
        """Give a waiting task to a worker (under the lock; `_run_on` then sends it)."""
        del self._waiting[waiting.task_id]
        w.seq += 1
        w.job = _Job(waiting.task_id, w.seq, waiting.on_message, cancelled=waiting.cancelled)
        self._by_task[waiting.task_id] = w
        if waiting.cancelled:  # cancelled while it waited: it stops at its first check
            w.cancel_seq.value = w.seq

    def _run_on(self, w: _Worker, waiting: _Waiting) -> bool:
        """Send an assigned task to its worker. False when the worker died meanwhile and the task is waiting
        again (the caller finds it another); True when it runs, or when the reader already reported its end."""
        job = w.job
        try:
            assert job is not None
            w.send_run(
                Run(
                    job.seq,
                    waiting.task_id,
                    waiting.target,
                    waiting.params,
                    waiting.max_output_bytes,
                    waiting.environment,
                )
            )
            return True
        except (OSError, ValueError):
            # It died while idle. If the reader has not seen that yet, the task waits for another worker; if
            # it has, it reported the task's exit already (the manager records the failure).
            with self._lock:
                w.retiring = True
                ours = w.job is not None and w.job.task_id == waiting.task_id
                if ours:
                    w.job = None
                    self._by_task.pop(waiting.task_id, None)
                    self._waiting[waiting.task_id] = waiting
            return not ours

    def _start_for(self, waiting: _Waiting) -> None:
        """On a start thread: bring up a worker for a waiting task, unless a free one took it meanwhile."""
        with self._lock:
            if self._closing or waiting.task_id not in self._waiting:
                return
        try:
            new = self._spawn(single_use=waiting.single_use)
        except Exception as exc:
            with self._lock:
                mine = self._waiting.pop(waiting.task_id, None) is waiting
            if mine:
                log.exception("Plexus: could not start a worker for task %s", waiting.task_id)
                self._deliver(
                    [
                        (waiting.on_message, Failed(f"the task could not be started: {exc}")),
                        (waiting.on_message, Exit(None)),
                    ]
                )
            return
        if not waiting.single_use:
            self._became_idle(new)  # it takes the oldest waiting task, perhaps not this one: then this one's
            return  # worker is still coming (each waiting task has its own start), or another took it
        with self._lock:
            mine = not self._closing and self._waiting.get(waiting.task_id) is waiting
            if mine:
                self._assign(new, waiting)
        if not mine:  # killed or shut down while its worker started
            self._retire(new)
        elif self._run_on(new, waiting):
            self._placed(new, waiting)
        else:
            self._starter_submit(waiting)

    def _starter_submit(self, waiting: _Waiting) -> None:
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            if self._starter is not None:
                self._starter.submit(self._start_for, waiting)

    def _became_idle(self, w: _Worker) -> None:
        """A reusable worker is free (warmed up, or its task ended): it takes the oldest waiting task, if any."""
        with self._lock:
            waiting = next((t for t in self._waiting.values() if not t.single_use), None)
            if waiting is None or w.retiring:
                if not w.retiring:
                    self._idle.append(w)
                return
            self._assign(w, waiting)
        if self._run_on(w, waiting):
            self._placed(w, waiting)
        else:
            self._starter_submit(waiting)  # the worker died before it got the task: another start for it

    def _placed(self, w: _Worker, waiting: _Waiting) -> None:
        self._deliver([(waiting.on_message, Placed(f"pid={w.process.pid}"))])

    def reply(self, task_id: str, message: Reply) -> None:
        with self._lock:
            w = self._by_task.get(task_id)
            seq = w.job.seq if w is not None and w.job is not None else None
        if w is not None and seq is not None:
            with contextlib.suppress(OSError, ValueError):  # the worker is gone: nobody waits for the answer
                w.send(ToTask(seq, message))

    def request_cancel(self, task_id: str) -> None:
        with self._lock:
            waiting = self._waiting.get(task_id)
            if waiting is not None:
                waiting.cancelled = True  # its worker is told as it gets the task (_assign)
            w = self._by_task.get(task_id)
            if w is not None and w.job is not None:
                w.job.cancelled = True
                w.cancel_seq.value = w.job.seq

    def kill(self, task_id: str) -> None:
        with self._lock:
            waiting = self._waiting.pop(task_id, None)
            w = self._by_task.get(task_id)
            if w is not None and w.process.is_alive():
                w.retiring = True
                w.process.kill()  # under the lock: the worker cannot have moved on to another task
        if waiting is not None:  # no worker took it yet: it ends as a killed one would
            self._deliver([(waiting.on_message, Exit(-9))])

    def pid(self, task_id: str) -> int | None:
        with self._lock:
            w = self._by_task.get(task_id)
        return w.process.pid if w is not None else None

    # -- the reader thread ---------------------------------------------------------------------

    def _read(self) -> None:
        """Wait on every worker's pipe; hand what arrived to the loop in one callback per wake-up.

        One `select.poll` object kept across wake-ups, its pipes registered again only when the workers changed
        (`_workers_version`): multiprocessing's `wait` built a selector and registered every pipe on each call,
        ~6 us of this thread's CPU against 0.6 with five pipes. Where there is no poll (Windows), that `wait`."""
        poller = select.poll() if hasattr(select, "poll") else None
        watched: dict[int, Any] = {}  # the poller's: file descriptor -> its pipe (the wake-up pipe's, every worker's)
        version = -1
        while True:
            with self._lock:
                channels = list(self._workers) if version != self._workers_version else None
                version = self._workers_version
                closing_with_none = self._closing and not self._workers
            if closing_with_none:
                return
            if poller is not None and channels is not None:
                wanted = {c.fileno(): c for c in [self._wake_r, *channels] if not c.closed}
                for fd in [fd for fd, c in watched.items() if wanted.get(fd) is not c]:
                    poller.unregister(fd)
                    del watched[fd]
                for fd, c in wanted.items():
                    if fd not in watched:
                        poller.register(fd, select.POLLIN)
                        watched[fd] = c
            if poller is None:
                with self._lock:
                    channels = list(self._workers)
                try:
                    ready: list[Any] = wait_for_pipes([self._wake_r, *channels], timeout=1.0)
                except OSError:  # a pipe closed while we waited: look again
                    ready = []
            else:
                ready = [watched[fd] for fd, _ in poller.poll(1000) if fd in watched]
            batch: Deliveries = []
            for channel in ready:
                if channel is self._wake_r:
                    with contextlib.suppress(OSError, EOFError):
                        while self._wake_r.poll():
                            self._wake_r.recv_bytes()
                    continue
                with self._lock:
                    w = self._workers.get(channel)
                if w is not None:
                    self._drain(w, batch)
            if batch:
                self._deliver(batch)

    def _drain(self, w: _Worker, batch: Deliveries) -> None:
        """Read what one worker sent (at most READ_BATCH messages); handle its end or its death. After a task's
        end it does not look for more: the worker sends nothing until its next task (anything else, a message of
        a thread the task left behind, or the pipe's end, the next poll finds: it reports a pipe while it holds
        something to read)."""
        for _ in range(READ_BATCH):
            try:
                msg = w.channel.recv()
            except (EOFError, OSError):
                self._died(w, batch)
                return
            except Exception as exc:  # an unpicklable message: report it, keep reading
                msg = Log(f"plexus: a message from the worker could not be read: {exc}")
            ended = False
            for one in _unbatched(msg):  # worker.Outbox coalesces messages
                job = w.job
                if isinstance(one, End):
                    self._ended(w, one, batch)
                    ended = True
                elif job is not None:
                    batch.append((job.on_message, one))
            if ended:
                return
            try:
                if not w.channel.poll():
                    return
            except (EOFError, OSError):
                self._died(w, batch)
                return

    def _ended(self, w: _Worker, end: End, batch: Deliveries) -> None:
        """A task ended in a worker that lives on: report it, then reuse or retire the worker."""
        rss_mb = float(end.rss_mb)
        with self._lock:
            job, w.job = w.job, None
            if job is not None:
                self._by_task.pop(job.task_id, None)
            w.tasks_run += 1
            retire = (
                w.single_use
                or w.retiring
                or self._closing
                or (job is not None and job.cancelled)
                or w.tasks_run >= self.max_tasks_per_worker
                or rss_mb > self.max_worker_memory_mb
                or sum(not o.single_use and not o.retiring for o in self._workers.values()) > self.pool_size
            )
        if job is not None:
            batch.append((job.on_message, end.final))
            batch.append((job.on_message, Exit(0)))
        if not retire:
            self._became_idle(w)
        if retire:
            if rss_mb > self.max_worker_memory_mb:
                log.info(
                    "Plexus: worker pid %s uses %.0f MB, above max_worker_memory_mb: replaced", w.process.pid, rss_mb
                )
            self._retire(w)

    def _retire(self, w: _Worker) -> None:
        """Stop a worker: an idle one is told to exit, a busy one is killed. Its pipe then reaches EOF and the
        reader thread reaps and replaces it (`_died`)."""
        with self._lock:
            w.retiring = True
            if w in self._idle:
                self._idle.remove(w)
            busy = w.job is not None
        try:
            if busy:
                w.process.kill()
            else:
                w.send(Stop())
        except (OSError, ValueError):
            w.process.kill()

    def _died(self, w: _Worker, batch: Deliveries) -> None:
        """A worker's pipe reached EOF: it exited (retired) or died (killed, crashed). Replace it."""
        with contextlib.suppress(OSError):
            w.channel.close()
        w.process.join(5)
        with self._lock:
            self._workers.pop(w.channel, None)
            self._workers_version += 1
            if w in self._idle:
                self._idle.remove(w)
            job, w.job = w.job, None
            if job is not None:
                self._by_task.pop(job.task_id, None)
        if job is not None:
            batch.append((job.on_message, Exit(w.process.exitcode)))
        if self.reuse and not self._closing:
            self._fill_pool()

    def _deliver(self, batch: Deliveries) -> None:
        self._handoff.deliver(self._loop, batch)


def _unbatched(msg: Any) -> list[ToManager | End]:
    """The messages of one read: a worker.Outbox batch is a list of messages pickled one by one, so one that
    cannot be read costs only itself (a log line), never the task's end beside it."""
    if not isinstance(msg, Batch):
        return [msg]
    out: list[ToManager | End] = []
    for data in msg.items:
        try:
            out.append(pickle.loads(data))
        except Exception as exc:
            out.append(Log(f"plexus: a message from the worker could not be read: {type(exc).__name__}: {exc}"))
    return out
