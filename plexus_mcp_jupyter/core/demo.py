"""The demo task (Plexus semantics): Setup, Processing of `items` items, Finalizing.

It exists to exercise the whole path an assistant uses (dispatch, progress, failure,
cancellation) without any real workload.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any

from .context import TaskContext
from .errors import InvalidArgument

DEFAULT_ITEMS = 2000
MAX_ITEMS = 1_000_000
DEFAULT_ITEM_DELAY_MS = 5.0
MAX_ITEM_DELAY_MS = 10_000.0
SETUP_STEPS = 3
FINALIZE_STEPS = 2


def validate_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check demo parameters and fill defaults; the error names the value and the allowed range."""
    allowed = {"items", "item_delay_ms", "fail", "fail_at", "seed"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown demo parameter(s) {unknown}; allowed: {sorted(allowed)}")
    items = params.get("items", DEFAULT_ITEMS)
    if isinstance(items, bool) or not isinstance(items, int) or not 1 <= items <= MAX_ITEMS:
        raise InvalidArgument(f"items must be a whole number from 1 to {MAX_ITEMS:,}, not {items!r}")
    delay = params.get("item_delay_ms", DEFAULT_ITEM_DELAY_MS)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= MAX_ITEM_DELAY_MS:
        raise InvalidArgument(
            f"item_delay_ms must be a number of milliseconds from 0 to {MAX_ITEM_DELAY_MS:g}, not {delay!r}"
        )
    fail = params.get("fail", False)
    if not isinstance(fail, bool):
        raise InvalidArgument(f"fail must be true or false, not {fail!r}")
    fail_at = params.get("fail_at")
    if fail_at is not None and (isinstance(fail_at, bool) or not isinstance(fail_at, int) or not 1 <= fail_at <= items):
        raise InvalidArgument(f"fail_at must be an item number from 1 to items ({items}), not {fail_at!r}")
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgument(f"seed must be a whole number, not {seed!r}")
    return {"items": items, "item_delay_ms": float(delay), "fail": fail, "fail_at": fail_at, "seed": seed}


def run_demo(
    ctx: TaskContext,
    items: int = DEFAULT_ITEMS,
    item_delay_ms: float = DEFAULT_ITEM_DELAY_MS,
    fail: bool = False,
    fail_at: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Process `items` simulated items; fail at `fail_at`, or at a random 30-70% point if `fail`."""
    delay = item_delay_ms / 1000.0
    failure_item = fail_at
    if failure_item is None and fail:
        rng = random.Random(seed)
        failure_item = max(1, int(items * rng.uniform(0.3, 0.7)))

    ctx.stage("Setup", SETUP_STEPS, "Preparing the simulated workload")
    for _ in range(SETUP_STEPS):
        _sleep(ctx, delay)
        ctx.advance()

    ctx.stage("Processing", items, f"Processing {items} items")
    started = time.monotonic()
    for i in range(1, items + 1):
        _sleep(ctx, delay)
        if failure_item is not None and i == failure_item:
            ctx.log(f"Simulated failure at item {i} of {items}", "error")
            ctx.flush()
            raise RuntimeError(f"Simulated failure at item {i} of {items}")
        ctx.advance()
    elapsed = time.monotonic() - started
    ctx.log(f"Processed {items} items in {elapsed:.2f} s")

    ctx.stage("Finalizing", FINALIZE_STEPS, "Writing the summary")
    for _ in range(FINALIZE_STEPS):
        _sleep(ctx, delay)
        ctx.advance()
    return {
        "items_processed": items,
        "processing_seconds": round(elapsed, 3),
        "items_per_second": round(items / elapsed, 1) if elapsed > 0 else None,
    }


def _sleep(ctx: TaskContext, seconds: float) -> None:
    # Sleep in short slices so a cancellation is noticed even with long item delays.
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))
        ctx.check_cancelled()
