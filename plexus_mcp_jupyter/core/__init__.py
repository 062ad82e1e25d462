"""The core: tasks, their store, manager, events and executors. Usable without any server."""

from .errors import Expired, InvalidArgument, NotFound, PlexusError
from .events import Event, EventBus
from .manager import CancelOutcome, TaskManager
from .models import ProgressSample, Stage, StageStatus, Task, TaskStatus
from .store import Store, TaskFilter

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
