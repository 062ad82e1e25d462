"""The task model: statuses, tasks, stages and progress samples (docs/architecture.md).

These are plain dataclasses with no I/O; the Store persists them and every face serialises them
with `to_dict()`, so the JSON shape of a task is defined once, here.
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidArgument


class TaskStatus(str, enum.Enum):
    """Lifecycle of a task. QUEUED (from its creation) -> RUNNING -> one of the final states."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES

    @classmethod
    def parse(cls, value: str | TaskStatus) -> TaskStatus:
        """Parse a status name case-insensitively, with an error that lists the allowed names."""
        if isinstance(value, TaskStatus):
            return value
        try:
            return cls(str(value).strip().upper())
        except ValueError:
            raise InvalidArgument(f"unknown status {value!r}; {cls.expected(value)}") from None

    @classmethod
    def expected(cls, value: object) -> str:
        """What a bad status name should have been: the allowed names, and QUEUED for "pending" (a task waiting
        to start, which some task systems call pending)."""
        hint = "; a task waiting to start is QUEUED" if str(value).strip().upper() == "PENDING" else ""
        return f"expected one of {', '.join(s.value for s in cls)}{hint}"


FINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class StageStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


def now() -> float:
    """Wall-clock time in epoch seconds: the one clock every stored timestamp uses."""
    return time.time()


def iso(ts: float | None) -> str | None:
    """Epoch seconds to an ISO 8601 UTC string (millisecond precision), None stays None."""
    if ts is None:
        return None
    return _iso(ts)


@functools.lru_cache(maxsize=8192)
def _iso(ts: float) -> str:
    # A pure function of the timestamp, memoized: every listing formats the same few timestamps again.
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str, name: str = "since") -> float:
    """An ISO 8601 date or date-time (naive means UTC) to epoch seconds; `name` is the argument's, for the error."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"{name!r} must be an ISO 8601 date or date-time such as 2026-01-31T12:00:00Z, not {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


# The longest stage name stored (task_stages.name, tasks.current_stage, progress_samples.stage): PostgreSQL refuses
# a longer VARCHAR where SQLite would keep it, so names are cut to this on both (core/progress.py).
STAGE_NAME_MAX = 128


@dataclass
class Stage:
    """One named phase of a task, with its own item counts and ETA."""

    name: str
    order: int
    status: StageStatus = StageStatus.PENDING
    status_message: str | None = None
    total_items: int | None = None
    processed_items: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    estimated_completion_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "order": self.order,
            "status": self.status.value,
            "status_message": self.status_message,
            "total_items": self.total_items,
            "processed_items": self.processed_items,
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "estimated_completion_at": iso(self.estimated_completion_at),
        }


@dataclass
class ProgressSample:
    """A point of a task's progress history."""

    at: float
    stage: str | None
    processed: int
    total: int | None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "stage": self.stage,
            "processed": self.processed,
            "total": self.total,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Moment:
    """The fields of a task's summary that change once it is claimed, at one moment (Task.moment, summary_at)."""

    status: TaskStatus
    current_stage: str | None
    estimated_completion_at: float | None
    progress: dict[str, Any]
    completed_at: float | None
    error_message: str | None


@dataclass
class Task:
    """A unit of long-running work and everything known about it."""

    id: str
    type: str
    status: TaskStatus
    priority: int = 0
    owner: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    created_at: float = field(default_factory=now)
    started_at: float | None = None
    completed_at: float | None = None
    estimated_completion_at: float | None = None
    current_stage: str | None = None
    error_message: str | None = None
    error_details: dict[str, Any] | None = None
    output: Any = None
    stdout_tail: str | None = None
    stderr_tail: str | None = None
    worker: str | None = None
    cancel_requested: bool = False
    stages: list[Stage] = field(default_factory=list)
    owner_role: str | None = None  # the role that dispatched it: its weight under weighted fair share
    retention_seconds: float | None = None  # kept this long once finished (a client's MCP ttl); None: by type
    batch_id: str | None = None  # the batch it was dispatched in (core/batches.py), if any
    retry_of: str | None = None  # the task this one is a new attempt of (retry_tasks), if any
    lease_expires_at: float | None = None  # RUNNING: until when its server's heartbeat holds it (core/leases.py)

    @property
    def progress(self) -> dict[str, Any]:
        """Processed and total items of the current stage (or the last one), and the percentage."""
        stage = next((s for s in self.stages if s.name == self.current_stage), None)
        if stage is None and self.stages:
            stage = self.stages[-1]
        if stage is None:
            return {"stage": None, "processed": 0, "total": None, "percent": None}
        percent = None
        if stage.total_items:
            percent = round(100.0 * stage.processed_items / stage.total_items, 1)
        return {
            "stage": stage.name,
            "processed": stage.processed_items,
            "total": stage.total_items,
            "percent": percent,
        }

    def summary(self) -> dict[str, Any]:
        """The compact form used in lists: enough to decide whether to look closer."""
        return self.summary_at(self.moment())

    def moment(self) -> Moment:
        """What of the summary changes while the task runs, as it is now (cheaper than the summary: an event of
        a running task keeps this, and becomes a summary only if it is published)."""
        return Moment(
            self.status,
            self.current_stage,
            self.estimated_completion_at,
            self.progress,
            self.completed_at,
            self.error_message,
        )

    def summary_at(self, moment: Moment) -> dict[str, Any]:
        """The summary as it was at `moment` (its other fields do not change while the task runs)."""
        return {
            "task_id": self.id,
            "type": self.type,
            "status": moment.status.value,
            "priority": self.priority,
            "description": self.description,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(moment.completed_at),
            "estimated_completion_at": iso(moment.estimated_completion_at),
            "current_stage": moment.current_stage,
            "progress": moment.progress,
            "error_message": moment.error_message,
            "owner": self.owner,
            "batch_id": self.batch_id,
        }

    def list_row(self, type_text: str | None) -> dict[str, Any]:
        """A listing's row (list_tasks, the tasks resource, the REST list): the summary without what says nothing
        about this task. Left out: null fields (progress's too), `description` when it is `type_text` (the type's
        own text, every task of the type has it), `current_stage` when `progress.stage` names it (one source).
        In TaskListRow's field order; get_task and the events keep the full summary."""
        moment = self.moment()
        progress = {key: value for key, value in moment.progress.items() if value is not None}
        row: dict[str, Any] = {"task_id": self.id, "type": self.type, "status": moment.status.value}
        row["priority"] = self.priority
        optional = (
            ("description", self.description if self.description != type_text else None),
            ("created_at", iso(self.created_at)),
            ("started_at", iso(self.started_at)),
            ("completed_at", iso(moment.completed_at)),
            ("estimated_completion_at", iso(moment.estimated_completion_at)),
            ("current_stage", moment.current_stage if moment.current_stage != progress.get("stage") else None),
        )
        row.update((key, value) for key, value in optional if value is not None)
        row["progress"] = progress
        for key, value in (("error_message", moment.error_message), ("owner", self.owner), ("batch_id", self.batch_id)):
            if value is not None:
                row[key] = value
        return row

    def to_dict(self) -> dict[str, Any]:
        """The full form: summary plus parameters, stages, output and log tails."""
        data = self.summary()
        data.update(
            {
                "params": self.params,
                "error_details": self.error_details,
                "output": self.output,
                "stdout_tail": self.stdout_tail,
                "stderr_tail": self.stderr_tail,
                "worker": self.worker,
                "cancel_requested": self.cancel_requested,
                "stages": [s.to_dict() for s in self.stages],
                "retry_of": self.retry_of,
            }
        )
        return data
