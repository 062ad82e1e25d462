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
task records its run in a file: the run also checks that each ran exactly once.

    python benchmarks/bench_multi_server.py [--tasks 1000] [--task-ms 200] [--concurrency 4]

Goal (issue 13): two servers dispatch >= 1.6x the tasks/s of one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.multi_server import PostgresCluster, Server, create_store, postgres_cluster, start_servers

BATCH = 100


def completed(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'")).scalar_one())


def run(
    cluster: PostgresCluster,
    workdir: Path,
    n_servers: int,
    tasks: int,
    task_ms: float,
    concurrency: int,
    relay: str = "auto",
) -> tuple[float, int]:
    """Tasks/s of `n_servers` servers on a fresh database, and how many runs were duplicates."""
    url = create_store(cluster.create_database())
    home = Path(tempfile.mkdtemp(dir=workdir))
    settings = {"max_concurrency": concurrency, "event_relay_interval": 0.1, "event_relay": relay}
    servers = start_servers(home, url, {f"s{i}": settings for i in range(n_servers)})
    engine = sa.create_engine(url)
    runs = home / "runs.txt"
    spec = {"type": "recorded", "params": {"runs": str(runs), "seconds": task_ms / 1000}}
    try:
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
        while completed(engine) < tasks:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        engine.dispose()
        with ThreadPoolExecutor(n_servers) as pool:
            list(pool.map(Server.stop, servers))
    counts = Counter(runs.read_text().split())
    return tasks / elapsed, sum(n - 1 for n in counts.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--task-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir, postgres_cluster() as cluster:
        for label, task_ms in ((f"{args.task_ms:g} ms tasks", args.task_ms), ("trivial tasks", 0.0)):
            one, dup1 = run(cluster, Path(workdir), 1, args.tasks, task_ms, args.concurrency)
            two, dup2 = run(cluster, Path(workdir), 2, args.tasks, task_ms, args.concurrency)
            quiet, dup3 = run(cluster, Path(workdir), 2, args.tasks, task_ms, args.concurrency, relay="off")
            print(
                f"{label}: one server {one:.1f} tasks/s, two servers {two:.1f} tasks/s, ratio {two / one:.2f}x "
                f"(goal >= 1.6x); two servers without the event relay {quiet:.1f} tasks/s (the relay costs "
                f"{100 * (1 - two / quiet):.0f}%); runs beyond one per task: {dup1 + dup2 + dup3}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
