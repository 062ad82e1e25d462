"""Evaluations end to end at 1M and 10M rows, CSV and Parquet, beside the raw pyarrow read + compute_metrics.

For each size and format, in one run against one real `jupyter server` with the extension (SQLite store):

1. the raw peer, in this process: read the label and prediction columns with pyarrow (`pyarrow.csv.read_csv`
   or `pyarrow.parquet.read_table`), then `compute_metrics` (every metric the evaluation reports);
2. the evaluation as a user sees it: `create_evaluation` (accuracy, prediction_column) over MCP with the SDK
   client, then `get_evaluation` every 50 ms until final; meanwhile a second session calls `get_task` (of
   an earlier task) back to back, and a thread samples the RSS of the server's whole process tree (psutil:
   the server, its warm workers, the forkserver);
3. bytes per item (the SQLite file, its WAL and the items directory, before and after), and
   `get_evaluation_results(only_mismatches=True)` page latency (p50 over --pages pages, following cursors);
4. warm start: the first `create_evaluation` after the server is ready (and its small evaluation end to end)
   beside the median of the next ones. The SDK client's own first-call cost (it imports jsonschema to check
   tool results: ~4 s under load, rfc3987_syntax building grammars) is paid before, so it is not counted.
   With --standalone, `plexus mcp serve` over stdio or http instead of Jupyter, and the server's CPU per call.

Goals (issue 15): end to end <= 5x raw, <= 16 bytes/item, peak RSS <= 2 GiB at 10M, only_mismatches p50
< 20 ms, get_task p50 during the evaluation <= 2x idle; the first create_evaluation as fast as later ones.

Data (id, text, label, prediction; 5 classes, labels with stray case/blanks and 1% missing, 80% right) is
generated once per size into --cache (default /tmp/plexus-bench-e2e) in pieces of a million rows, and
hard-linked into the server's root.

    python benchmarks/bench_evaluation_e2e.py [--rows 1000000,10000000] [--formats csv,parquet] [--pages 20]
    python benchmarks/bench_evaluation_e2e.py --rows 0 --starts N [--standalone stdio|http]  (warm start only)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common
import mcp_types
import psutil
import pyarrow.csv as pcsv
from _common import (
    TOKEN,
    LeanSession,
    client,
    evaluation_data,
    evaluation_rows,
    jupyter_server,
    raw_evaluation,
    tempdir,
)
from bench_columnar import disk_bytes, page_latencies, stage_times
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.message import SessionMessage

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


class TreeRss:
    """The peak RSS of a process and all its descendants, sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker that ended meanwhile
                total += process.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> TreeRss:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


async def create(session: Any, dataset: str) -> tuple[str, float]:
    """(evaluation id, seconds the create_evaluation call took)."""
    t0 = time.perf_counter()
    made = await session.call_tool(
        "create_evaluation",
        {"type": "accuracy", "dataset": dataset, "label_column": "label", "prediction_column": "prediction"},
    )
    if made.is_error:
        raise RuntimeError(made.content[0].text)
    return made.structured_content["evaluation_id"], time.perf_counter() - t0


async def finished(session: Any, evaluation_id: str) -> dict[str, Any]:
    while True:
        got = (await session.call_tool("get_evaluation", {"evaluation_id": evaluation_id})).structured_content
        if got["status"] in FINAL:
            return got  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)


async def get_task_latencies(session: Any, task_id: str, until: asyncio.Event | None, n: int = 100) -> list[float]:
    """get_task ten times a second (a client watching, not a load test): `n` calls, or until `until` is set."""
    out: list[float] = []
    while (until is None and len(out) < n) or (until is not None and not until.is_set()):
        t0 = time.perf_counter()
        await session.call_tool("get_task", {"task_id": task_id})
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
    return out


