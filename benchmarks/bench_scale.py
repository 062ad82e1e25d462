"""Scale-out: trivial tasks and one large evaluation through a real Jupyter server, local executor and Dask.

In one run, on the same machine (nothing pinned: the server, its workers and the cluster share every core). A
LocalCluster of --workers single-threaded worker processes is started first; Dask's own rate on it (N
`client.submit` of the same trivial function, `trivial`, and one gather) is measured right before and right
after each round below, and each round's ratio is against the mean of the two (the machine is shared: its load
moves within a minute, and an own rate taken once at the end made ratios of 0.6-1.0x for the same code).

(a) local executor + the store (workers at nice 0, as Dask's are): N trivial tasks (run_demo_task items=1
    item_delay_ms=0) end to end until all are COMPLETED, sent two ways, each a round of its own: with --batch K,
    as `dispatch_batch` calls of K specs one after the other from one session (a client dispatching its N
    tasks); with --sessions S (0: not), as one run_demo_task call per task from S concurrent keep-alive
    sessions. Each round: tasks/s and the server process's CPU per task; meanwhile one more session calls
    get_task on the newest task back to back: its p50 during the load (its calls count in the server's CPU).
    Then, unless --rows 0, one --rows-row accuracy evaluation of a prediction column
    (a --format file generated once for the run, hard-linked into the server's root; after two 1,000-row
    warm-up evaluations, so each worker has imported what an evaluation needs): create_evaluation over MCP,
    get_evaluation every 50 ms until final: rows/s, get_task p50 during it (ten calls a second, a client
    watching), and where its task ran (get_task's worker: "dask:tcp://..." on the Dask executor). Right
    after, the raw peer in this process: pyarrow read of the two columns + compute_metrics (_common);
(b) Dask executor (a server connected to that cluster; max_concurrency --concurrency) + the same kind of
    store: the same figures;
then the core alone, without HTTP (benchmarks/_common.py `core_batch`: N tasks dispatched at once to a
TaskManager in this process) with each executor, the Dask one on the same cluster (its own rate taken around
it too). The ratios of the Dask executor (core, and end to end over MCP per round) to Dask's own rate are
printed, beside the MCP path's own ceiling: the local executor over MCP against Dask's own rate.

Each part is one store URL and one executor (`Part`). `--postgres` adds (c): the Dask executor on the same
cluster with its store on a throwaway PostgreSQL started here (tests/multi_server.py: initdb in the temp dir, a
free port, removed at the end), and prints its get_task p50 against (b)'s on SQLite, in the same run.

    python benchmarks/bench_scale.py [--tasks 1000] [--sessions 8] [--batch 100] [--workers 2] [--concurrency 32]
        [--store-url URL] [--postgres] [--rows 1000000] [--format csv|parquet]

    small and quick: python benchmarks/bench_scale.py --tasks 300 --rows 0 --batch 100

Goals (issue 13): the Dask executor >= 0.8x Dask's own submit rate for the same function; get_task p50 on
PostgreSQL within 1.5x of SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import (
    TOKEN,
    TRIVIAL,
    LeanSession,
    completed,
    core_batch,
    cpu_seconds,
    dispatch,
    evaluation_data,
    evaluation_rows,
    jupyter_server,
    raw_evaluation,
    submit_rate,
    tempdir,
    wait_completed,
)
from pyarrow.csv import write_csv

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


@dataclass
class Part:
    """One configuration measured: a label, the executor's settings, the store (None: SQLite in a temp dir)."""

    label: str
    env: dict[str, str]
    store_url: str | None = None


async def get_task_p50(url: str, stop: asyncio.Event, pace: float = 0.0) -> float:
    """p50 (ms) of get_task calls in a loop until `stop`, on the newest task each time (a task of the load, queued,
    running or just finished, or the evaluation's): the latency a client following its work sees under load.
    `pace`: seconds from one call's start to the next (0: back to back)."""
    async with LeanSession(url, TOKEN) as s:
        out: list[float] = []
        while not stop.is_set():
            listed = await s.call("list_tasks", {"limit": 1})
            task_id = listed["tasks"][0]["task_id"]
            t0 = time.perf_counter()
            await s.call("get_task", {"task_id": task_id})
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, pace - (time.perf_counter() - t0)))
    return 1000 * statistics.median(out) if out else float("nan")


async def create_evaluation(session: LeanSession, dataset: str) -> dict[str, Any]:
    arguments = {"type": "accuracy", "dataset": dataset, "label_column": "label", "prediction_column": "prediction"}
    return await session.call("create_evaluation", arguments)


