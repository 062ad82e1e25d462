"""The registry of task types: name -> TaskType, whose function is named by import path so workers can load it.

The core registers its own type (`demo`); a package with task types of its own registers them when the
runtime is built (the evaluations package: evaluations/task_type.py), so the core names no module of theirs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument
from .resources import DEFAULT_NEEDS, check_amount

ParamsCheck = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class TaskType:
    """A kind of task: where its function lives, how its parameters are checked and how its tasks run."""

    name: str
    target: str  # "package.module:function", imported by the worker
    description: str
    validate: ParamsCheck | None = None
    # An idempotent task may be re-queued after a server crash (or a lost Dask worker) instead of failed.
    idempotent: bool = False
    # Created only by the service that owns it (which checked its parameters), never directly by a client.
    internal: bool = False
    # What one task needs to run (core/resources.py): worker slots, memory_mb, named resources such as gpu.
    resources: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_NEEDS))
    # Runs in a fresh worker process discarded after it, never in a reused one (untrusted or memory-hungry code).
    isolated: bool = False
    # Its module is imported once in the local executor's forkserver, so that no worker pays for its imports
    # (worth it for heavy ones: pandas, pyarrow).
    preload: bool = False
    # For an internal type: the tools that create its tasks, named when a client tries another way.
    created_by: str = ""

    def __post_init__(self) -> None:
        module, colon, function = self.target.partition(":")
        if not self.name or not module or not colon or not function:
            raise InvalidArgument(
                f"task type {self.name!r}: target must be 'package.module:function', not {self.target!r}"
            )

    @property
    def module(self) -> str:
        """The module of its function (what a worker imports)."""
        return self.target.partition(":")[0]


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


def type_text(name: str) -> str | None:
    """The description every task of this type gets unless given its own (None for a type no longer registered)."""
    task_type = _REGISTRY.get(name)
    return task_type.description if task_type is not None else None


def task_type_names() -> list[str]:
    return sorted(_REGISTRY)


def preload_modules() -> list[str]:
    """The modules of the registered task types that ask to be imported ahead of their tasks (`preload`)."""
    return sorted({t.module for t in _REGISTRY.values() if t.preload})


def load_target(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)  # type: ignore[no-any-return]


def _validate_demo(params: Mapping[str, Any]) -> dict[str, Any]:
    # demo's checks are a pydantic model: imported where a task is created (the server), never in a worker,
    # which imports this module to load task functions.
    from .demo import validate_params

    return validate_params(params)


def _register_builtin() -> None:
    register_task_type(
        TaskType(
            name="demo",
            target="plexus_mcp_jupyter.core.demo:run_demo",
            description="Simulated work in three stages, with optional failure.",
            validate=_validate_demo,
        )
    )


_register_builtin()
