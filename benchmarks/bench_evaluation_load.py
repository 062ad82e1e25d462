"""Responsiveness under a large evaluation, and the evaluation's end-to-end time beside its raw metrics.

Starts a real `jupyter server` with the extension (benchmarks/_common.py), registers a DataFrame of
--rows rows (id, text, label, prediction; 5 classes with stray case/whitespace and a few missing values,
as in bench_evaluation.py) over REST as Parquet, and then:

1. Responsiveness (goal: "tools/call p50 within 2x of idle"): a lean keep-alive MCP client
   (_common.LeanSession) calls `get_task` on a finished task once every --interval-ms, while the server is
   idle, then while an `accuracy` evaluation of the whole frame runs (created with `create_evaluation`,
   followed with `get_evaluation` by a second session until it ends), then idle again: idle, (busy, idle)
   x --rounds. Busy latencies are also split by the evaluation's stage at the time of the call.
2. The evaluation's end-to-end time (task created -> COMPLETED, and per stage from get_task's stages)
   beside the raw time of the same metrics (`compute_metrics` in this process on the same frame, as read
   back from the same Parquet), with the CPU used by the server process and by the worker (psutil).
3. With --py-spy DIR: py-spy recordings of the worker and of the server during the busy phase, and the
   share of samples in the worker's pieces and in the event loop's callbacks (server).

Servers are pinned to one core as _common.py does; the evaluation's worker is forked by the server's
forkserver, so it shares that core with the server (--no-pin lets the server and the worker use every core;
--worker-nice N renices the forkserver, so the workers, as an experiment).

    python benchmarks/bench_evaluation_load.py [--rows 1000000 | --quick] [--rounds 1] [--idle-calls 1000]
        [--interval-ms 10] [--py-spy DIR]
        [--no-pin] [--worker-nice N]

Goal: busy get_task p50 <= 2.0 x idle p50.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import httpx2
import numpy as np
import pandas as pd
import psutil
from _common import TOKEN, LeanSession, jupyter_server, pin_client, tempdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed copy

from bench_evaluation import CLASSES, make_data

from plexus_mcp_jupyter.core.models import parse_iso
from plexus_mcp_jupyter.evaluations.metrics import compute_metrics

ROOT = Path(__file__).resolve().parent.parent

STAGES = ("Setup", "Scoring", "Metrics")
FINAL = ("COMPLETED", "FAILED", "CANCELLED")
TEXTS = {
    "billing": "I was charged twice on my last invoice, please refund the second payment",
    "cancellation": "Please cancel my subscription at the end of this month, thank you",
    "complaint": "The app keeps crashing whenever I open the settings page, very annoying",
    "praise": "Your support team solved my problem in minutes, great service as always",
    "question": "How do I export my data to a spreadsheet before the trial ends?",
}


# -- the data --------------------------------------------------------------------------------------------


def make_frame(rows: int) -> pd.DataFrame:
    """id, text (~70-90 chars), label, prediction: the label/prediction noise of bench_evaluation.py."""
    labels, predictions = make_data(rows)
    rng = np.random.default_rng(1)
    topic = np.array([TEXTS[c] for c in CLASSES], dtype=object)[rng.integers(0, len(CLASSES), rows)]
    ids = np.arange(1, rows + 1, dtype=np.int64)
    text = pd.Series(topic, dtype="str") + " (ticket #" + pd.Series(ids).astype("str") + ")"
    return pd.DataFrame({"id": ids, "text": text, "label": labels, "prediction": predictions})


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def time_raw(frame: pd.DataFrame, rounds: int) -> float:
    """Median seconds of compute_metrics on the frame's label and prediction columns."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        compute_metrics(frame["label"], frame["prediction"])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- the server side: calls, CPU ---------------------------------------------------------------------------


def structured(reply: dict[str, Any]) -> dict[str, Any]:
    result = reply.get("result") or {}
    if result.get("isError") or "structuredContent" not in result:
        raise RuntimeError(f"tool call failed: {reply}")
    return result["structuredContent"]  # type: ignore[no-any-return]


