"""Progress tracking with Plexus's semantics, as pure logic (no I/O, no clock of its own).

- processed never decreases and never exceeds total;
- the ETA is items left / items per second, shown once the stage is at least 10% done;
- persistence is throttled (one write per `write_interval` per task) except stage changes and
  final states, which the caller writes at once;
- history keeps at most one sample per `sample_interval` plus one at every stage change.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import STAGE_NAME_MAX, ProgressSample, Stage, StageStatus, Task

ETA_MIN_FRACTION = 0.10


@dataclass
class ProgressDecision:
    """What the caller should do after an update: persist now? record this sample?"""

    write: bool
    sample: ProgressSample | None
    changed_stages: list[Stage]


class ProgressTracker:
    """Applies worker progress reports to a Task and decides when they must be persisted."""

    def __init__(self, task: Task, *, write_interval: float = 1.0, sample_interval: float = 1.0) -> None:
        self.task = task
        self.write_interval = write_interval
        self.sample_interval = sample_interval
        self._last_write = float("-inf")
        self._last_sample = float("-inf")

    @property
    def stage(self) -> Stage | None:
        return self.task.stages[-1] if self.task.stages else None

    def begin_stage(self, name: str, total: int | None, at: float, message: str | None = None) -> ProgressDecision:
        """Close the current stage as COMPLETED and open a new RUNNING one. Always persisted.

        A name longer than STAGE_NAME_MAX (task code chooses it) is cut, ending in "...": stored whole it would
        fail the write on PostgreSQL, and with it the batched writes of every other task."""
        if len(name) > STAGE_NAME_MAX:
            name = name[: STAGE_NAME_MAX - 3] + "..."
        changed: list[Stage] = []
        previous = self.stage
        if previous is not None and previous.status == StageStatus.RUNNING:
            previous.status = StageStatus.COMPLETED
            previous.completed_at = at
            previous.estimated_completion_at = None
            if previous.total_items is not None:
                previous.processed_items = previous.total_items
            changed.append(previous)
        stage = Stage(
            name=name,
            order=len(self.task.stages),
            status=StageStatus.RUNNING,
            status_message=message,
            total_items=None if total is None else max(0, int(total)),
            started_at=at,
        )
        self.task.stages.append(stage)
        self.task.current_stage = name
        self.task.estimated_completion_at = None
        changed.append(stage)
        return self._decide(at, force=True, changed=changed)

    def advance_to(self, processed: int, at: float, message: str | None = None) -> ProgressDecision:
        """Set the processed count of the current stage (clamped, monotonic); maybe persist."""
        stage = self.stage
        if stage is None:
            stage_decision = self.begin_stage("Processing", None, at)
            stage = self.stage
            assert stage is not None
            forced = True
        else:
            stage_decision = None
            forced = False
        value = max(stage.processed_items, int(processed))
        if stage.total_items is not None:
            value = min(value, stage.total_items)
        stage.processed_items = value
        if message is not None:
            stage.status_message = message
        stage.estimated_completion_at = self._eta(stage, at)
        self.task.estimated_completion_at = stage.estimated_completion_at
        decision = self._decide(at, force=forced, changed=[stage])
        if stage_decision is not None:
            decision.changed_stages = stage_decision.changed_stages
        return decision

    def finish(self, status: StageStatus, at: float, message: str | None = None) -> ProgressDecision:
        """Close the current stage with the task's final outcome. Always persisted."""
        stage = self.stage
        changed: list[Stage] = []
        if stage is not None and stage.status == StageStatus.RUNNING:
            stage.status = status
            stage.completed_at = at
            stage.estimated_completion_at = None
            if message:
                stage.status_message = message
            if status == StageStatus.COMPLETED and stage.total_items is not None:
                stage.processed_items = stage.total_items
            changed.append(stage)
        self.task.estimated_completion_at = None
        return self._decide(at, force=True, changed=changed)

    @staticmethod
    def _eta(stage: Stage, at: float) -> float | None:
        total = stage.total_items
        if not total or stage.started_at is None or stage.processed_items <= 0:
            return None
        if stage.processed_items / total < ETA_MIN_FRACTION:
            return None
        elapsed = at - stage.started_at
        if elapsed <= 0:
            return None
        rate = stage.processed_items / elapsed
        return at + (total - stage.processed_items) / rate

    def _decide(self, at: float, *, force: bool, changed: list[Stage]) -> ProgressDecision:
        write = force or (at - self._last_write) >= self.write_interval
        if not write:
            return ProgressDecision(write=False, sample=None, changed_stages=changed)
        self._last_write = at
        sample = None
        if force or (at - self._last_sample) >= self.sample_interval:
            stage = self.stage
            sample = ProgressSample(
                at=at,
                stage=stage.name if stage else None,
                processed=stage.processed_items if stage else 0,
                total=stage.total_items if stage else None,
                message=stage.status_message if stage else None,
            )
            self._last_sample = at
        return ProgressDecision(write=True, sample=sample, changed_stages=changed)
