"""Many subscribed sessions: does every one of them learn every final state, and at what cost?

Starts a real `jupyter server` with the extension. N SDK client sessions (default 100) each dispatch
T demo tasks (default 10), subscribe to each task's resource, and re-read a task whenever it is
announced, until every task is seen in a final state or the deadline passes. Prints the final states
lost (goal 0), the time to the last one, and the server's CPU time and peak memory.

    python benchmarks/bench_sessions.py [--sessions 100] [--tasks 10] [--items 20] [--deadline 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import warnings
from pathlib import Path

from _common import client, cpu_seconds, jupyter_server, memory_kib, pin_client, tempdir
from mcp.types import ResourceUpdatedNotification, ServerNotification

warnings.filterwarnings("ignore")  # resources/subscribe is the 2025-era API, deprecated for 2026 clients
FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


async def one_session(
    url: str, tasks: int, items: int, deadline: float, ready: asyncio.Event, connected: asyncio.Semaphore
) -> int:
    """Returns how many of its tasks' final states this session never saw."""
    announced: set[str] = set()
    woken = asyncio.Event()

    async def on_message(message):
        if isinstance(message, ServerNotification) and isinstance(message, ResourceUpdatedNotification):
            announced.add(str(message.params.uri))
            woken.set()

    final: dict[str, str] = {}
    async with client(url, message_handler=on_message) as c:
        # Server notifications on the 2025 wire ride the session's GET stream, which the client opens
        # in the background after the handshake; whatever is sent before it is up is lost by design.
        # A canary task that reports progress for a while proves the stream is up before we count.
        # A long canary task, cancelled once subscribed to: its end (queued or running) is announced,
        # which proves the stream is up before we count.
        try:
            canary = await c.call_tool("run_demo_task", {"items": 100_000, "item_delay_ms": 5})
            canary_id = canary.structured_content["task_id"]
            await c.subscribe_resource(f"plexus://tasks/{canary_id}")
            await c.call_tool("cancel_tasks", {"task_ids": [canary_id]})
            await asyncio.wait_for(woken.wait(), 60)
            await c.unsubscribe_resource(f"plexus://tasks/{canary_id}")
            announced.clear()
        finally:
            connected.release()  # never leave the others waiting for this session
        await ready.wait()
        ids = []
        for _ in range(tasks):
            result = await c.call_tool("run_demo_task", {"items": items, "item_delay_ms": 0})
            ids.append(result.structured_content["task_id"])
            await c.subscribe_resource(f"plexus://tasks/{ids[-1]}")
        # A task may have ended before its subscription: read each once, then follow announcements.
        pending = {f"plexus://tasks/{i}" for i in ids}
        announced |= pending
        while pending and time.monotonic() < deadline:
            woken.clear()  # before reading: an announcement during the reads must wake the next wait
            for uri in sorted(announced & pending):
                announced.discard(uri)
                status = json.loads((await c.read_resource(uri)).contents[0].text)["status"]
                if status in FINAL:
                    final[uri] = status
                    pending.discard(uri)
            if pending and not (announced & pending):
                try:
                    await asyncio.wait_for(woken.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
    return tasks - len(final)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=300.0)
    args = parser.parse_args()
    pin_client()
    with tempdir() as tmp, jupyter_server(Path(tmp), extra_env={"PLEXUS_MCP_MAX_CONCURRENCY": "4"}) as (url, pid):
        cpu0 = cpu_seconds(pid)
        started = time.monotonic()
        ready = asyncio.Event()
        deadline = started + args.deadline
        connected = asyncio.Semaphore(0)
        runs = [
            asyncio.create_task(one_session(url, args.tasks, args.items, deadline, ready, connected))
            for _ in range(args.sessions)
        ]
        for _ in range(args.sessions):
            await connected.acquire()
        ready.set()
        lost = sum(await asyncio.gather(*runs))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(pid) - cpu0
        peak = memory_kib(pid, "VmHWM")
    total = args.sessions * args.tasks
    print(f"{args.sessions} subscribed sessions x {args.tasks} tasks ({args.items} items each): {total} tasks")
    print(f"final states lost: {lost} (goal 0); all seen within {elapsed:.1f} s")
    print(f"server CPU {cpu:.1f} s ({1000 * cpu / total:.1f} ms per task), peak RSS {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
