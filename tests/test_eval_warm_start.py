"""Warm start: the event loop never waits for a worker process to start (issue 15, item 5).

Right after the server starts, the forkserver is still preloading and the pool's warm-up thread is starting
workers under the executor's spawn lock; a task submitted then used to start its own worker on the event loop
and freeze the whole server (health, get_task, every request) for a second or more. These tests hold that
lock from another thread, which makes the old behaviour a hang rather than a delay: what they assert is that
the server answers while no worker can start, and the task runs on the first worker that can.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pandas as pd
import pytest
from mcp import Client, StdioServerParameters

from plexus_mcp_jupyter.core import EventBus, Store, TaskManager, TaskStatus
from plexus_mcp_jupyter.core import store as store_module
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.endpoint import transport as transport_module
from plexus_mcp_jupyter.endpoint.principal import REHEARSAL, acting_as
from plexus_mcp_jupyter.evaluations import service as service_module
from plexus_mcp_jupyter.security.identity import Principal

from .conftest import poll
from .test_evaluations import create, finished

# The end of each bootstrap below (its patches before): `plexus mcp serve` with the test's arguments.
_THEN_SERVE = "from plexus_mcp_jupyter.cli import main\nsys.exit(main(sys.argv[1:]))\n"


class SpawnsBlocked:
    """Holds a LocalExecutor's spawn lock from a thread of its own (as the warm-up does while the forkserver
    preloads) until `release()`, or 60 s at most so that a failing test cannot hang the run."""

    def __init__(self, executor: LocalExecutor) -> None:
        self._go = threading.Event()
        self._taken = threading.Event()
        self.released = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(executor,), daemon=True)
        self._thread.start()
        assert self._taken.wait(10)

    def _hold(self, executor: LocalExecutor) -> None:
        with executor._spawn_lock:
            self._taken.set()
            self._go.wait(60)
            self.released.set()

    @property
    def held(self) -> bool:
        return not self.released.is_set()

    def release(self) -> None:
        self._go.set()
        self._thread.join(10)


@pytest.fixture
def spawns_blocked(jp_serverapp) -> Iterator[SpawnsBlocked]:
    """Before the runtime starts (request it before `runtime`): no worker can start until released."""
    blocked = SpawnsBlocked(jp_serverapp.web_app.settings["plexus"].manager.executor)
    yield blocked
    blocked.release()


async def test_the_first_evaluation_after_start_never_holds_the_event_loop(
    spawns_blocked, runtime, mcp_client, server_url, token, jp_root_dir
):
    rows = 2_000
    pd.DataFrame(
        {
            "id": range(rows),
            "label": ["yes" if i % 3 else "no" for i in range(rows)],
            "prediction": ["yes" if i % 5 else "no" for i in range(rows)],
        }
    ).to_csv(jp_root_dir / "first.csv", index=False)
    executor = runtime.manager.executor
    async with mcp_client() as client, httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        made = await create(
            client, type="accuracy", dataset="first.csv", label_column="label", prediction_column="prediction"
        )
        # The evaluation's task was handed to the executor, and waits for a worker that cannot start yet...
        await poll(lambda: executor.status()["waiting"], lambda n: n == 1)
        # ...while the server answers: health, and get_task on the very task (running, its worker still coming).
        health = await http.get(f"{server_url}plexus/api/health")
        task = (await client.call_tool("get_task", {"task_id": made["task_id"]})).structured_content
        assert spawns_blocked.held, "the answers came only once workers could start"
        assert health.status_code == 200
        assert task["status"] == "RUNNING" and task["worker"].endswith("/pid=starting"), task
        spawns_blocked.release()
        done = await finished(client, made["evaluation_id"])
        assert done["status"] == "COMPLETED", done
        ran = (await client.call_tool("get_task", {"task_id": made["task_id"]})).structured_content
        assert int(ran["worker"].rsplit("pid=", 1)[1]) > 0  # Placed: the worker that took it


@asynccontextmanager
async def started_blocked(tmp_path, **executor: Any) -> AsyncIterator[tuple[TaskManager, SpawnsBlocked]]:
    """A manager whose executor cannot start a worker yet (its warm-up blocked, as right after start)."""
    store = Store(f"sqlite:///{tmp_path / 'warm-start.db'}")
    ex = LocalExecutor(**executor)
    blocked = SpawnsBlocked(ex)
    m = TaskManager(store, EventBus(), ex, max_concurrency=1, cancel_grace_seconds=1.0, poll_interval=0.1)
    await m.start()
    try:
        yield m, blocked
    finally:
        blocked.release()
        await m.stop()
        store.close()


async def waiting_task(m: TaskManager, params: dict[str, Any]) -> str:
    """A demo task dispatched, once it waits in the executor for a worker."""
    task = m.dispatch("demo", params)
    await poll(lambda: m.executor.status()["waiting"], lambda n: n == 1)
    return task.id


@pytest.mark.parametrize("reuse", [True, False])
async def test_a_task_submitted_before_any_worker_is_up_runs_on_the_first_one_ready(tmp_path, reuse):
    async with started_blocked(tmp_path, reuse=reuse) as (m, blocked):
        task_id = await waiting_task(m, {"items": 2, "item_delay_ms": 0})
        assert m.get(task_id).status is TaskStatus.RUNNING and blocked.held
        blocked.release()
        await m.wait_final([task_id], 30)
        done = m.get(task_id)
        assert done.status is TaskStatus.COMPLETED, done
        assert m.executor.status()["waiting"] == 0
        assert int(done.worker.rsplit("pid=", 1)[1]) > 0


async def test_a_task_cancelled_while_it_waits_for_a_worker_ends_cancelled_and_the_next_runs(tmp_path):
    async with started_blocked(tmp_path) as (m, blocked):
        task_id = await waiting_task(m, {"items": 100_000, "item_delay_ms": 5})
        m.cancel([task_id])
        blocked.release()
        await m.wait_final([task_id], 30)
        assert m.get(task_id).status is TaskStatus.CANCELLED
        after = m.dispatch("demo", {"items": 1, "item_delay_ms": 0})
        await m.wait_final([after.id], 30)
        assert m.get(after.id).status is TaskStatus.COMPLETED


async def test_a_task_still_waiting_past_the_grace_period_is_killed_without_a_worker(tmp_path):
    async with started_blocked(tmp_path) as (m, blocked):
        task_id = await waiting_task(m, {"items": 100_000, "item_delay_ms": 5})
        m.cancel([task_id])  # no worker to ask: after the grace period the manager kills it
        await m.wait_final([task_id], 30)
        assert blocked.held and m.get(task_id).status is TaskStatus.CANCELLED
        assert m.executor.status()["waiting"] == 0


class UnfairSpawnLock:
    """The executor's spawn lock as an unfair Lock behaves at its worst: the thread that released it may take it again
    within BARGE seconds before any other waiter (a woken waiter needs the GIL and a core, the releaser has both).
    Records which threads take it, in order, and how many wait."""

    BARGE = 0.5

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: threading.Thread | None = None
        self._released_by: threading.Thread | None = None
        self._released_at = 0.0
        self.takers: list[str] = []
        self.waiting = 0

    def _free_for(self, me: threading.Thread) -> bool:
        barging = self._released_by is not None and time.monotonic() - self._released_at < self.BARGE
        return self._owner is None and (not barging or self._released_by is me)

    def __enter__(self) -> None:
        me = threading.current_thread()
        with self._cond:
            self.waiting += 1
            while not self._free_for(me):
                self._cond.wait(0.05)
            self.waiting -= 1
            self._owner = me
            self.takers.append(me.name)

    def __exit__(self, *_: object) -> None:
        with self._cond:
            self._owner, self._released_by, self._released_at = None, threading.current_thread(), time.monotonic()
            self._cond.notify_all()


async def test_a_waiting_tasks_worker_starts_before_the_rest_of_the_pools_warm_up(tmp_path):
    """Right after start the pool's warm-up starts its workers one after the other under the spawn lock, as a task's
    start does; a Lock is not fair, so the warm-up could take it again and again before the first task's start (one
    to three workers of 5-15 ms each, after the forkserver's preload: seen at ready). It now lets a waiting task's
    start go first, whatever the lock does."""
    store = Store(f"sqlite:///{tmp_path / 'order.db'}")
    ex = LocalExecutor(pool_size=3)
    ex._spawn_lock = UnfairSpawnLock()  # type: ignore[assignment]
    blocked = SpawnsBlocked(ex)  # holds it, as the forkserver's preload does
    m = TaskManager(store, EventBus(), ex, max_concurrency=3, poll_interval=0.1)
    await m.start()
    try:
        await poll(lambda: ex._spawn_lock.waiting, lambda n: n == 1)  # the warm-up's first worker
        task = m.dispatch("demo", {"items": 1, "item_delay_ms": 0})
        await poll(lambda: ex._spawn_lock.waiting, lambda n: n == 2)  # and the task's start
        blocked.release()
        await m.wait_final([task.id], 30)
        assert m.get(task.id).status is TaskStatus.COMPLETED
        await poll(lambda: len(ex._spawn_lock.takers), lambda n: n >= 3)
        takers = ex._spawn_lock.takers[1:]  # after the blocker's
        # The warm-up's first worker may have taken it first (both waited); its next ones came after the task's.
        assert takers.index(next(t for t in takers if t.startswith("plexus-worker-start"))) <= 1, takers
    finally:
        blocked.release()
        await m.stop()
        store.close()


async def test_the_warm_up_after_start_rehearses_the_first_evaluation_and_stores_nothing(
    runtime, mcp_client, jp_root_dir
):
    """The evaluation service's warm-up (planned, inserted and rolled back, read) runs off the loop after start:
    the first create_evaluation then finds its statements compiled; no task or record is left by it."""
    service = runtime.evaluations
    await poll(service.warmed.is_set, bool)
    # Then its rehearsals again after start (warm_up_again, in the same thread: done once this no-op has run).
    await asyncio.wrap_future(service._pruner.submit(lambda: None))
    engine = runtime.store.engine
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar_one() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM evaluations").scalar_one() == 0
    compiled = [c.string for c in engine._compiled_cache.values()]  # SQLAlchemy's compiled statements
    assert any(sql.startswith("INSERT INTO evaluations") for sql in compiled), compiled
    # The task's own writes on SQLite's driver (compiled on first use, on the event loop): its claim, progress
    # with a stage and a sample, and its end.
    prepared = {statement for statement, _columns in runtime.store._on_driver}  # keyed by (statement, columns)
    for statement in (
        store_module._CLAIM,
        store_module._progress_update(final=False, held=True),
        store_module._progress_update(final=True, held=True),
        store_module._upsert_stages_statement("sqlite"),
        store_module._INSERT_SAMPLES,
    ):
        assert statement in prepared, statement
    pd.DataFrame({"label": ["yes", "no"] * 50, "prediction": ["yes"] * 100}).to_csv(jp_root_dir / "w.csv", index=False)
    warmed = {c.string for c in engine._compiled_cache.values()}
    async with mcp_client() as client:
        made = await create(
            client, type="accuracy", dataset="w.csv", label_column="label", prediction_column="prediction"
        )
        # What the call ran (its task's and record's inserts, then both read back, the task with its stages) was
        # compiled by the warm-up: the stages' select was not (compiled only when a task is found), ~1 ms of the call;
        # nor is the manager's check for a cancel request while it runs. (The event relay's thread sends the task's
        # events to the outbox on its own clock, meanwhile or not.)
        new = {c.string for c in engine._compiled_cache.values()} - warmed
        assert not {sql for sql in new if "plexus_event_outbox" not in sql}, new
        assert (await finished(client, made["evaluation_id"]))["status"] == "COMPLETED"


async def test_the_rehearsals_after_start_stop_once_a_client_has_come(runtime, mcp_client, jp_root_dir, monkeypatch):
    """warm_up_again's rehearsals (~5 ms of the GIL each, and on SQLite the write lock until each rolls back) stop at
    a client's first MCP message (a session's initialize: its create_evaluation follows within milliseconds) and at
    a create (the REST face too): they would compete with it and the calls after it, which warm the path
    themselves. Before any, they all run; one already planning when the client comes stops before the store."""
    service = runtime.evaluations
    await poll(service.warmed.is_set, bool)
    await asyncio.wrap_future(service._pruner.submit(lambda: None))  # the rehearsals after start are done
    rehearsals: list[float] = []
    stored: list[float] = []
    rehearse, plan, rehearse_create = service._rehearse, service.plan, runtime.store.rehearse_create_task
    planning, go = threading.Event(), threading.Event()

    def counted_rehearse(*args: Any, **kwargs: Any) -> None:
        rehearsals.append(time.monotonic())
        rehearse(*args, **kwargs)

    def counted_store(*args: Any, **kwargs: Any) -> None:
        stored.append(time.monotonic())
        rehearse_create(*args, **kwargs)

    def held_plan(*args: Any, **kwargs: Any) -> Any:  # a create (or a rehearsal) stays in its plan until `go`
        planning.set()
        assert go.wait(30)
        return plan(*args, **kwargs)

    monkeypatch.setattr(service, "_rehearse", counted_rehearse)
    monkeypatch.setattr(runtime.store, "rehearse_create_task", counted_store)
    await asyncio.wrap_future(service._pruner.submit(service.warm_up_again))
    assert len(rehearsals) == len(stored) == service_module.WARM_REPEATS  # no client yet: every rehearsal ran
    rehearsals.clear()
    # A rehearsal in its plan when the first message comes: it goes no further (no insert, no write lock taken).
    monkeypatch.setattr(service, "plan", held_plan)
    stored.clear()
    again = asyncio.wrap_future(service._pruner.submit(service.warm_up_again))
    await poll(planning.is_set, bool)
    async with mcp_client() as client:
        go.set()
        await again
        assert len(rehearsals) == 1 and not stored, "a rehearsal went on after a client came"
        rehearsals.clear()
        await asyncio.wrap_future(service._pruner.submit(service.warm_up_again))
        assert not rehearsals, "a rehearsal ran after a client's first message"
    # A create stops them too (a REST create may be a server's first request): as if no message had come.
    planning.clear()
    go.clear()
    pd.DataFrame({"label": ["yes", "no"] * 5, "prediction": ["yes"] * 10}).to_csv(jp_root_dir / "r.csv", index=False)
    async with mcp_client() as client:
        service._served = False  # (the endpoint tells the service once, at the server's first request)
        call = asyncio.ensure_future(
            create(client, type="accuracy", dataset="r.csv", label_column="label", prediction_column="prediction")
        )
        await poll(planning.is_set, bool)
        await asyncio.wrap_future(service._pruner.submit(service.warm_up_again))
        assert not rehearsals, "a rehearsal ran beside a create"
        go.set()
        made = await call
        await asyncio.wrap_future(service._pruner.submit(service.warm_up_again))
        assert not rehearsals, "the rehearsals went on after a create"
        assert (await finished(client, made["evaluation_id"]))["status"] == "COMPLETED"


async def test_the_rehearsals_end_after_a_failed_warm_up_or_a_slow_rehearsal_and_are_not_waited_for(
    runtime, monkeypatch
):
    """A store locked or hanging makes each rehearsal wait out its timeout: after a warm_up that failed none follows;
    after one longer than REHEARSAL_SECONDS none more; and `rehearsals_ended` (what a stdio server waits for before
    its first message) returns once the one running has run that long, not when it ends."""
    service = runtime.evaluations
    await poll(service.warmed.is_set, bool)
    await asyncio.wrap_future(service._pruner.submit(lambda: None))  # the rehearsals after start are done
    monkeypatch.setattr(service_module, "REHEARSAL_SECONDS", 0.2)
    ran: list[float] = []
    release = threading.Event()

    def failing(until_served: bool = False) -> None:
        ran.append(time.monotonic())
        raise RuntimeError("the store is locked")

    def hanging(until_served: bool = False) -> None:
        ran.append(time.monotonic())
        assert release.wait(30)

    monkeypatch.setattr(service, "_rehearse", failing)
    await asyncio.wrap_future(service._pruner.submit(service.warm_up))
    await asyncio.wrap_future(service._pruner.submit(service.warm_up_again))
    assert len(ran) == 1, "a rehearsal ran after warm_up failed"
    ran.clear()
    service._rehearsals_over = False
    monkeypatch.setattr(service, "_rehearse", hanging)
    service.rehearsed = service._pruner.submit(service.warm_up_again)
    await poll(lambda: len(ran), bool)
    since = time.monotonic()
    await asyncio.wait_for(service.rehearsals_ended(), 10)
    waited = time.monotonic() - since
    assert waited < 0.2 + 1.0 and not service.rehearsed.done(), waited  # (still rehearsing, in its thread)
    release.set()
    await asyncio.wrap_future(service.rehearsed)
    assert len(ran) == 1, "a rehearsal ran after one longer than REHEARSAL_SECONDS"


async def test_the_threads_the_first_evaluation_uses_are_started_before_it(runtime, mcp_client, jp_root_dir):
    """A thread pool starts a thread on its first submit and waits there until it runs: 5-10 ms each on a server
    just ready, on the event loop, for each of the three pools the first create_evaluation uses. They are started
    with the server instead, and that call starts none."""
    pools = ("plexus-datasets_", "plexus-store_", "plexus-worker-start_")

    def started() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith(pools)}

    # Threads, not names: earlier servers' pools in this process may still be ending theirs (shut down without
    # waiting, or at garbage collection), so the count can fall during the call; none may be added.
    await poll(lambda: {t.name.rsplit("_", 1)[0] + "_" for t in started()}, lambda found: found == set(pools))
    before = started()
    pd.DataFrame({"label": ["yes", "no"] * 50, "prediction": ["yes"] * 100}).to_csv(jp_root_dir / "t.csv", index=False)
    async with mcp_client() as client:
        made = await create(
            client, type="accuracy", dataset="t.csv", label_column="label", prediction_column="prediction"
        )
        added = sorted(t.name for t in started() - before)
        assert not added, f"the first create_evaluation started threads: {added}"
        assert (await finished(client, made["evaluation_id"]))["status"] == "COMPLETED"


def run_python(code: str) -> None:
    """`code` in a fresh interpreter (its imports and its forkserver are its own), from the repository's root."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_worker_imports_neither_the_manager_nor_the_store_nor_pydantic():
    """The forkserver imports `core.worker` before any worker exists: through the core package's lazy names it
    costs ~50 ms, not the ~300 ms of the manager, the store (SQLAlchemy) and the executors it once pulled."""
    run_python(
        "import sys\n"
        "import plexus_mcp_jupyter.core.worker\n"
        "heavy = [n for n in sys.modules if n.split('.')[0] in ('sqlalchemy', 'pydantic', 'asyncio', 'pandas')\n"
        "         or n in ('plexus_mcp_jupyter.core.manager', 'plexus_mcp_jupyter.core.store')]\n"
        "assert not heavy, heavy\n"
        "from plexus_mcp_jupyter.core import Store, TaskManager, InvalidArgument, __all__\n"
        "import plexus_mcp_jupyter.core as core\n"
        "assert sorted(__all__) == sorted(core._MODULES) and all(getattr(core, n) for n in __all__)\n"
        "assert TaskManager.__module__ == 'plexus_mcp_jupyter.core.manager'\n"
    )


