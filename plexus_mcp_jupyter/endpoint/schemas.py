"""Pydantic models of what the MCP tools return: the source of each tool's `outputSchema`.

They mirror `Task.summary()` / `Task.to_dict()` (core/models.py), which produce the data; the
models only describe and validate it at the edge.
"""

from __future__ import annotations

import json
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
    batch_id: str | None = Field(default=None, description="The batch it was dispatched in (plexus://batches/{id})")


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
        description="Expected start (ISO 8601 UTC) from the running tasks' expected ends; null when unknown"
    )
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
    retry_of: str | None = Field(default=None, description="The task this one is a new attempt of (retry_tasks)")
    history: list[ProgressPoint] | None = Field(
        default=None, description="Progress samples, oldest first (only when history=true)"
    )
    history_total: int | None = Field(default=None, description="How many samples exist in all")
    resource_uri: str
    queue: QueuePlace | None = Field(default=None, description="Where a QUEUED task stands; null otherwise")
    retention_seconds: float | None = Field(default=None, description="How long it is kept once finished")
    expires_at: str | None = Field(default=None, description="When a finished task is pruned (ISO 8601 UTC)")
    dashboard_url: str | None = Field(
        default=None, description="While it runs on a Dask cluster: the Dask dashboard (`worker` names the Dask worker)"
    )


class RowProgress(BaseModel):
    """Progress of the current (or last) stage; a field without a value is left out."""

    stage: str | None = Field(default=None, description="Name of the current (or last) stage; absent before one")
    processed: int = Field(description="Items processed in that stage")
    total: int | None = Field(default=None, description="Items in that stage; absent while unknown")
    percent: float | None = Field(default=None, description="processed / total as a percentage; absent while unknown")


class TaskListRow(BaseModel):  # Task.list_row produces it (its docstring is published: kept for assistants)
    """A task in a listing, compact: fields without a value are left out, and so are a description that is the
    type's own text and current_stage when progress.stage names it. get_task has every field."""

    task_id: str
    type: str
    status: TaskStatus
    priority: int
    description: str | None = Field(default=None, description="Absent when it is the type's own text")
    created_at: str | None = Field(default=None, description="ISO 8601 UTC")
    started_at: str | None = Field(default=None, description="Absent until it starts")
    completed_at: str | None = Field(default=None, description="Absent until it ends")
    estimated_completion_at: str | None = Field(
        default=None, description="Expected end of the current stage (ISO 8601 UTC), once it is 10% done"
    )
    current_stage: str | None = Field(
        default=None, description="Only when it is not progress.stage (which names the current stage)"
    )
    progress: RowProgress
    error_message: str | None = Field(default=None, description="Why it failed or was cancelled")
    owner: str | None = Field(default=None, description="Who created it: jupyter (the notebook user), key:<id>")
    batch_id: str | None = Field(default=None, description="The batch it was dispatched in (plexus://batches/{id})")


class TaskPage(BaseModel):
    tasks: list[TaskListRow]
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


class BatchDispatchResult(BaseModel):
    batch_id: str = Field(description="Groups the tasks: list_tasks(batch=...), plexus://batches/{batch_id}")
    task_ids: list[str] = Field(description="The new tasks' ids, in the order of the specs")
    status: TaskStatus = Field(description="QUEUED: every task was stored, none has started yet")
    resource_uri: str = Field(description="The batch's counts by status and aggregated progress (subscribable)")


class OperationItem(BaseModel):
    task_id: str
    outcome: str = Field(
        description="cancelled | cancelling | already_finished | retried | not_retryable | "
        "updated | not_queued | not_found | forbidden"
    )
    status: str | None = Field(description="The task's status when the call acted on it")
    message: str
    new_task_id: str | None = Field(default=None, description="retried: the new attempt's id")


class OperationResult(BaseModel):
    """What cancel_tasks, retry_tasks and set_task_priority did (or, with dry_run, would act on)."""

    dry_run: bool
    matched: int = Field(description="Tasks the call acted on (with dry_run: would act on)")
    sample: list[str] = Field(default_factory=list, description="dry_run: the first ids it would act on (at most 20)")
    results: list[OperationItem] = Field(description="One outcome per task (empty for a dry run)")
    max_per_call: int = Field(description="The most tasks one call may act on (setting max_batch_size)")


class BatchProgress(BaseModel):
    finished: int = Field(description="Tasks that ended (COMPLETED, FAILED or CANCELLED)")
    total: int
    percent: float | None
    processed_items: int = Field(description="Items processed in the stages of the tasks that started")
    total_items: int = Field(description="Items known in those stages (grows as tasks start)")


