"""Thread pools whose first thread is started ahead of their first call."""

from __future__ import annotations

from concurrent.futures import Executor


def start_one_thread(pool: Executor) -> None:
    """Start one of `pool`'s threads now. A ThreadPoolExecutor starts its threads on demand, and `submit` then
    waits until the new thread runs (it needs a core and the GIL): on a server that has just become ready, 5-10 ms
    for each pool, paid on the event loop by the first create_evaluation (three pools: the catalog's, the store
    calls', the local executor's start threads; 23 ms measured). A no-op leaves the thread idle, so the next
    submit reuses it."""
    pool.submit(int)