def test_the_forkserver_started_early_is_the_one_the_executor_uses_and_workers_see_the_servers_environment():
    """plexus_mcp_jupyter._start_workers_early starts the forkserver while Jupyter imports the extension, with the
    preload the local executor computes once the evaluation type is registered (EARLY_PRELOAD): the executor then
    forks from it rather than start another, and its workers see the environment the server set after it started.
    An executor wanting another preload replaces it; a runtime without a local executor ends it."""
    run_python(
        "import asyncio, os, tempfile, time\n"
        "from multiprocessing import forkserver\n"
        "import plexus_mcp_jupyter\n"
        "from plexus_mcp_jupyter.core import EventBus, Store, TaskManager, TaskStatus\n"
        "from plexus_mcp_jupyter.core.executors.local import LocalExecutor, start_forkserver_early\n"
        "from plexus_mcp_jupyter.core.executors.local import stop_early_forkserver\n"
        "from plexus_mcp_jupyter.core.tasks import TaskType, register_task_type\n"
        "from plexus_mcp_jupyter.evaluations.task_type import register_evaluation_task_type\n"
        "assert start_forkserver_early(plexus_mcp_jupyter.EARLY_PRELOAD)\n"
        "early = forkserver._forkserver._forkserver_pid\n"
        "os.environ['PLEXUS_TEST_LATE'] = 'set after the forkserver started'\n"
        "register_evaluation_task_type()\n"
        "register_task_type(TaskType('facts', 'tests.task_functions:worker_facts', 'facts'))\n"
        "async def facts(db, **executor):\n"
        "    store = Store(f'sqlite:///{db}')\n"
        "    m = TaskManager(store, EventBus(), LocalExecutor(**executor), max_concurrency=1, poll_interval=0.1)\n"
        "    await m.start()\n"
        "    try:\n"
        "        task = m.dispatch('facts', {})\n"
        "        await m.wait_final([task.id], 60)\n"
        "        done = m.get(task.id)\n"
        "        assert done.status is TaskStatus.COMPLETED, done\n"
        "        return done.output\n"
        "    finally:\n"
        "        await m.stop()\n"
        "        store.close()\n"
        "tmp = tempfile.mkdtemp()\n"
        "same = asyncio.run(facts(f'{tmp}/a.db'))\n"
        "assert same == {'late': 'set after the forkserver started', 'parent': early, 'runner_loaded': True}, same\n"
        "forkserver._forkserver._stop()  # its workers are gone: it exits\n"
        "assert start_forkserver_early(plexus_mcp_jupyter.EARLY_PRELOAD)\n"
        "early = forkserver._forkserver._forkserver_pid\n"
        "other = asyncio.run(facts(f'{tmp}/b.db', preload=[]))\n"
        "assert other['parent'] != early and not other['runner_loaded'], other\n"
        "assert other['late'] == 'set after the forkserver started', other\n"
        "forkserver._forkserver._stop()\n"
        "assert start_forkserver_early(plexus_mcp_jupyter.EARLY_PRELOAD)\n"
        "early = forkserver._forkserver._forkserver_pid\n"
        "stop_early_forkserver()  # what the runtime does when its executor is not a local one\n"
        "deadline = time.monotonic() + 60\n"
        "while os.path.exists(f'/proc/{early}') and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "assert not os.path.exists(f'/proc/{early}'), 'the early forkserver did not end'\n"
    )


