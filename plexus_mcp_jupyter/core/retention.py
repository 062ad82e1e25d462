"""Retention: finished tasks are kept for a while, then pruned, and their ids answer "expired".

A finished task (with its stages, progress history and, through the store's cascade, its evaluation
record and items) is kept `retention` seconds after it ended: its own (a client's MCP task ttl, bounded),
else its type's (`task_retention_by_type`), else the default (`task_retention_seconds`). A background
thread prunes expired tasks in bounded batches, never on the event loop, and leaves a tombstone
(expired_tasks: id, type, owner, dates) so the id answers "expired on <date>" instead of "not found";
tombstones go in turn after as long again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .models import Task, now
from .resources import parse_positive_numbers

log = logging.getLogger("plexus_mcp_jupyter")

DAY = 86_400.0
MIN_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished tasks are kept, by task and type."""

    default_seconds: float = 30 * DAY
    by_type: Mapping[str, float] = field(default_factory=dict)
    max_ttl_seconds: float = 30 * DAY  # the longest a client may ask for (MCP task ttl)

    @classmethod
    def from_settings(cls, default_seconds: float, by_type: str, max_ttl_seconds: float) -> RetentionPolicy:
        """The policy of the settings task_retention_seconds, task_retention_by_type and max_task_ttl_seconds."""
        parsed = parse_positive_numbers(by_type, "task_retention_by_type")
        return cls(default_seconds, parsed, max_ttl_seconds)

    def for_type(self, task_type: str) -> float:
        return self.by_type.get(task_type, self.default_seconds)

    def for_task(self, task: Task) -> float:
        """Seconds `task` is kept once finished."""
        return task.retention_seconds if task.retention_seconds is not None else self.for_type(task.type)

    def expires_at(self, task: Task) -> float | None:
        """When a finished task will be pruned (None while it is not finished)."""
        return task.completed_at + self.for_task(task) if task.completed_at is not None else None

    def ttl_seconds(self, ttl_ms: int) -> float:
        """A client's requested ttl (milliseconds), bounded to what this server allows."""
        return min(max(ttl_ms / 1000.0, MIN_TTL_SECONDS), self.max_ttl_seconds)


def expired_message(entity_id: str, tombstone: Mapping[str, object], kind: str = "task") -> str:
    """`task '…' expired on <date> UTC: ...`: what an id pruned by retention answers."""
    at = datetime.fromtimestamp(float(tombstone["expired_at"]), tz=timezone.utc)  # type: ignore[arg-type]
    seconds = float(tombstone["retention_seconds"])  # type: ignore[arg-type]
    return (
        f"{kind} {entity_id!r} expired on {at.strftime('%Y-%m-%d %H:%M:%S')} UTC: finished {tombstone['type']} "
        f"tasks are kept {_span(seconds)} (task_retention_seconds, task_retention_by_type, or the ttl asked "
        "for the task), then pruned with their history"
    )


def _span(seconds: float) -> str:
    for unit, size in (("days", DAY), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} second" + ("" if seconds == 1 else "s")


class RetentionPruner:
    """A daemon thread that prunes expired tasks in bounded batches every `interval` seconds.

    `prune(policy, at, batch)` (Store.prune_expired) returns the ids it removed; `on_pruned` is told them
    (the manager drops them from its memory, on its own loop).
    """

    def __init__(
        self,
        prune: Callable[[RetentionPolicy, float, int], list[str]],
        policy: RetentionPolicy,
        *,
        interval: float,
        batch: int,
        on_pruned: Callable[[list[str]], None],
    ) -> None:
        self.prune = prune
        self.policy = policy
        self.interval = interval
        self.batch = batch
        self.on_pruned = on_pruned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pruned_total = 0

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="plexus-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current batch (waits up to `timeout` seconds for it: the store may close next)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run_once(self) -> int:
        """Prune everything expired now, a batch at a time; the number of tasks pruned."""
        total = 0
        while not self._stop.is_set():
            ids = self.prune(self.policy, now(), self.batch)
            if ids:
                total += len(ids)
                self.on_pruned(ids)
            if len(ids) < self.batch:
                break
            self._stop.wait(0.05)  # let other writers in between batches
        self.pruned_total += total
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("Plexus: pruning expired tasks failed; retrying in %gs", self.interval)
