"""Dispatch throughput: trivial tasks over MCP against a real Jupyter server, beside ProcessPoolExecutor and Dask.

In one run, on the same machine (nothing pinned: the server, its workers and the pools share every core):

1. one by one: a lean keep-alive MCP client (benchmarks/_common.py LeanSession) calls `run_demo_task`
   (items=1, item_delay_ms=0) N times in sequence, then waits until all N are COMPLETED (the health
   endpoint's counts); tasks/s end to end, and the server process's CPU per task (/proc/<pid>/stat: the
   server's own threads, not its workers);
2. as a batch over MCP: `dispatch_batch` calls of up to the server's `max_batch_size` specs (1,000), then the
   same wait; and N calls from --sessions concurrent sessions; and the core alone: `TaskManager.dispatch`
   N times in one turn of its loop, in this process, with the same LocalExecutor (CPU per task: this
   process, i.e. the loop and the reader thread);
3. `concurrent.futures.ProcessPoolExecutor(2)` and a Dask `LocalCluster` of 2 single-threaded worker
   processes (one `submit` each, if `distributed` is installed: the `bench` extra) running the demo task's
   own function with a context that sends nowhere;
4. `list_tasks` with a status filter over MCP on a server whose store holds --stored finished tasks
   (inserted into the store file before the server starts): p50 and p99 of sequential calls.

    python benchmarks/bench_dispatch.py [--tasks 1000] [--sessions 8] [--stored 100000]

Goals (issue 12): >= 300 tasks/s one by one, >= 1,000 tasks/s as a batch, server CPU per task <= 3 ms,
list_tasks p50 < 10 ms at 100,000 stored tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import (
    TOKEN,
    TRIVIAL,
    LeanSession,
    completed,
    core_batch,
    cpu_seconds,
    dispatch,
    jupyter_server,
    submit_rate,
    tempdir,
    trivial,
    wait_completed,
)


async def dispatch_batches(url: str, n: int, per_call: int = 1000) -> None:
    """n trivial tasks as `dispatch_batch` calls of at most `per_call` specs, from one session."""
    spec = {"type": "demo", "params": TRIVIAL["arguments"]}
    async with LeanSession(url, TOKEN) as s:
        for start in range(0, n, per_call):
            count = min(per_call, n - start)
            reply = await s.request("tools/call", {"name": "dispatch_batch", "arguments": {"tasks": [spec] * count}})
            assert not reply["result"].get("isError"), reply


async def mcp_round(url: str, pid: int, n: int, sessions: int) -> dict[str, float]:
    """sessions > 0: n run_demo_task calls over that many sessions; 0: dispatch_batch calls."""
    before = await completed(url)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await (dispatch(url, n, sessions) if sessions else dispatch_batches(url, n))
    dispatched = time.perf_counter() - t0
    await wait_completed(url, before + n)
    elapsed = time.perf_counter() - t0
    return {
        "tasks_per_s": n / elapsed,
        "dispatch_per_s": n / dispatched,
        "cpu_ms_per_task": 1000 * (cpu_seconds(pid) - cpu0) / n,
    }


def pool_rate(n: int) -> float:
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(trivial, range(20)))  # start the workers
        t0 = time.perf_counter()
        futures = [pool.submit(trivial, i) for i in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - t0)


def dask_rate(n: int) -> float | None:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        return None
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.CRITICAL
        ) as cluster,
        Client(cluster) as c,
    ):
        return submit_rate(c, n)


def fill_store(db_file: Path, count: int) -> None:
    """`count` finished tasks in the store file, as a long-lived server accumulates them."""
    import sqlalchemy as sa

    from plexus_mcp_jupyter.core.store import Store, tasks_table

    store = Store(f"sqlite:///{db_file}")
    rng = random.Random(12)
    start = time.time() - count
    statuses = ["COMPLETED"] * 90 + ["FAILED"] * 7 + ["CANCELLED"] * 3
    rows = [
        {
            "id": str(uuid.UUID(int=rng.getrandbits(128))),
            "type": "demo",
            "status": rng.choice(statuses),
            "priority": 0,
            "owner": None,
            "params": {"items": 1},
            "description": "stored",
            "created_at": start + i,
            "cancel_requested": False,
        }
        for i in range(count)
    ]
    with store.engine.begin() as conn:
        for i in range(0, count, 10_000):
            conn.execute(sa.insert(tasks_table), rows[i : i + 10_000])
    store.close()


async def list_latency(url: str, calls: int) -> dict[str, float]:
    params = {"name": "list_tasks", "arguments": {"status": ["FAILED"], "limit": 20}}
    out = []
    async with LeanSession(url, TOKEN) as s:
        for i in range(calls + 20):
            t0 = time.perf_counter()
            reply = await s.request("tools/call", params)
            if i >= 20:  # the first calls warm the caches
                out.append(time.perf_counter() - t0)
            assert not reply["result"].get("isError") and reply["result"]["structuredContent"]["tasks"], reply
    ordered = sorted(out)
    return {"p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions of the batch round")
    parser.add_argument("--stored", type=int, default=100_000, help="finished tasks in the list_tasks store")
    parser.add_argument("--calls", type=int, default=200, help="list_tasks calls timed")
    args = parser.parse_args()
    n = args.tasks

    with tempdir() as tmp, jupyter_server(Path(tmp), pin=False) as (url, pid):
        await dispatch(url, 50, 1)  # warm the server, its store and its workers
        await wait_completed(url, 50)
        one = await mcp_round(url, pid, n, 1)
        batch = await mcp_round(url, pid, n, 0)
        concurrent = await mcp_round(url, pid, n, args.sessions)
    with tempdir() as tmp:
        core = await core_batch(n, f"sqlite:///{Path(tmp) / 'core.db'}")
    pool = pool_rate(n)
    dask = dask_rate(n)
    with tempdir() as tmp:
        fill_store(Path(tmp) / "jupyter.db", args.stored)
        with jupyter_server(Path(tmp), pin=False) as (url, _pid):
            listing = await list_latency(url, args.calls)

    print(f"{n} trivial tasks (run_demo_task items=1 item_delay_ms=0), end to end until all COMPLETED")
    print(f"{'path':<38} {'tasks/s':>8} {'dispatch/s':>10} {'server CPU ms/task':>18}")
    rounds = (
        ("MCP one by one", one),
        ("MCP dispatch_batch", batch),
        (f"MCP, {args.sessions} concurrent sessions", concurrent),
        ("core batch (TaskManager, in-process)", core),
    )
    for label, r in rounds:
        print(f"{label:<38} {r['tasks_per_s']:>8.0f} {r['dispatch_per_s']:>10.0f} {r['cpu_ms_per_task']:>18.2f}")
    print(f"{'ProcessPoolExecutor(2), submit':<38} {pool:>8.0f}")
    if dask is None:
        print("Dask LocalCluster: skipped (pip install 'distributed>=2024.1', the bench extra)")
    else:
        print(f"{'Dask LocalCluster(2 procs), submit':<38} {dask:>8.0f}")
    print(
        f"list_tasks status=FAILED limit=20 at {args.stored:,} stored tasks: p50 {listing['p50_ms']:.2f} ms, "
        f"p99 {listing['p99_ms']:.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