def test_plexus_mcp_serve_starts_the_forkserver_before_its_own_imports(tmp_path):
    """As Jupyter's start does (`_start_workers_early`), `plexus mcp serve` starts the forkserver before it imports
    the runtime (pandas, pyarrow, SQLAlchemy: a second or more), which its executor then adopts: the first
    evaluation's worker waited for the forkserver's preload after the server answered (end to end 6-10x the next
    ones'). The server here reads an empty stdin and ends."""
    bootstrap = (
        "import sys\n"
        "from plexus_mcp_jupyter.core.executors import local\n"
        "start = local.start_forkserver_early\n"
        "def early(extra):\n"
        "    heavy = ('pandas', 'pyarrow', 'sqlalchemy', 'plexus_mcp_jupyter.runtime')\n"
        "    loaded = [m for m in heavy if m in sys.modules]\n"
        "    started = start(extra)\n"
        "    sys.stderr.write(f'EARLY {started} {loaded}\\n')\n"
        "    return started\n"
        "local.start_forkserver_early = early\n" + _THEN_SERVE
    )
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), PLEXUS_MCP_DB_URL=f"sqlite:///{tmp_path / 's.db'}")
    result = subprocess.run(
        [sys.executable, "-c", bootstrap, "mcp", "serve", "--root-dir", str(tmp_path)],
        input="",
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    assert "EARLY True []" in result.stderr.splitlines(), result.stderr


def _running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_plexus_mcp_serve_that_fails_to_start_leaves_no_process_behind(tmp_path):
    """`plexus mcp serve` starts the forkserver early (above), but only once its settings are checked: a bad flag
    ends it before any process starts (it started the forkserver, and the resource tracker, first). A failure
    after it (a store that cannot be reached) ends and reaps both before it exits: they held its stdout (a stdio
    client's pipe: its EOF came ~0.5 s after the exit, while the forkserver finished its imports)."""
    bootstrap = (
        "import sys\n"
        "from multiprocessing import forkserver, resource_tracker\n"
        "from plexus_mcp_jupyter.core.executors import local\n"
        "start = local.start_forkserver_early\n"
        "def early(extra):\n"
        "    started = start(extra)\n"
        "    pids = forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid\n"
        "    sys.stderr.write(f'EARLY {started} {pids[0]} {pids[1]}\\n')\n"
        "    return started\n"
        "local.start_forkserver_early = early\n" + _THEN_SERVE
    )
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), PLEXUS_MCP_DB_URL=f"sqlite:///{tmp_path / 's.db'}")

    def serve(*flags: str) -> subprocess.CompletedProcess[str]:
        """Its output in files: a pipe's reader would wait for every holder's end, the forkserver's too."""
        out, err = tmp_path / "out", tmp_path / "err"
        with out.open("w") as stdout, err.open("w") as stderr:
            server = subprocess.Popen(
                [sys.executable, "-c", bootstrap, "mcp", "serve", "--root-dir", str(tmp_path), *flags],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                cwd=Path(__file__).resolve().parent.parent,
            )
            try:
                server.wait(180)
            finally:
                if server.poll() is None:
                    server.kill()
        return subprocess.CompletedProcess(server.args, server.returncode, out.read_text(), err.read_text())

    bad = serve("--max-concurrency", "-3")
    assert bad.returncode == 2 and bad.stdout == "", bad.stdout + bad.stderr
    assert "--max-concurrency -3 is not valid" in bad.stderr and "EARLY" not in bad.stderr, bad.stderr
    # Nothing listens on port 9 (discard) here: the connection is refused at once.
    unreachable = serve("--db-url", "postgresql+psycopg://plexus:hunter2@127.0.0.1:9/plexus")
    assert unreachable.returncode == 1 and unreachable.stdout == "", unreachable.stdout + unreachable.stderr
    # What was wrong and where to fix it, in one line: not a traceback, not the password.
    assert "Traceback" not in unreachable.stderr and "hunter2" not in unreachable.stderr, unreachable.stderr
    assert "plexus: not started: the store is unavailable: connection failed" in unreachable.stderr
    assert "check --db-url / PLEXUS_MCP_DB_URL" in unreachable.stderr
    [line] = [line for line in unreachable.stderr.splitlines() if line.startswith("EARLY ")]
    started, *pids = line.split()[1:]
    assert started == "True", line
    assert [pid for pid in map(int, pids) if _running(pid)] == [], unreachable.stderr  # (checked at its exit)


