"""Task functions used by the tests (imported by worker processes by path)."""

from __future__ import annotations

import time


def stubborn(ctx) -> None:
    """Reports a stage, then ignores cancellation: only a forced stop ends it."""
    ctx.stage("Stubborn", 1)
    while True:
        time.sleep(0.05)
