"""TaskState: the kernel's live copy of one task, fed by the event stream, observed by widgets and handles.

State is traitlets, so widgets react with `observe` and never poll. Updates are coalesced here, once for
every view: a change of status or stage applies at once, a progress-only change at most every
`min_interval` seconds (the latest one wins, a timer applies it at the end of the window), so a 2,000-item
task costs a widget at most ~20 updates a second, not one per item. A final state always applies at once
and nothing after it does.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

from traitlets import Bool, Float, HasTraits, Int, Unicode

# The task statuses, as the server's core.models.TaskStatus defines them (checked by a test; the core is
# not imported here because it brings the server's store with it).
TASK_STATUSES = ("QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
FINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
EVALUATION_STATUSES = ("SETUP", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
SETUP_STAGE = "Setup"
MIN_INTERVAL = 0.05  # seconds between progress-only updates: 20 a second at most


def parse_time(value: str | None) -> float | None:
    """An ISO 8601 timestamp from the server to epoch seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def evaluation_status(task_status: str, stage: str | None) -> str:
    """An evaluation's status from its task's (the rule of the server's EvaluationStatus.of)."""
    if task_status == "QUEUED" or (task_status == "RUNNING" and stage in (None, SETUP_STAGE)):
        return "SETUP"
    return task_status


class TaskState(HasTraits):
    """The latest known state of one task. Fed by `offer()` from any thread."""

    task_id = Unicode()
    type = Unicode("")
    description = Unicode(None, allow_none=True)
    status = Unicode("QUEUED")  # a task exists QUEUED first
    stage = Unicode(None, allow_none=True)
    processed = Int(0)
    total = Int(None, allow_none=True)
    estimated_completion_at = Float(None, allow_none=True)
    error_message = Unicode(None, allow_none=True)
    final = Bool(False)
    at = Float(None, allow_none=True)  # server time of the event last applied (epoch seconds)
    applied_at = Float(None, allow_none=True)  # local time it was applied

    def __init__(self, task_id: str, min_interval: float = MIN_INTERVAL) -> None:
        super().__init__(task_id=task_id)
        self.min_interval = min_interval
        self.done = threading.Event()
        self._lock = threading.RLock()
        self._seq = -1
        self._pending: tuple[dict[str, Any], float | None] | None = None
        self._timer: threading.Timer | None = None

    @property
    def evaluation_status(self) -> str:
        return evaluation_status(self.status, self.stage)

    def offer(self, summary: dict[str, Any], seq: int | None = None, at: float | None = None) -> None:
        """A task summary from an event (with its sequence number and time) or from REST (seq None)."""
        with self._lock:
            if self.final:
                return
            if seq is not None:
                if seq <= self._seq:
                    return
                self._seq = seq
            status = summary.get("status", self.status)
            stage = (summary.get("progress") or {}).get("stage", summary.get("current_stage"))
            urgent = (
                status != self.status
                or stage != self.stage
                or status in FINAL_STATUSES
                or self.applied_at is None
                or time.time() - self.applied_at >= self.min_interval
            )
            if not urgent:
                self._pending = (summary, at)
                if self._timer is None:
                    wait = (self.applied_at or 0.0) + self.min_interval - time.time()
                    self._timer = threading.Timer(max(wait, 0.0), self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._pending = None
            self._apply(summary, at)

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            pending, self._pending = self._pending, None
            if pending is not None and not self.final:
                self._apply(*pending)

    def _apply(self, summary: dict[str, Any], at: float | None) -> None:
        progress = summary.get("progress") or {}
        with self.hold_trait_notifications():
            self.type = summary.get("type") or self.type
            self.description = summary.get("description")
            self.stage = progress.get("stage", summary.get("current_stage"))
            self.processed = int(progress.get("processed") or 0)
            self.total = progress.get("total")
            self.estimated_completion_at = parse_time(summary.get("estimated_completion_at"))
            self.error_message = summary.get("error_message")
            self.at = at
            self.applied_at = time.time()
            self.status = summary.get("status", self.status)
            if self.status in FINAL_STATUSES:
                self.final = True
        if self.final:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.done.set()