async def test_the_endpoints_rehearsals_after_start_are_unaudited_sessionless_and_stop_at_a_client(
    runtime, mcp_client, monkeypatch
):
    """After start the MCP endpoint rehearses a tool call through the SDK's own request kernel (REHEARSALS times), so
    a client's first call runs code the interpreter has specialized: as REHEARSAL, a caller no credential maps to.
    None of it is audited, opens a session or stores a task; it stops at a client's first request; and only that
    very principal goes unaudited (an equal one, say a key's, is audited)."""
    endpoint = runtime.endpoint
    ran = await asyncio.wait_for(asyncio.shield(endpoint._rehearsal), 30)
    assert ran == transport_module.REHEARSALS  # no client yet: every rehearsal ran
    runtime.audit.flush()
    records, _ = runtime.audit.query()
    assert not records, records  # none audited
    assert endpoint.session_count == 0
    with runtime.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar_one() == 0
    # Each one's tool ran (the whole path, not a refusal): it read the rehearsal's own tasks, as a viewer.
    viewers: list[str | None] = []
    list_rows = runtime.manager.alist_rows

    async def counted(request: Any, viewer: str | None) -> Any:
        viewers.append(viewer)
        return await list_rows(request, viewer)

    monkeypatch.setattr(runtime.manager, "alist_rows", counted)
    assert await endpoint.rehearse(2) == 2
    assert viewers == [REHEARSAL.owner] * 2
    # A client's first request stops them, the one in flight finishing alone.
    held, go = asyncio.Event(), asyncio.Event()

    async def held_rows(request: Any, viewer: str | None) -> Any:
        held.set()
        await go.wait()
        return await list_rows(request, viewer)

    monkeypatch.setattr(runtime.manager, "alist_rows", held_rows)
    rehearsing = asyncio.ensure_future(endpoint.rehearse())
    await asyncio.wait_for(held.wait(), 10)
    async with mcp_client():
        go.set()
        assert await asyncio.wait_for(rehearsing, 10) == 1
        assert await endpoint.rehearse() == 0
    # A store that fails (a tool error, not an exception) or hangs ends them at the first.
    calls: list[int] = []

    async def failing_rows(request: Any, viewer: str | None) -> Any:
        calls.append(1)
        raise ConnectionError("the store is down")

    async def hanging_rows(request: Any, viewer: str | None) -> Any:
        calls.append(1)
        await asyncio.sleep(3600)

    for broken in (failing_rows, hanging_rows):
        calls.clear()
        monkeypatch.setattr(runtime.manager, "alist_rows", broken)
        monkeypatch.setattr(endpoint, "_arrived", False)
        assert await asyncio.wait_for(endpoint.rehearse(), 10) == 0
        assert calls == [1]
    monkeypatch.setattr(runtime.manager, "alist_rows", list_rows)
    # Only REHEARSAL itself goes unaudited: an equal principal's call is recorded.
    lookalike = Principal(owner=REHEARSAL.owner, role=REHEARSAL.role, name=REHEARSAL.name)
    assert lookalike == REHEARSAL and lookalike is not REHEARSAL
    with acting_as(lookalike):
        await runtime.mcp.call_tool("list_tasks", {"limit": 1})
    runtime.audit.flush()
    records, _ = runtime.audit.query(action="tool.list_tasks")
    assert [r["owner"] for r in records] == [REHEARSAL.owner], records