async def warm_start(url: str) -> tuple[float, float, float, float, str]:
    """(first create_evaluation call s, later p50 s, first small evaluation end to end s, later p50 s, task id),
    on a server that has just become ready."""
    async with client(url) as session:
        calls, ends = [], []
        task_id = ""
        for _ in range(4):
            t0 = time.perf_counter()
            evaluation_id, call = await create(session, "warm.csv")
            done = await finished(session, evaluation_id)
            if done["status"] != "COMPLETED":
                raise RuntimeError(f"warm-up evaluation {done['status']}: {done['error_message']}")
            calls.append(call)
            ends.append(time.perf_counter() - t0)
            task_id = done["task_id"]
    return calls[0], statistics.median(calls[1:]), ends[0], statistics.median(ends[1:]), task_id


async def lean_evaluations(
    url: str, n: int, gap: float = 0, pid: int | None = None, session: Any = None
) -> tuple[list[float], list[float], list[float]]:
    """`n` small evaluations, one after the other (each after `gap` seconds idle but the first), in a new session of
    the lean client at `url` (or in `session`, one already open: a `StdioSession`): each create_evaluation call's
    seconds, each evaluation's end to end (the call, then get_evaluation every 50 ms until it ends), and with `pid`
    the server process's CPU seconds over each call (its threads', from /proc: a figure the machine's load inflates
    less than wall time)."""
    arguments = {"type": "accuracy", "dataset": "warm.csv", "label_column": "label", "prediction_column": "prediction"}
    calls, ends, cpus = [], [], []
    async with contextlib.nullcontext(session) if session is not None else LeanSession(url, TOKEN) as session:
        for i in range(n):
            if i and gap:
                await asyncio.sleep(gap)
            cpu0 = _common.thread_cpu_seconds(pid) if pid else 0.0
            t0 = time.perf_counter()
            made = await session.call("create_evaluation", arguments)
            calls.append(time.perf_counter() - t0)
            cpus.append(_common.thread_cpu_seconds(pid) - cpu0 if pid else 0.0)
            while True:
                got = await session.call("get_evaluation", {"evaluation_id": made["evaluation_id"]})
                if got["status"] in FINAL:
                    break
                await asyncio.sleep(0.05)
            if got["status"] != "COMPLETED":
                raise RuntimeError(f"warm-up evaluation {got['status']}: {got['error_message']}")
            ends.append(time.perf_counter() - t0)
    return calls, ends, cpus


async def lean_warm_start(
    url: str, idle: float, again: float = 0, spaced: bool = False, pid: int | None = None, session: Any = None
) -> tuple[float, float, float, float, float | None, float, float]:
    """warm_start's figures through the lean client (the SDK client validates each tool's first result against its
    output schema, a first-call cost of the client's own), `idle` seconds after the server became ready; with
    `spaced`, each later call `idle` seconds after the evaluation before it ended (the same idle as the first's);
    with `again`, last, the call of a new session `again` seconds after those (a server that served the same call
    already, idle as long: what a first call pays that is not first use, e.g. caches gone cold while idle). Last,
    the server's CPU seconds over the first call and the median over the later ones (0 without `pid`)."""
    await asyncio.sleep(idle)
    calls, ends, cpus = await lean_evaluations(url, 4, idle if spaced else 0, pid, session)
    later_call = None
    if again:
        await asyncio.sleep(again)
        later_call = (await lean_evaluations(url, 1))[0][0]
    return (
        calls[0],
        statistics.median(calls[1:]),
        ends[0],
        statistics.median(ends[1:]),
        later_call,
        cpus[0],
        statistics.median(cpus[1:]),
    )


