"""Faults of several servers on one store, on a real SQLite file and a real PostgreSQL (tests/postgres.py):
a take-over and its resolution commit together or not at all; a server whose tasks were taken over (it stalled
longer than its lease) writes nothing more of them and stops its copies; a valid lease means a live server
whatever its host name says; a migration waits for another beyond the statement timeout, and gives up clearly;
`plexus mcp serve` on a store newer than the code says so in one line; a runtime that cannot be built closes
the LocalCluster it started."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.config import PlexusSettings
from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.core.events import EventBus
from plexus_mcp_jupyter.core.executors.local import LocalExecutor
from plexus_mcp_jupyter.core.leases import MACHINE
from plexus_mcp_jupyter.core.manager import HOST, TaskManager, _owner_gone
from plexus_mcp_jupyter.core.models import Stage, StageStatus, Task, TaskStatus
from plexus_mcp_jupyter.core.store import ProgressWrite, Store, make_engine
from plexus_mcp_jupyter.migrations import _LOCK_KEY, StoreBusy, head_revision, upgrade_store
from plexus_mcp_jupyter.runtime import PlexusRuntime

from .conftest import poll

GONE = "local:another-host:1:gone"  # a server that stopped renewing its leases


def refuse_updates_to(store: Store, status: str) -> None:
    """A trigger that makes the database refuse any UPDATE of a task to `status`: a resolution that fails."""
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION "
                "'refused by the test'; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE UPDATE ON tasks FOR EACH ROW WHEN "
                f"(NEW.status = '{status}') EXECUTE FUNCTION refuse()"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE UPDATE ON tasks WHEN NEW.status = '{status}' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )


def drop_refusal(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP TRIGGER refuse ON tasks" if store.engine.dialect.name == "postgresql" else "DROP TRIGGER refuse"
        )


def left_running(store: Store, task_type: str = "demo") -> Task:
    """A task a gone server left RUNNING, its lease run out, with a stage under way."""
    at = time.time() - 60
    task = Task(
        id=str(uuid.uuid4()),
        type=task_type,
        status=TaskStatus.RUNNING,
        started_at=at,
        worker=GONE,
        lease_expires_at=at + 1,
    )
    store.create_task(task)
    stage = Stage(name="Processing", order=0, status=StageStatus.RUNNING, started_at=at)
    store.save_progress(task, stages=[stage])
    return task


async def test_a_take_over_whose_resolution_fails_is_undone(store_url):
    """The take-over and the task's end commit in one transaction: when the end cannot be written, the task is
    still the gone server's (the next recovery tries again), not RUNNING held by the survivor for ever (its
    heartbeat would renew that lease)."""
    store = Store(store_url)
    manager = TaskManager(store, EventBus(), LocalExecutor())
    manager.lease_seconds = 30
    try:
        task = left_running(store)
        refuse_updates_to(store, "FAILED")
        with pytest.raises(sa.exc.DBAPIError, match="refused by the test"):
            manager.recover()
        after = store.get_task(task.id)
        assert (after.status, after.worker) == (TaskStatus.RUNNING, GONE)
        assert store.renew_leases(manager.server_id, time.time() + 60) == 0
        drop_refusal(store)
        manager.recover()
        after = store.get_task(task.id)
        assert (after.status, after.error_message) == (TaskStatus.FAILED, "server restarted while the task was running")
        assert after.worker == GONE and after.stages[0].status is StageStatus.FAILED  # the claim that ran it
    finally:
        store.close()


def test_a_take_over_and_its_requeue_commit_together(store_url):
    store = Store(store_url)
    try:
        task = left_running(store)
        refuse_updates_to(store, "QUEUED")
        with pytest.raises(sa.exc.DBAPIError, match="refused by the test"):
            store.take_over(task.id, previous=GONE, worker="survivor", lease_expires_at=time.time() + 30, requeue=True)
        assert store.get_task(task.id).worker == GONE
        drop_refusal(store)
        assert store.take_over(task.id, previous=GONE, worker="survivor", lease_expires_at=None, requeue=True)
        after = store.get_task(task.id)
        assert (after.status, after.worker, after.stages) == (TaskStatus.QUEUED, None, [])
    finally:
        store.close()


def test_progress_and_final_writes_need_the_lease(store_url):
    """A server's batched write skips the tasks another server holds now, and says which."""
    store = Store(store_url)
    try:
        mine, taken = (Task(id=str(uuid.uuid4()), type="demo", status=TaskStatus.QUEUED) for _ in range(2))
        for task in (mine, taken):
            store.create_task(task)
            store.claim(task.id, worker="stale", started_at=time.time(), lease_expires_at=time.time() + 1)
        assert store.take_over(taken.id, previous="stale", worker="survivor", lease_expires_at=time.time() + 30)
        for task in (mine, taken):
            task.status, task.worker, task.current_stage = TaskStatus.COMPLETED, "stale/pid=1", "Finalizing"
        stage = Stage(name="Finalizing", order=0, status=StageStatus.COMPLETED)
        lost = store.save_progress_many(
            [ProgressWrite(t, [stage], [], final=True) for t in (mine, taken)], holder="stale"
        )
        assert lost == {taken.id}
        kept = store.get_task(taken.id)
        assert (kept.status, kept.worker, kept.current_stage, kept.stages) == (TaskStatus.RUNNING, "survivor", None, [])
        assert store.get_task(mine.id).status is TaskStatus.COMPLETED
        assert not store.requeue(taken.id, holder="stale") and store.get_task(taken.id).status is TaskStatus.RUNNING
    finally:
        store.close()


