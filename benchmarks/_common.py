"""Helpers shared by the benchmarks: start servers as subprocesses, time MCP calls, print ratios."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"


SERVER_CPU = 1  # servers run on this core, the benchmark's client on the others (less scheduler noise)


def pinned() -> list[str]:
    """A `taskset` prefix that puts a server on SERVER_CPU, when the machine has more than one core."""
    if (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
        return ["taskset", "-c", str(SERVER_CPU)]
    return []


def pin_client() -> None:
    """Keep the benchmark's own process off the servers' core."""
    cpus = set(range(os.cpu_count() or 1)) - {SERVER_CPU}
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx2.get(url, timeout=1.0)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


@contextmanager
def serving(proc: subprocess.Popen, ready_url: str):
    """Wait until a started server answers at `ready_url`; stop it when the block ends (also on Ctrl-C or an
    error), killing it if it has not stopped 15 s after SIGTERM."""
    try:
        wait_http(ready_url)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def started(args: list[str], ready_url: str, env: dict[str, str] | None = None, pin: bool = True):
    """`python <args>` pinned to the servers' core (unless not `pin`), its output discarded (and its stdin, so
    that a Ctrl-C cannot make it ask the terminal anything); yields its pid once it answers at `ready_url`."""
    proc = subprocess.Popen(
        [*(pinned() if pin else []), sys.executable, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with serving(proc, ready_url):
        yield proc.pid


@contextmanager
def jupyter_server(
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    python_args: list[str] | None = None,
    port: int | None = None,
    pin: bool = True,
    db_url: str | None = None,
):
    """A real `jupyter server` with the extension; yields (MCP endpoint URL, server pid).

    `python_args` replaces `-m jupyter server` (e.g. `-c` code that registers a task type, then runs
    jupyter_server.serverapp.main); `port` defaults to a free one; `pin=False` leaves it (and its task
    workers, which inherit the affinity) free to use every core; `db_url` is its store (default: SQLite in
    `workdir`)."""
    port = port or free_port()
    env = dict(
        os.environ,
        JUPYTER_DATA_DIR=str(workdir / "jdata"),
        JUPYTER_RUNTIME_DIR=str(workdir / "jrun"),
        PLEXUS_MCP_DB_URL=db_url or f"sqlite:///{workdir / 'jupyter.db'}",
        **(extra_env or {}),
    )
    args = [
        *(python_args or ["-m", "jupyter", "server"]),
        f"--port={port}",
        "--no-browser",
        "--allow-root",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={workdir}",
        "--ServerApp.log_level=WARN",
    ]
    with started(args, f"http://127.0.0.1:{port}/plexus/api/health", env, pin) as pid:
        yield f"http://127.0.0.1:{port}/plexus/mcp", pid


@contextmanager
def standalone_server(
    workdir: Path, extra_env: dict[str, str] | None = None, port: int | None = None, pin: bool = True
):
    """`plexus mcp serve --transport http` on a SQLite store in `workdir` (also its root dir), with TOKEN, pinned
    as `jupyter_server` is (unless not `pin`); yields (MCP endpoint URL, server pid)."""
    port = port or free_port()
    env = dict(os.environ, JUPYTER_DATA_DIR=str(workdir / "jdata"), **(extra_env or {}))
    args = [
        "-m",
        "plexus_mcp_jupyter.cli",
        "mcp",
        "serve",
        "--transport=http",
        f"--port={port}",
        f"--token={TOKEN}",
        f"--root-dir={workdir}",
        f"--db-url=sqlite:///{workdir / 'standalone.db'}",
        "--log-level=WARNING",
    ]
    with started(args, f"http://127.0.0.1:{port}/health", env, pin) as pid:
        yield f"http://127.0.0.1:{port}/mcp", pid


@contextmanager
def uvicorn_peer(workdir: Path):
    """The same MCP server on uvicorn (the SDK's own ASGI app); yields (URL, server pid)."""
    port = free_port()
    args = [str(HERE / "_uvicorn_peer.py"), str(port), f"sqlite:///{workdir / 'uvicorn.db'}", str(workdir / "udata")]
    with started(args, f"http://127.0.0.1:{port}/mcp") as pid:
        yield f"http://127.0.0.1:{port}/mcp", pid


@asynccontextmanager
async def client(url: str, token: str | None = TOKEN, mode: str = "legacy", **kwargs: Any):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, **kwargs) as c,
    ):
        yield c