class BatchStatus(BaseModel):
    """plexus://batches/{batch_id} and GET plexus/api/batches/{batch_id}."""

    batch_id: str
    done: bool = Field(description="Every task ended")
    total: int = Field(description="Tasks in the batch (a retried task counts once, through its newest attempt)")
    counts: dict[str, int] = Field(description="Tasks by status (all six statuses)")
    superseded: int = Field(description="Attempts that were retried (not in counts)")
    progress: BatchProgress
    created_at: str | None
    completed_at: str | None = Field(description="When the last task ended, once done")
    estimated_completion_at: str | None = Field(description="The batch's own pace extrapolated, once a task ended")
    tasks_uri: str
    resource_uri: str


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
        default=None, description="When the per-item results of this cancelled evaluation were deleted (null: kept)"
    )
    resource_uri: str
    definition: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = Field(
        default=None,
        description="Per score: accuracy (95% Wilson interval), per-class precision/recall/F1, "
        "macro/weighted F1, Cohen's kappa, Gwet's AC1, confusion matrix, class distributions (once completed)",
    )


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
        "none of that name): use their spec",
    )


# Keywords that constrain only values of their own JSON type (or say nothing about a value): a null passes them, so
# `{"anyOf": [{"type": T, ...these}, {"type": "null"}]}` says the same as `{"type": [T, "null"], ...these}`.
_TYPE_ONLY_KEYWORDS = frozenset(
    {"type", "title", "description", "format", "items", "properties", "required", "additionalProperties", "default"}
)


def lean_output_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The same schema in the form a client validates fastest: local `$ref`s into `$defs` written out in place,
    `anyOf` of a type and null written as a type list, and the titles pydantic makes of field names left out.

    Every client that validates structured content against the published schema (the SDK's client does, on each
    call) walks it per result: with jsonschema, a 20-task list_tasks page took ~15 ms of the client's CPU against the
    models' own schema, ~5 against this one (the anyOf tries a branch and builds an error for every null, the refs
    are resolved per row). The values allowed are the same (tests/test_schemas_lean.py); recursive definitions are
    left as references. An array of objects is checked one step per item (_rows_checked_shallow), its items'
    full schema kept in `$defs` for readers."""
    defs = schema.get("$defs", {})

    def lean(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [lean(v, seen) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in defs and name not in seen:
                inlined = lean(defs[name], (*seen, name))
                rest = {k: lean(v, seen) for k, v in node.items() if k != "$ref"}
                return {**inlined, **rest} if rest else inlined
            return dict(node)
        out = {}
        for key, value in node.items():
            if key == "$defs" or (key == "title" and isinstance(value, str) and "properties" not in node):
                continue  # a property's title: its name, capitalised
            out[key] = value if key in ("enum", "const", "default", "examples") else lean(value, seen)
        branches = out.get("anyOf")
        if isinstance(branches, list) and len(branches) == 2 and {"type": "null"} in branches:
            other = branches[1 - branches.index({"type": "null"})]
            if isinstance(other.get("type"), str) and set(other) <= _TYPE_ONLY_KEYWORDS and not set(other) & set(out):
                del out["anyOf"]
                out = {**other, **out, "type": [other["type"], "null"]}
        return out

    result = lean(schema, ())
    if any(f'"#/$defs/{name}"' in json.dumps(result) for name in defs):  # a recursive definition is still referred to
        result["$defs"] = {name: lean(d, (name,)) for name, d in defs.items()}
    rows: dict[str, Any] = {}
    result = _rows_checked_shallow(result, rows)
    if rows:
        result["$defs"] = {**result.get("$defs", {}), **rows}
    return result


ROW_FIELDS = "$comment"  # where a shallow row schema names the `$defs` entry that describes its fields


def _rows_checked_shallow(node: Any, rows: dict[str, Any]) -> Any:
    """`node` with each array of objects checked one step per item: the items schema keeps the object's type, its
    required fields and its description, and names (in `$comment`, and in the description) the `$defs` entry that
    holds the item's full schema, there for readers (assistants, docs, code generators), not applied.

    Why: jsonschema (the SDK client's check of every result) descends into each field of each item, ~3-5 us a
    value: ~1.2 ms of the client's CPU for a list_tasks page of 20 rows, more than our server spends on the call.
    The server validates every result against the models before it answers, so the items' fields are checked
    where they are made; the client still checks the result's own fields, each item's type and required fields."""
    if isinstance(node, list):
        return [_rows_checked_shallow(v, rows) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rows_checked_shallow(v, rows) for k, v in node.items()}
    items = out.get("items")
    types = out.get("type")
    if (
        (types == "array" or (isinstance(types, list) and "array" in types))
        and isinstance(items, dict)
        and "properties" in items
        and "title" in items
    ):
        name = items["title"]
        while name in rows and rows[name] != items:
            name += "_"
        rows[name] = items
        text = f"Each item's fields: $defs/{name}."
        shallow = {
            "type": "object",
            "description": f"{items['description']} {text}" if "description" in items else text,
        }
        if items.get("required"):
            shallow["required"] = items["required"]
        out["items"] = {**shallow, ROW_FIELDS: f"#/$defs/{name}"}
    return out
