"""The registry of task types: name -> task function, by import path so workers can load it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument
from .resources import DEFAULT_NEEDS, check_amount


@dataclass(frozen=True)
class TaskType:
    """A kind of task: where its function lives and how its parameters are checked."""

    name: str
    target: str  # "package.module:function", imported by the worker
    description: str
    validate: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    # An idempotent task may be re-queued after a server crash instead of failed.
    idempotent: bool = False
    # Created only by the service that owns it (which checked its parameters), never directly by a client.
    internal: bool = False
    # What one task needs to run (core/resources.py): worker slots, memory_mb, named resources such as gpu.
    resources: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_NEEDS))
    # Runs in a fresh worker process discarded after it, never in a reused one (untrusted or memory-hungry code).
    isolated: bool = False


_REGISTRY: dict[str, TaskType] = {}


def register_task_type(task_type: TaskType) -> TaskType | None:
    """Register (or replace) a task type; returns the one it replaced, if any."""
    for name, amount in task_type.resources.items():
        check_amount(name, amount, f"the resources of task type {task_type.name!r}")
    previous = _REGISTRY.get(task_type.name)
    _REGISTRY[task_type.name] = task_type
    return previous


def unregister_task_type(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_task_type(name: str) -> TaskType:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(f"unknown task type {name!r}; expected one of {', '.join(sorted(_REGISTRY))}") from None


def task_type_names() -> list[str]:
    return sorted(_REGISTRY)


def load_target(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)  # type: ignore[no-any-return]


def _register_builtin() -> None:
    from . import demo

    register_task_type(
        TaskType(
            name="demo",
            target="plexus_mcp_jupyter.core.demo:run_demo",
            description="Simulated work in three stages, with optional failure.",
            validate=demo.validate_params,
        )
    )
    register_task_type(
        TaskType(
            name="evaluation",
            target="plexus_mcp_jupyter.evaluations.runner:run_evaluation",
            description="An evaluation of a scorer on a dataset (created by create_evaluation).",
            validate=_evaluation_params,
            idempotent=True,  # its items are keyed by position: a re-run after a crash rewrites them
            internal=True,  # its parameters name code to import and records to write: only the service makes them
            # Seconds long, so a fresh process costs nothing that matters; it loads whole datasets (memory a
            # process keeps after freeing it) and runs scorer code named by the caller: none of that may
            # outlive the evaluation in a worker that then serves another key's tasks.
            isolated=True,
        )
    )


def _evaluation_params(params: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(params.get("evaluation_id"), str) or not isinstance(params.get("scores"), list):
        raise InvalidArgument("evaluation tasks are created by create_evaluation (MCP) or POST "
                              "plexus/api/evaluations, which check their parameters")
    return dict(params)


_register_builtin()
