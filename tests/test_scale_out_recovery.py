"""Recovering the tasks of a gone server, with several servers on one store (issue 13).

On a real PostgreSQL, recovery never holds the event loop: the lease keeper's recovery (the RUNNING read and
each take-over) and the re-queue of a task at shutdown run on the manager's writer thread, so while another
connection holds a lock on `tasks` Jupyter's own status, health and the reads still answer, and once the lock
goes the work commits. On a real SQLite file, a claim's process id is trusted over its valid lease only when
the claim is provably from this machine and process-id namespace (core/leases.py MACHINE): two containers
sharing the file, with one host name and PID 1 each, do not take each other's live tasks over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import httpx2
import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core.events import EventBus
from plexus_mcp_jupyter.core.executors.local import LocalExecutor
from plexus_mcp_jupyter.core.leases import MACHINE, machine_identity
from plexus_mcp_jupyter.core.manager import HOST, TaskManager
from plexus_mcp_jupyter.core.models import Stage, StageStatus, Task, TaskStatus
from plexus_mcp_jupyter.core.store import Store
from plexus_mcp_jupyter.core.tasks import TaskType

from .conftest import poll, registered_task_types

T = TypeVar("T")
POOL_TIMEOUT = 1.0  # db_pool_timeout_seconds: a store read slower than this answers "the store is unavailable"
PROMPT = 3.0  # seconds within which the loop answers (generous: the machine is shared); a blocked loop takes
STATEMENT_TIMEOUT = 10.0  # this long (db_statement_timeout_seconds) before PostgreSQL gives up on the statement
OTHER_MACHINE = "0123456789ab"  # the machine identity of a server in another container or on another machine
GONE = "local:another-host:4242:gone"  # a server that stopped renewing its leases
REDO = TaskType("redo", "plexus_mcp_jupyter.core.demo:run_demo", "the demo, safe to re-run", idempotent=True)
RESUMABLE = TaskType("resumable", "tests.task_functions:long_idempotent", "runs until stopped", idempotent=True)


@pytest.fixture
def plexus_config(postgres_url) -> dict[str, Any]:
    return {
        "db_url": postgres_url,
        "cancel_grace_seconds": 1.0,
        "poll_interval": 0.2,
        "progress_write_interval": 0.2,
        "db_pool_timeout_seconds": POOL_TIMEOUT,
        "db_statement_timeout_seconds": STATEMENT_TIMEOUT,
    }


@pytest.fixture
def redo_type():
    with registered_task_types(REDO):
        yield


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    """The call's result and how many seconds it took."""
    start = time.monotonic()
    result = await call
    return result, time.monotonic() - start


def left_running(
    store: Store, task_type: str = "demo", *, worker: str = GONE, lease_ends: float, params: dict | None = None
) -> Task:
    """A task RUNNING as claimed by `worker`, its lease ending at `lease_ends`, with a stage under way."""
    at = time.time() - 60
    task = Task(
        id=str(uuid.uuid4()),
        type=task_type,
        status=TaskStatus.RUNNING,
        params=params or {"items": 3, "item_delay_ms": 0},
        started_at=at,
        worker=worker,
        lease_expires_at=lease_ends,
    )
    store.create_task(task)
    store.save_progress(task, stages=[Stage(name="Processing", order=0, status=StageStatus.RUNNING, started_at=at)])
    return task


class LoopWatch:
    """The longest the event loop went without running a 20 ms ticker, while watched."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            at = time.monotonic()
            self.longest = max(self.longest, at - last)
            last = at

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@contextlib.contextmanager
def held_elsewhere(db_url: str, statement: str, **params: Any) -> Iterator[None]:
    """Another connection holds a lock on `tasks` (taken by `statement`) for the block, then lets it go."""
    locker = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with locker.connect() as conn:
            lock = conn.begin()
            conn.execute(sa.text(statement), params)
            try:
                yield
            finally:
                lock.rollback()
    finally:
        locker.dispose()


ROW_LOCK = "SELECT id FROM tasks WHERE id = :id FOR UPDATE"


async def failed_by_recovery(store: Store, task_id: str) -> Task:
    """The task once recovery resolved it as a gone server's: FAILED, saying why."""
    failed = await poll(lambda: store.get_task(task_id), lambda t: t.status is TaskStatus.FAILED, timeout=30)
    assert failed.error_message == "server restarted while the task was running"
    return failed


def call_like_the_lease_keeper(runtime) -> None:
    """What LeaseKeeper does when a heartbeat finds expired leases: call `on_expired` on the loop."""
    asyncio.get_running_loop().call_soon_threadsafe(runtime.leases.on_expired)


async def until_past(at: float) -> None:
    await poll(time.time, lambda t: t > at, timeout=30)