async def test_a_stdio_server_rehearses_before_it_reads_the_first_message_and_its_first_evaluation_finds_it_warm(
    tmp_path,
):
    """`plexus mcp serve` over stdio (Claude Desktop, Cursor): the client sends initialize as it starts the server, so
    the message is waiting before the server could read it, and a client's first message stops the start-up
    rehearsals: read first, none ran. The server runs all of them (the endpoint's through the SDK's kernel, the
    evaluation service's) before it reads it, none after; the first create_evaluation then imports no module,
    compiles no statement and starts no thread; and stdout carries the protocol only."""
    records = tmp_path / "warm.jsonl"
    pd.DataFrame({"label": ["yes", "no"] * 50, "prediction": ["yes"] * 100}).to_csv(tmp_path / "w.csv", index=False)
    bootstrap = (
        "import os, sys; from tests.task_functions import record_warm_start; "
        "record_warm_start(os.environ['PLEXUS_TEST_RECORDS']); "
        "from plexus_mcp_jupyter.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = dict(
        os.environ,
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        PLEXUS_MCP_DB_URL=f"sqlite:///{tmp_path / 's.db'}",
        PLEXUS_TEST_RECORDS=str(records),
    )
    params = StdioServerParameters(
        command=sys.executable,
        args=["-c", bootstrap, "mcp", "serve", "--transport", "stdio", "--root-dir", str(tmp_path)],
        env=env,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    garbage: list[Exception] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):  # a line on stdout that is not a JSON-RPC message
            garbage.append(message)

    async with Client(params, message_handler=on_message) as client:
        made = await create(
            client, type="accuracy", dataset="w.csv", label_column="label", prediction_column="prediction"
        )
        assert (await finished(client, made["evaluation_id"]))["status"] == "COMPLETED"
    assert garbage == []
    events = [json.loads(line) for line in records.read_text().splitlines()]
    [arrived] = [e["t"] for e in events if e["event"] == "arrived"]
    endpoint = [e["t"] for e in events if e["event"] == "endpoint rehearsal"]
    evaluation = [e["t"] for e in events if e["event"] == "evaluation rehearsal"]
    assert len(endpoint) == transport_module.REHEARSALS, events
    assert len(evaluation) == 1 + service_module.WARM_REPEATS, events  # warm_up, then warm_up_again's
    assert max(endpoint + evaluation) < arrived, events  # each one ended before the first message was read
    [first] = [e for e in events if e["event"] == "first create"]
    assert first["modules"] == [] and first["compiled"] == [] and first["threads"] == [], first


def _stdio_server(tmp_path: Path, bootstrap: str, **env: str) -> subprocess.Popen[bytes]:
    """`plexus mcp serve` over stdio, run by `bootstrap` (which ends by calling the CLI's main), its stderr in
    tmp_path/err; the caller writes its stdin and reads its stdout. `env` over this one's (an empty value unsets)."""
    environ = dict(
        os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), PLEXUS_MCP_DB_URL=f"sqlite:///{tmp_path / 's.db'}", **env
    )
    environ = {name: value for name, value in environ.items() if value}
    return subprocess.Popen(
        [sys.executable, "-c", bootstrap, "mcp", "serve", "--transport", "stdio", "--root-dir", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "err").open("w"),
        env=environ,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _initialize(server: subprocess.Popen[bytes]) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    assert server.stdin is not None
    server.stdin.write((json.dumps(init) + "\n").encode())
    server.stdin.flush()


def _close_stdin_and_wait(server: subprocess.Popen[bytes]) -> None:
    """As a client ends a stdio server: its stdin closed, then its exit awaited (killed if it does not come)."""
    assert server.stdin is not None
    server.stdin.close()
    try:
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()


def _lines(server: subprocess.Popen[bytes]) -> Any:
    """The server's stdout lines, read in a thread: `.get(timeout=...)` each (b"" at its end)."""
    import queue

    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        assert server.stdout is not None
        for line in iter(server.stdout.readline, b""):
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=read, daemon=True).start()
    return lines


# A stdio server whose rehearsals after start (warm_up has run) wait for the file PLEXUS_TEST_LOCKED, once they said


def _locked_out(module: str, cls: str, method: str) -> str:
    """Bootstrap lines: `cls.method` (of `module`) says LOCKED-OUT on stderr when it fails (a lock wait that timed
    out), so that a test knows its statement waited for the lock."""
    return (
        f"from {module} import {cls}\n"
        f"_inner = {cls}.{method}\n"
        "def _locked_out(self, *args, **kwargs):\n"
        "    try:\n"
        "        return _inner(self, *args, **kwargs)\n"
        "    except Exception as exc:\n"
        "        sys.stderr.write('LOCKED-OUT ' + type(exc).__name__ + '\\n'); sys.stderr.flush()\n"
        "        raise\n"
        f"{cls}.{method} = _locked_out\n"
    )


