"""Where a trivial task's CPU goes, by component, with one server and with two on one PostgreSQL: each server
thread (named), the workers (their main thread and the rest), the forkserver, the PostgreSQL backends, the client.

bench_multi_server's run (its fresh database, warm-up, batches and timing), with the servers' threads named for
this probe: a hook in their boot line records each Python thread's native id and name, and the CPU of every
thread is read from /proc before and after the timed part. With --against, another checkout's server code (the
servers and their workers import it; this bench drives both) runs in turn with this one, alternating which goes
first, so that the two share the machine's minutes; medians follow. Linux only (/proc). Threads and workers that
ended during the timed part are not counted (bench_multi_server's totals count them).

    python benchmarks/bench_multi_server_threads.py [--tasks 2000] [--rounds 3] [--servers 1,2]
        [--against /path/to/other/checkout]

Why (issue 13): one server is bound by its store writer's chain of round trips to PostgreSQL, two by the cores;
CPU cut off that chain raises what two servers do and not what one does, and shows here, not in tasks/s, on a
machine other sessions share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Prepended to the servers' boot line: each thread started records "<native id> <name>" in a file per process.
NAMES_HOOK = """import os, threading
_names = os.environ['PLEXUS_BENCH_THREAD_NAMES']
_bootstrap = threading.Thread._bootstrap_inner
def _named(self, _bootstrap=_bootstrap):
    with open(f'{_names}/{os.getpid()}', 'a') as f:
        f.write(f'{threading.get_native_id()} {self.name}\\n')
    _bootstrap(self)
threading.Thread._bootstrap_inner = _named
"""
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu(stat_path: str) -> float:
    """User + system seconds of a process or thread (its /proc stat), children not included."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _thread_names(names_dir: str, pid: int) -> dict[int, str]:
    try:
        lines = Path(names_dir, str(pid)).read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {int(tid): name for tid, _, name in (line.partition(" ") for line in lines)}


def _component(name: str) -> str:
    for prefix, short in (("ThreadPoolExecutor", "ThreadPoolExecutor"), ("asyncio_", "asyncio"), ("Thread-", "Thread")):
        if name.startswith(prefix):
            return short
    return name


def snapshot(pid: int, names_dir: str, postmaster: int) -> dict[str, float]:
    """CPU seconds so far by component of one server (`pid`) and its children, or of PostgreSQL."""
    import psutil

    out: dict[str, float] = defaultdict(float)
    if pid == postmaster:
        out["postgres: postmaster"] += _cpu(f"/proc/{pid}/stat")
        for child in psutil.Process(pid).children():
            try:
                command = " ".join(
                    child.cmdline()
                )  # a backend names its client: "postgres: user db 127.0.0.1(port) idle"
                kind = "backends" if "127.0.0.1" in command or "[local]" in command else "other"
                out[f"postgres: {kind}"] += _cpu(f"/proc/{child.pid}/stat")
            except (psutil.Error, FileNotFoundError):
                pass
        return out
    names = _thread_names(names_dir, pid)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cpu = _cpu(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:
            continue
        name = "event loop" if int(tid) == pid else _component(names.get(int(tid), "?"))
        out[f"server: {name}"] += cpu
    server = psutil.Process(pid)
    forkservers = [c for c in server.children() if "forkserver" in " ".join(c.cmdline())]
    for child in server.children(recursive=True):
        try:
            if child in forkservers:
                out["forkserver"] += _cpu(f"/proc/{child.pid}/stat")
                continue
            for tid in os.listdir(f"/proc/{child.pid}/task"):
                part = "main thread" if int(tid) == child.pid else "other threads"
                out[f"workers: {part}"] += _cpu(f"/proc/{child.pid}/task/{tid}/stat")
        except (psutil.Error, FileNotFoundError):
            pass
    return out


def child(tree: str, n_servers: int, tasks: int) -> None:
    """One configuration on `tree`'s server code; prints tasks/s and CPU ms a task by component as JSON."""
    sys.path.insert(0, str(REPO))
    import benchmarks.bench_multi_server as bench
    import tests.multi_server as multi

    names_dir = tempfile.mkdtemp()
    os.environ["PLEXUS_BENCH_THREAD_NAMES"] = names_dir
    os.environ["PYTHONPATH"] = tree
    multi.REPO = Path(tree)  # the servers' PYTHONPATH and working directory: their code and their task functions
    multi.BOOT = NAMES_HOOK + multi.BOOT.replace("; ", "\n")
    snapshots: list[dict[str, float]] = []
    postmaster_pid = [0]
    tree_cpu = bench.tree_cpu

    def recording_tree_cpu(pid: int) -> float:  # run() asks each server, then PostgreSQL, before and after
        import psutil

        if psutil.Process(pid).name() == "postgres":
            postmaster_pid[0] = pid
        snapshots.append(snapshot(pid, names_dir, postmaster_pid[0]))
        return tree_cpu(pid)

    bench.tree_cpu = recording_tree_cpu
    with tempfile.TemporaryDirectory() as workdir, multi.postgres_cluster() as cluster:
        result = bench.run(cluster, Path(workdir), n_servers, tasks, 0.0, 4)
    k = n_servers + 1
    spent: dict[str, float] = defaultdict(float)
    for before, after in zip(snapshots[:k], snapshots[k : 2 * k], strict=True):
        for key, value in after.items():
            spent[key] += 1000 * (value - before.get(key, 0.0)) / tasks
    spent["client"] = result.cpu_ms["client"]
    print(json.dumps({"tasks_per_s": result.tasks_per_s, "duplicates": result.duplicates, "cpu_ms": spent}))


def line(label: str, figures: dict[str, float]) -> str:
    total = sum(figures.values())
    parts = ", ".join(f"{key} {value:.3f}" for key, value in sorted(figures.items()) if abs(value) >= 0.005)
    return f"{label}: {total:.2f} ms a task ({parts})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", default="1,2", help="comma-separated numbers of servers")
    parser.add_argument("--against", help="another checkout whose server code runs in turn with this one")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return 0
    trees = [str(REPO)] + ([str(Path(args.against).resolve())] if args.against else [])
    print(f"load average {os.getloadavg()[0]:.2f} at start, {os.cpu_count()} cores", flush=True)
    results: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for i in range(args.rounds):
        for n in (int(x) for x in args.servers.split(",")):
            for tree in trees if i % 2 == 0 else trees[::-1]:
                load = os.getloadavg()[0]
                run = subprocess.run(
                    [sys.executable, __file__, "--child", tree, str(n), str(args.tasks)],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                )
                if run.returncode:
                    print(run.stderr[-4000:], file=sys.stderr)
                    return 1
                figures = json.loads(run.stdout.strip().splitlines()[-1])
                results[(tree, n)].append(figures)
                label = (
                    f"{tree}, {n} server{'s' if n > 1 else ''}, {figures['tasks_per_s']:.0f} tasks/s, load {load:.2f}"
                )
                print(line(label, figures["cpu_ms"]), flush=True)
    if args.rounds > 1:
        print("medians:")
        for (tree, n), runs in results.items():
            keys = {key for figures in runs for key in figures["cpu_ms"]}
            medians = {key: statistics.median(f["cpu_ms"].get(key, 0.0) for f in runs) for key in keys}
            rate = statistics.median(f["tasks_per_s"] for f in runs)
            print(line(f"{tree}, {n} server{'s' if n > 1 else ''}, {rate:.0f} tasks/s", medians), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
