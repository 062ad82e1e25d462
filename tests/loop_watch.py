"""Whether a server's event loop kept answering while heavy work ran, measured so that load cannot fake it.

A wall-clock bound on health's latency ("under 1 s while a 1 MiB scorecard is parsed") flakes on a machine at a
load of 10: the loop waits for a core, and so does every answer. What the hardening tests mean is that the heavy
work does not run on the event loop. So `HealthWatch` asks for health again and again and, between two answers,
reads from the kernel's schedstat of the server's loop thread (this process's, for a Jupyter server under
pytest-jupyter; a server process's main thread otherwise):

- the loop thread's CPU time: work on the loop is CPU of that thread, while waiting for a core, or for the GIL a
  parsing thread holds, is not. A parse moved onto the loop puts all its CPU (a second or more for the cards these
  tests send) into one stretch;
- the time the loop was away: the wall time less the pause between requests and less the time the loop thread
  (and, for a server in another process, this test's thread) waited for a core. Work on the loop that waits
  (pyarrow reading a file with threads of its own, a blocking read) shows here.

The largest of each during the work must stay under a bound: `LOOP_CPU_BOUND` / `STALL_BOUND`, or `RATIO` times
the largest of the same server idle, measured first in the same test, whichever is larger.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2

LOOP_CPU_BOUND = 0.5  # CPU seconds the loop thread may spend between two health answers during the work
STALL_BOUND = 5.0  # seconds the loop may be away (not waiting for a core) between two answers during the work
RATIO = 10.0  # ... or this many times the most of the same server idle, if that is more
IDLE_ROUNDS = 10
PAUSE = 0.05  # seconds between two health requests


def thread_clock(pid: int | None = None) -> Callable[[], tuple[float, float]]:
    """(CPU seconds, seconds spent waiting for a core) of a server's event loop thread so far, from schedstat:
    this process's current thread (call it on the loop) when `pid` is None, else process `pid`'s main thread (its
    loop, for uvicorn and tornado)."""
    path = (
        f"/proc/{os.getpid()}/task/{threading.get_native_id()}/schedstat"
        if pid is None
        else f"/proc/{pid}/task/{pid}/schedstat"
    )

    def read() -> tuple[float, float]:
        with open(path) as handle:
            cpu, waited, _ = handle.read().split()
        return int(cpu) / 1e9, int(waited) / 1e9

    return read


class HealthWatch:
    """Health asked every PAUSE s while the work runs; (loop CPU, loop away) between consecutive answers."""

    def __init__(self, ask: Callable[[], Awaitable[Any]], pid: int | None) -> None:
        self.ask = ask
        self.server = thread_clock(pid)
        self.client = thread_clock() if pid is not None else None  # in-process: the same thread
        self.idle: list[tuple[float, float]] = []
        self.during: list[tuple[float, float]] = []
        self._last: tuple[float, float, float] | None = None

    def _now(self) -> tuple[float, float, float]:
        cpu, waited = self.server()
        if self.client is not None:
            waited += self.client()[1]
        return time.monotonic(), cpu, waited

    async def once(self, into: list[tuple[float, float]], pause: float = PAUSE) -> None:
        """Ask once; the stretch since the previous answer (or the start), `pause` of it left out, into `into`."""
        last = self._last or self._now()
        await self.ask()
        now = self._now()
        into.append((now[1] - last[1], max(0.0, now[0] - last[0] - (now[2] - last[2]) - pause)))
        self._last = now

    async def stretches(self, into: list[tuple[float, float]], until: Callable[[], bool]) -> None:
        self._last = self._now()
        while not until():
            await self.once(into)
            await asyncio.sleep(PAUSE)

    async def measure_idle(self) -> None:
        await self.stretches(self.idle, lambda: len(self.idle) >= IDLE_ROUNDS)

    async def around(self, work: Awaitable[Any]) -> Any:
        """Run `work` while watching; its result."""
        task = asyncio.ensure_future(work)
        await self.stretches(self.during, task.done)
        return task.result()

    def bounds(self) -> tuple[float, float]:
        """(loop CPU, loop away) bounds for one stretch during the work."""
        idle_cpu = max((c for c, _ in self.idle), default=0.0)
        idle_away = max((a for _, a in self.idle), default=0.0)
        return max(LOOP_CPU_BOUND, RATIO * idle_cpu), max(STALL_BOUND, RATIO * idle_away)

    def check(self, away: bool = True) -> None:
        """Assert the bounds (`away=False`: the CPU one alone, for asks at irregular times)."""
        cpu_bound, away_bound = self.bounds()
        cpu = max((c for c, _ in self.during), default=0.0)
        worst_away = max((a for _, a in self.during), default=0.0)
        idle = [round(max(x[i] for x in self.idle) * 1000, 1) for i in (0, 1)] if self.idle else []
        print(  # shown with -s, and in a failure's captured output
            f"between two health answers: idle max (loop CPU, away) {idle} ms; during the work max loop CPU "
            f"{cpu * 1000:.1f} ms (bound {cpu_bound * 1000:.0f}), away {worst_away * 1000:.1f} ms (bound "
            f"{away_bound * 1000:.0f}) over {len(self.during)} answers"
        )
        assert self.during, "health was not asked while the work ran"
        stretches = [(round(c, 3), round(a, 3)) for c, a in self.during]
        assert cpu < cpu_bound, (
            f"the event loop ran {cpu:.2f} s of CPU between two health answers during the work (bound "
            f"{cpu_bound:.2f} s): heavy work ran on the loop; (CPU, away) stretches {stretches}"
        )
        assert not away or worst_away < away_bound, (
            f"the event loop was away {worst_away:.2f} s between two health answers during the work, not waiting for a "
            f"core (bound {away_bound:.2f} s): it waited on the work; (CPU, away) stretches {stretches}"
        )


async def watched(ask: Callable[[], Awaitable[Any]], work: Callable[[], Awaitable[Any]], pid: int | None = None) -> Any:
    """The result of `work()` (started once the idle stretches are measured), after checking that the server's loop
    kept answering `ask` (health) while it ran."""
    watch = HealthWatch(ask, pid)
    await watch.measure_idle()
    result = await watch.around(work())
    watch.check()
    return result


@asynccontextmanager
async def health_watch(url: str, pid: int | None = None) -> AsyncIterator[HealthWatch]:
    """`GET url` (health) while the block runs, the idle stretches measured first; checked at the block's end."""
    async with httpx2.AsyncClient(timeout=60) as http:

        async def ask() -> None:
            response = await http.get(url)
            assert response.status_code == 200, response.text

        watch = HealthWatch(ask, pid)
        await watch.measure_idle()
        done = asyncio.Event()
        watcher = asyncio.create_task(watch.stretches(watch.during, done.is_set))
        try:
            yield watch
        finally:
            done.set()
            await watcher
    watch.check()