class StdioSession(_common.ToolCalls):
    """A lean client over the SDK's stdio client (`mcp.client.stdio.stdio_client`: it starts `plexus mcp serve` and
    carries JSON-RPC over its stdin and stdout): initialize as a client launching it does (at once: the request
    waits in the pipe while the server starts), then tool calls, one at a time. `pid` is the server's."""

    def __init__(self, work: Path, pin: bool, env: dict[str, str]) -> None:
        command = [*(_common.pinned() if pin else []), sys.executable, "-m", "plexus_mcp_jupyter.cli", "mcp", "serve"]
        self._params = StdioServerParameters(
            command=command[0],
            args=[
                *command[1:],
                f"--root-dir={work}",
                f"--db-url=sqlite:///{work / 'standalone.db'}",
                "--log-level=WARNING",
            ],
            env={**os.environ, "JUPYTER_DATA_DIR": str(work / "jdata"), **env},
            cwd=str(work),
        )
        self._errlog = open(os.devnull, "w")  # noqa: SIM115 (the server's stderr: closed at __aexit__)
        self._client = stdio_client(self._params, errlog=self._errlog)
        self._id = 0
        self.pid = 0
        self.initialized = 0.0  # seconds from the start to initialize's answer

    async def __aenter__(self) -> StdioSession:
        before = {p.pid for p in psutil.Process().children()}
        t0 = time.perf_counter()
        self._read, self._write = await self._client.__aenter__()
        self.pid = next(p.pid for p in psutil.Process().children() if p.pid not in before)
        init = await self.request("initialize", _common.INITIALIZE["params"])
        assert "result" in init, init
        self.initialized = time.perf_counter() - t0
        await self._send(mcp_types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._client.__aexit__(None, None, None)
        finally:
            self._errlog.close()

    async def _send(self, message: Any) -> None:
        await self._write.send(SessionMessage(message=message))

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        await self._send(mcp_types.JSONRPCRequest(jsonrpc="2.0", id=self._id, method=method, params=params))
        while True:
            item = await self._read.receive()
            if isinstance(item, Exception):
                raise item
            message = item.message.model_dump(by_alias=True, exclude_none=True)
            if message.get("id") == self._id:
                return message  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def standalone_started(kind: str, work: Path, pin: bool, env: dict[str, str]) -> Any:
    """A fresh `plexus mcp serve` (`kind` stdio or http) with `work` as its root and its SQLite store: yields
    (URL, server pid, open StdioSession or None)."""
    if kind == "stdio":
        async with StdioSession(work, pin, env) as session:
            yield "", session.pid, session
    else:
        with _common.standalone_server(work, extra_env=env, pin=pin) as (url, pid):
            yield url, pid, None


async def fresh_starts(
    n: int,
    nice: int,
    pin: bool,
    idle: float,
    without: list[str],
    again: float = 0,
    spaced: bool = False,
    standalone: str = "",
) -> None:
    """Item 5 of issue 15 over several fresh servers, through the lean client: each one's first create_evaluation
    call (and its 1,000-row evaluation end to end) against the median of its next three, `idle` seconds after
    the server answered health, and the median ratios over the starts. `without`: server extensions disabled
    (e.g. jupyter_lsp, whose language-server discovery runs in a thread and an `npm prefix -g` at ready). `spaced`:
    the later calls each after the same idle as the first (an idle spell alone makes a call slower: the machine's
    caches go cold, the client's too), so that the ratio is first use only. `standalone`: `plexus mcp serve` over
    stdio (the SDK's stdio client starts it, and initializes at once, as Claude Desktop and Cursor do; `idle` then
    counts from initialize's answer) or http, instead of Jupyter; the server's CPU over each call is shown too."""
    args = ["-m", "jupyter", "server"]
    if without:
        args.append("--ServerApp.jpserver_extensions=" + repr(dict.fromkeys(without, False)))
    calls, ends, agains, cpus = [], [], [], []
    for i in range(n):
        with tempdir() as tmp:
            work = Path(tmp)
            pcsv.write_csv(evaluation_rows(0, 1000), work / "warm.csv")
            env = {"PLEXUS_MCP_WORKER_NICE": str(nice)}
            load = os.getloadavg()[0]
            if standalone:
                async with standalone_started(standalone, work, pin, env) as (url, pid, session):
                    first, later, first_end, later_end, again_call, first_cpu, later_cpu = await lean_warm_start(
                        url, idle, again, spaced, pid, session
                    )
            else:
                with jupyter_server(work, extra_env=env, pin=pin, python_args=args) as (url, _pid):
                    first, later, first_end, later_end, again_call, first_cpu, later_cpu = await lean_warm_start(
                        url, idle, again, spaced
                    )
        calls.append(first / later)
        ends.append(first_end / later_end)
        again_text = cpu_text = ""
        if standalone and later_cpu:
            cpus.append(first_cpu / later_cpu)
            cpu_text = (
                f"; server CPU {first_cpu * 1000:.1f} ms against {later_cpu * 1000:.1f} ms "
                f"({first_cpu / later_cpu:.2f}x)"
            )
        if again_call is not None:
            agains.append(again_call / later)
            again_text = (
                f"; a new session's call {again:g} s later {again_call * 1000:.0f} ms ({again_call / later:.2f}x)"
            )
        print(
            f"start {i + 1}{' (' + standalone + ')' if standalone else ''} (first call {idle:g} s after ready): "
            f"first create_evaluation {first * 1000:.0f} ms, "
            f"later p50 {later * 1000:.0f} ms{f' (each {idle:g} s after the last)' if spaced else ''} "
            f"({first / later:.2f}x); end to end {first_end:.2f} s against "
            f"{later_end:.2f} s ({first_end / later_end:.2f}x){cpu_text}{again_text}; load {load:.2f}",
            flush=True,
        )
    print(
        f"fresh starts: {n}{' plexus mcp serve ' + standalone if standalone else ''}"
        f"{' without ' + ','.join(without) if without else ''}{' spaced' if spaced else ''}, "
        "first / later "
        f"create_evaluation median {statistics.median(calls):.2f}x "
        f"(goal <= 1.3x), end to end median {statistics.median(ends):.2f}x"
        + (f", server CPU median {statistics.median(cpus):.2f}x" if cpus else "")
        + (f", a new session's call {again:g} s later median {statistics.median(agains):.2f}x" if agains else "")
        + f"; load {os.getloadavg()[0]:.2f}"
    )


async def one(url: str, pid: int, work: Path, name: str, rows: int, task_id: str, pages: int) -> dict[str, Any]:
    store = [work / "jupyter.db", work / "jupyter.db-wal", work / "jdata"]
    async with client(url) as session, client(url) as watcher:
        idle = await get_task_latencies(watcher, task_id, None, 100)
        before = disk_bytes(*store)
        done_event = asyncio.Event()
        with TreeRss(pid) as rss:
            t0 = time.perf_counter()
            evaluation_id, _ = await create(session, name)
            during_task = asyncio.create_task(get_task_latencies(watcher, task_id, done_event))
            final = await finished(session, evaluation_id)
            end = time.perf_counter() - t0
            done_event.set()
            during = await during_task
        if final["status"] != "COMPLETED":
            raise RuntimeError(f"evaluation of {name} {final['status']}: {final['error_message']}")
        grown = disk_bytes(*store) - before
        latencies = await page_latencies(session, evaluation_id, pages)
        stages = await stage_times(session, final["task_id"])
    return {
        "end": end,
        "per_item": grown / rows,
        "rss": rss.peak,
        "pages": latencies,
        "idle": idle,
        "during": during,
        "accuracy": final["metrics"]["score"]["accuracy"],
        "stages": stages,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated sizes")
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/plexus-bench-e2e"))
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="the workers' nice (worker_nice; the server's default "
        "is 10, which on a shared, loaded machine measures the other load, not the pipeline)",
    )
    parser.add_argument("--pin", action="store_true", help="pin the server (and so its workers) to one core")
    parser.add_argument("--idle", type=float, default=0.0, help="--starts: seconds between ready and the first call")
    parser.add_argument(
        "--starts",
        type=int,
        default=0,
        help="first, N fresh servers: the first create_evaluation of each against the median of its later ones",
    )
    parser.add_argument(
        "--again",
        type=float,
        default=0.0,
        help="--starts: also, S seconds after the later calls, one call in a new session (the same idle, served); "
        "not with --standalone stdio (its one session is the client that started the server)",
    )
    parser.add_argument(
        "--spaced",
        action="store_true",
        help="--starts: each later call --idle seconds after the evaluation before it (like the first: idle alone "
        "makes a call slower), so the ratio is first use only",
    )
    parser.add_argument(
        "--without",
        default="",
        help="--starts: comma-separated server extensions to disable (jupyter_lsp: its start-up work runs at ready)",
    )
    parser.add_argument(
        "--standalone",
        choices=("", "stdio", "http"),
        default="",
        help="--starts: `plexus mcp serve` over stdio (started by the SDK's stdio client) or http, not Jupyter",
    )
    args = parser.parse_args()
    if args.again and args.standalone == "stdio":
        parser.error("--again needs a server a new session can reach: --standalone http or Jupyter, not stdio")
    sizes = [int(r) for r in args.rows.split(",") if int(r)]
    formats = args.formats.split(",")
    _common.pin_client()
    # The SDK client validates a tool's result with jsonschema, imported on its first call_tool: ~4 s here
    # (rfc3987_syntax builds its grammars). A client's cost, not the server's: paid before the clock starts.
    import jsonschema  # noqa: F401

    print(
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on {os.cpu_count()} cores at start; "
        f"workers at nice {args.nice}; client on cores {sorted(os.sched_getaffinity(0))}, server "
        f"{'pinned to core ' + str(_common.SERVER_CPU) if args.pin else 'on any core'}"
    )
    if args.starts:
        without = [e for e in args.without.split(",") if e]
        await fresh_starts(
            args.starts, args.nice, args.pin, args.idle, without, args.again, args.spaced, args.standalone
        )
    if not sizes:
        print(f"load average {os.getloadavg()[0]:.2f} at end")
        return
    files = {(rows, fmt): evaluation_data(args.cache, rows, fmt) for rows in sizes for fmt in formats}
    with tempdir() as tmp:
        work = Path(tmp)
        pcsv.write_csv(evaluation_rows(0, 1000), work / "warm.csv")
        for (_rows, _fmt), path in files.items():
            os.link(path, work / path.name)
        env = {"PLEXUS_MCP_MAX_EVALUATION_ITEMS": str(max(sizes) + 1), "PLEXUS_MCP_WORKER_NICE": str(args.nice)}
        with jupyter_server(work, extra_env=env, pin=args.pin) as (url, pid):
            first, later, first_end, later_end, task_id = await warm_start(url)
            print(
                f"warm start: first create_evaluation {first * 1000:.0f} ms, later p50 {later * 1000:.0f} ms; "
                f"first 1,000-row evaluation end to end {first_end:.2f} s, later p50 {later_end:.2f} s"
            )
            for (rows, fmt), path in files.items():
                served = await one(url, pid, work, path.name, rows, task_id, args.pages)
                peer = [raw_evaluation(path) for _ in range(2)]
                raw_s = min(s for _, s in peer)
                idle, during = statistics.median(served["idle"]), statistics.median(served["during"])
                pages = statistics.median(served["pages"]) * 1000 if served["pages"] else float("nan")
                print(
                    f"{rows:>11,} rows {fmt:8} end to end {served['end']:7.2f} s | raw pyarrow + compute_metrics "
                    f"{raw_s:6.2f} s | ratio {served['end'] / raw_s:5.1f}x (goal <= 5x)"
                )
                print(
                    f"{'':29}{served['per_item']:.1f} bytes/item (<= 16) | peak RSS server+workers "
                    f"{served['rss'] / 2**30:.2f} GiB (<= 2 at 10M) | only_mismatches p50 {pages:.1f} ms (< 20)"
                )
                print(f"{'':29}stages: {served['stages']}")
                print(
                    f"{'':29}get_task p50 idle {idle * 1000:.1f} ms, during {during * 1000:.1f} ms "
                    f"({during / idle:.1f}x, <= 2x; {len(served['during'])} calls) | accuracy served "
                    f"{served['accuracy']:.6f}, raw {peer[0][0]:.6f}"
                )
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    asyncio.run(main())