# REHEARSING on stderr: the test takes the store's lock meanwhile (_lock_the_store_once_rehearsing); INTO-THE-LOCK as
# the rehearsals go on into it, LOCKED-OUT when a rehearsal's statement gave up on it.
_REHEARSING_INTO_A_LOCK = (
    "import os, sys, time\n"
    "from plexus_mcp_jupyter.evaluations.service import EvaluationService\n"
    "again = EvaluationService.warm_up_again\n"
    "def held(self, *args):\n"
    "    sys.stderr.write('REHEARSING\\n'); sys.stderr.flush()\n"
    "    deadline = time.monotonic() + 120\n"
    "    while not os.path.exists(os.environ['PLEXUS_TEST_LOCKED']) and time.monotonic() < deadline:\n"
    "        time.sleep(0.005)\n"
    "    sys.stderr.write('INTO-THE-LOCK\\n'); sys.stderr.flush()\n"
    "    again(self, *args)\n"
    "EvaluationService.warm_up_again = held\n"
    + _locked_out("plexus_mcp_jupyter.core.store", "Store", "rehearse_create_task")
    + _THEN_SERVE
)


def _lock_the_store_once_rehearsing(tmp_path: Path, server: subprocess.Popen[str], locked: Path) -> Any:
    """Once the server's rehearsals wait (_REHEARSING_INTO_A_LOCK): another process's write transaction on its
    SQLite store (BEGIN IMMEDIATE), held until the caller rolls it back; then the rehearsals go on into it."""
    return _lock_the_store_once(tmp_path, server, locked, "REHEARSING")


def _lock_the_store_once(tmp_path: Path, server: subprocess.Popen[Any], locked: Path, said: str) -> Any:
    """Once the server has said `said` on stderr (and waits for the file `locked`): another process's write
    transaction on its SQLite store (BEGIN IMMEDIATE), held until the caller rolls it back; `locked` made."""
    import sqlite3

    deadline = time.monotonic() + 120
    while said not in (tmp_path / "err").read_text():
        assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()
        time.sleep(0.01)
    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    locked.touch()
    return holder


def test_a_stdio_server_reads_its_first_message_soon_when_another_process_holds_the_store_locked(tmp_path):
    """The stdio server waits for its start-up rehearsals before it reads the client's first message; a store that
    another process holds locked (SQLite: BEGIN IMMEDIATE) makes a rehearsal wait out the busy timeout (5 s; a
    PostgreSQL that hangs, 30 s), and the client's initialize waited as long. The wait now ends once a rehearsal has
    run longer than REHEARSAL_SECONDS, and none runs after it."""

    locked = tmp_path / "locked"
    server = _stdio_server(tmp_path, _REHEARSING_INTO_A_LOCK, PLEXUS_TEST_LOCKED=str(locked))
    lines = _lines(server)
    holder = None
    try:
        _initialize(server)  # as a client does: at once
        holder = _lock_the_store_once_rehearsing(tmp_path, server, locked)
        since = time.monotonic()
        answer = lines.get(timeout=60)
        waited = time.monotonic() - since
        assert json.loads(answer)["id"] == 1, answer
        # Before: 5.1 s (the busy timeout). A margin for a loaded machine.
        assert waited < service_module.REHEARSAL_SECONDS + 2.0, waited
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        _close_stdin_and_wait(server)
    assert server.returncode == 0, (tmp_path / "err").read_text()


def test_what_runs_while_a_stdio_server_waits_for_its_rehearsals_does_not_write_to_the_protocol(tmp_path):
    """The stdio server waits for its start-up rehearsals inside the SDK's `stdio_server()`, which points fd 1 at
    stderr while it serves: what runs meanwhile and prints (a task or scorer module imported) went to the client's
    pipe when the wait came first. A print still buffered at the end goes to stderr too, not to the wire that
    `stdio_server()` gives back to fd 1 as it exits. The rehearsals' limits raised: the 8th rehearsal comes 1.6 s
    after start, the wait's 5 s and each rehearsal's 1 s could end them before it on a loaded machine."""
    bootstrap = (
        "import sys, time\n"
        "from plexus_mcp_jupyter import standalone\n"
        "from plexus_mcp_jupyter.endpoint import transport\n"
        "from plexus_mcp_jupyter.evaluations import service\n"
        "from plexus_mcp_jupyter.evaluations.service import EvaluationService\n"
        "standalone.STDIO_REHEARSAL_SECONDS = 120.0\n"
        "transport.REHEARSAL_SECONDS = service.REHEARSAL_SECONDS = 30.0\n"
        "rehearse = EvaluationService._rehearse\n"
        "after_start = []\n"
        "def printing(self, until_served=False):\n"  # the last of warm_up_again's, 1.6 s after start: in the wait
        "    if until_served:\n"
        "        after_start.append(1)\n"
        "        time.sleep(0.2)\n"
        "        if len(after_start) == 8:\n"
        "            print('STRAY-FLUSHED', flush=True)\n"
        "            print('STRAY-BUFFERED')\n"
        "    rehearse(self, until_served)\n"
        "EvaluationService._rehearse = printing\n" + _THEN_SERVE
    )
    server = _stdio_server(tmp_path, bootstrap, PYTHONUNBUFFERED="")  # as a client launches it: stdout buffered
    lines = _lines(server)
    try:
        _initialize(server)
        first = lines.get(timeout=120)
    finally:
        _close_stdin_and_wait(server)
    out = [first]
    while out[-1]:
        out.append(lines.get(timeout=30))
    assert json.loads(first)["id"] == 1, out
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in out[:-1]), out
    err = (tmp_path / "err").read_text()
    assert server.returncode == 0 and "STRAY-FLUSHED" in err and "STRAY-BUFFERED" in err, [*out, err]


def _stdio_output(server: subprocess.Popen[bytes], lines: Any) -> list[bytes]:
    """All the server's stdout lines once it has exited (60 s at most), the last b""."""
    try:
        server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
    out = [lines.get(timeout=30)]
    while out[-1]:
        out.append(lines.get(timeout=30))
    return out


def test_a_stdio_server_stopped_during_its_start_up_serves_nothing(tmp_path):
    """A SIGTERM while the runtime starts: the server stops without reading a message. It served after
    start-up all the same (the runtime's start no longer raced the signal): answered the initialize and ran a
    dispatch_batch the client never learned of (the process exits at once after a signal)."""
    import sqlite3

    bootstrap = (
        "import os, signal, sys\n"
        "from tests.multi_server import register; register()\n"
        "from plexus_mcp_jupyter.core.manager import TaskManager\n"
        "start = TaskManager.start\n"
        "async def signalled(self, *args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    await start(self, *args, **kwargs)\n"
        "TaskManager.start = signalled\n" + _THEN_SERVE
    )
    server = _stdio_server(tmp_path, bootstrap)
    lines = _lines(server)
    _initialize(server)
    assert server.stdin is not None
    for message in (
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {
                "name": "dispatch_batch",
                "arguments": {"tasks": [{"type": "recorded", "params": {"runs": str(tmp_path / "runs")}}]},
            },
        },
    ):
        server.stdin.write((json.dumps(message) + "\n").encode())
    server.stdin.flush()
    out = _stdio_output(server, lines)
    err = (tmp_path / "err").read_text()
    assert server.returncode == 0 and out == [b""], [*out, err]
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert db.execute("SELECT id FROM tasks").fetchall() == []


