"""An evaluation dispatched through TaskManager.adispatch on a real PostgreSQL (its insert on the manager's
writer thread, off the event loop): its record is written in the transaction that stores its task, so a task
started at once never runs before its record exists, and a record that cannot be written leaves no task."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core.batches import PlannedSpec
from plexus_mcp_jupyter.core.store import tasks_table
from plexus_mcp_jupyter.evaluations.requests import CreateEvaluation

from .conftest import poll

BY_COLUMN = CreateEvaluation(
    type="accuracy", dataset="example:sentiment", prediction_column="prediction", label_column="label"
)

RECORD_DELAY = 0.5  # seconds the record's transaction stays open before the record is written


@pytest.fixture
def plexus_config(postgres_url) -> dict[str, Any]:
    # No maintenance tick during a test: each tick marks the queue as possibly refilled by other servers until its
    # pass has read it, and a dispatch in that moment is queued for the pass instead of started at once.
    return {"db_url": postgres_url, "cancel_grace_seconds": 1.0, "poll_interval": 30}


def wrap_records(runtime, monkeypatch, before) -> None:
    """Every evaluation's record runs `before()` first, in its task's transaction."""
    service = runtime.evaluations
    planned_spec = service.planned_spec

    def slow_spec(plan, owner, *inserted):  # (create passes a dict to receive the row it inserted)
        spec = planned_spec(plan, owner, *inserted)

        def record(task, conn):
            before()
            spec.record(task, conn)

        return PlannedSpec(spec.params, spec.description, record)

    monkeypatch.setattr(service, "planned_spec", slow_spec)


async def test_an_evaluation_started_at_once_runs_only_once_its_record_exists(runtime, monkeypatch):
    manager = runtime.manager
    assert manager.offload  # PostgreSQL: adispatch inserts on the writer thread
    wrap_records(runtime, monkeypatch, lambda: time.sleep(RECORD_DELAY))
    # The relay's LISTEN start has the queue read again (tasks other servers queued meanwhile): a dispatch before
    # that pass is queued for it, not started at once. Its telling is seen as the bus's skipped sequence number.
    await poll(lambda: runtime.relay.listening and runtime.bus.skipped_seq, bool, timeout=30)
    tasks = []
    for _ in range(3):
        # the last pass found the queue empty: a task dispatched now starts at once (TaskManager._starts_at_once)
        await poll(lambda: manager._queue_empty, lambda empty: empty, timeout=30)
        _, task = await runtime.evaluations.create(BY_COLUMN)
        await manager.wait_final([task.id], 60)
        tasks.append(manager.get(task.id))
    assert [t.status.value for t in tasks] == ["COMPLETED"] * 3, [t.error_message for t in tasks]
    # Started at once (one insert already claimed), not by a later scheduling pass.
    assert all(t.started_at is not None and t.started_at < t.created_at + RECORD_DELAY for t in tasks)


async def test_a_record_that_cannot_be_written_leaves_no_task_and_no_held_slot(runtime, monkeypatch):
    manager = runtime.manager

    def refuse() -> None:
        raise RuntimeError("the record cannot be written")

    wrap_records(runtime, monkeypatch, refuse)
    with pytest.raises(RuntimeError, match="cannot be written"):
        await runtime.evaluations.create(BY_COLUMN)
    with manager.store.engine.connect() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(tasks_table)).scalar_one()
    assert stored == 0  # the task's insert rolled back with its record
    assert not manager._starting and not manager._running  # the slot it held is free again
    demo = await manager.adispatch("demo", {"items": 1, "item_delay_ms": 0})
    await manager.wait_final([demo.id], 30)
    assert manager.get(demo.id).status.value == "COMPLETED"