# -- PostgreSQL: recovery off the loop -------------------------------------------------------------------


async def test_lease_recovery_under_a_table_lock_never_stalls_the_loop_and_resolves_once_it_goes(
    server_url, token, runtime, mcp_client, plexus_config, redo_type
):
    """The lease keeper finds a gone server's tasks while another connection holds `LOCK TABLE tasks`: the
    recovery's RUNNING read waits on the writer thread, Jupyter's status answers at once, health says degraded
    and the reads "unavailable" within the pool timeout. Once the lock goes, the plain task is FAILED (and
    announced) and the idempotent one re-queued and run here."""
    assert runtime.manager.offload
    store = runtime.store
    lease_ends = time.time() + 2.0  # valid while the rows are written and the lock taken, then run out
    plain = left_running(store, lease_ends=lease_ends)
    redo = left_running(store, "redo", lease_ends=lease_ends)
    ended: list[str] = []
    runtime.bus.add_listener(lambda e: ended.append(e.entity_id) if e.kind == "task.failed" else None)
    headers = {"Authorization": f"token {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, mcp_client() as client:
        with held_elsewhere(plexus_config["db_url"], "LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"):
            await until_past(lease_ends)
            async with LoopWatch() as watch:
                call_like_the_lease_keeper(runtime)
                status, took = await timed(http.get(server_url + "api/status"))  # Jupyter's own: no store
                assert status.status_code == 200 and took < PROMPT, took

                health, took = await timed(http.get(server_url + "plexus/api/health"))
                assert took < POOL_TIMEOUT + PROMPT, took
                assert health.json()["status"] == "degraded", health.json()

                listing, took = await timed(http.get(server_url + "plexus/api/tasks"))
                assert took < POOL_TIMEOUT + PROMPT, took
                assert listing.status_code == 503, listing.text

                got, took = await timed(client.call_tool("get_task", {"task_id": plain.id}))
                assert took < POOL_TIMEOUT + PROMPT, took
                assert got.is_error and "the store is unavailable" in got.content[0].text
            assert watch.longest < PROMPT, watch.longest

    failed = await failed_by_recovery(store, plain.id)
    assert failed.stages[0].status is StageStatus.FAILED
    await poll(lambda: ended, lambda ids: plain.id in ids)  # announced on this server's bus
    again = await poll(lambda: store.get_task(redo.id), lambda t: t.status is TaskStatus.COMPLETED, timeout=30)
    assert again.worker.startswith(runtime.manager.server_id)  # re-queued, then claimed and run here


async def test_lease_recovery_whose_take_over_waits_on_a_row_lock_leaves_the_reads_answering(
    server_url, token, runtime, plexus_config
):
    """Another transaction holds the gone server's task row (`FOR UPDATE`): recovery reads it, and its take-over
    waits on the writer thread while REST reads of that very task answer at once. Once the row is free, the take
    over commits."""
    store = runtime.store
    task = left_running(store, lease_ends=time.time() - 1)
    headers = {"Authorization": f"token {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
        with held_elsewhere(plexus_config["db_url"], ROW_LOCK, id=task.id):
            async with LoopWatch() as watch:
                call_like_the_lease_keeper(runtime)
                got, took = await timed(http.get(server_url + f"plexus/api/tasks/{task.id}"))
                assert took < PROMPT and got.status_code == 200, (took, got.text)
                assert got.json()["status"] == "RUNNING"  # not taken over: the row is held
                health, took = await timed(http.get(server_url + "plexus/api/health"))
                assert took < PROMPT and health.json()["status"] == "ok", (took, health.json())
            assert watch.longest < PROMPT, watch.longest
    await failed_by_recovery(store, task.id)


@contextlib.asynccontextmanager
async def pg_manager(postgres_url: str) -> AsyncIterator[TaskManager]:
    """A TaskManager with leases on a real PostgreSQL, its statements bounded by STATEMENT_TIMEOUT."""
    with registered_task_types(RESUMABLE):
        store = Store(postgres_url, statement_timeout=STATEMENT_TIMEOUT)
        manager = TaskManager(
            store, EventBus(), LocalExecutor(), cancel_grace_seconds=1.0, poll_interval=0.1, lease_seconds=30
        )
        await manager.start()
        try:
            yield manager
        finally:
            await manager.stop()
            store.close()


async def test_a_requeue_at_shutdown_waits_on_the_writer_thread_not_on_the_loop(postgres_url):
    """The server stops while an idempotent task runs and another transaction holds the task's row: the re-queue
    waits on the writer thread (the loop keeps running, `stop` waits for it), then commits once the row is free."""
    async with pg_manager(postgres_url) as manager:
        await requeue_at_shutdown_under_a_row_lock(manager, postgres_url)


async def requeue_at_shutdown_under_a_row_lock(manager: TaskManager, postgres_url: str) -> None:
    store = manager.store
    task = await manager.adispatch("resumable", {})
    await poll(lambda: store.get_task(task.id).stages, lambda stages: len(stages) == 1, timeout=30)
    with held_elsewhere(postgres_url, ROW_LOCK, id=task.id):
        async with LoopWatch() as watch:
            stopping = asyncio.ensure_future(manager.stop())
            await poll(lambda: task.id in manager._requeueing, lambda asked: asked, timeout=30)
            assert not stopping.done()  # it waits for the re-queue (bounded)
            assert store.get_task(task.id).status is TaskStatus.RUNNING
        assert watch.longest < PROMPT, watch.longest
    await asyncio.wait_for(stopping, 30)
    after = store.get_task(task.id)
    assert (after.status, after.worker, after.stages) == (TaskStatus.QUEUED, None, [])


# -- SQLite: a process id decides only for a claim provably from here ------------------------------------


def a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def left_alone(store: Store, live: dict[str, Task]) -> None:
    for why, task in live.items():
        after = store.get_task(task.id)
        assert (after.status, after.worker) == (TaskStatus.RUNNING, task.worker), why


async def test_a_live_claim_of_another_container_with_our_host_name_and_pid_is_left_to_its_lease(tmp_path):
    """Two containers share a SQLite file, one host name, and PID 1: the other's claims name our host and our
    process id (or one that does not exist here), but another machine identity, so their valid leases decide
    (left running); claims provably from here with a dead process or our own (an earlier life) are gone at once,
    and so is any claim whose lease ran out."""
    assert MACHINE and MACHINE != OTHER_MACHINE  # Linux: the boot id and /proc/self/ns/pid are readable
    store = Store(f"sqlite:///{tmp_path / 'shared.db'}")
    valid, expired = time.time() + 30, time.time() - 1
    pid, dead = os.getpid(), a_dead_pid()

    def claim(pid: int, machine: str | None) -> str:
        return f"local:{HOST}:{pid}:{uuid.uuid4().hex[:12]}" + (f":{machine}" if machine else "") + "/pid=7"

    live = {
        "their PID 1 is ours": left_running(store, worker=claim(pid, OTHER_MACHINE), lease_ends=valid),
        "their pid is not alive here": left_running(store, worker=claim(dead, OTHER_MACHINE), lease_ends=valid),
        "no machine recorded": left_running(store, worker=claim(dead, None), lease_ends=valid),
    }
    gone = {
        "an earlier life of our pid here": left_running(store, worker=claim(pid, MACHINE), lease_ends=valid),
        "a crashed server here": left_running(store, worker=claim(dead, MACHINE), lease_ends=valid),
        "their lease ran out": left_running(store, worker=claim(pid, OTHER_MACHINE), lease_ends=expired),
    }
    manager = TaskManager(store, EventBus(), LocalExecutor(), poll_interval=0.1, lease_seconds=30)
    try:
        await manager.start()  # start-up recovery
        left_alone(store, live)
        for why, task in gone.items():
            after = store.get_task(task.id)
            assert after.status is TaskStatus.FAILED, why
            assert after.error_message == "server restarted while the task was running", why
        await manager.arecover()  # and the lease keeper's, later
        left_alone(store, live)
        assert manager.server_id.endswith(f":{MACHINE}")  # this server's claims say where it runs
    finally:
        await manager.stop()
        store.close()


def test_the_machine_identity_names_the_kernel_boot_and_the_pid_namespace(tmp_path):
    boot = tmp_path / "boot_id"
    boot.write_text("a7f695af-5b30-45e7-aa10-2ea03b87fea5\n")
    (tmp_path / "ns1").symlink_to("pid:[4026531836]")
    (tmp_path / "ns2").symlink_to("pid:[4026532001]")
    one = machine_identity(str(boot), str(tmp_path / "ns1"))
    assert one == machine_identity(str(boot), str(tmp_path / "ns1")) and len(one) == 12
    assert machine_identity(str(boot), str(tmp_path / "ns2")) != one  # another container on the same kernel
    other_boot = tmp_path / "other_boot_id"
    other_boot.write_text("0b6f2c1e-0000-4000-8000-000000000000\n")
    assert machine_identity(str(other_boot), str(tmp_path / "ns1")) != one  # another machine, or a reboot
    assert machine_identity(str(tmp_path / "missing"), str(tmp_path / "ns1")) == ""  # unreadable: nothing proven
    assert machine_identity(str(boot), str(tmp_path / "missing")) == ""