async def evaluation_done(session: LeanSession, evaluation_id: str) -> dict[str, Any]:
    """The evaluation once COMPLETED (get_evaluation every 50 ms); RuntimeError if it ends otherwise."""
    while (got := await session.call("get_evaluation", {"evaluation_id": evaluation_id}))["status"] not in FINAL:
        await asyncio.sleep(0.05)
    if got["status"] != "COMPLETED":
        raise RuntimeError(f"evaluation {evaluation_id} ended {got['status']}: {got['error_message']}")
    return got


async def warm_evaluations(url: str, dataset: str, n: int) -> None:
    """`n` small evaluations at once, so that each worker has imported what an evaluation needs (a Dask worker
    imports pyarrow, pandas and SQLAlchemy on its first one; the local executor preloads them in its forkserver)."""
    async with LeanSession(url, TOKEN) as s:
        made = [await create_evaluation(s, dataset) for _ in range(n)]
        for m in made:
            await evaluation_done(s, m["evaluation_id"])


async def evaluate(url: str, dataset: str, rows: int) -> dict[str, Any]:
    """One accuracy evaluation of `dataset` over MCP: create_evaluation, then get_evaluation every 50 ms until
    final, while another session follows it with get_task ten times a second (a client watching). Its rows/s
    (from the call to seeing it final), that get_task p50, its accuracy and where its task ran (get_task's worker:
    "dask:tcp://..." on the Dask executor)."""
    stop = asyncio.Event()
    async with LeanSession(url, TOKEN) as s:
        t0 = time.perf_counter()
        made = await create_evaluation(s, dataset)
        latency = asyncio.create_task(get_task_p50(url, stop, pace=0.1))
        got = await evaluation_done(s, made["evaluation_id"])
        elapsed = time.perf_counter() - t0
        stop.set()
        task = await s.call("get_task", {"task_id": made["task_id"]})
    return {
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
        "get_task_p50_ms": await latency,
        "accuracy": got["metrics"]["score"]["accuracy"],
        "worker": task["worker"],
        "stages": stage_times(task),
    }


def stage_times(task: dict[str, Any]) -> str:
    """Where an evaluation's time went (get_task): from created to its worker starting, then each stage."""

    def at(text: str | None) -> float:
        return datetime.fromisoformat(text).timestamp() if text else float("nan")

    parts = [f"start {at(task['started_at']) - at(task['created_at']):.2f} s"]
    parts += [f"{s['name']} {at(s['completed_at']) - at(s['started_at']):.2f} s" for s in task["stages"]]
    return ", ".join(parts)


async def dispatch_batches(url: str, n: int, size: int) -> None:
    """n trivial tasks as `dispatch_batch` calls of at most `size` specs, one after the other from one session
    (a client dispatching its N tasks)."""
    spec = {"type": "demo", "params": TRIVIAL["arguments"]}
    async with LeanSession(url, TOKEN) as s:
        for start in range(0, n, size):
            await s.call("dispatch_batch", {"tasks": [spec] * min(size, n - start)})


async def trivial_round(
    url: str, pid: int, n: int, send: Callable[[], Awaitable[None]], own: Callable[[], float]
) -> dict[str, Any]:
    """n trivial tasks sent by `send`, until all are COMPLETED: tasks/s end to end, the server's CPU per task and
    get_task p50 meanwhile (another session, back to back on the newest task); and Dask's own rate (`own`) right
    before and right after, their mean the round's peer (the machine is shared: its load moves within a minute)."""
    before_own = own()
    stop = asyncio.Event()
    latency = asyncio.create_task(get_task_p50(url, stop))
    before = await completed(url)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await send()
    await wait_completed(url, before + n)
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    stop.set()
    p50 = await latency
    rate = n / elapsed
    return {
        "tasks_per_s": rate,
        "get_task_p50_ms": p50,
        "server_cpu_ms_per_task": 1000 * cpu / n,
        "own": (before_own + own()) / 2,
    }


