"""`list_tasks` with a status filter on a store holding 100,000 tasks: the latency of one page.

Fills a SQLite store with `--tasks` tasks (mostly COMPLETED, some FAILED, CANCELLED, QUEUED and
RUNNING, three stages each, as the demo makes), then times TaskManager.list_tasks (the call behind the
MCP tool, the resource and REST) for a page of 20 with each status filter, the next page by cursor, two
statuses at once, the scheduler's read of the queue and get_task. Prints p50/p99 per query.

With `--db-url URL` (an empty PostgreSQL database, say) or `--postgres` (a throwaway PostgreSQL cluster started
for the run, as the tests do), the same store is filled and timed there too, beside SQLite in the same run, and
the ratio of the p50s is printed.

    python benchmarks/bench_list_tasks.py [--tasks 100000] [--repeat 200] [--db-url URL | --postgres]

Goals: p50 < 10 ms with a status filter at 100,000 stored tasks (issue #12), on SQLite and PostgreSQL; get_task
p50 on PostgreSQL within 1.5x of SQLite's (issue #13).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from plexus_mcp_jupyter.core.events import EventBus
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.manager import TaskManager
from plexus_mcp_jupyter.core.store import Store, TaskFilter, stages_table, tasks_table

MIX = [("COMPLETED", 0.80), ("FAILED", 0.08), ("CANCELLED", 0.07), ("QUEUED", 0.04), ("RUNNING", 0.01)]


def fill(store: Store, n: int) -> None:
    rng = random.Random(7)
    statuses = rng.choices([s for s, _ in MIX], weights=[w for _, w in MIX], k=n)
    start = time.time() - n
    for first in range(0, n, 10_000):
        tasks, stages = [], []
        for i in range(first, min(first + 10_000, n)):
            task_id = f"{i:08d}-task"
            status = statuses[i]
            done = status not in ("QUEUED", "RUNNING")
            tasks.append(
                {
                    "id": task_id,
                    "type": "demo",
                    "status": status,
                    "priority": rng.choice((0, 0, 0, 5)),
                    "owner": rng.choice(("jupyter", "key:a", "key:b")),
                    "params": {"items": 10},
                    "created_at": start + i,
                    "started_at": start + i + 0.1 if status != "QUEUED" else None,
                    "completed_at": start + i + 1 if done else None,
                    "cancel_requested": False,
                }
            )
            if status != "QUEUED":
                for order, name in enumerate(("Setup", "Processing", "Finalizing")):
                    stages.append(
                        {
                            "task_id": task_id,
                            "stage_order": order,
                            "name": name,
                            "status": "COMPLETED",
                            "total_items": 10,
                            "processed_items": 10,
                        }
                    )
        with store.engine.begin() as conn:
            conn.execute(sa.insert(tasks_table), tasks)
            conn.execute(sa.insert(stages_table), stages)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def measure(url: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Fill the store at `url` and time every query on it: {query: (p50 ms, p99 ms)}."""
    store = Store(url)
    if store.count_tasks(TaskFilter()):
        raise SystemExit(f"{store.safe_url} already holds tasks: give an empty database")
    t0 = time.perf_counter()
    fill(store, args.tasks)
    if store.engine.dialect.name == "postgresql":  # the planner's statistics, as autovacuum would gather them
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    print(f"{store.engine.dialect.name}: filled {args.tasks} tasks in {time.perf_counter() - t0:.1f} s")
    manager = TaskManager(store, EventBus(), LocalExecutor())
    cases: list[tuple[str, Callable[[], Any]]] = []
    for status, _ in MIX:
        flt = manager.build_filter(status=status)
        cases.append((f"status={status}", lambda flt=flt: manager.list_tasks(flt, limit=20)))
    flt = manager.build_filter(status="COMPLETED")
    _, cursor = manager.list_tasks(flt, limit=20)
    cases.append(("status=COMPLETED, page 2", lambda: manager.list_tasks(flt, limit=20, cursor=cursor)))
    both = manager.build_filter(status="FAILED,CANCELLED")
    cases.append(("status=FAILED,CANCELLED", lambda: manager.list_tasks(both, limit=20)))
    viewer = manager.build_filter(status="COMPLETED", viewer="key:a")
    cases.append(("status=COMPLETED as key:a", lambda: manager.list_tasks(viewer, limit=20)))
    cases.append(("scheduler's queue read", lambda: store.queue_window(per_owner=5, limit=200)))
    ids = [f"{i:08d}-task" for i in random.Random(3).sample(range(args.tasks), 50)]
    cases.append(("get_task", lambda: store.get_task(ids[int(time.perf_counter_ns()) % len(ids)])))
    try:
        return {name: timed(fn, args.repeat) for name, fn in cases}
    finally:
        store.close()


def main(args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        results = {"sqlite": measure(f"sqlite:///{Path(tmp) / 'plexus.db'}", args)}
        url = args.db_url
        if args.postgres:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.postgres import start_cluster  # the tests' throwaway cluster

            url = stack.enter_context(start_cluster()).create_database()
        if url:
            results["other"] = measure(url, args)
    sqlite = results["sqlite"]
    other = results.get("other")
    header = f"{'query':<28} {'sqlite p50':>10} {'p99':>7}"
    if other:
        header += f" {'pg p50':>8} {'p99':>7} {'pg/sqlite':>9}"
    print(header)
    for name, (p50, p99) in sqlite.items():
        line = f"{name:<28} {p50:10.2f} {p99:7.2f}"
        if other:
            o50, o99 = other[name]
            line += f" {o50:8.2f} {o99:7.2f} {o50 / p50:8.2f}x"
        print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--db-url", help="also time this (empty) store, e.g. postgresql+psycopg://user@host/db")
    parser.add_argument("--postgres", action="store_true", help="also time a throwaway PostgreSQL cluster")
    main(parser.parse_args())
