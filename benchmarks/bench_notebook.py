"""Notebook mirroring: latency from a task's progress event to the widget's trait change, and kernel CPU.

Starts a real `jupyter server` with the extension and a real IPython kernel (jupyter_client) that
finds it through PLEXUS_MCP_URL/PLEXUS_MCP_TOKEN. In the kernel, `plexus.run_demo(items=2000)` is mirrored
by a `TaskProgress` widget (comm messages really sent on IOPub); an observer on the bar's `value` records
local time minus the event's `at` (the EventBus publish time, same machine, same clock, millisecond
precision) for each change. The kernel's CPU time (user + system, all its threads) over the task's run is
divided by the wall time. Prints p50/p99/max per run and overall.

    python benchmarks/bench_notebook.py [--items 2000] [--item-delay-ms 5] [--runs 3]

Goal (issue #6): p99 < 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _common import TOKEN, jupyter_server, pin_client, tempdir
from jupyter_client.manager import AsyncKernelManager

CHECKOUT = str(Path(__file__).resolve().parents[1])

CELL = """
import json, resource, time
from plexus_mcp_jupyter import plexus
latencies = []
h = plexus.run_demo(items={items}, item_delay_ms={delay})
w = h.progress()
def on_value(change, state=h.state):
    if state.at is not None:
        latencies.append(time.time() - state.at)
w.bar.observe(on_value, names="value")
t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
h.wait(600)
t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({{"status": h.status, "latencies": latencies, "cpu": cpu, "wall": t1 - t0}}))
"""


async def run_cell(kc, code: str, timeout: float = 600) -> str:
    msg_id = kc.execute(code)
    out = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise RuntimeError(f"{msg['content']['ename']}: {msg['content']['evalue']}")
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--item-delay-ms", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    pin_client()
    with tempdir() as tmp, jupyter_server(Path(tmp)) as (mcp_url, _pid):
        base = mcp_url.removesuffix("plexus/mcp")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_MCP_")}
        env.update(
            PLEXUS_MCP_URL=base,
            PLEXUS_MCP_TOKEN=TOKEN,
            PYTHONPATH=os.pathsep.join(p for p in (CHECKOUT, os.environ.get("PYTHONPATH")) if p),
        )
        km = AsyncKernelManager(kernel_name="python3")
        await km.start_kernel(env=env)
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            await run_cell(kc, "from plexus_mcp_jupyter import plexus; plexus.tasks(limit=1)")  # connect, warm up
            every: list[float] = []
            for i in range(args.runs):
                out = json.loads(
                    (await run_cell(kc, CELL.format(items=args.items, delay=args.item_delay_ms)))
                    .strip()
                    .splitlines()[-1]
                )
                lat = [x * 1000 for x in out["latencies"]]
                every += lat
                print(
                    f"run {i + 1}: {out['status']}, {len(lat)} widget updates in {out['wall']:.1f} s, "
                    f"latency p50 {statistics.median(lat):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, "
                    f"max {max(lat):.1f} ms; kernel CPU {out['cpu']:.2f} s = {100 * out['cpu'] / out['wall']:.1f}% "
                    "of one core"
                )
            print(
                f"all: {len(every)} updates, p50 {statistics.median(every):.1f} ms, "
                f"p99 {pct(every, 0.99):.1f} ms (goal < 100 ms)"
            )
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
