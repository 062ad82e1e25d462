"""The executor interface the TaskManager drives."""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import PlexusError
from ..messages import Reply, ToManager
from ..resources import Resources, machine_capacity

MessageCallback = Callable[[ToManager], None]
Deliveries = list[tuple[MessageCallback, ToManager]]  # what an executor's thread hands the event loop at once

log = logging.getLogger("plexus_mcp_jupyter")


class ExecutorUnavailable(PlexusError):
    """The executor cannot start (a Dask scheduler that does not answer); the message says what to change."""


def run_callbacks(batch: Deliveries) -> None:
    """Hand the messages an executor's thread collected to their tasks, on the event loop (one loop wake-up per
    batch rather than per message); a failing handler is logged and never stops the others."""
    for on_message, msg in batch:
        try:
            on_message(msg)
        except Exception:
            log.exception("Plexus: handling a worker message %s failed", type(msg).__name__)


class LoopHandoff:
    """What an executor's threads hand the event loop, in order, with at most one callback waiting on the loop:
    what arrives before the loop has run it joins it. Each call_soon_threadsafe writes to the loop's self-pipe
    (a system call here, a read and a pass of the loop there, and a wake-up when it slept); while the loop is
    busy, as it is when the machine's cores are, the hand-offs of a worker's end, the next one's and the
    placements share one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: Deliveries = []
        self._scheduled_on: asyncio.AbstractEventLoop | None = None  # the loop a callback waits on, if one does

    def deliver(self, loop: asyncio.AbstractEventLoop | None, batch: Deliveries) -> None:
        if not batch or loop is None:
            return
        with self._lock:
            self._waiting.extend(batch)
            if self._scheduled_on is loop:
                return
            self._scheduled_on = loop  # (another loop's callback, one stopped without running it, is not waited for)
        try:
            loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop closed during shutdown: nothing will run what waits
            with self._lock:
                self._waiting.clear()
                self._scheduled_on = None

    def _run(self) -> None:
        with self._lock:
            batch, self._waiting = self._waiting, []
            self._scheduled_on = None
        run_callbacks(batch)


class Executor(abc.ABC):
    """Runs task functions elsewhere and reports their messages on the server's event loop.

    `on_message` is always called on the loop given to `start()` with core/messages.py messages; the last
    message of every submitted task is Exit, after its final message (Done, Failed, Cancelled or Lost) if it
    sent one. A Done message carries output already passed through `core.output.bounded_output` with the
    given `max_output_bytes`, in the worker, so a huge result never reaches the server.
    """

    name: str = "executor"

    def size_for(self, max_concurrency: int) -> None:  # noqa: B027 - optional: an executor without a pool ignores it
        """Told, before start(), how many tasks may run at once: a pool of workers sizes itself from it."""

    @abc.abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    @abc.abstractmethod
    def submit(
        self,
        task_id: str,
        target: str,
        params: dict[str, Any],
        on_message: MessageCallback,
        *,
        max_output_bytes: int,
        environment: Mapping[str, Any] | None = None,
        isolated: bool = False,
        resources: Mapping[str, int] | None = None,
    ) -> str:
        """Start a task; return an identifier of the worker running it (e.g. "pid=1234").

        `isolated`: the task must not share its worker with any other task (a fresh process, discarded after it).
        `resources`: what the task needs (its type's, core/resources.py); an executor whose workers declare
        resources (Dask) places it on one that has them; the local one has nothing to place.

        `environment` is what the server tells every task besides its parameters (`TaskContext.environment`:
        the store URL, the Jupyter root); unlike parameters it is never stored or shown to a client.
        """

    def dashboard_link(self, task_id: str | None = None) -> str | None:
        """A web page showing the cluster's work (Dask's dashboard), for `task_id` only while it runs here; None
        when the executor has none."""
        return None

    def reply(self, task_id: str, message: Reply) -> None:
        """Send a task the answer to one of its requests (`TaskContext.request`)."""
        raise NotImplementedError(f"the {self.name} executor cannot answer requests from tasks")

    @abc.abstractmethod
    def request_cancel(self, task_id: str) -> None:
        """Ask the task to stop at its next check (cooperative)."""

    @abc.abstractmethod
    def kill(self, task_id: str) -> None:
        """Stop the task's worker now (forced)."""

    @abc.abstractmethod
    async def shutdown(self, grace: float) -> None:
        """Cancel everything still running, wait up to `grace` seconds, then kill."""

    def close(self) -> None:  # noqa: B027 - optional: an executor that holds nothing before start() ignores it
        """Release what the constructor took (a Dask LocalCluster and its processes) when the server never
        starts; once started, `shutdown` does."""

    async def stop_and_wait(
        self, task_ids: list[str], running: Callable[[], bool], grace: float, *, force: bool = False
    ) -> None:
        """Ask these tasks to stop (cooperatively, or with `force` by `kill`), then wait up to `grace` seconds
        while `running()` holds: the steps of a shutdown."""
        for task_id in task_ids:
            (self.kill if force else self.request_cancel)(task_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while running() and loop.time() < deadline:
            await asyncio.sleep(0.02)

    @abc.abstractmethod
    def status(self) -> dict[str, Any]: ...

    def capacity(self) -> Resources:
        """What this executor can run at once (core/resources.py); the scheduler never commits more.

        By default this machine's cores (as `slots`) and physical memory (`memory_mb`); an executor with
        other resources (a cluster's GPUs) says so here. The server's `executor_resources` setting overrides
        any of it, and `max_concurrency` bounds the slots.
        """
        return machine_capacity()
