"""The background threads' trims of issue 16: the event relay's SQLite poll reads the outbox only when its newest
row moved, and never misses a row for it; the audit writer's longer batch wait is cut short by flush and by a full
batch."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import sqlalchemy as sa

from plexus_mcp_jupyter.core import EventBus, Store
from plexus_mcp_jupyter.core.relay import EventRelay
from plexus_mcp_jupyter.security.audit import MAX_BATCH, AuditLog, audit_table

from .conftest import poll


class CountingRelay(EventRelay):
    reads = 0

    def _read(self) -> None:
        type(self).reads += 1
        super()._read()


async def test_the_relay_reads_the_outbox_only_when_it_moved_and_gets_every_other_servers_row(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    here_store, there_store = Store(db), Store(db)
    here_bus, there_bus = EventBus(), EventBus()
    here = CountingRelay(here_store, here_bus, mode="poll", interval=0.02)
    there = EventRelay(there_store, there_bus, mode="poll", interval=0.02)
    arrived: list[str] = []
    here_bus.add_listener(lambda event: arrived.append(event.entity_id))
    loop = asyncio.get_running_loop()
    here.start(loop, "here")
    there.start(loop, "there")
    try:
        await poll(lambda: here.status()["mode"], lambda _: CountingRelay.reads >= 1)
        settled = CountingRelay.reads
        polls_before = time.monotonic()
        await poll(lambda: time.monotonic() - polls_before, lambda waited: waited > 0.3)  # ~15 polls
        assert CountingRelay.reads == settled, "nothing was written: no poll read the outbox"
        for i in range(3):  # another server's events, one after another: each arrives
            there_bus.publish("task.created", "task", f"t{i}", {"status": "QUEUED"})
            await poll(lambda: arrived, lambda a, i=i: f"t{i}" in a)
        assert CountingRelay.reads > settled
        # This server's own event moves the newest id too: read once, nothing published here.
        here_bus.publish("task.created", "task", "mine", {"status": "QUEUED"})
        await poll(lambda: here.status()["sent"], lambda sent: sent >= 1)
        there_bus.publish("task.created", "task", "after", {"status": "QUEUED"})
        await poll(lambda: arrived, lambda a: "after" in a)
        assert arrived.count("mine") == 1  # published once by its own bus, never relayed back
    finally:
        await asyncio.to_thread(here.stop)
        await asyncio.to_thread(there.stop)
        here_store.close()
        there_store.close()


def count_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(audit_table)).scalar_one())


async def test_audit_flush_writes_at_once_and_a_full_batch_goes_without_waiting(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    audit = AuditLog(store.engine)
    try:
        audit.record(None, "tool.one")
        audit.flush()
        assert count_rows(store) == 1
        for i in range(MAX_BATCH):
            audit.record(None, f"tool.n{i}")
        # Nobody flushes: a full batch is written, and a lone record after it within the batch wait.
        await poll(lambda: count_rows(store), lambda rows: rows == 1 + MAX_BATCH, timeout=20)
        audit.record(None, "tool.last")
        await poll(lambda: count_rows(store), lambda rows: rows == 2 + MAX_BATCH, timeout=20)
    finally:
        audit.close()
        store.close()
