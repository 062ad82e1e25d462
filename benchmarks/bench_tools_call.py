"""tools/call: our tornado endpoint inside Jupyter vs the same SDK server on uvicorn, in one run.

Both serve the same Plexus MCPServer over Streamable HTTP (stateful, SSE, with an event store), each
in its own process with its own SQLite store. Three measures, each in alternating rounds so that
machine noise hits both servers alike:

Servers are pinned to one core and the client to the other (taskset), rounds alternate in order.

1. the official SDK client (one session, sequential calls): calls/s, p50, p99 -- what an assistant sees;
2. server CPU per call during (1), read from /proc: the cost of the serving stack itself;
3. a lean keep-alive client (benchmarks/_common.py LeanSession): latency that is mostly the server's.

    python benchmarks/bench_tools_call.py [--calls 300] [--rounds 8]

Goal (DESIGN 10, issue #3): throughput ratio tornado/uvicorn >= 1.0; get_task p50 < 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from _common import (
    TOKEN,
    LeanSession,
    client,
    cpu_seconds,
    jupyter_server,
    med,
    pin_client,
    summarize,
    tempdir,
    time_calls,
    uvicorn_peer,
)

TOOLS = ("get_task", "list_tasks")
SERVERS = ("tornado (Jupyter)", "uvicorn (SDK app)")


def tool_args(tool: str, task_id: str) -> dict:
    return {"task_id": task_id} if tool == "get_task" else {"limit": 20}


async def seed(url: str, token: str | None) -> str:
    """A finished task to read, and 20 more so list_tasks builds a full page."""
    async with client(url, token) as c:
        task_id = (await c.call_tool("run_demo_task", {"items": 10, "item_delay_ms": 0})).structured_content["task_id"]
        for _ in range(20):
            await c.call_tool("run_demo_task", {"items": 1, "item_delay_ms": 0})
        while (await c.call_tool("get_task", {"task_id": task_id})).structured_content["status"] != "COMPLETED":
            await asyncio.sleep(0.1)
    return str(task_id)


async def sdk_round(url: str, token: str | None, pid: int, task_id: str, calls: int, warmup: int) -> dict:
    out = {}
    async with client(url, token) as c:
        for tool in TOOLS:
            args = tool_args(tool, task_id)

            async def call(tool=tool, args=args):
                result = await c.call_tool(tool, args)
                assert not result.is_error, result

            await time_calls(call, warmup)
            cpu0 = cpu_seconds(pid)
            stats = summarize(await time_calls(call, calls))
            stats["server_cpu_us"] = 1e6 * (cpu_seconds(pid) - cpu0) / calls
            out[tool] = stats
    return out


async def lean_round(url: str, token: str | None, task_id: str, calls: int, warmup: int) -> dict:
    out = {}
    async with LeanSession(url, token) as s:
        for tool in TOOLS:
            params = {"name": tool, "arguments": tool_args(tool, task_id)}

            async def call(params=params):
                reply = await s.request("tools/call", params)
                assert not reply["result"].get("isError"), reply

            await time_calls(call, warmup)
            out[tool] = summarize(await time_calls(call, calls))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    pin_client()
    with tempdir() as tmp, jupyter_server(Path(tmp)) as (j_url, j_pid), uvicorn_peer(Path(tmp)) as (u_url, u_pid):
        targets = {SERVERS[0]: (j_url, TOKEN, j_pid), SERVERS[1]: (u_url, None, u_pid)}
        task_ids = {name: await seed(url, token) for name, (url, token, _) in targets.items()}
        sdk: dict[str, list[dict]] = {name: [] for name in SERVERS}
        lean: dict[str, list[dict]] = {name: [] for name in SERVERS}
        for round_no in range(args.rounds):
            order = list(targets.items()) if round_no % 2 == 0 else list(reversed(targets.items()))
            for name, (url, token, pid) in order:
                sdk[name].append(await sdk_round(url, token, pid, task_ids[name], args.calls, args.warmup))
                lean[name].append(await lean_round(url, token, task_ids[name], args.calls, args.warmup))

    print(f"tools/call: {args.calls} sequential calls per tool, median of {args.rounds} alternating rounds")
    print(f"{'client':<6} {'tool':<11} {'server':<18} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv CPU us':>10}")
    for label, runs in (("sdk", sdk), ("lean", lean)):
        for tool in TOOLS:
            for name in SERVERS:
                cpu = f"{med(runs[name], tool, 'server_cpu_us'):>10.0f}" if label == "sdk" else f"{'':>10}"
                print(
                    f"{label:<6} {tool:<11} {name:<18} {med(runs[name], tool, 'calls_per_s'):>8.0f} "
                    f"{med(runs[name], tool, 'p50_ms'):>7.2f} {med(runs[name], tool, 'p99_ms'):>7.2f} {cpu}"
                )
    print("ratios tornado / uvicorn (throughput: higher is better; server CPU: lower is better)")
    ours, peer = SERVERS
    for tool in TOOLS:
        sdk_ratio = med(sdk[ours], tool, "calls_per_s") / med(sdk[peer], tool, "calls_per_s")
        lean_ratio = med(lean[ours], tool, "calls_per_s") / med(lean[peer], tool, "calls_per_s")
        cpu_ratio = med(sdk[ours], tool, "server_cpu_us") / med(sdk[peer], tool, "server_cpu_us")
        print(
            f"  {tool:<11} sdk throughput {sdk_ratio:.2f}  lean throughput {lean_ratio:.2f}  "
            f"server CPU/call {cpu_ratio:.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