async def time_calls(call: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    """Latencies (seconds) of n sequential calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


def summarize(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "calls_per_s": len(ordered) / sum(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status, in KiB: VmRSS now, VmHWM its peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def thread_cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process's live threads, to the nanosecond (the sum of /proc/<pid>/task/*/schedstat):
    `cpu_seconds` counts clock ticks (10 ms), too coarse for a few hundred calls of ~1 ms. Threads that ended
    are not counted (`cpu_seconds` counts them)."""
    total = 0
    task_dir = Path(f"/proc/{pid}/task")
    for tid in os.listdir(task_dir):
        with contextlib.suppress(OSError, ValueError, IndexError):  # the thread ended meanwhile
            total += int((task_dir / tid / "schedstat").read_text().split()[0])
    return total / 1e9


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by a process (from /proc, no dependency)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class ToolCalls:
    """`call` over a `request(method, params)` that answers the JSON-RPC message: LeanSession's and the stdio
    client's of bench_evaluation_e2e (StdioSession)."""

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """A tools/call's structured content; RuntimeError with the tool's message when it answers an error, or
        with the JSON-RPC error."""
        message = await self.request("tools/call", {"name": tool, "arguments": arguments})
        if "result" not in message:
            raise RuntimeError(f"{tool}: {message.get('error', message)}")
        result = message["result"]
        if result.get("isError"):
            raise RuntimeError(f"{tool}: {result['content'][0]['text']}")
        return result["structuredContent"]  # type: ignore[no-any-return]


class LeanSession(ToolCalls):
    """A minimal keep-alive MCP client (2025-11-25 handshake, SSE parsed by hand).

    The SDK client opens a new connection for each call and spends several milliseconds of CPU per
    call itself; this one reuses one connection and does little work, so its latency is mostly the
    server's.
    """

    def __init__(self, url: str, token: str | None) -> None:
        headers = dict(MCP_HEADERS)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url
        self.http = httpx2.AsyncClient(headers=headers, timeout=60)
        self._id = 0

    async def __aenter__(self) -> LeanSession:
        init = await self.request("initialize", INITIALIZE["params"])
        assert "result" in init, init
        await self.http.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.delete(self.url)
        await self.http.aclose()

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        import json

        self._id += 1
        response = await self.http.post(
            self.url, json={"jsonrpc": "2.0", "id": self._id, "method": method, "params": params}
        )
        if "mcp-session-id" in response.headers:
            self.http.headers["mcp-session-id"] = response.headers["mcp-session-id"]
            self.http.headers["mcp-protocol-version"] = "2025-11-25"
        if response.headers.get("content-type", "").startswith("application/json"):
            message = response.json()
            if message.get("id") == self._id:
                return message  # type: ignore[no-any-return]
        for line in response.text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                message = json.loads(line[5:])
                if message.get("id") == self._id:
                    return message  # type: ignore[no-any-return]
        raise RuntimeError(f"no response to {method}: {response.status_code} {response.text[:200]}")


TRIVIAL = {"name": "run_demo_task", "arguments": {"items": 1, "item_delay_ms": 0}}


class _NeverCancelled:
    def is_set(self) -> bool:
        return False


def trivial(i: int) -> Any:
    """The demo task's function with items=1 and no delay, as a worker runs it (messages go nowhere)."""
    from plexus_mcp_jupyter.core.context import TaskContext
    from plexus_mcp_jupyter.core.demo import run_demo

    return run_demo(TaskContext(str(i), lambda msg: None, _NeverCancelled()), items=1, item_delay_ms=0)


def submit_rate(dask_client: Any, n: int) -> float:
    """Dask's own rate for `trivial`: n `submit` calls on `dask_client`, then one gather (tasks/s; warmed first)."""
    dask_client.gather([dask_client.submit(trivial, i, pure=False) for i in range(20)])
    t0 = time.perf_counter()
    futures = [dask_client.submit(trivial, i, pure=False) for i in range(n)]
    dask_client.gather(futures)
    return n / (time.perf_counter() - t0)


async def core_batch(n: int, db_url: str, executor: Any = None, max_concurrency: int = 4) -> dict[str, float]:
    """N demo tasks dispatched at once to a TaskManager in this process: the core's own cost, without HTTP.

    `executor`: the one to measure (default: a LocalExecutor); its CPU per task is this process's (the loop and
    the executor's threads)."""
    import resource

    from plexus_mcp_jupyter.core import EventBus, Store, TaskManager
    from plexus_mcp_jupyter.core.executors import LocalExecutor

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    store = Store(db_url)
    manager = TaskManager(store, EventBus(), executor or LocalExecutor(), max_concurrency=max_concurrency)
    await manager.start()
    try:
        await manager.wait_final([manager.dispatch("demo", TRIVIAL["arguments"]).id for _ in range(50)], 60)
        cpu0, t0 = cpu(), time.perf_counter()
        ids = [manager.dispatch("demo", TRIVIAL["arguments"]).id for _ in range(n)]
        await manager.wait_final(ids, 600)
        elapsed = time.perf_counter() - t0
        cpu_ms = 1000 * (cpu() - cpu0) / n
        assert all(manager.get(i).status.value == "COMPLETED" for i in ids)
    finally:
        await manager.stop()
        store.close()
    return {"tasks_per_s": n / elapsed, "dispatch_per_s": float("nan"), "cpu_ms_per_task": cpu_ms}


async def completed(url: str) -> int:
    """COMPLETED tasks on the server (its health details; the token is the server's own, an admin)."""
    health = url.replace("/plexus/mcp", "/plexus/api/health")
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        return int((await http.get(health)).json()["tasks"]["COMPLETED"])


async def wait_completed(url: str, target: int, timeout: float = 600) -> None:
    """Until `target` tasks have completed: polled every 50 ms, then every 5 ms for the last 100 (a round of
    1,000 trivial tasks takes about a second, which 50 ms polling alone overstated by up to 5%)."""
    deadline = time.monotonic() + timeout
    while (done := await completed(url)) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {target} tasks completed within {timeout:.0f} s")
        await asyncio.sleep(0.005 if target - done <= 100 else 0.05)


async def dispatch(url: str, n: int, sessions: int) -> None:
    """n trivial run_demo_task calls, spread over `sessions` concurrent keep-alive sessions (1: one by one)."""

    async def one_session(count: int) -> None:
        async with LeanSession(url, TOKEN) as s:
            for _ in range(count):
                reply = await s.request("tools/call", TRIVIAL)
                assert not reply["result"].get("isError"), reply

    shares = [n // sessions + (1 if i < n % sessions else 0) for i in range(sessions)]
    await asyncio.gather(*(one_session(k) for k in shares if k))


def tempdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="plexus-bench-")


def med(runs: list[dict], tool: str, key: str) -> float:
    """The median of one figure over rounds (runs: one dict per round, by tool then figure)."""
    return statistics.median(r[tool][key] for r in runs)


# -- evaluation data and its raw peer (bench_evaluation_e2e, bench_scale) -----------------------------------

EVALUATION_CLASSES = ("billing", "technical", "account", "shipping", "other")
EVALUATION_PIECE = 1_000_000  # rows generated (and written) at a time


def evaluation_rows(start: int, rows: int) -> Any:
    """Rows start..start+rows of the evaluation benchmarks' data, a pyarrow Table (id, text, label, prediction; 5
    classes, labels with stray case/blanks and 1% missing, 80% of predictions right), seeded by `start`, so a file
    is the same every time."""
    import numpy as np
    import pyarrow as pa

    classes = np.array(EVALUATION_CLASSES)
    rng = np.random.default_rng(start)
    truth = rng.integers(0, len(classes), rows)
    label = classes[truth].astype(object)
    odd = rng.random(rows)
    label[odd < 0.02] = np.char.upper(classes[truth[odd < 0.02]].astype(str))
    label[(odd >= 0.02) & (odd < 0.03)] = np.char.add(" ", classes[truth[(odd >= 0.02) & (odd < 0.03)]].astype(str))
    label[odd > 0.99] = None
    wrong = rng.random(rows) < 0.2
    predicted = np.where(wrong, (truth + rng.integers(1, len(classes), rows)) % len(classes), truth)
    ids = np.arange(start + 1, start + rows + 1, dtype=np.int64)
    text = np.char.add("a support ticket about ", classes[truth].astype(str))
    return pa.table(
        {
            "id": ids,
            "text": pa.array(text, pa.string()),
            "label": pa.array(label, pa.string()),
            "prediction": pa.array(classes[predicted], pa.string()),
        }
    )


def evaluation_data(cache: Path, rows: int, fmt: str) -> Path:
    """The file of `rows` rows in `fmt` ("csv" or "parquet") in `cache`, written once (to a temporary name first)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = cache / f"eval-{rows}.{fmt}"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    schema = evaluation_rows(0, 1).schema
    writer: Any = pcsv.CSVWriter(temporary, schema) if fmt == "csv" else pq.ParquetWriter(temporary, schema)
    with writer:
        for start in range(0, rows, EVALUATION_PIECE):
            writer.write_table(evaluation_rows(start, min(EVALUATION_PIECE, rows - start)))
    temporary.rename(path)
    return path


def raw_evaluation(path: Path) -> tuple[float, float]:
    """The raw peer of an accuracy evaluation of `path`: (accuracy, seconds) to read the label and prediction
    columns with pyarrow, then `compute_metrics` (every metric the evaluation reports)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from plexus_mcp_jupyter.evaluations.metrics import compute_metrics

    t0 = time.perf_counter()
    columns = ["label", "prediction"]
    if path.suffix == ".csv":
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(include_columns=columns))
    else:
        table = pq.read_table(path, columns=columns)
    metrics = compute_metrics(
        table["label"].to_numpy(zero_copy_only=False), table["prediction"].to_numpy(zero_copy_only=False)
    )
    return metrics.accuracy, time.perf_counter() - t0
