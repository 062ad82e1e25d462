"""Where a task's CPU goes on the Dask executor: the server's threads, its client's messages, the cluster's processes.

A LocalCluster of --workers single-threaded processes is started in a child process (so that its scheduler is
not on this process's IO loop, as in a real deployment); then, in this process, the core (benchmarks/_common.py
`core_batch`: N trivial tasks dispatched at once to a TaskManager with a DaskExecutor on that cluster,
max_concurrency --concurrency). Printed per task: tasks/s; this process's CPU by thread (/proc, sampled every
50 ms, so the executor's threads count until they end); the messages of the executor's client on its comm to
the scheduler, each way (its batched stream, counted by op) and its RPCs (counted by name); the scheduler's
and the workers' CPU (/proc of the cluster's processes) for these tasks, and for Dask's own rate (N
`client.submit` of the same trivial function, one gather, from a plain client in this process) right before.

    python benchmarks/bench_dask_costs.py [--tasks 2000] [--workers 2] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import HERE, core_batch, cpu_seconds, submit_rate

CLUSTER = """
import logging, sys, time
from distributed import LocalCluster
if __name__ == "__main__":
    with LocalCluster(n_workers=int(sys.argv[2]), threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={"slots": 1}, scheduler_kwargs={"allowed_failures": 0},
                      silence_logs=logging.CRITICAL) as cluster:
        open(sys.argv[1], "w").write(cluster.scheduler_address)
        while True:
            time.sleep(1)
"""


class ThreadCpu:
    """This process's CPU by thread name, sampled every 50 ms (a thread's last sample stands after it ends)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, float]] = {}
        self.ticks = os.sysconf("SC_CLK_TCK")
        threading.Thread(target=self._run, name="bench-sampler", daemon=True).start()

    def _run(self) -> None:
        while True:
            names = {t.native_id: t.name for t in threading.enumerate()}
            for tid in os.listdir("/proc/self/task"):
                try:
                    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                name = names.get(int(tid)) or self.seen.get(int(tid), (f"thread {tid}", 0.0))[0]
                self.seen[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / self.ticks)
            time.sleep(0.05)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = collections.Counter()
        for name, cpu in list(self.seen.values()):
            out[name] += cpu
        return out


def count_messages(client: Any) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    """Counters of the client's messages to the scheduler (batched stream, by op), from it (by op), and its RPCs."""
    sent: collections.Counter = collections.Counter()
    received: collections.Counter = collections.Counter()
    rpcs: collections.Counter = collections.Counter()
    stream = client.scheduler_comm
    send = stream.send

    def counted_send(*msgs: Any, **kwargs: Any) -> Any:
        sent.update(m.get("op") for m in msgs)
        return send(*msgs, **kwargs)

    stream.send = counted_send
    for op, handler in list(client._stream_handlers.items()):

        def counted(op: str = op, handler: Any = handler, **kwargs: Any) -> Any:
            received[op] += 1
            return handler(**kwargs)

        client._stream_handlers[op] = counted
    rpc_type = type(client.scheduler)
    getattr_ = rpc_type.__getattr__

    def counted_getattr(self: Any, key: str) -> Any:
        if not key.startswith("_"):
            rpcs[key] += 1
        return getattr_(self, key)

    rpc_type.__getattr__ = counted_getattr
    return sent, received, rpcs


def cluster_cpu(root: int) -> tuple[float, float]:
    """CPU seconds of the cluster's process (scheduler and nannies) and of its worker processes."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == root:
                children.append(int(stat.parent.name))
    return cpu_seconds(root), sum(cpu_seconds(pid) for pid in children)


def per_task(counter: dict[str, float], n: int, scale: float = 1.0) -> str:
    return ", ".join(f"{k} {scale * v / n:.3f}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]) if v)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    n = args.tasks
    from distributed import Client

    from plexus_mcp_jupyter.core.executors.dask import DaskExecutor

    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp:
        address_file = Path(tmp) / "address"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        cluster = subprocess.Popen([sys.executable, "-c", CLUSTER, str(address_file), str(args.workers)], env=env)
        try:
            deadline = time.monotonic() + 60
            while not (address_file.exists() and address_file.read_text()):
                if time.monotonic() > deadline or cluster.poll() is not None:
                    raise RuntimeError("the LocalCluster did not start")
                await asyncio.sleep(0.2)
            address = address_file.read_text()
            threads = ThreadCpu()
            with Client(address, set_as_default=False) as own_client:
                s0, w0, c0 = *cluster_cpu(cluster.pid), cpu_seconds(os.getpid())
                own = submit_rate(own_client, n)
                s1, w1, c1 = *cluster_cpu(cluster.pid), cpu_seconds(os.getpid())
            executor = DaskExecutor(address)
            sent, received, rpcs = count_messages(executor.client)
            before = threads.totals()
            result = await core_batch(n, f"sqlite:///{Path(tmp) / 'core.db'}", executor, args.concurrency)
            s2, w2 = cluster_cpu(cluster.pid)
            await asyncio.sleep(0.1)
            after = threads.totals()
        finally:
            cluster.send_signal(signal.SIGINT)  # the LocalCluster closes its workers on the way out
            try:
                cluster.wait(30)
            except subprocess.TimeoutExpired:
                cluster.kill()
    print(
        f"load average {os.getloadavg()[0]:.2f}; {n} trivial tasks, the core with the Dask executor (max_concurrency "
        f"{args.concurrency}) on a LocalCluster of {args.workers} x 1 thread in another process"
    )
    print(
        f"tasks/s {result['tasks_per_s']:.0f} (Dask's own rate right before {own:.0f}: "
        f"{result['tasks_per_s'] / own:.2f}x); this process {result['cpu_ms_per_task']:.2f} ms CPU a task"
    )
    threads_cpu = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    print(f"this process's threads, ms CPU a task: {per_task(threads_cpu, n, 1000)}")
    print(f"client -> scheduler, messages a task: {per_task(sent, n)}")
    print(f"scheduler -> client, messages a task: {per_task(received, n)}")
    print(f"client RPCs a task: {per_task(rpcs, n)}")
    print(
        f"cluster ms CPU a task, these tasks: scheduler {1000 * (s2 - s1) / n:.2f}, "
        f"workers {1000 * (w2 - w1) / n:.2f}; "
        f"Dask's own submits: scheduler {1000 * (s1 - s0) / n:.2f}, workers {1000 * (w1 - w0) / n:.2f}"
    )
    ours = result["cpu_ms_per_task"] + 1000 * (s2 - s1 + w2 - w1) / n
    theirs = 1000 * (c1 - c0 + s1 - s0 + w1 - w0) / n
    print(
        f"all processes, ms CPU a task: these tasks {ours:.2f}, Dask's own {theirs:.2f} (its client "
        f"{1000 * (c1 - c0) / n:.2f}): on cores kept busy, the Dask executor's rate is about {theirs / ours:.2f}x "
        "Dask's own"
    )


if __name__ == "__main__":
    asyncio.run(main())
