"""Store size under a steady load with a short retention: it must level off, not grow with time.

Runs the real core (SQLite store, TaskManager, local worker processes) with `demo` tasks kept
`--retention` seconds once finished and the pruner every `--interval` seconds, dispatches `--rate`
short demo tasks a second for `--seconds`, and prints every `--every` seconds the tasks dispatched,
the rows in the store and the size of the database file (plus its WAL). Once the first tasks expire,
the rows and the file size stay flat: freed pages are reused.

    python benchmarks/bench_retention.py [--seconds 60] [--rate 20] [--retention 5] [--interval 0.5]

Goal (issue #12, item 5): the store's size stays flat under a steady load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from plexus_mcp_jupyter.core.events import EventBus
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.manager import TaskManager
from plexus_mcp_jupyter.core.retention import RetentionPolicy
from plexus_mcp_jupyter.core.store import Store, expired_table, samples_table, tasks_table


def size_kb(path: Path) -> tuple[int, int]:
    wal = Path(f"{path}-wal")
    return path.stat().st_size // 1024, (wal.stat().st_size // 1024 if wal.exists() else 0)


def rows(store: Store) -> list[int]:
    """Finished tasks, unfinished ones (queued or running), progress samples, tombstones."""
    t = tasks_table
    count = sa.select(sa.func.count())
    with store.engine.connect() as conn:
        return [
            conn.execute(count.select_from(t).where(t.c.completed_at.is_not(None))).scalar_one(),
            conn.execute(count.select_from(t).where(t.c.completed_at.is_(None))).scalar_one(),
            conn.execute(count.select_from(samples_table)).scalar_one(),
            conn.execute(count.select_from(expired_table)).scalar_one(),
        ]


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plexus.db"
        store = Store(f"sqlite:///{path}")
        manager = TaskManager(
            store,
            EventBus(),
            LocalExecutor(),
            max_concurrency=os.cpu_count() or 2,
            progress_write_interval=0.05,
            poll_interval=0.2,
        )
        manager.configure_retention(RetentionPolicy(default_seconds=args.retention), interval=args.interval, batch=500)
        await manager.start()
        print(
            f"{'t (s)':>6} {'dispatched':>10} {'finished':>8} {'unfinished':>10} {'samples':>8} "
            f"{'tombstones':>10} {'db KB':>7} {'wal KB':>7}"
        )
        begin = time.monotonic()
        dispatched = 0
        next_print = 0.0
        try:
            while (elapsed := time.monotonic() - begin) < args.seconds:
                due = int(elapsed * args.rate) - dispatched
                for _ in range(due):
                    manager.dispatch("demo", {"items": 5, "item_delay_ms": 2})
                    dispatched += 1
                if elapsed >= next_print:
                    db, wal = size_kb(path)
                    counts = " ".join(f"{n:>{w}}" for n, w in zip(rows(store), (8, 10, 8, 10), strict=True))
                    print(f"{elapsed:6.0f} {dispatched:10d} {counts} {db:7d} {wal:7d}", flush=True)
                    next_print += args.every
                await asyncio.sleep(0.02)
        finally:
            await manager.stop()
            store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=20, help="tasks dispatched per second")
    parser.add_argument("--retention", type=float, default=5, help="seconds a finished task is kept")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between pruning passes")
    parser.add_argument("--every", type=float, default=5, help="seconds between lines of output")
    asyncio.run(main(parser.parse_args()))
