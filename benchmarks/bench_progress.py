"""Progress latency: from the worker's progress report to the MCP client's notification.

Starts a real `jupyter server` with the extension, whose demo task stamps each progress report with
the wall-clock time it was made (benchmarks/_clocked_tasks.py; same machine, same clock), then calls
`run_demo_task` (2,000 items) with a progress token from the official SDK client, and measures
receive time minus stamp for every notification. Prints p50/p99/max over several runs.

    python benchmarks/bench_progress.py [--items 2000] [--runs 3] [--item-delay-ms 1]

Goal (issue #4): p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from _common import HERE, client, jupyter_server, pin_client, tempdir


async def one_run(url: str, items: int, delay: float) -> list[float]:
    latencies: list[float] = []

    async def on_progress(progress, total, message):
        now = time.time()
        if message and "@" in message:
            latencies.append(now - float(message.rsplit("@", 1)[1]))

    async with client(url) as c:
        result = await c.call_tool(
            "run_demo_task", {"items": items, "item_delay_ms": delay}, progress_callback=on_progress
        )
        assert not result.is_error, result
    return latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--item-delay-ms", type=float, default=1.0)
    args = parser.parse_args()
    pin_client()
    bootstrap = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import _clocked_tasks; _clocked_tasks.install(); "
        "from jupyter_server.serverapp import main; sys.exit(main())"
    )
    all_latencies: list[float] = []
    with tempdir() as tmp, jupyter_server(Path(tmp), python_args=["-c", bootstrap]) as (url, _pid):
        for _ in range(args.runs):
            all_latencies += await one_run(url, args.items, args.item_delay_ms)
    ms = sorted(1000 * x for x in all_latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(
        f"progress notifications: {len(ms)} over {args.runs} runs of {args.items} items ({args.item_delay_ms} ms/item)"
    )
    print(
        f"worker report -> client notification: p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
        f"max {ms[-1]:.1f} ms  (goal p99 < 50 ms: {'met' if p99 < 50 else 'NOT met'})"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
