"""Warm workers: the local executor reuses worker processes across tasks and keeps the guarantees of a
process per task (kill-and-replace on an ignored cancel, a crash fails only its task, isolation on request).

The core tests drive a real TaskManager with a real LocalExecutor on a SQLite file; the MCP test a real
Jupyter server through the official SDK client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from plexus_mcp_jupyter.core import EventBus, Store, TaskManager, TaskStatus
from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.tasks import TaskType

from .conftest import poll, registered_task_types
from .processes import pid_alive

TRIVIAL = {"items": 1, "item_delay_ms": 0}


@pytest.fixture
def worker_task_types():
    with registered_task_types(
        TaskType("stubborn", "tests.task_functions:stubborn", "ignores cancellation"),
        TaskType("crash_exit", "tests.worker_task_functions:crash_exit", "os._exit"),
        TaskType("segfault", "tests.worker_task_functions:segfault", "SIGSEGV"),
        TaskType("raise_error", "tests.worker_task_functions:raise_error", "raises"),
        TaskType("ask_twice", "tests.worker_task_functions:ask_twice", "requests"),
        TaskType("grow", "tests.worker_task_functions:grow", "holds memory"),
        TaskType("niceness", "tests.worker_task_functions:niceness", "reports its nice value"),
        TaskType("untrusted", "tests.worker_task_functions:pid", "isolated by its type", isolated=True),
        TaskType("odd_messages", "tests.worker_task_functions:odd_messages", "unsendable messages"),
    ):
        yield


@asynccontextmanager
async def manager_with(path, executor: LocalExecutor | None = None, **kw: Any):
    store = Store(f"sqlite:///{path / 'warm.db'}")
    kw.setdefault("max_concurrency", 1)
    m = TaskManager(store, EventBus(), executor or LocalExecutor(), cancel_grace_seconds=1.0, poll_interval=0.1, **kw)
    await m.start()
    if m.executor.reuse:  # the pool warms up off the loop: a task dispatched before it did starts its own worker
        await poll(lambda: m.executor.status()["idle_workers"], lambda n: n >= m.max_concurrency)
    try:
        yield m
    finally:
        await m.stop()
        store.close()


async def run(m: TaskManager, type_: str, params: dict[str, Any] | None = None, timeout: float = 30):
    task = m.dispatch(type_, params or {})
    await m.wait_final([task.id], timeout)
    done = m.get(task.id)
    assert done.status.is_final, done
    return done


def worker_pid(task) -> int:
    """The worker's process id, from the task's `worker` field ("executor:host:pid:instance/pid=N")."""
    return int(task.worker.rsplit("pid=", 1)[1])


async def test_sequential_tasks_reuse_one_warm_worker(tmp_path):
    async with manager_with(tmp_path) as m:
        first = await run(m, "demo", TRIVIAL)
        second = await run(m, "demo", TRIVIAL)
        third = await run(m, "demo", {"items": 3, "item_delay_ms": 1})
    assert first.status is second.status is third.status is TaskStatus.COMPLETED
    assert worker_pid(first) == worker_pid(second) == worker_pid(third)
    assert [s.name for s in third.stages] == ["Setup", "Processing", "Finalizing"]


async def test_an_ignored_cancel_kills_the_worker_and_a_fresh_one_takes_its_place(tmp_path, worker_task_types):
    async with manager_with(tmp_path) as m:
        task = m.dispatch("stubborn", {})
        await poll(lambda: m.get(task.id).current_stage, lambda s: s == "Stubborn")
        pid = m.executor.pid(task.id)
        m.cancel([task.id])
        await m.wait_final([task.id], 10)
        done = m.get(task.id)
        assert done.status is TaskStatus.CANCELLED and "grace period" in done.error_message
        await poll(lambda: pid_alive(pid), lambda alive: not alive, timeout=5)
        after = await run(m, "demo", TRIVIAL)
        assert after.status is TaskStatus.COMPLETED and worker_pid(after) != pid


async def test_a_cooperative_cancel_retires_the_worker_too(tmp_path):
    async with manager_with(tmp_path) as m:
        task = m.dispatch("demo", {"items": 100_000, "item_delay_ms": 5})
        await poll(lambda: m.get(task.id).current_stage, lambda s: s == "Processing")
        m.cancel([task.id])
        await m.wait_final([task.id], 10)
        done = m.get(task.id)
        assert done.status is TaskStatus.CANCELLED and "request check" in done.error_message
        # Threads or state the cancelled task left behind must stop with it.
        await poll(lambda: pid_alive(worker_pid(done)), lambda alive: not alive, timeout=5)
        after = await run(m, "demo", TRIVIAL)
        assert after.status is TaskStatus.COMPLETED and worker_pid(after) != worker_pid(done)


@pytest.mark.parametrize("crash, exitcode", [("crash_exit", 3), ("segfault", -11)])
async def test_a_crash_fails_only_its_task_and_the_next_task_runs(tmp_path, worker_task_types, crash, exitcode):
    async with manager_with(tmp_path, max_concurrency=2) as m:
        neighbour = m.dispatch("demo", {"items": 100, "item_delay_ms": 5})
        await poll(lambda: m.get(neighbour.id).current_stage, lambda s: s == "Processing")
        crashed = await run(m, crash)
        await m.wait_final([neighbour.id], 30)
        after = await run(m, "demo", TRIVIAL)
        assert m.executor.status()["workers"] <= 2
    assert crashed.status is TaskStatus.FAILED
    assert f"exited unexpectedly (exit code {exitcode})" in crashed.error_message
    assert m.get(neighbour.id).status is TaskStatus.COMPLETED
    assert worker_pid(m.get(neighbour.id)) != worker_pid(crashed)
    assert after.status is TaskStatus.COMPLETED and worker_pid(after) != worker_pid(crashed)


async def test_an_exception_fails_its_task_and_the_worker_serves_the_next(tmp_path, worker_task_types):
    async with manager_with(tmp_path) as m:
        failed = await run(m, "raise_error")
        after = await run(m, "demo", TRIVIAL)
    assert failed.status is TaskStatus.FAILED and "ValueError: this task fails on purpose" in failed.error_message
    assert after.status is TaskStatus.COMPLETED and worker_pid(after) == worker_pid(failed)


async def test_a_message_that_cannot_cross_costs_only_itself_never_the_end_or_the_next_tasks_progress(
    tmp_path, worker_task_types
):
    """The worker's outbox pickles each message on its own: one it cannot pickle, and one the server cannot
    unpickle, each become a log line; the task still ends, and the next task on the same worker still
    reports its progress live (the outbox's flusher survived)."""
    async with manager_with(tmp_path) as m:
        odd = await run(m, "odd_messages")
        seen: list[str] = []
        sub = m.bus.subscribe(lambda e: e.kind == "task.stage")
        after = m.dispatch("demo", {"items": 3, "item_delay_ms": 300})
        first = await asyncio.wait_for(sub.next_batch(), 10)  # a stage arrives while the task runs, not at its end
        seen.extend(e.data["current_stage"] for e in first)
        assert m.get(after.id).status is TaskStatus.RUNNING
        await m.wait_final([after.id], 30)
    assert odd.status is TaskStatus.COMPLETED and odd.output == "ended", odd
    assert "could not be sent" in (odd.stderr_tail or "") and "could not be read" in (odd.stderr_tail or "")
    assert worker_pid(m.get(after.id)) == worker_pid(odd) and seen == ["Setup"]


async def test_without_reuse_every_task_gets_a_fresh_process(tmp_path):
    async with manager_with(tmp_path, LocalExecutor(reuse=False)) as m:
        tasks = [await run(m, "demo", TRIVIAL) for _ in range(3)]
        assert m.executor.status()["idle_workers"] == 0
    pids = [worker_pid(t) for t in tasks]
    assert len(set(pids)) == 3 and all(t.status is TaskStatus.COMPLETED for t in tasks)
    await poll(lambda: [pid_alive(p) for p in pids], lambda alive: not any(alive), timeout=5)


async def test_a_task_type_flagged_isolated_never_shares_a_worker(tmp_path, worker_task_types):
    async with manager_with(tmp_path) as m:
        warm = await run(m, "demo", TRIVIAL)
        isolated = [await run(m, "untrusted") for _ in range(2)]
        again = await run(m, "demo", TRIVIAL)
    pids = [worker_pid(t) for t in isolated]
    assert [t.output for t in isolated] == pids  # the task itself ran in the process the field names
    assert len({worker_pid(warm), *pids}) == 3
    assert worker_pid(again) == worker_pid(warm)
    await poll(lambda: [pid_alive(p) for p in pids], lambda alive: not any(alive), timeout=5)


async def test_a_worker_is_replaced_after_max_tasks_or_past_its_memory_bound(tmp_path, worker_task_types):
    async with manager_with(tmp_path, LocalExecutor(max_tasks_per_worker=2)) as m:
        pids = [worker_pid(await run(m, "demo", TRIVIAL)) for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]
    async with manager_with(tmp_path, LocalExecutor(max_worker_memory_mb=64)) as m:
        grown = await run(m, "grow", {"mb": 96})
        after = await run(m, "demo", TRIVIAL)
    assert grown.output == 96 and worker_pid(after) != worker_pid(grown)


async def test_reused_workers_run_below_the_server_priority_once_not_cumulatively(tmp_path, worker_task_types):
    import os

    async with manager_with(tmp_path, LocalExecutor(nice=3)) as m:
        runs = [await run(m, "niceness") for _ in range(3)]
    assert [t.output for t in runs] == [min(19, os.nice(0) + 3)] * 3
    assert len({worker_pid(t) for t in runs}) == 1


async def test_requests_reach_the_server_from_a_reused_worker(tmp_path, worker_task_types):
    async def echo(task, payload):
        if payload == "no-2":
            raise InvalidArgument("refused on purpose")
        return f"{payload} from {task.id[:8]}"

    async with manager_with(tmp_path) as m:
        m.request_handlers["echo"] = echo
        first = await run(m, "ask_twice", {"word": "a"})
        second = await run(m, "ask_twice", {"word": "b"})
        refused = await run(m, "ask_twice", {"word": "no"})
    assert first.output == [f"a-1 from {first.id[:8]}", f"a-2 from {first.id[:8]}"]
    assert second.output == [f"b-1 from {second.id[:8]}", f"b-2 from {second.id[:8]}"]
    assert worker_pid(first) == worker_pid(second)
    assert refused.status is TaskStatus.FAILED and "refused on purpose" in refused.error_message


async def test_progress_streams_over_mcp_from_a_reused_worker(mcp_client, runtime):
    updates: list[float] = []

    async def on_progress(progress, total, message):
        updates.append(progress)

    executor = runtime.executor
    await poll(lambda: executor.status()["idle_workers"], lambda n: n >= executor.pool_size)
    async with mcp_client() as client:
        first = await client.call_tool("run_demo_task", TRIVIAL)
        first_id = first.structured_content["task_id"]
        await runtime.manager.wait_final([first_id], 20)
        result = await client.call_tool(
            "run_demo_task", {"items": 200, "item_delay_ms": 2}, progress_callback=on_progress
        )
        warm = (await client.call_tool("get_task", {"task_id": first_id})).structured_content
        second_id = result.structured_content["task_id"]
        reused = (await client.call_tool("get_task", {"task_id": second_id})).structured_content
    assert reused["status"] == "COMPLETED"
    # The worker that ran the first task was handed back first (the idle list is last in, first out).
    assert worker_pid_text(reused["worker"]) == worker_pid_text(warm["worker"])
    assert len(updates) >= 5 and updates == sorted(updates) and updates[-1] == 3 + 200 + 2 + 1


def worker_pid_text(worker: str) -> str:
    return worker.rsplit("pid=", 1)[1]


async def test_many_tasks_ending_together_are_recorded_in_shared_writes(tmp_path):
    async with manager_with(tmp_path, max_concurrency=4) as m:
        writes: list[int] = []
        save_many = m.store.save_progress_many
        m.store.save_progress_many = lambda batch, **kw: (writes.append(len(batch)), save_many(batch, **kw))[1]
        tasks = [m.dispatch("demo", TRIVIAL) for _ in range(40)]
        await m.wait_final([t.id for t in tasks], 60)
        stored = [m.store.get_task(t.id) for t in tasks]
        assert all(t.status is TaskStatus.COMPLETED for t in stored), [t.status for t in stored]
        assert all([s.name for s in t.stages] == ["Setup", "Processing", "Finalizing"] for t in stored)
        assert all(t.worker and "pid=" in t.worker for t in stored)  # stored with a later write than its claim
        # Each task's start, three stages and end would be five writes alone.
        assert sum(writes) >= 40 and len(writes) < 40 * 5

        # Four tasks that end while the loop is busy (here: blocked) are recorded in ONE write.
        await poll(lambda: m._queue_empty and not m._pending, bool)  # a dispatch starts its task at once
        writes.clear()
        four = [m.dispatch("demo", TRIVIAL) for _ in range(4)]
        assert [m.get(t.id).status for t in four] == [TaskStatus.RUNNING] * 4
        time.sleep(1.5)  # the loop is busy while the four run and end
        await m.wait_final([t.id for t in four], 60)
        assert writes == [4], writes


def test_a_stage_change_sends_no_count_the_server_completes_anyway():
    from plexus_mcp_jupyter.core.context import TaskContext
    from plexus_mcp_jupyter.core.messages import Progress

    sent: list[tuple] = []
    never = type("Never", (), {"is_set": lambda self: False})()
    ctx = TaskContext("t", sent.append, never, flush_interval=3600)
    ctx.stage("Setup", 3)
    ctx.advance(3)
    ctx.stage("Open-ended")  # the server completes Setup at 3 of 3 itself
    ctx.advance(2)
    ctx.stage("Last", 5)  # no total before: the count is news
    ctx.advance(1, "a message the server has not seen")
    ctx.stage("After")
    assert [type(m).__name__ for m in sent] == ["Stage", "Stage", "Progress", "Stage", "Progress", "Stage"]
    assert sent[2] == Progress(2, None) and sent[4] == Progress(1, "a message the server has not seen")


ORPHANED = """
import asyncio, os, sys
from multiprocessing import forkserver
from plexus_mcp_jupyter.core import EventBus, Store, TaskManager
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.tasks import TaskType, register_task_type

register_task_type(TaskType("stubborn", "tests.task_functions:stubborn", "ignores cancellation"))


async def main():
    m = TaskManager(Store(f"sqlite:///{sys.argv[1]}"), EventBus(), LocalExecutor(), max_concurrency=1)
    await m.start()
    task = m.dispatch("stubborn", {})
    while m.executor.pid(task.id) is None or m.get(task.id).current_stage != "Stubborn":
        await asyncio.sleep(0.05)
    with open(sys.argv[2], "w") as f:
        f.write(f"{m.executor.pid(task.id)} {forkserver._forkserver._forkserver_pid}")
    os._exit(0)  # as SIGKILL would: no shutdown, no atexit


asyncio.run(main())
"""


def test_a_worker_whose_server_died_mid_task_ends_and_so_does_the_forkserver(tmp_path):
    """A server killed while a task runs (one that never looks at its pipe) leaves neither the worker running it
    nor the forkserver behind (the worker holds a copy of the forkserver's lifeline): a worker ends when the
    server's end of its pipe closes (worker._exit_with_the_server)."""
    root = Path(__file__).resolve().parent.parent
    pids, output = tmp_path / "pids", tmp_path / "output"
    with output.open("w") as out:  # a file, not a pipe: the processes left behind would hold a pipe open
        code = subprocess.run(
            [sys.executable, "-c", ORPHANED, str(tmp_path / "orphan.db"), str(pids)],
            stdout=out,
            stderr=out,
            timeout=120,
            cwd=root,
        ).returncode
    assert code == 0, output.read_text()
    worker, server = (int(pid) for pid in pids.read_text().split())
    try:
        deadline = time.monotonic() + 30
        while (pid_alive(worker) or pid_alive(server)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(worker), "the orphaned worker still runs its task"
        assert not pid_alive(server), "the forkserver outlived its server"
    finally:
        for pid in (worker, server):  # only when the test failed: what it started must not outlive it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_what_the_reader_hands_a_busy_loop_waits_in_one_callback_in_order(monkeypatch):
    """The executor's threads hand messages to the loop: while the loop is busy (it has not run the callback
    handed it yet) what follows joins that callback rather than writing to the loop's self-pipe again."""
    loop = asyncio.get_running_loop()
    executor = LocalExecutor()
    executor._loop = loop  # not started: only its hand-off is used
    scheduled: list[Any] = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(*args: Any) -> Any:
        scheduled.append(args)
        return call_soon_threadsafe(*args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    got: list[Any] = []

    def reader() -> None:
        for i in range(50):
            executor._deliver([(got.append, i), (got.append, -i)])

    thread = threading.Thread(target=reader)
    thread.start()
    thread.join()  # the loop is busy meanwhile: it runs nothing until this test awaits
    await poll(lambda: len(got), lambda n: n == 100, timeout=10)
    assert got == [x for i in range(50) for x in (i, -i)] and len(scheduled) == 1
    executor._deliver([(got.append, "after")])  # once run, the next hand-off schedules a callback again
    await poll(lambda: got[-1], lambda last: last == "after", timeout=10)
    assert len(scheduled) == 2
    other = asyncio.new_event_loop()  # a loop that never runs what it is handed (stopped for good)
    try:
        executor._loop = other
        executor._deliver([(got.append, "stranded")])
    finally:
        other.close()
    executor._loop = loop  # an executor started again, on this loop, is not left waiting on the other's callback
    executor._deliver([(got.append, "here")])
    await poll(lambda: got[-2:], lambda last: last == ["stranded", "here"], timeout=10)