def test_what_prints_while_a_stdio_server_stops_at_its_clients_end_does_not_reach_the_client(tmp_path):
    """The client closes stdin: the runtime stops inside the SDK's `stdio_server()`, fd 1 still pointed at
    stderr. It stopped after `stdio_server()` had given fd 1 back: a print then reached the client's pipe."""
    bootstrap = (
        "import sys\n"
        "from plexus_mcp_jupyter.evaluations.service import EvaluationService\n"
        "close = EvaluationService.close\n"
        "def printing(self):\n"
        "    print('STRAY-AT-STOP')\n"
        "    close(self)\n"
        "EvaluationService.close = printing\n" + _THEN_SERVE
    )
    out, err, code = _initialized_and_closed(tmp_path, bootstrap)
    assert json.loads(out[0])["id"] == 1 and out[1:] == [b""], [*out, err]
    assert code == 0 and "STRAY-AT-STOP" in err, [*out, err]


def _initialized_and_closed(tmp_path: Path, bootstrap: str, **env: str) -> tuple[list[bytes], str, int | None]:
    """A stdio server run by `bootstrap`, launched as a client does (stdout buffered), initialized, then its stdin
    closed once initialize is answered: its stdout lines (the last b""), its stderr and its exit code."""
    server = _stdio_server(tmp_path, bootstrap, PYTHONUNBUFFERED="", **env)
    return _answered_then_closed(server), (tmp_path / "err").read_text(), server.returncode


def _answered_then_closed(server: subprocess.Popen[bytes]) -> list[bytes]:
    """Initialize `server`, close its stdin once initialize is answered: its stdout lines (the last b"")."""
    lines = _lines(server)
    _initialize(server)
    first = lines.get(timeout=120)
    assert server.stdin is not None
    server.stdin.close()
    return [first, *_stdio_output(server, lines)]


