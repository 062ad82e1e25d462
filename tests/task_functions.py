"""Task functions used by the tests (imported by worker processes by path)."""

from __future__ import annotations

import time


def stubborn(ctx) -> None:
    """Reports a stage, then ignores cancellation: only a forced stop ends it."""
    ctx.stage("Stubborn", 1)
    while True:
        time.sleep(0.05)


def big_output(ctx, size: int = 200_000) -> dict:
    """Returns more output than the server keeps, and prints to stdout and stderr."""
    print("hello from the task's stdout")
    ctx.log("a line for the task's stderr tail")
    return {"blob": "x" * size}