async def run_part(
    part: Part, n: int, sessions: int, batch: int, data: Path | None, rows: int, own: Callable[[], float]
) -> dict[str, Any]:
    """The trivial tasks (one run_demo_task call each from `sessions` sessions, when `sessions`; as dispatch_batch
    calls of `batch` specs, when `batch`), then the evaluation of `data` (hard-linked into the server's root; None:
    none), on one fresh server; then the raw peer of that evaluation in this process, right after it."""
    env = {**part.env, "PLEXUS_MCP_MAX_EVALUATION_ITEMS": str(max(rows + 1, 5_000_000))}
    out: dict[str, Any] = {}
    with tempdir() as tmp, jupyter_server(Path(tmp), extra_env=env, pin=False, db_url=part.store_url) as (url, pid):
        await dispatch(url, 50, 8)  # warm the server, its store and its workers
        await wait_completed(url, 50)
        if batch:
            out["batch"] = await trivial_round(url, pid, n, lambda: dispatch_batches(url, n, batch), own)
        if sessions:
            out["calls"] = await trivial_round(url, pid, n, lambda: dispatch(url, n, sessions), own)
        if data is not None:
            os.link(data, Path(tmp) / data.name)
            write_csv(evaluation_rows(0, 1000), Path(tmp) / "warm.csv")
            await warm_evaluations(url, "warm.csv", 2)
            out["evaluation"] = await evaluate(url, data.name, rows)
    if data is not None:
        out["raw_accuracy"], out["raw_s"] = raw_evaluation(data)
    return out


@contextlib.contextmanager
def throwaway_postgres(wanted: bool) -> Iterator[str | None]:
    """An empty database on a PostgreSQL cluster started for this run (None when not `wanted`)."""
    if not wanted:
        yield None
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.multi_server import postgres_cluster

    with postgres_cluster() as cluster:
        yield cluster.create_database()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument(
        "--sessions", type=int, default=8, help="concurrent MCP sessions calling run_demo_task (0: no such round)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="also send the N tasks as dispatch_batch calls of this many specs from one session (0: not)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Dask LocalCluster worker processes (1 thread each)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="max_concurrency of the Dask part: tasks in flight on the cluster (Dask queues them)",
    )
    parser.add_argument("--store-url", default=None, help="the store of every part (default: SQLite in a temp dir)")
    parser.add_argument(
        "--postgres", action="store_true", help="add (c): the Dask executor on a throwaway PostgreSQL started here"
    )
    parser.add_argument(
        "--rows", type=int, default=1_000_000, help="rows of the evaluation's dataset (0: no evaluation)"
    )
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv", help="the evaluation's dataset format")
    args = parser.parse_args()
    if not (args.sessions or args.batch):
        parser.error("nothing to measure: --sessions 0 and no --batch")
    from distributed import Client, LocalCluster

    from plexus_mcp_jupyter.core.executors.dask import DaskExecutor

    n = args.tasks
    load = os.getloadavg()
    mcp: list[tuple[str, dict[str, Any]]] = []
    with (
        tempdir() as cache,
        throwaway_postgres(args.postgres) as postgres_url,
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={"slots": 1},
            scheduler_kwargs={"allowed_failures": 0},
            silence_logs=logging.CRITICAL,
        ) as cluster,
        Client(cluster) as client,
    ):
        data = evaluation_data(Path(cache), args.rows, args.format) if args.rows else None

        def own() -> float:
            return submit_rate(client, n)

        async def measure(part: Part) -> None:
            mcp.append((part.label, await run_part(part, n, args.sessions, args.batch, data, args.rows, own)))

        await measure(
            Part("(a) local executor", {"PLEXUS_MCP_EXECUTOR": "local", "PLEXUS_MCP_WORKER_NICE": "0"}, args.store_url)
        )
        with tempdir() as tmp:
            core_local = await core_batch(n, args.store_url or f"sqlite:///{Path(tmp) / 'core-local.db'}")
        dask_env = {
            "PLEXUS_MCP_EXECUTOR": "dask",
            "PLEXUS_MCP_DASK_SCHEDULER_ADDRESS": cluster.scheduler_address,
            "PLEXUS_MCP_MAX_CONCURRENCY": str(args.concurrency),
        }
        await measure(Part("(b) Dask executor (LocalCluster)", dask_env, args.store_url))
        if postgres_url is not None:
            await measure(Part("(c) Dask executor + PostgreSQL", dask_env, postgres_url))
        core_own = own()
        with tempdir() as tmp:
            core_dask = await core_batch(
                n,
                args.store_url or f"sqlite:///{Path(tmp) / 'core-dask.db'}",
                DaskExecutor(cluster.scheduler_address),
                args.concurrency,
            )
        core_own = (core_own + own()) / 2

    store = args.store_url or "SQLite (a file in a temp dir)"
    print(f"load average {load[0]:.2f} {load[1]:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} cores")
    print(
        f"{n} trivial tasks (run_demo_task items=1 item_delay_ms=0) until all COMPLETED; store: {store}; "
        f"Dask: LocalCluster of {args.workers} x 1 thread, max_concurrency {args.concurrency}; Dask own: n "
        "client.submit of the same function on that cluster, right before and after each round (mean)"
    )
    rounds = {
        "batch": f"dispatch_batch x {args.batch} specs, 1 session",
        "calls": f"run_demo_task per task, {args.sessions} sessions",
    }
    for mode, how in rounds.items():
        if mode not in mcp[0][1]:
            continue
        title = f"over MCP, {how}"
        print(
            f"{title:<52} {'tasks/s':>8} {'Dask own':>9} {'ratio':>6} {'get_task p50 ms':>16} "
            f"{'server CPU ms/task':>19}"
        )
        for label, r in mcp:
            m = r[mode]
            print(
                f"  {label:<50} {m['tasks_per_s']:>8.0f} {m['own']:>9.0f} {m['tasks_per_s'] / m['own']:>5.2f}x "
                f"{m['get_task_p50_ms']:>16.2f} {m['server_cpu_ms_per_task']:>19.2f}"
            )
    print(
        f"{'the core alone (TaskManager, in-process)':<52} {'tasks/s':>8} {'Dask own':>9} {'ratio':>6} "
        f"{'CPU ms/task':>16}"
    )
    print(
        f"  {'(a) local executor':<50} {core_local['tasks_per_s']:>8.0f} {'':>16} "
        f"{core_local['cpu_ms_per_task']:>16.2f}"
    )
    print(
        f"  {'(b) Dask executor':<50} {core_dask['tasks_per_s']:>8.0f} {core_own:>9.0f} "
        f"{core_dask['tasks_per_s'] / core_own:>5.2f}x {core_dask['cpu_ms_per_task']:>16.2f}"
    )
    over_mcp = ", ".join(
        f"over MCP ({mode}) {mcp[1][1][mode]['tasks_per_s'] / mcp[1][1][mode]['own']:.2f}x"
        for mode in rounds
        if mode in mcp[1][1]
    )
    ceiling = ", ".join(
        f"({mode}) {mcp[0][1][mode]['tasks_per_s'] / mcp[0][1][mode]['own']:.2f}x"
        for mode in rounds
        if mode in mcp[0][1]
    )
    print(
        f"Dask executor / Dask's own submit rate: core {core_dask['tasks_per_s'] / core_own:.2f}x, {over_mcp} "
        f"(goal >= 0.8x); the MCP path's own ceiling, (a) the local executor over MCP / Dask's own rate: {ceiling}"
    )
    if data is not None:
        print_evaluations(mcp, args.rows, args.format)
    if postgres_url is not None:
        print_postgres(mcp, data is not None)