def test_nothing_a_stdio_server_prints_before_it_serves_reaches_the_client(tmp_path):
    """stdout is the protocol's from the first byte: a library that writes at import while the runtime is built, a
    print in the warm-up (at construction, in its thread) and in the task manager's start, and a child process
    writing to its stdout, all land on stderr. They came before the SDK's `stdio_server()` pointed fd 1 at stderr:
    on the client's pipe, ahead of the initialize's answer."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "noisy_lib.py").write_text("print('STRAY-AT-IMPORT', flush=True)\n")
    bootstrap = (
        "import os, subprocess, sys\n"
        "sys.path.insert(0, os.environ['PLEXUS_TEST_LIB'])\n"
        "from plexus_mcp_jupyter.core.manager import TaskManager\n"
        "from plexus_mcp_jupyter.evaluations.service import EvaluationService\n"
        "from plexus_mcp_jupyter.runtime import PlexusRuntime\n"
        "init, warm_up, start = PlexusRuntime.__init__, EvaluationService.warm_up, TaskManager.start\n"
        "def built(self, *args, **kwargs):\n"
        "    import noisy_lib\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"STRAY-FROM-A-CHILD\")'], check=True)\n"
        "    init(self, *args, **kwargs)\n"
        "def warming(self):\n"
        "    print('STRAY-IN-WARM-UP', flush=True)\n"
        "    warm_up(self)\n"
        "async def starting(self, *args, **kwargs):\n"
        "    print('STRAY-AT-START', flush=True)\n"
        "    await start(self, *args, **kwargs)\n"
        "PlexusRuntime.__init__, EvaluationService.warm_up, TaskManager.start = built, warming, starting\n"
        + _THEN_SERVE
    )
    out, err, code = _initialized_and_closed(tmp_path, bootstrap, PLEXUS_TEST_LIB=str(tmp_path / "lib"))
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in out[:-1]) and json.loads(out[0])["id"] == 1, out
    assert code == 0, err
    for stray in ("STRAY-AT-IMPORT", "STRAY-FROM-A-CHILD", "STRAY-IN-WARM-UP", "STRAY-AT-START"):
        assert stray in err, (stray, err)


def _closed_with_the_store_locked(tmp_path: Path, bootstrap: str, said: str) -> float:
    """A stdio server run by `bootstrap` (which says `said` on stderr, then waits for the file PLEXUS_TEST_LOCKED,
    then says INTO-THE-LOCK before the statement that waits for the lock, and LOCKED-OUT when it gave up: see
    `_locked_out`), initialized; once it said it, another process holds its store locked (`_lock_the_store_once`,
    until the server has exited), and once it goes into the lock the client closes its stdin: the seconds from
    there to its exit (code 0)."""
    locked = tmp_path / "locked"
    server = _stdio_server(tmp_path, bootstrap, PLEXUS_TEST_LOCKED=str(locked))
    lines = _lines(server)
    holder = None
    try:
        _initialize(server)
        holder = _lock_the_store_once(tmp_path, server, locked, said)
        assert json.loads(lines.get(timeout=60))["id"] == 1
        deadline = time.monotonic() + 120  # the statement that waits for the lock begins (LOCKED-OUT says it did)
        while "INTO-THE-LOCK" not in (tmp_path / "err").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()
            time.sleep(0.01)
        assert server.stdin is not None
        since = time.monotonic()
        server.stdin.close()
        server.wait(60)
        exited = time.monotonic() - since
    finally:
        if server.poll() is None:
            server.kill()
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
    err = (tmp_path / "err").read_text()
    assert server.returncode == 0, err
    assert "LOCKED-OUT OperationalError" in err, f"the lock was not waited for: nothing was tested\n{err}"
    return exited


def test_a_stdio_server_closed_while_a_rehearsal_waits_for_a_store_lock_exits_soon(tmp_path):
    """The client closes stdin while another process holds the store locked (SQLite: BEGIN IMMEDIATE) and a
    start-up rehearsal waits for it: the rehearsal waits REHEARSAL_SECONDS at most (its connection's busy timeout;
    PostgreSQL: its transaction's lock and statement timeouts) and the server's stop does not wait for it. It
    waited out the store's busy timeout (5 s) and the stop waited for it: exit 4.6-4.9 s after stdin's end, and
    the SDK's client kills a server 4 s after it closed its stdin (before its audit log's last records)."""

    exited = _closed_with_the_store_locked(tmp_path, _REHEARSING_INTO_A_LOCK, "REHEARSING")
    # REHEARSAL_SECONDS (1 s) at most for the rehearsal; a margin for a loaded machine (before: 4.6-4.9 s).
    assert exited < service_module.REHEARSAL_SECONDS + 2.0, exited


def test_a_stdio_server_closed_while_its_pruning_waits_for_a_store_lock_exits_soon(tmp_path):
    """The client closes stdin while another process holds the store locked (SQLite: BEGIN IMMEDIATE) and the
    pruning of a cancelled evaluation's items (at start: what a stopped server left) waits for it: each pruning
    transaction waits PRUNE_LOCK_WAIT at most, and none is tried again once the service closes; its batch rolled
    back, the evaluation is not marked pruned (the next start prunes it). It waited out the store's busy timeout
    (5 s), and the stop waited for it."""
    from plexus_mcp_jupyter.evaluations.store import EvaluationStore

    from .test_hardening_evaluations import cancelled_with_items

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    cancelled_with_items(store, 10)
    store.close()
    bootstrap = (
        "import os, sys, time\n"
        "from plexus_mcp_jupyter.evaluations.store import EvaluationStore\n"
        "delete = EvaluationStore.delete_items\n"
        "def held(self, *args, **kwargs):\n"
        "    sys.stderr.write('PRUNING\\n'); sys.stderr.flush()\n"
        "    deadline = time.monotonic() + 120\n"
        "    while not os.path.exists(os.environ['PLEXUS_TEST_LOCKED']) and time.monotonic() < deadline:\n"
        "        time.sleep(0.005)\n"
        "    sys.stderr.write('INTO-THE-LOCK\\n'); sys.stderr.flush()\n"
        "    return delete(self, *args, **kwargs)\n"
        "EvaluationStore.delete_items = held\n"
        + _locked_out("plexus_mcp_jupyter.evaluations.store", "EvaluationStore", "delete_items")
        + _THEN_SERVE
    )
    exited = _closed_with_the_store_locked(tmp_path, bootstrap, "PRUNING")
    # PRUNE_LOCK_WAIT (1 s) at most for the pruning, and the stop's own steps: 1.7-3.0 s at a load of 6.5; a margin
    # for a loaded machine (before: 5.9 s, the busy timeout's 5 s alone from the lock on).
    assert exited < service_module.PRUNE_LOCK_WAIT + 3.0, exited
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        record = EvaluationStore(store.engine).get("e-cancelled")
        assert record is not None and record["items_pruned_at"] is None
        assert EvaluationStore(store.engine).count_items("e-cancelled", "score") == 10, "its batch rolled back"
    finally:
        store.close()


def test_a_stdio_server_launched_with_stderr_closed_keeps_its_prints_off_the_client_pipe(tmp_path):
    """A client that launches the server with fd 2 closed: the client's pipe is kept above 2, and what is printed
    (here in the warm-up) is dropped, not written to the pipe. os.dup(1) took fd 2, the lowest free, and pointing fd
    1 "at stderr" left it on the client's pipe: the print came ahead of the initialize's answer."""
    bootstrap = (
        "import sys\n"
        "from plexus_mcp_jupyter.evaluations.service import EvaluationService\n"
        "warm_up = EvaluationService.warm_up\n"
        "def warming(self):\n"
        "    print('STRAY-IN-WARM-UP', flush=True)\n"
        "    warm_up(self)\n"
        "EvaluationService.warm_up = warming\n" + _THEN_SERVE
    )
    environ = dict(
        os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), PLEXUS_MCP_DB_URL=f"sqlite:///{tmp_path / 's.db'}"
    )
    environ.pop("PYTHONUNBUFFERED", None)  # as a client launches it: stdout buffered
    server = subprocess.Popen(
        [sys.executable, "-c", bootstrap, "mcp", "serve", "--transport", "stdio", "--root-dir", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environ,
        cwd=Path(__file__).resolve().parent.parent,
        preexec_fn=lambda: os.close(2),  # the child's stderr closed, as its client launched it
    )
    out = _answered_then_closed(server)
    assert out[-1] == b"" and all(json.loads(line)["jsonrpc"] == "2.0" for line in out[:-1]), out
    assert json.loads(out[0])["id"] == 1, out


@asynccontextmanager
async def built_runtime(tmp_path: Path) -> AsyncIterator[Any]:
    """A runtime on a SQLite store in tmp_path, built, not started (its evaluation service started by the test)."""
    from plexus_mcp_jupyter.config import PlexusSettings
    from plexus_mcp_jupyter.runtime import PlexusRuntime

    runtime = PlexusRuntime(PlexusSettings(db_url=f"sqlite:///{tmp_path / 's.db'}"), data_dir=str(tmp_path))
    try:
        await asyncio.to_thread(runtime.evaluations.warmed.wait, 60)
        yield runtime
    finally:
        await runtime.stop()


async def test_the_rehearsals_running_when_the_evaluation_service_stops_go_no_further(tmp_path, monkeypatch):
    """`stop` (a start that failed after the service started) while warm_up_again rehearses: it ends after the
    rehearsal under way, not running on for a stopped runtime (the next start's would queue behind it)."""
    async with built_runtime(tmp_path) as runtime:
        service = runtime.evaluations
        rehearsed: list[int] = []
        entered, go = threading.Event(), threading.Event()
        timed = service._timed_rehearsal

        def counted(until_served: bool = False) -> None:
            rehearsed.append(1)
            if len(rehearsed) == 1:
                entered.set()
                go.wait(30)
            timed(until_served)

        monkeypatch.setattr(service, "_timed_rehearsal", counted)
        service.start()
        try:
            assert await asyncio.to_thread(entered.wait, 30)
            service.stop()
        finally:
            go.set()
        assert service.rehearsed is not None
        await asyncio.wait_for(asyncio.wrap_future(service.rehearsed), 30)
        assert len(rehearsed) == 1, f"{len(rehearsed)} rehearsals for a stopped service"


async def test_the_pruning_running_when_the_evaluation_service_stops_goes_no_further(tmp_path, monkeypatch):
    """`stop` while the pruning deletes a cancelled evaluation's items: it ends after the batch under way, the
    evaluation left unmarked (the next start prunes the rest), not pruning on for a stopped runtime."""
    from plexus_mcp_jupyter.evaluations.store import EvaluationStore

    from .test_hardening_evaluations import cancelled_with_items

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    cancelled_with_items(store, 10)
    store.close()
    monkeypatch.setattr(service_module, "PRUNE_BATCH", 2)
    async with built_runtime(tmp_path) as runtime:
        service = runtime.evaluations
        service._rehearsals_over = True  # (no rehearsal before the pruning)
        entered, go = threading.Event(), threading.Event()
        delete = service.store.delete_items

        def held(*args: Any, **kwargs: Any) -> int:
            entered.set()
            go.wait(30)
            return delete(*args, **kwargs)

        monkeypatch.setattr(service.store, "delete_items", held)
        service.start()
        pruning = service._started_work[1]
        try:
            assert await asyncio.to_thread(entered.wait, 30)
            service.stop()
        finally:
            go.set()
        await asyncio.wait_for(asyncio.wrap_future(pruning), 30)
        evaluations = EvaluationStore(runtime.store.engine)
        assert evaluations.count_items("e-cancelled", "score") == 8, "one batch, then no more"
        record = evaluations.get("e-cancelled")
        assert record is not None and record["items_pruned_at"] is None
