"""tools/call: our endpoint inside Jupyter against a bare SDK server and datalayer's extension, in one run.

Servers (each its own process, pinned to one core, the client on the other; `--peers` picks the peers):
- ours: a real `jupyter server` with the Plexus extension (SQLite store, audit, API-key auth, sessions);
- bare: the `mcp` SDK's own MCPServer on uvicorn (benchmarks/_bare_sdk_peer.py), serving `get_task` and
  `list_tasks` with our argument lists and, as a constant, the very results our server answered: the floor
  of any server built on the SDK;
- datalayer: datalayer's jupyter-mcp-server extension in its own `jupyter server`, installed in a separate
  venv (never in ours): `python3 -m venv /tmp/venv-datalayer && /tmp/venv-datalayer/bin/pip install
  jupyter-mcp-server`. Its cheapest read tool is called for both rows: `list_kernels` (no kernel runs, so it
  reads the kernel manager and answers one line). It speaks only the handshake era (it announces 2024-11-05
  and its results lack the 2026 `resultType`), so it has no 2026-07-28 figures;
- sdk-app: the Plexus MCPServer itself on the SDK's Starlette app and uvicorn (benchmarks/_uvicorn_peer.py):
  our tools without tornado, Jupyter's auth or our bridge.

Measures, per protocol era (2025-11-25: initialize handshake and a session; 2026-07-28: one self-contained
POST per call), in rounds that rotate the servers' order so machine noise hits them alike:
1. the official SDK client (one client, sequential calls): calls/s, p50, p99 -- what an assistant sees;
2. server CPU per call during (1), read from /proc (its threads' schedstat, to the nanosecond): the cost of the
   serving stack itself; the SDK client's CPU per call (this process); and the answer: its size, and the
   client's own work on it without HTTP (parse into the SDK's models, check against the published output
   schema: `answer_cost`), timed in this process after the calls;
3. (2025-11-25 only) a lean keep-alive client (benchmarks/_common.py LeanSession): latency that is mostly the
   server's.
The load average is printed before and after: the machine is shared, and the ratios are what to compare.

    python benchmarks/bench_tools_call.py [--calls 300] [--rounds 6] [--peers bare,datalayer,sdk-app]
        [--baseline /path/to/another/checkout]

`--baseline` adds, as a peer, the same Jupyter server with another checkout of this project first on its
PYTHONPATH (e.g. main's worktree): an A/B of a change in the same run, rounds alternating like the others.

Goal (issue 16): ours / bare >= 1.0 on get_task and list_tasks in both eras; ours / datalayer >= 2.0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    HERE,
    TOKEN,
    LeanSession,
    client,
    free_port,
    jupyter_server,
    med,
    pin_client,
    pinned,
    serving,
    started,
    summarize,
    tempdir,
    thread_cpu_seconds,
    time_calls,
    uvicorn_peer,
)
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for
from mcp.types import CallToolResult, jsonrpc_message_adapter
from referencing import Registry

TOOLS = ("get_task", "list_tasks")
ERAS = {"2025-11-25": "legacy", "2026-07-28": "2026-07-28"}  # era -> the SDK client's `mode`
PEERS = ("bare", "datalayer", "sdk-app")
DATALAYER_TOOL = "list_kernels"
OURS = "ours"

Plan = dict[str, tuple[str, dict[str, Any]]]  # row (our tool) -> (tool called on this server, its arguments)


def tool_args(tool: str, task_id: str) -> dict:
    return {"task_id": task_id} if tool == "get_task" else {"limit": 20}


def plan_for(task_id: str) -> Plan:
    return {tool: (tool, tool_args(tool, task_id)) for tool in TOOLS}


@dataclass
class Target:
    """A server under test: where it is, how to call it, which eras it speaks."""

    name: str
    url: str
    token: str | None
    pid: int
    plan: Plan
    eras: tuple[str, ...] = tuple(ERAS)
    sdk: dict[str, list[dict]] = field(default_factory=dict)  # era -> one dict per round
    lean: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        called = {tool for tool, _ in self.plan.values()}
        return self.name if called == set(TOOLS) else f"{self.name} ({', '.join(sorted(called))})"


async def seed(url: str, token: str | None) -> str:
    """A finished task to read, and 20 more so list_tasks builds a full page."""
    async with client(url, token) as c:
        task_id = (await c.call_tool("run_demo_task", {"items": 10, "item_delay_ms": 0})).structured_content["task_id"]
        for _ in range(20):
            await c.call_tool("run_demo_task", {"items": 1, "item_delay_ms": 0})
        while (await c.call_tool("get_task", {"task_id": task_id})).structured_content["status"] != "COMPLETED":
            await asyncio.sleep(0.1)
    return str(task_id)


async def our_results(url: str, token: str | None, task_id: str) -> dict[str, Any]:
    """What our server answers to each timed call (the bare peer serves these as constants)."""
    async with client(url, token) as c:
        out = {}
        for tool, (name, args) in plan_for(task_id).items():
            result = await c.call_tool(name, args)
            out[tool] = result.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"result_type"})
        return out


async def timed_calls(
    url: str, token: str | None, pid: int, plan: Plan, calls: int, warmup: int, mode: str = "legacy"
) -> dict:
    """Each row of `plan` called `calls` times by one SDK client (after `warmup` calls): latency figures and the
    server's CPU per call."""
    out = {}
    async with client(url, token, mode=mode) as c:
        for row, (tool, args) in plan.items():

            async def call(tool=tool, args=args):
                result = await c.call_tool(tool, args)
                assert not result.is_error, result

            await time_calls(call, warmup)
            cpu0, client0 = thread_cpu_seconds(pid), own_cpu_seconds()
            stats = summarize(await time_calls(call, calls))
            stats["server_cpu_us"] = 1e6 * (thread_cpu_seconds(pid) - cpu0) / calls
            stats["client_cpu_us"] = 1e6 * (own_cpu_seconds() - client0) / calls
            schemas = {t.name: t.output_schema for t in (await c.list_tools()).tools}
            stats["answer_bytes"], stats["answer_us"] = answer_cost(await c.call_tool(tool, args), schemas.get(tool))
            out[row] = stats
    return out


