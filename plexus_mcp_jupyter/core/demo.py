"""The demo task (Plexus semantics): Setup, Processing of `items` items, Finalizing.

It exists to exercise the whole path an assistant uses (dispatch, progress, failure,
cancellation) without any real workload.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, Strict

from .context import TaskContext
from .errors import InvalidArgument
from .requests import Number, Priority, RequestModel

DEFAULT_ITEMS = 2000
MAX_ITEMS = 1_000_000
DEFAULT_ITEM_DELAY_MS = 5.0
MAX_ITEM_DELAY_MS = 10_000.0
SETUP_STEPS = 3
FINALIZE_STEPS = 2


class DemoParams(RequestModel):
    """The demo task's parameters, declared once: MCP's run_demo_task publishes them (with priority), a demo spec's
    params are checked with them (REST, batches, the CLI's file), and the notebook's run_demo builds them."""

    items: Annotated[int, Number] = Field(
        DEFAULT_ITEMS, ge=1, le=MAX_ITEMS, description=f"Items to process in the Processing stage, 1 to {MAX_ITEMS:,}"
    )
    item_delay_ms: Annotated[float, Number] = Field(
        DEFAULT_ITEM_DELAY_MS,
        ge=0,
        le=MAX_ITEM_DELAY_MS,
        description=f"Simulated work per item, in milliseconds (0 to {MAX_ITEM_DELAY_MS:g})",
    )
    fail: Annotated[bool, Strict()] = Field(False, description="Fail at a random item between 30% and 70% of the way")
    fail_at: Annotated[int | None, Number] = Field(
        None, ge=1, description="Fail exactly at this item number (1 to items)"
    )
    seed: Annotated[int | None, Number] = Field(
        None, description="Seed of the random failure point, for repeatable runs"
    )


class RunDemo(DemoParams):
    """Start the demo task: its parameters and its priority (MCP's run_demo_task)."""

    priority: Priority = 0


def validate_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check demo parameters and fill defaults (the task type's validator); the error names the field, the value
    and the allowed range."""
    return checked_params(DemoParams.parse(params))


def checked_params(checked: DemoParams) -> dict[str, Any]:
    """The task's params from a parsed request (run_demo_task's RunDemo, its priority left out), checked as
    `validate_params` checks them: the tool passes them on as checked, not parsed a second time."""
    if checked.fail_at is not None and checked.fail_at > checked.items:  # depends on two fields: checked here
        raise InvalidArgument(
            f"fail_at must be an item number from 1 to items ({checked.items}), not {checked.fail_at!r}"
        )
    return checked.model_dump(exclude={"priority"})


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
