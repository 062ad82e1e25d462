"""Several servers on one store: tasks/s of two Jupyter servers on one PostgreSQL beside one server alone.

In one run, on a throwaway PostgreSQL cluster (tests/multi_server.py: initdb in the temp dir, a free port),
each configuration on a fresh database of it, every server with the same --concurrency worker slots:

1. one `jupyter server` with the extension: --tasks tasks dispatched through REST in batches of 100, timed
   from the first dispatch until the store holds all of them COMPLETED;
2. two servers on one database: the same tasks, the batches through the two servers in turn (each runs
   what it claims from the shared queue, whichever server queued it).

For each workload: tasks that sleep --task-ms (work that holds a worker slot, as real tasks do: capacity is
what a second server adds) and trivial tasks (0 ms: the servers' own dispatch cost, bound by the machine's
cores). Beside them, two servers with the event relay off (`event_relay = off`): what relaying costs. Every
task records its run in a file: the run also checks that each ran exactly once. Each server first runs WARM
tasks, untimed. For each configuration, the CPU spent per task (psutil, user + system, over the timed part):
the server processes with their workers, PostgreSQL (the postmaster and its backends), this client: on a
machine with few cores, whether two servers can be faster depends on the CPU a task costs them in all. And
what PostgreSQL wrote per task: the event outbox's rows (its id sequence) and the WAL bytes.

    python benchmarks/bench_multi_server.py [--tasks 1000] [--task-ms 200] [--concurrency 4]
        [--workloads slot,trivial] [--rounds 1]

With --rounds N, each workload's three configurations run N times, two servers with and without the relay in
turn first (the later of two runs in a minute may find the machine warmer or busier), and the medians follow.

Goal (issue 13): two servers dispatch >= 1.6x the tasks/s of one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.multi_server import PostgresCluster, Server, create_store, postgres_cluster, start_servers

BATCH = 100
WARM = 50  # tasks each server runs before the clock starts


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process, its live descendants and the children it reaped."""
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # ended meanwhile: counted by its parent once reaped
                times = child.cpu_times()
                total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Round:
    """One configuration's figures: tasks/s, runs beyond one per task, CPU ms per task by whose, and what
    PostgreSQL wrote per task (event outbox rows, WAL bytes)."""

    tasks_per_s: float
    duplicates: int
    cpu_ms: dict[str, float]
    outbox_rows: float
    wal_bytes: float

    def cpu_line(self) -> str:
        parts = ", ".join(f"{who} {ms:.2f}" for who, ms in self.cpu_ms.items())
        written = f"outbox rows/task {self.outbox_rows:.3f}, WAL bytes/task {self.wal_bytes:.0f}"
        return f"CPU ms/task {sum(self.cpu_ms.values()):.2f} ({parts}); {written}"


