"""The core: tasks, their store, manager, events and executors. Usable without any server.

The public names are loaded on first use (PEP 562): a worker process imports `core.worker` (and what a task
needs), which must not pull the manager, the store (SQLAlchemy) and the executors through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below are, for type checkers; loaded lazily at run time
    from .errors import Expired, InvalidArgument, NotFound, PlexusError
    from .events import Event, EventBus
    from .manager import CancelOutcome, TaskManager
    from .models import ProgressSample, Stage, StageStatus, Task, TaskStatus
    from .store import Store, TaskFilter

_MODULES = {
    "CancelOutcome": "manager",
    "Event": "events",
    "EventBus": "events",
    "Expired": "errors",
    "InvalidArgument": "errors",
    "NotFound": "errors",
    "PlexusError": "errors",
    "ProgressSample": "models",
    "Stage": "models",
    "StageStatus": "models",
    "Store": "store",
    "Task": "models",
    "TaskFilter": "store",
    "TaskManager": "manager",
    "TaskStatus": "models",
}

__all__ = [
    "CancelOutcome",
    "Event",
    "EventBus",
    "Expired",
    "InvalidArgument",
    "NotFound",
    "PlexusError",
    "ProgressSample",
    "Stage",
    "StageStatus",
    "Store",
    "Task",
    "TaskFilter",
    "TaskManager",
    "TaskStatus",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