async def test_a_server_whose_task_was_taken_over_stops_its_copy_and_writes_nothing(store_url, caplog):
    """A server stalled longer than its lease: another server took its task over meanwhile. Its next write of
    that task finds the row held by the other: it writes nothing, stops its run, says so in one log line."""
    store = Store(store_url)
    manager = TaskManager(
        store, EventBus(), LocalExecutor(), cancel_grace_seconds=1.0, poll_interval=0.1, progress_write_interval=0.1
    )
    manager.lease_seconds = 30
    await manager.start()
    try:
        task = manager.dispatch("demo", {"items": 400, "item_delay_ms": 25})
        stored = await poll(
            lambda: store.get_task(task.id),
            lambda t: t.status is TaskStatus.RUNNING and t.current_stage == "Processing",
        )
        other = Store(store_url)
        try:
            taken = other.take_over(
                task.id, previous=stored.worker, worker="survivor", lease_expires_at=time.time() + 30
            )
        finally:
            other.close()
        assert taken
        with caplog.at_level(logging.WARNING, logger="plexus_mcp_jupyter"):
            await poll(lambda: task.id in manager._running, lambda running: not running, timeout=15)
        assert f"task {task.id} was taken over by another server" in caplog.text
        await poll(lambda: manager.executor.status()["running"], lambda n: n == 0, timeout=15)  # its run stopped
        after = store.get_task(task.id)
        assert (after.status, after.worker) == (TaskStatus.RUNNING, "survivor")
        assert manager.store.renew_leases(manager.server_id, time.time() + 60) == 0
        await manager.stop()
        assert store.get_task(task.id).worker == "survivor"  # its stop wrote nothing either
    finally:
        await manager.stop()
        store.close()


def test_a_valid_lease_means_a_live_server_whatever_its_host_name():
    """Two machines with one host name on a networked store: a claim whose process id is not alive here, but
    whose lease is valid, belongs to a live server on the other machine."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    dead = f"local:{HOST}:{process.pid}:elsewhere/pid=1"
    assert not _owner_gone(dead, "me", lease_expires_at=time.time() + 30)
    assert _owner_gone(dead, "me", lease_expires_at=time.time() - 1)
    assert _owner_gone(dead, "me")  # no lease (an older release): the process id decides, as before
    # A claim provably from this machine and process-id namespace (core/leases.py MACHINE): a crash is seen at once.
    here = f"local:{HOST}:{process.pid}:elsewhere:{MACHINE}/pid=1"
    assert _owner_gone(here, "me", lease_expires_at=time.time() + 30)


def test_a_migration_waits_for_another_beyond_the_statement_timeout(postgres_url):
    """The migration lock is taken without the store's statement_timeout (it bounds the server's calls, not a
    wait for another process's migration), and the pooled connection gets that timeout back afterwards."""
    holder = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    engine = make_engine(postgres_url, statement_timeout=0.3)
    outcome: list[Any] = []
    try:
        with holder.connect() as other:
            other.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
            waiting = threading.Thread(target=lambda: outcome.append(upgrade_store(engine, "the test store")))
            waiting.start()
            time.sleep(1.0)  # the other process migrates for longer than statement_timeout
            assert waiting.is_alive() and not outcome
            other.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
            other.commit()
        waiting.join(30)
        assert outcome and outcome[0][1] == head_revision()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "300ms"
    finally:
        engine.dispose()
        holder.dispose()


def test_a_migration_lock_held_too_long_fails_clearly(postgres_url):
    holder = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    engine = make_engine(postgres_url)
    try:
        with holder.connect() as other:
            other.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
            with pytest.raises(StoreBusy, match=r"held its migration lock for more than 0\.5 s") as refused:
                upgrade_store(engine, "the test store", lock_wait=0.5)
            other.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
            other.commit()
        assert str(refused.value).startswith("the store at the test store is being migrated by another process")
        assert upgrade_store(engine, "the test store")[1] == head_revision()  # the lock is free: it migrates
    finally:
        engine.dispose()
        holder.dispose()


def test_serve_on_a_store_newer_than_the_code_says_so_in_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    Store(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    engine.dispose()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "plexus_mcp_jupyter.cli", "mcp", "serve", "--db-url", url],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("plexus: not started: the store at ") and "'9999_from_the_future'" in last


def test_a_local_cluster_is_closed_when_the_runtime_cannot_be_built(tmp_path):
    """executor=dask without a scheduler starts a LocalCluster (worker processes) before the rest of the runtime
    is built: a setting refused after that must not leave those processes behind."""
    pytest.importorskip("distributed")
    import psutil  # installed with distributed

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    settings = PlexusSettings(
        executor="dask",
        dask_local_workers=1,
        max_concurrency_by_type="evaluation=many",
        db_url=f"sqlite:///{tmp_path / 'store.db'}",
    )
    with pytest.raises(InvalidArgument, match="max_concurrency_by_type") as refused:
        PlexusRuntime(settings, data_dir=str(tmp_path))

    def left() -> list[str]:  # multiprocessing's resource tracker stays for the life of this interpreter
        commands = []
        for process in me.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile (or a zombie): not left
                if process.pid not in before and "resource_tracker" not in (command := " ".join(process.cmdline())):
                    commands.append(command)
        return commands

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left()
    assert refused.value is not None  # the error, and what its traceback refers to, is still held here