def answer_cost(result: CallToolResult, schema: dict[str, Any] | None, repeat: int = 50) -> tuple[int, float]:
    """The size of an answer (its JSON-RPC body as the 2026 era sends it) and the SDK client's own work on it
    without HTTP, in us of this process's CPU: the body parsed into the SDK's message model, the result into
    `CallToolResult`, and its structured content checked against the published output schema as
    `ClientSession.validate_tool_result` does (a compiled validator, `best_match` over `iter_errors`)."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "result": result.model_dump(by_alias=True, mode="json", exclude_none=True)},
        separators=(",", ":"),
    ).encode()
    validator = validator_for(schema)(schema, registry=Registry()) if schema is not None else None

    def once() -> None:
        answer = CallToolResult.model_validate(jsonrpc_message_adapter.validate_json(body, by_name=False).result)
        if validator is not None:
            assert best_match(validator.iter_errors(answer.structured_content)) is None

    once()
    started = time.process_time()
    for _ in range(repeat):
        once()
    return len(body), 1e6 * (time.process_time() - started) / repeat


async def sdk_round(url: str, token: str | None, pid: int, task_id: str, calls: int, warmup: int) -> dict:
    """Our two tools through the SDK client in the 2025-11-25 era (bench_auth.py uses it too)."""
    return await timed_calls(url, token, pid, plan_for(task_id), calls, warmup)


async def lean_calls(url: str, token: str | None, plan: Plan, calls: int, warmup: int) -> dict:
    out = {}
    async with LeanSession(url, token) as s:
        for row, (tool, args) in plan.items():
            params = {"name": tool, "arguments": args}

            async def call(params=params):
                reply = await s.request("tools/call", params)
                assert not reply["result"].get("isError"), reply

            await time_calls(call, warmup)
            out[row] = summarize(await time_calls(call, calls))
    return out


async def lean_round(url: str, token: str | None, task_id: str, calls: int, warmup: int) -> dict:
    return await lean_calls(url, token, plan_for(task_id), calls, warmup)


def own_cpu_seconds() -> float:
    """User + system CPU time of this process (the SDK client's work: parsing, validating, its HTTP stack)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def bare_peer(results_file: Path):
    """The bare SDK server (benchmarks/_bare_sdk_peer.py); yields (URL, pid)."""
    port = free_port()
    with started(
        [str(HERE / "_bare_sdk_peer.py"), str(port), str(results_file)], f"http://127.0.0.1:{port}/mcp"
    ) as pid:
        yield f"http://127.0.0.1:{port}/mcp", pid


@contextmanager
def datalayer_peer(workdir: Path, python: str):
    """datalayer's jupyter-mcp-server extension in a `jupyter server` of its own venv; yields (URL, pid)."""
    port = free_port()
    root = workdir / "datalayer"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours on its path
    env.update(JUPYTER_DATA_DIR=str(workdir / "dl-data"), JUPYTER_RUNTIME_DIR=str(workdir / "dl-run"))
    proc = subprocess.Popen(
        [
            *pinned(),
            python,
            "-m",
            "jupyter",
            "server",
            f"--port={port}",
            "--no-browser",
            "--allow-root",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.log_level=WARN",
        ],
        env=env,
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with serving(proc, f"http://127.0.0.1:{port}/mcp/healthz"):
        yield f"http://127.0.0.1:{port}/mcp", proc.pid


async def measure(target: Target, calls: int, warmup: int) -> None:
    for era in target.eras:
        target.sdk.setdefault(era, []).append(
            await timed_calls(target.url, target.token, target.pid, target.plan, calls, warmup, ERAS[era])
        )
    target.lean.append(await lean_calls(target.url, target.token, target.plan, calls, warmup))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(targets: list[Target], args: argparse.Namespace, load_before: str) -> None:
    print(
        f"tools/call: {args.calls} sequential calls per tool, median of {args.rounds} rounds in rotating order; "
        f"load average (1, 5, 15 min) before {load_before}, after {load()}"
    )
    width = max(len(t.label) for t in targets)
    print(
        f"{'client':<6} {'era':<10} {'tool':<11} {'server':<{width}} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'srv CPU us':>10} {'cli CPU us':>10} {'answer B':>8} {'answer us':>9}"
    )
    for era in ERAS:
        for tool in TOOLS:
            for t in targets:
                if era in t.eras:
                    runs = t.sdk[era]
                    print(
                        f"{'sdk':<6} {era:<10} {tool:<11} {t.label:<{width}} {med(runs, tool, 'calls_per_s'):>8.0f} "
                        f"{med(runs, tool, 'p50_ms'):>7.2f} {med(runs, tool, 'p99_ms'):>7.2f} "
                        f"{med(runs, tool, 'server_cpu_us'):>10.0f} {med(runs, tool, 'client_cpu_us'):>10.0f} "
                        f"{med(runs, tool, 'answer_bytes'):>8.0f} {med(runs, tool, 'answer_us'):>9.0f}"
                    )
    for tool in TOOLS:
        for t in targets:
            print(
                f"{'lean':<6} {'2025-11-25':<10} {tool:<11} {t.label:<{width}} "
                f"{med(t.lean, tool, 'calls_per_s'):>8.0f} {med(t.lean, tool, 'p50_ms'):>7.2f} "
                f"{med(t.lean, tool, 'p99_ms'):>7.2f}"
            )
    ours, peers = targets[0], targets[1:]
    print("ratios ours / peer (throughput: higher is better; server CPU per call: lower is better)")
    for peer in peers:
        for era in ERAS:
            if era not in peer.eras:
                print(f"  {peer.label:<{width}} {era}: not served by this peer")
                continue
            for tool in TOOLS:
                throughput = med(ours.sdk[era], tool, "calls_per_s") / med(peer.sdk[era], tool, "calls_per_s")
                cpu = med(ours.sdk[era], tool, "server_cpu_us") / med(peer.sdk[era], tool, "server_cpu_us")
                lean_ratio = med(ours.lean, tool, "calls_per_s") / med(peer.lean, tool, "calls_per_s")
                lean = f"  lean throughput {lean_ratio:.2f}" if era == "2025-11-25" else ""
                print(
                    f"  {peer.label:<{width}} {era} {tool:<11} sdk throughput {throughput:.2f}  "
                    f"server CPU/call {cpu:.2f}{lean}"
                )
    goals(ours, peers)


GOALS = {"bare": 1.0, "datalayer": 2.0}  # issue 16: ours / peer throughput with the SDK client, in every era served


def goals(ours: Target, peers: list[Target]) -> None:
    """One line per goal of issue 16: the SDK client's throughput ratio, met or not (the lean client's beside it)."""
    print("goals (issue 16; SDK client throughput ours / peer, lean client in brackets):")
    for peer in peers:
        goal = GOALS.get(peer.name)
        if goal is None:
            continue
        for era in ERAS:
            if era not in peer.eras:
                continue
            for tool in TOOLS:
                ratio = med(ours.sdk[era], tool, "calls_per_s") / med(peer.sdk[era], tool, "calls_per_s")
                lean = ""
                if era == "2025-11-25":
                    lean = f" (lean {med(ours.lean, tool, 'calls_per_s') / med(peer.lean, tool, 'calls_per_s'):.2f})"
                verdict = "met" if ratio >= goal else "NOT met"
                print(f"  {tool:<10} {era} vs {peer.label}: {ratio:.2f}{lean} >= {goal:.1f}? {verdict}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--peers", default="bare,datalayer", help=f"comma-separated, from {', '.join(PEERS)} (default: bare,datalayer)"
    )
    parser.add_argument(
        "--baseline", help="another checkout of this project, served as the peer 'baseline' (an A/B of a change)"
    )
    parser.add_argument(
        "--datalayer-python",
        default="/tmp/venv-datalayer/bin/python",
        help="the python of the venv jupyter-mcp-server is installed in",
    )
    args = parser.parse_args()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := set(peers) - set(PEERS):
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    if "datalayer" in peers and not Path(args.datalayer_python).exists():
        parser.error(
            f"no {args.datalayer_python}: install datalayer's extension in a venv of its own "
            "(python3 -m venv /tmp/venv-datalayer && /tmp/venv-datalayer/bin/pip install jupyter-mcp-server) "
            "or leave 'datalayer' out of --peers"
        )
    pin_client()
    load_before = load()
    with tempdir() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        url, pid = stack.enter_context(jupyter_server(workdir))
        task_id = await seed(url, TOKEN)
        targets = [Target(OURS, url, TOKEN, pid, plan_for(task_id))]
        if args.baseline:
            (workdir / "baseline").mkdir()
            b_url, b_pid = stack.enter_context(
                jupyter_server(workdir / "baseline", extra_env={"PYTHONPATH": str(Path(args.baseline).resolve())})
            )
            targets.append(Target("baseline", b_url, TOKEN, b_pid, plan_for(await seed(b_url, TOKEN))))
        for peer in peers:
            if peer == "bare":
                results_file = workdir / "results.json"
                results_file.write_text(json.dumps(await our_results(url, TOKEN, task_id)))
                p_url, p_pid = stack.enter_context(bare_peer(results_file))
                targets.append(Target(peer, p_url, None, p_pid, plan_for("constant")))
            elif peer == "sdk-app":
                p_url, p_pid = stack.enter_context(uvicorn_peer(workdir))
                targets.append(Target(peer, p_url, None, p_pid, plan_for(await seed(p_url, None))))
            else:
                p_url, p_pid = stack.enter_context(datalayer_peer(workdir, args.datalayer_python))
                targets.append(
                    Target(
                        peer, p_url, TOKEN, p_pid, {tool: (DATALAYER_TOOL, {}) for tool in TOOLS}, eras=("2025-11-25",)
                    )
                )
        for round_no in range(args.rounds):
            shift = round_no % len(targets)
            for target in targets[shift:] + targets[:shift]:
                await measure(target, args.calls, args.warmup)
    report(targets, args, load_before)


if __name__ == "__main__":
    asyncio.run(main())
