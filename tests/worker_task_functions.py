"""Task functions the warm-worker tests use (imported by worker processes by path)."""

from __future__ import annotations

import os
import time


def crash_exit(ctx) -> None:
    """Ends its process without a word, as a C extension calling exit() would."""
    ctx.stage("Crashing", 1)
    ctx.flush()
    os._exit(3)


def segfault(ctx) -> None:
    """Dereferences a null pointer: the worker dies of SIGSEGV."""
    import ctypes

    ctx.stage("Crashing", 1)
    ctypes.string_at(0)


def raise_error(ctx) -> None:
    raise ValueError("this task fails on purpose")


def ask_twice(ctx, word: str) -> list:
    """Asks the server to echo `word` twice over the duplex pipe (TaskContext.request)."""
    return [ctx.request("echo", f"{word}-1", timeout=20), ctx.request("echo", f"{word}-2", timeout=20)]


def grow(ctx, mb: int = 80) -> int:
    """Holds `mb` MB while it runs; the worker's resident memory stays high after it returns."""
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    grow.kept = block  # type: ignore[attr-defined]  # kept in the worker: what a leaky task does
    return len(block) // 2**20


def pid(ctx) -> int:
    time.sleep(0.01)
    return os.getpid()


def niceness(ctx) -> int:
    return os.nice(0)


class Unreadable(Exception):
    """Pickles in the worker, cannot be unpickled on the server (its __init__ wants two arguments)."""

    def __init__(self, a, b) -> None:
        super().__init__(a)


def odd_messages(ctx) -> str:
    """Sends one stage message the worker cannot pickle and one the server cannot unpickle, then ends."""
    ctx.stage("Unpicklable", 1, message=lambda: None)
    ctx.stage("Unreadable", 1, message=Unreadable(1, 2))
    ctx.stage("Fine", 1)
    return "ended"