async def call_tool(session: LeanSession, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return structured(await session.request("tools/call", {"name": name, "arguments": arguments}))


async def seed_task(session: LeanSession) -> str:
    """A finished task for get_task to read (served from the manager's memory, like a fresh one)."""
    task_id = (await call_tool(session, "run_demo_task", {"items": 10, "item_delay_ms": 0}))["task_id"]
    while (await call_tool(session, "get_task", {"task_id": task_id}))["status"] not in FINAL:
        await asyncio.sleep(0.05)
    return str(task_id)


async def register(base_url: str, name: str, body: bytes) -> float:
    t0 = time.perf_counter()
    async with httpx2.AsyncClient(timeout=600) as http:
        response = await http.post(
            f"{base_url}plexus/api/datasets",
            params={"name": name, "replace": "true"},
            content=body,
            headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/vnd.apache.parquet"},
        )
    if response.status_code != 201:
        raise RuntimeError(f"registering {name!r} failed: {response.status_code} {response.text[:300]}")
    return time.perf_counter() - t0


class TreeCPU:
    """CPU seconds of the server process and of its descendants (forkserver, workers), with psutil.

    A worker that has ended is counted through its parent's children_user/children_system (the forkserver
    reaps it), so the sum over the live tree never loses a finished worker."""

    def __init__(self, pid: int) -> None:
        self.server = psutil.Process(pid)
        self.peak_rss: dict[int, int] = {}

    def read(self) -> tuple[float, float]:
        t = self.server.cpu_times()
        own = t.user + t.system
        rest = 0.0
        for child in self.server.children(recursive=True):
            try:
                c = child.cpu_times()
                rest += c.user + c.system + c.children_user + c.children_system
                rss = child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            self.peak_rss[child.pid] = max(self.peak_rss.get(child.pid, 0), rss)
        return own, rest + t.children_user + t.children_system

    def renice_descendants(self, nice: int) -> None:
        """Workers fork from the forkserver and inherit its niceness."""
        for child in self.server.children(recursive=True):
            child.nice(nice)


# -- the phases --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    samples: list[tuple[float, float]] = field(default_factory=list)  # (wall clock at the call, latency s)
    wall: float = 0.0
    server_cpu: float = 0.0
    worker_cpu: float = 0.0


@dataclass
class Run:
    """One evaluation as the server reports it."""

    created: float
    started: float
    completed: float
    stages: dict[str, tuple[float, float]]
    status: str
    create_call_ms: float
    follow_ms: list[float]
    worker_peak_rss: int = 0
    profiles: dict[str, Path] = field(default_factory=dict)


async def paced_calls(
    session: LeanSession,
    params: dict[str, Any],
    interval: float,
    phase: Phase,
    *,
    calls: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """get_task once every `interval` seconds (never in a burst to catch up), until `calls` or `stop`."""
    due = time.perf_counter()
    while (calls is None or len(phase.samples) < calls) and not (stop is not None and stop.is_set()):
        at = time.time()
        t0 = time.perf_counter()
        reply = await session.request("tools/call", params)
        latency = time.perf_counter() - t0
        if reply["result"].get("isError"):
            raise RuntimeError(f"get_task failed: {reply}")
        phase.samples.append((at, latency))
        due = max(due + interval, time.perf_counter())
        await asyncio.sleep(due - time.perf_counter())


async def idle_phase(
    session: LeanSession, params: dict[str, Any], args: argparse.Namespace, cpu: TreeCPU, name: str
) -> Phase:
    phase = Phase(name)
    own0, rest0 = cpu.read()
    t0 = time.perf_counter()
    await paced_calls(session, params, args.interval_ms / 1000, phase, calls=args.idle_calls)
    phase.wall = time.perf_counter() - t0
    own1, rest1 = cpu.read()
    phase.server_cpu, phase.worker_cpu = own1 - own0, rest1 - rest0
    return phase


async def busy_phase(
    url: str,
    session: LeanSession,
    params: dict[str, Any],
    args: argparse.Namespace,
    cpu: TreeCPU,
    name: str,
) -> tuple[Phase, Run]:
    phase = Phase(name)
    before = {p.pid for p in cpu.server.children(recursive=True)}
    stop = asyncio.Event()
    follow_ms: list[float] = []
    async with LeanSession(url, TOKEN) as follower:
        own0, rest0 = cpu.read()
        t0 = time.perf_counter()
        timed = asyncio.create_task(paced_calls(session, params, args.interval_ms / 1000, phase, stop=stop))
        spies = Spies(args.py_spy)
        spies.record("server", cpu.server.pid, idle=True)
        c0 = time.perf_counter()
        view = await call_tool(
            follower,
            "create_evaluation",
            {
                "type": "accuracy",
                "dataset": "registered:big",
                "prediction_column": "prediction",
                "label_column": "label",
                "input_column": "text",
                "id_column": "id",
            },
        )
        create_ms = 1000 * (time.perf_counter() - c0)
        evaluation_id, task_id = view["evaluation_id"], view["task_id"]
        while True:  # follow it, and sample the process tree's CPU and memory meanwhile
            cpu.read()
            if "worker" not in spies.running:
                for pid in {p.pid for p in cpu.server.children(recursive=True)} - before:
                    spies.record("worker", pid)
            f0 = time.perf_counter()
            view = await call_tool(follower, "get_evaluation", {"evaluation_id": evaluation_id})
            follow_ms.append(1000 * (time.perf_counter() - f0))
            if view["status"] in FINAL:
                break
            await asyncio.sleep(args.follow_s)
        stop.set()
        await timed
        spies.stop()
        phase.wall = time.perf_counter() - t0
        own1, rest1 = cpu.read()
        phase.server_cpu, phase.worker_cpu = own1 - own0, rest1 - rest0
        task = await call_tool(follower, "get_task", {"task_id": task_id})
    stages = {
        s["name"]: (parse_iso(s["started_at"]), parse_iso(s["completed_at"]))
        for s in task["stages"]
        if s["started_at"] and s["completed_at"]
    }
    run = Run(
        created=parse_iso(task["created_at"]),
        started=parse_iso(task["started_at"]),
        completed=parse_iso(task["completed_at"]),
        stages=stages,
        status=view["status"],
        create_call_ms=create_ms,
        follow_ms=follow_ms,
        worker_peak_rss=max((rss for pid, rss in cpu.peak_rss.items() if pid not in before), default=0),
        profiles=spies.files,
    )
    if run.status != "COMPLETED":
        raise RuntimeError(f"evaluation {evaluation_id} ended {run.status}: {view.get('error_message')}")
    return phase, run


class Spies:
    """py-spy recordings (--py-spy DIR): the server during the busy phase (with idle samples, so shares are of
    wall-clock time) and the evaluation's worker (until it exits), as collapsed stacks."""

    def __init__(self, out_dir: str | None) -> None:
        self.out_dir = Path(out_dir) if out_dir else None
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.files: dict[str, Path] = {}

    def record(self, label: str, pid: int, idle: bool = False) -> None:
        if self.out_dir is None or label in self.running:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{label}.txt"
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        command = [
            py_spy,
            "record",
            "--nonblocking",
            "-p",
            str(pid),
            "-r",
            "100",
            "-f",
            "raw",
            "-o",
            str(path),
            *(["--idle"] * idle),
        ]
        self.running[label] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.files[label] = path

    def stop(self) -> None:
        for spy in self.running.values():
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT, and when its target exits
        for spy in self.running.values():
            spy.wait(60)


WORKER_PIECES = (
    ("importing the task code (pandas, SQLAlchemy...)", "load_target ("),
    ("load Parquet (DatasetCatalog.load)", "DatasetCatalog.load ("),
    ("scorer (ColumnScorer.score: _labels)", "ColumnScorer.score ("),
    ("normalize_labels (correct)", "normalize_labels ("),
    ("item columns: _columns()", "_columns ("),
    ("  of which _texts()", "_texts ("),
    ("add_chunk (Parquet)", "EvaluationStore.add_chunk ("),
    ("  SQLAlchemy parameters per row", "DefaultExecutionContext._init_compiled ("),
    ("  sqlite3 executemany", "DefaultDialect.do_executemany ("),
    ("  commit", "DefaultDialect.do_commit ("),
    ("compute_metrics", "compute_metrics ("),
    ("progress (TaskContext)", "TaskContext."),
)
SERVER_PIECES = (
    ("idle (waiting in epoll)", "EpollSelector.select ("),
    ("MCP requests (SDK + tools)", "ServerRunner._on_request ("),
    ("tornado HTTP handlers", "RequestHandler._execute ("),
    ("worker messages (TaskManager._on_message)", "TaskManager._on_message ("),
    ("  store writes (Store.save_progress)", "Store.save_progress ("),
    ("events published (EventBus.publish)", "EventBus.publish ("),
)


def profile_shares(path: Path, pieces: tuple[tuple[str, str], ...], root: str | None = None) -> tuple[int, list]:
    """Share of py-spy samples (raw: collapsed stacks) whose stack holds a frame containing each needle.

    `root` keeps only stacks with a frame containing it (the server's event loop thread)."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if root is None or root in stack:
            stacks.append((stack, int(n)))
    total = sum(n for _, n in stacks) or 1
    return total, [(name, sum(n for stack, n in stacks if needle in stack) / total) for name, needle in pieces]


def print_profiles(files: dict[str, Path]) -> None:
    for label, pieces, root in (("worker", WORKER_PIECES, None), ("server", SERVER_PIECES, "launch_instance")):
        if label not in files or not files[label].exists():
            continue
        total, shares = profile_shares(files[label], pieces, root)
        where = "the event loop thread, idle included" if root else "CPU samples"
        print(f"  py-spy, {label} ({where}; {total} samples, {files[label]}):")
        for name, share in shares:
            print(f"    {name:<48} {100 * share:5.1f}%")
        if root:
            print(f"    {'busy (not waiting), all callbacks':<48} {100 * (1 - shares[0][1]):5.1f}%")


# -- the report --------------------------------------------------------------------------------------------


def p(ms: list[float], q: float) -> float:
    ordered = sorted(ms)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_row(name: str, latencies: list[float], extra: str = "") -> str:
    if not latencies:
        return f"  {name:<24} {0:>6}"
    ms = [1000 * x for x in latencies]
    return f"  {name:<24} {len(ms):>6} {statistics.median(ms):>7.2f} {p(ms, 0.99):>7.2f} {max(ms):>8.1f}{extra}"


def cpu_text(phase: Phase) -> str:
    return f"   server {100 * phase.server_cpu / phase.wall:4.0f}%  workers {100 * phase.worker_cpu / phase.wall:4.0f}%"


def report(
    args: argparse.Namespace,
    idle: list[Phase],
    busy: list[Phase],
    runs: list[Run],
    raw: float,
    read_parquet: float,
    upload: float,
) -> None:
    pinned = "server and worker pinned to one core" if _common.pinned() else "no pinning"
    nice = f", worker nice {args.worker_nice}" if args.worker_nice else ""
    print(
        f"\n{args.rows:,} rows; get_task on a finished task once every {args.interval_ms:g} ms "
        f"(lean client); {pinned}{nice}"
    )
    print(f"  {'phase':<24} {'calls':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8}   CPU (% of one core)")
    for n, phase in enumerate(idle):
        print(latency_row(phase.name, [s[1] for s in phase.samples], cpu_text(phase)))
        if n < len(busy):
            b, run = busy[n], runs[n]
            print(latency_row(b.name, [s[1] for s in b.samples], cpu_text(b)))
            for stage in STAGES:
                if stage in run.stages:
                    start, end = run.stages[stage]
                    print(latency_row(f"  during {stage}", [s[1] for s in b.samples if start <= s[0] < end]))
    idle_ms = [1000 * s[1] for phase in idle for s in phase.samples]
    busy_ms = [1000 * s[1] for phase in busy for s in phase.samples]
    scoring_ms = [
        1000 * s[1]
        for b, run in zip(busy, runs, strict=True)
        for s in b.samples
        if "Scoring" in run.stages and run.stages["Scoring"][0] <= s[0] < run.stages["Scoring"][1]
    ]
    ratio = statistics.median(busy_ms) / statistics.median(idle_ms)
    print(
        f"  idle p50 {statistics.median(idle_ms):.2f} ms, busy p50 {statistics.median(busy_ms):.2f} ms: "
        f"busy/idle p50 {ratio:.2f} (goal <= 2.0: {'met' if ratio <= 2.0 else 'NOT met'}); "
        f"p99 idle {p(idle_ms, 0.99):.2f} ms, busy {p(busy_ms, 0.99):.2f} ms "
        f"({p(busy_ms, 0.99) / p(idle_ms, 0.99):.1f}x)"
    )
    if scoring_ms:
        print(
            f"  during Scoring only: p50 {statistics.median(scoring_ms):.2f} ms "
            f"({statistics.median(scoring_ms) / statistics.median(idle_ms):.2f}x idle), "
            f"p99 {p(scoring_ms, 0.99):.2f} ms"
        )
    follow = [ms for run in runs for ms in run.follow_ms]
    print(
        f"  follower: create_evaluation {statistics.median(r.create_call_ms for r in runs):.1f} ms, "
        f"get_evaluation p50 {statistics.median(follow):.2f} ms (every {args.follow_s:g} s)"
    )

    print(f"\nevaluation of {args.rows:,} rows (median of {len(runs)}), from get_task's times:")

    def med(fn: Callable[[Run], float]) -> float:
        return statistics.median(fn(r) for r in runs)

    total = med(lambda r: r.completed - r.created)
    parts: list[tuple[str, float]] = [
        ("start (created -> started)", med(lambda r: r.started - r.created)),
        ("worker start, imports (-> Setup)", med(lambda r: min(a for a, _ in r.stages.values()) - r.started)),
    ]
    for stage in STAGES:
        if all(stage in r.stages for r in runs):
            parts.append((f"stage {stage}", med(lambda r, s=stage: r.stages[s][1] - r.stages[s][0])))
    parts.append(
        ("end (last stage -> COMPLETED)", med(lambda r: r.completed - max(end for _, end in r.stages.values())))
    )
    print(f"  {'created -> COMPLETED':<32} {total:8.2f} s   {args.rows / total:>9,.0f} rows/s")
    for name, seconds in parts:
        print(f"  {name:<32} {seconds:8.2f} s   {100 * seconds / total:5.1f}%")
    busy_wall = sum(b.wall for b in busy)
    print(
        f"  CPU during the busy phases: server {sum(b.server_cpu for b in busy):.1f} s, workers "
        f"{sum(b.worker_cpu for b in busy):.1f} s over {busy_wall:.1f} s; worker peak RSS "
        f"{max(r.worker_peak_rss for r in runs) / 2**20:.0f} MiB"
    )
    print(
        f"  raw compute_metrics in this process, same frame: {1000 * raw:.1f} ms "
        f"(read_parquet {1000 * read_parquet:.0f} ms; the upload of the Parquet body took {upload:.2f} s)"
    )
    print(
        f"  ratios: end-to-end / raw metrics {total / raw:,.0f}x; end-to-end / (read_parquet + raw metrics) "
        f"{total / (read_parquet + raw):,.0f}x  (compute_metrics over the whole frame runs at the end of the "
        "Scoring stage; the Metrics stage only stores them)"
    )
    for run in runs[:1]:
        print_profiles(run.profiles)


# -- main --------------------------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 rows and 300 idle calls a phase")
    parser.add_argument("--rounds", type=int, default=1, help="evaluations, each followed by an idle phase")
    parser.add_argument("--idle-calls", type=int, default=1000, help="get_task calls per idle phase")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="one get_task call every this often")
    parser.add_argument("--follow-s", type=float, default=0.5, help="get_evaluation every this often")
    parser.add_argument("--raw-rounds", type=int, default=5)
    parser.add_argument("--no-pin", action="store_true", help="let the server and its workers use every core")
    parser.add_argument("--py-spy", metavar="DIR", help="record the server and the worker with py-spy into DIR")
    parser.add_argument("--worker-nice", type=int, default=0, help="renice the forkserver (so workers) to this")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.idle_calls = 100_000, 300
    if args.no_pin:
        _common.pinned = lambda: []
    else:
        pin_client()

    t0 = time.perf_counter()
    frame = make_frame(args.rows)
    body = parquet_bytes(frame)
    t1 = time.perf_counter()
    as_read = pd.read_parquet(io.BytesIO(body))  # the frame as the worker will see it
    read_parquet = time.perf_counter() - t1
    raw = time_raw(as_read, args.raw_rounds)
    print(f"{args.rows:,} rows, {len(body) / 2**20:.1f} MiB of Parquet, made in {time.perf_counter() - t0:.1f} s")

    idle: list[Phase] = []
    busy: list[Phase] = []
    runs: list[Run] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempdir()))
        url, pid = stack.enter_context(jupyter_server(tmp, extra_env={"PYTHONPATH": str(ROOT)}))
        base_url = url.removesuffix("plexus/mcp")
        upload = await register(base_url, "big", body)
        cpu = TreeCPU(pid)
        async with LeanSession(url, TOKEN) as session:
            params = {"name": "get_task", "arguments": {"task_id": await seed_task(session)}}
            await paced_calls(session, params, 0.0, Phase("warm-up"), calls=200)
            if args.worker_nice:
                cpu.renice_descendants(args.worker_nice)
            idle.append(await idle_phase(session, params, args, cpu, "idle 1"))
            for n in range(args.rounds):
                phase, run = await busy_phase(url, session, params, args, cpu, f"busy {n + 1} (evaluation)")
                busy.append(phase)
                runs.append(run)
                idle.append(await idle_phase(session, params, args, cpu, f"idle {n + 2}"))
    report(args, idle, busy, runs, raw, read_parquet, upload)


if __name__ == "__main__":
    asyncio.run(main())
