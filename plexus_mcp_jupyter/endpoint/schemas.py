"""Pydantic models of what the MCP tools return: the source of each tool's `outputSchema`.

They mirror `Task.summary()` / `Task.to_dict()` (core/models.py), which produce the data; the
models only describe and validate it at the edge.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..core.models import StageStatus, TaskStatus


def task_uri(task_id: str) -> str:
    """The MCP resource of one task."""
    return f"plexus://tasks/{task_id}"


class Progress(BaseModel):
    stage: str | None = Field(description="Name of the current (or last) stage")
    processed: int = Field(description="Items processed in that stage")
    total: int | None = Field(description="Items in that stage, when known")
    percent: float | None = Field(description="processed / total as a percentage, when total is known")


class TaskSummary(BaseModel):
    task_id: str
    type: str
    status: TaskStatus
    priority: int
    description: str | None
    created_at: str | None = Field(description="ISO 8601 UTC")
    started_at: str | None
    completed_at: str | None
    estimated_completion_at: str | None = Field(
        description="Expected end of the current stage (ISO 8601 UTC), once it is 10% done"
    )
    current_stage: str | None
    progress: Progress
    error_message: str | None
    owner: str | None = Field(description="Who created it: jupyter (the notebook user), key:<id> (an API key)")


class StageInfo(BaseModel):
    name: str
    order: int
    status: StageStatus
    status_message: str | None
    total_items: int | None
    processed_items: int
    started_at: str | None
    completed_at: str | None
    estimated_completion_at: str | None


class ProgressPoint(BaseModel):
    at: str | None
    stage: str | None
    processed: int
    total: int | None
    message: str | None


class QueuePlace(BaseModel):
    position: int = Field(description="1 = the next to start, in the scheduler's order (priority, then owners sharing)")
    reason: str = Field(description="Why it waits: no_slot | owner_cap | type_cap | resources | starting")
    message: str = Field(description="The reason in words, with the numbers")
    estimated_start_at: str | None = Field(
        description="Expected start (ISO 8601 UTC) from the running tasks' expected ends; null when unknown")
    exact: bool = Field(description="False beyond the scheduler's look-ahead: position by priority and age only")


class TaskDetail(TaskSummary):
    params: dict[str, Any]
    error_details: dict[str, Any] | None
    output: Any = Field(description="The task's result (bounded in size)")
    stdout_tail: str | None
    stderr_tail: str | None
    worker: str | None
    cancel_requested: bool
    stages: list[StageInfo]
    history: list[ProgressPoint] | None = Field(
        default=None, description="Progress samples, oldest first (only when history=true)"
    )
    history_total: int | None = Field(default=None, description="How many samples exist in all")
    resource_uri: str
    queue: QueuePlace | None = Field(default=None, description="Where a QUEUED task stands; null otherwise")
    retention_seconds: float | None = Field(default=None, description="How long it is kept once finished")
    expires_at: str | None = Field(default=None, description="When a finished task is pruned (ISO 8601 UTC)")


class TaskPage(BaseModel):
    tasks: list[TaskSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page")


class DispatchResult(BaseModel):
    task_id: str
    type: str
    status: TaskStatus
    priority: int
    created_at: str | None
    resource_uri: str = Field(description="Read this resource for stages and progress history")
    output: Any = Field(default=None, description="The task's result once it has completed (bounded in size)")
    error_message: str | None = Field(default=None, description="Why the task failed, once it has failed")


class CancelItem(BaseModel):
    task_id: str
    outcome: str = Field(description="cancelled | cancelling | already_finished | not_found | forbidden")
    status: str | None
    message: str


class CancelResult(BaseModel):
    results: list[CancelItem]
    more: bool = Field(default=False, description="More tasks matched the filter than one call cancels: call again")


class EvaluationDetail(BaseModel):
    """An evaluation: its status and progress (from its task), definition and metrics."""

    evaluation_id: str
    task_id: str
    type: str = Field(description="accuracy | feedback | consistency")
    status: str = Field(description="SETUP | RUNNING | COMPLETED | FAILED | CANCELLED")
    dataset: str
    scores: list[str] = Field(description="Names of the scores (one, or a scorecard's)")
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    elapsed_seconds: float | None
    remaining_seconds: float | None = Field(description="Estimated, once scoring is 10% done")
    processed_items: int
    total_items: int | None
    counts: dict[str, Any] | None = Field(description="Per score: items, scored, errors (once completed)")
    error_message: str | None
    items_pruned_at: str | None = Field(
        default=None, description="When the per-item results of this cancelled evaluation were deleted (null: kept)")
    resource_uri: str
    definition: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = Field(
        default=None, description="Per score: accuracy (95% Wilson interval), per-class precision/recall/F1, "
        "macro/weighted F1, Cohen's kappa, Gwet's AC1, confusion matrix, class distributions (once completed)")


class EvaluationPage(BaseModel):
    evaluations: list[EvaluationDetail]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page")


class EvaluationItem(BaseModel):
    seq: int = Field(description="Position in the (sampled) dataset")
    item_id: str | None
    input: str | None = Field(description="Excerpt of the input text")
    label: str | None
    prediction: str | None
    correct: bool | None = Field(description="null when the item could not be scored")
    explanation: str | None
    error: str | None


class EvaluationResults(BaseModel):
    evaluation_id: str
    score: str
    only_mismatches: bool
    label: str | None
    items: list[EvaluationItem]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null on the last page")


class DatasetList(BaseModel):
    datasets: list[dict[str, Any]]


class ScorerList(BaseModel):
    kinds: dict[str, str]
    examples: list[dict[str, str]]
    kernel_scorers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Kernel scorers your evaluations can name now (your own, and the notebook user's where you have "
        "none of that name): use their spec")