def completed(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'")).scalar_one())


def wait_completed(engine: sa.Engine, runs: Path, n: int) -> None:
    """Until the store holds `n` tasks COMPLETED. While fewer than `n` runs are recorded, the runs file's size
    says so (a stat here, where a count(*) every 20 ms is a query and its CPU on the PostgreSQL under test and in
    this client); only then is the store asked, for the last ends."""
    line = len(str(uuid.uuid4())) + 1  # each run records its task's id (a uuid) and a newline
    while not runs.exists() or runs.stat().st_size < n * line:
        time.sleep(0.01)
    while completed(engine) < n:
        time.sleep(0.02)


def written(engine: sa.Engine) -> tuple[int, int]:
    """The event outbox's newest row id (its sequence: rows ever inserted, whatever was pruned) and the WAL position."""
    with engine.connect() as conn:
        lsn = "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
        row = conn.execute(sa.text(f"SELECT (SELECT coalesce(max(id), 0) FROM plexus_event_outbox), {lsn}")).one()
        return int(row[0]), int(row[1])


def run(
    cluster: PostgresCluster,
    workdir: Path,
    n_servers: int,
    tasks: int,
    task_ms: float,
    concurrency: int,
    relay: str = "auto",
) -> Round:
    """Tasks/s of `n_servers` servers on a fresh database, how many runs were duplicates, and the CPU each side
    spent per task: the servers (with their workers), PostgreSQL (all its processes), this client."""
    url = create_store(cluster.create_database())
    home = Path(tempfile.mkdtemp(dir=workdir))
    settings = {"max_concurrency": concurrency, "event_relay_interval": 0.1, "event_relay": relay}
    servers = start_servers(home, url, {f"s{i}": settings for i in range(n_servers)})
    engine = sa.create_engine(url)
    runs = home / "runs.txt"
    spec = {"type": "recorded", "params": {"runs": str(runs), "seconds": task_ms / 1000}}
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])

    def cpu() -> dict[str, float]:
        return {
            "servers": sum(tree_cpu(server.proc.pid) for server in servers),
            "postgres": tree_cpu(postmaster),
            "client": client_cpu(),
        }

    try:
        # Warm each server first (its workers, the first store calls, its imports): a server's first seconds cost
        # CPU that would be counted once per server, and so against two servers twice.
        for server in servers:
            requests.post(
                server.url + "plexus/api/tasks", json={"tasks": [spec] * WARM}, headers=server.headers, timeout=60
            ).raise_for_status()
        wait_completed(engine, runs, WARM * n_servers)
        before, rows_before = cpu(), written(engine)
        started = time.perf_counter()
        for i in range(0, tasks, BATCH):
            server = servers[(i // BATCH) % n_servers]
            answer = requests.post(
                server.url + "plexus/api/tasks",
                json={"tasks": [spec] * min(BATCH, tasks - i)},
                headers=server.headers,
                timeout=60,
            )
            answer.raise_for_status()
        wait_completed(engine, runs, tasks + WARM * n_servers)
        elapsed = time.perf_counter() - started
        after, rows_after = cpu(), written(engine)
    finally:
        engine.dispose()
        with ThreadPoolExecutor(n_servers) as pool:
            list(pool.map(Server.stop, servers))
    counts = Counter(runs.read_text().split())  # the warm-up's runs too
    spent = {who: 1000 * (after[who] - before[who]) / tasks for who in before}
    outbox_rows, wal = ((a - b) / tasks for a, b in zip(rows_after, rows_before, strict=True))
    return Round(tasks / elapsed, sum(n - 1 for n in counts.values()), spent, outbox_rows, wal)


def report(label: str, one: Round, two: Round, quiet: Round, relay_cost: float) -> None:
    print(
        f"{label}: one server {one.tasks_per_s:.1f} tasks/s, two servers {two.tasks_per_s:.1f} tasks/s, "
        f"ratio {two.tasks_per_s / one.tasks_per_s:.2f}x (goal >= 1.6x); two servers without the event "
        f"relay {quiet.tasks_per_s:.1f} tasks/s (the relay costs {relay_cost:.0f}%); "
        f"runs beyond one per task: {one.duplicates + two.duplicates + quiet.duplicates}\n"
        f"  one server {one.cpu_line()}\n  two servers {two.cpu_line()}\n"
        f"  two without the relay {quiet.cpu_line()}\n  load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--task-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--workloads", default="slot,trivial", help="comma-separated: slot (tasks of --task-ms), trivial (0 ms)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three configurations (medians after)")
    args = parser.parse_args(argv)
    workloads = {"slot": (f"{args.task_ms:g} ms tasks", args.task_ms), "trivial": ("trivial tasks", 0.0)}
    print(f"load average {os.getloadavg()[0]:.2f} at start, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as workdir, postgres_cluster() as cluster:
        for label, task_ms in (workloads[w] for w in args.workloads.split(",")):
            ratios, costs = [], []
            for i in range(args.rounds):
                one = run(cluster, Path(workdir), 1, args.tasks, task_ms, args.concurrency)
                pair = {
                    relay: run(cluster, Path(workdir), 2, args.tasks, task_ms, args.concurrency, relay=relay)
                    for relay in (("auto", "off") if i % 2 == 0 else ("off", "auto"))
                }
                two, quiet = pair["auto"], pair["off"]
                relay_cost = 100 * (1 - two.tasks_per_s / quiet.tasks_per_s)
                ratios.append(two.tasks_per_s / one.tasks_per_s)
                costs.append(relay_cost)
                report(label, one, two, quiet, relay_cost)
            if args.rounds > 1:
                print(
                    f"{label}, {args.rounds} rounds: median ratio {statistics.median(ratios):.2f}x "
                    f"({', '.join(f'{r:.2f}x' for r in ratios)}); the relay's median cost "
                    f"{statistics.median(costs):.0f}% ({', '.join(f'{c:.0f}%' for c in costs)})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