def print_evaluations(mcp: list[tuple[str, dict[str, Any]]], rows: int, fmt: str) -> None:
    print(f"one {rows:,}-row accuracy evaluation ({fmt}) over MCP, then the raw peer (pyarrow read + compute_metrics)")
    print(f"{'':<44} {'rows/s':>10} {'s':>6} {'raw s':>6} {'ratio':>6} {'get_task p50 ms':>16}  ran on")
    for label, r in mcp:
        e = r["evaluation"]
        if abs(e["accuracy"] - r["raw_accuracy"]) > 1e-9:
            raise RuntimeError(f"{label}: accuracy {e['accuracy']} served, {r['raw_accuracy']} raw")
        print(
            f"{label:<44} {e['rows_per_s']:>10,.0f} {e['seconds']:>6.2f} {r['raw_s']:>6.2f} "
            f"{e['seconds'] / r['raw_s']:>5.1f}x {e['get_task_p50_ms']:>16.2f}  {e['worker']}"
        )
        print(f"{'':<44} stages: {e['stages']}")


def print_postgres(mcp: list[tuple[str, dict[str, Any]]], evaluated: bool) -> None:
    (_, sqlite), (_, postgres) = mcp[1], mcp[2]
    mode = "calls" if "calls" in sqlite else "batch"
    line = (
        f"get_task p50 PostgreSQL (c) / SQLite (b): "
        f"{postgres[mode]['get_task_p50_ms'] / sqlite[mode]['get_task_p50_ms']:.2f}x under the trivial tasks ({mode})"
    )
    if evaluated:
        line += (
            f", {postgres['evaluation']['get_task_p50_ms'] / sqlite['evaluation']['get_task_p50_ms']:.2f}x during "
            "the evaluation"
        )
    line += f" (goal <= 1.5x); tasks/s (c) / (b): {postgres[mode]['tasks_per_s'] / sqlite[mode]['tasks_per_s']:.2f}x"
    if evaluated:
        line += (
            f"; evaluation rows/s (c) / (b): "
            f"{postgres['evaluation']['rows_per_s'] / sqlite['evaluation']['rows_per_s']:.2f}x"
        )
    print(line)


if __name__ == "__main__":
    asyncio.run(main())
