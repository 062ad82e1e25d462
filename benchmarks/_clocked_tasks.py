"""A demo task that stamps each progress report with the wall-clock time it was made (benchmarks only).

Registered as task type "demo" in the server the progress benchmark starts, so the MCP tool
`run_demo_task` runs the real demo code path with a clock in each progress message.
"""

from __future__ import annotations

import time
from typing import Any

from plexus_mcp_jupyter.core import demo
from plexus_mcp_jupyter.core.tasks import TaskType, register_task_type


class _ClockedContext:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def advance(self, n: int = 1, message: str | None = None) -> None:
        self._ctx.advance(n, message=f"@{time.time():.6f}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def clocked_demo(ctx: Any, **params: Any) -> Any:
    return demo.run_demo(_ClockedContext(ctx), **params)


def install() -> None:
    register_task_type(
        TaskType("demo", "_clocked_tasks:clocked_demo", "demo with clocked progress", demo.validate_params)
    )
