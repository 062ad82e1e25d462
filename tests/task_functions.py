"""Task functions used by the tests (imported by worker processes by path)."""

from __future__ import annotations

import time
from typing import Any


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


def noisy_demo(ctx, **params):
    """The demo task, writing to stdout through Python and straight to file descriptor 1."""
    import os
    import sys

    from plexus_mcp_jupyter.core.demo import run_demo

    print("noise on sys.stdout")
    sys.stdout.flush()
    os.write(1, b"noise on fd 1\n")
    return run_demo(ctx, **params)


def use_noisy_demo() -> None:
    """Make 'demo' tasks noisy in this process (used by the stdio test's server)."""
    from plexus_mcp_jupyter.core import demo
    from plexus_mcp_jupyter.core.tasks import TaskType, register_task_type

    register_task_type(TaskType("demo", "tests.task_functions:noisy_demo", "noisy demo", demo.validate_params))


def record_client_came(path: str) -> None:
    """Append a line to `path` each time this process's evaluation service is told a client came (the stdio test's
    server: MCPEndpoint.arrived -> EvaluationService.client_came)."""
    from plexus_mcp_jupyter.evaluations.service import EvaluationService

    came = EvaluationService.client_came

    def told(self) -> None:
        with open(path, "a") as f:
            f.write("came\n")
        came(self)

    EvaluationService.client_came = told


def record_warm_start(path: str) -> None:
    """Append a JSON line to `path` as this process's start-up rehearsals end (the endpoint's, each call through the
    SDK's kernel; the evaluation service's, each `_rehearse`), at the endpoint's first request (`arrived`), and
    after the first create_evaluation: the modules it imported, the statements it compiled (SQLAlchemy's compiled
    cache) and the threads it started, that were not there before it (the stdio warm-start test's server)."""
    import json
    import sys
    import threading

    from plexus_mcp_jupyter.endpoint import transport
    from plexus_mcp_jupyter.evaluations.service import EvaluationService

    def record(**fields: Any) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"t": time.monotonic(), **fields}) + "\n")

    rehearse_call, rehearse, arrived, create = (
        transport.rehearse_call,
        EvaluationService._rehearse,
        transport.MCPEndpoint.arrived,
        EvaluationService.create,
    )

    async def endpoint_rehearsal(*args: Any, **kwargs: Any) -> Any:
        try:
            return await rehearse_call(*args, **kwargs)
        finally:
            record(event="endpoint rehearsal")

    def evaluation_rehearsal(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            rehearse(self, *args, **kwargs)
        finally:
            record(event="evaluation rehearsal")

    def told(self: Any) -> None:
        if not self._arrived:
            record(event="arrived")
        arrived(self)

    created: list[int] = []

    async def first_create(self: Any, *args: Any, **kwargs: Any) -> Any:
        if created:
            return await create(self, *args, **kwargs)
        created.append(1)
        cache = self.manager.store.engine._compiled_cache
        modules, compiled, threads = set(sys.modules), {c.string for c in cache.values()}, set(threading.enumerate())
        try:
            return await create(self, *args, **kwargs)
        finally:
            record(
                event="first create",
                modules=sorted(set(sys.modules) - modules),
                compiled=sorted({c.string for c in cache.values()} - compiled),
                threads=sorted(t.name for t in set(threading.enumerate()) - threads),
            )

    transport.rehearse_call = endpoint_rehearsal  # type: ignore[assignment]
    EvaluationService._rehearse = evaluation_rehearsal  # type: ignore[method-assign]
    transport.MCPEndpoint.arrived = told  # type: ignore[method-assign]
    EvaluationService.create = first_create  # type: ignore[method-assign]


def circular(ctx) -> list:
    """Returns a value JSON cannot express at all."""
    loop: list = []
    loop.append(loop)
    return loop


def long_idempotent(ctx) -> None:
    """Runs until stopped; registered as idempotent by the tests."""
    import time

    ctx.stage("Working", 1)
    while True:
        time.sleep(0.02)
        ctx.check_cancelled()


def warns(ctx) -> str:
    """Raises a Python warning (sent live to the MCP sessions following the task) and completes."""
    import warnings

    warnings.warn("the data looks odd", UserWarning, stacklevel=1)
    return "done"


def worker_facts(ctx) -> dict:
    """What the worker running it sees: an environment variable the tests set, its parent (the forkserver) and
    whether the evaluation runner was imported before the task (by the forkserver's preload)."""
    import os
    import sys

    return {
        "late": os.environ.get("PLEXUS_TEST_LATE"),
        "parent": os.getppid(),
        "runner_loaded": "plexus_mcp_jupyter.evaluations.runner" in sys.modules,
    }
