"""MCP prompts: the guided workflows an assistant (or its user, from a prompt menu) starts from.

Each prompt is one user message naming the tools and resources to use, in order, with the caller's
arguments filled in; it reads nothing and changes nothing itself, so rendering one is free. Every tool and
resource a prompt names exists on the server that serves it (tests/test_mcp_surface.py checks).
Arguments complete through `completion/complete` (endpoint/completion.py): PROMPT_ARGUMENT_KINDS says what
each argument is.

A prompt's arguments are a request model, as a tool's are (`ModelPrompt`): the published arguments are its
fields (name, description, required), and the strings a client sends are checked with the types and bounds the
tools use (a task id, an evaluation type, ...) before the prompt is rendered; a refusal is an INVALID_PARAMS
error in the tools' words ("invalid arguments for <prompt>: ..."). An empty string is an argument left out (a
prompt menu sends one for a field left blank).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.prompts import Prompt
from mcp.server.mcpserver.prompts.base import PromptArgument
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from pydantic import Field

from ..core.errors import InvalidArgument, bounded
from ..core.requests import CreatedSince, OptionalText, RequestModel, TaskId, TaskTypeName
from ..evaluations.requests import EvaluationId, EvaluationType
from .tools import short, unknown_arguments

# What each prompt argument is, for completion: the kind of value (see endpoint/completion.py).
PROMPT_ARGUMENT_KINDS: dict[str, dict[str, str]] = {
    "evaluate_dataset": {"dataset": "dataset", "scorer": "scorer", "label_column": "column", "type": "evaluation_type"},
    "watch_task": {"task_id": "task_id"},
    "compare_evaluations": {"baseline_id": "evaluation_id", "candidate_id": "evaluation_id"},
    "triage_failed_tasks": {"type": "task_type", "since": "none"},
}
MAX_TEXT = 4096  # a dataset ref or scorer spec in a prompt: what a tool would take, bounded


class EvaluateDataset(RequestModel):
    dataset: str = Field(
        min_length=1,
        max_length=MAX_TEXT,
        description="Dataset ref (example:sentiment, registered:<name> or a file path); list_datasets shows them",
    )
    scorer: str = Field(
        min_length=1,
        max_length=MAX_TEXT,
        description="Scorer spec (column:<col>, python:<module>:<function>, kernel:<name>); list_scorers shows them",
    )
    label_column: OptionalText = Field(None, max_length=1024, description="Column of correct labels (default: label)")
    type: EvaluationType = "accuracy"


class WatchTask(RequestModel):
    task_id: TaskId  # get_task's: the same bounds and words


class CompareEvaluations(RequestModel):
    baseline_id: EvaluationId = Field(description="The evaluation to compare against")
    candidate_id: EvaluationId = Field(description="The evaluation to judge")


class TriageFailedTasks(RequestModel):
    type: TaskTypeName | None = Field(None, description="Only tasks of this type (e.g. demo, evaluation)")
    since: CreatedSince = None


class ModelPrompt(Prompt):
    """A prompt whose arguments are a request model: published as its fields, checked before rendering."""

    request_model: type[RequestModel] = Field(exclude=True)

    @classmethod
    def of(
        cls, model: type[RequestModel], render: Callable[[Any], str], *, name: str, title: str, description: str
    ) -> ModelPrompt:
        arguments = [
            PromptArgument(name=field, description=info.description, required=info.is_required())
            for field, info in model.model_fields.items()
        ]

        def fn(**given: str) -> str:
            return render(_request(model, name, given))

        return cls(
            name=name,
            title=title,
            description=description,
            arguments=arguments,
            fn=fn,
            context_kwarg=None,
            request_model=model,
        )

    async def render(self, arguments: dict[str, Any] | None, context: Any) -> Any:
        _request(self.request_model, self.name, arguments or {})  # the tools' words, before the SDK's own checks
        return await super().render(arguments, context)


def _request(model: type[RequestModel], prompt: str, given: dict[str, Any]) -> Any:
    """The prompt's arguments as its model (an empty string left out), or INVALID_PARAMS saying what is wrong."""
    unknown = unknown_arguments(prompt, given, model.model_fields)
    if unknown is not None:
        raise MCPError(INVALID_PARAMS, unknown)
    try:
        return model.parse({name: value for name, value in given.items() if value != ""})
    except InvalidArgument as exc:
        raise MCPError(INVALID_PARAMS, bounded(f"invalid arguments for {prompt}: {exc}")) from None


def _value(text: str) -> str:
    """An argument as the prompt quotes it: one line, bounded (prompt arguments are the client's text)."""
    return short(text.strip(), 200)


def evaluate_dataset(request: EvaluateDataset) -> str:
    dataset, scorer = _value(request.dataset), _value(request.scorer)
    label = f", label_column={_value(request.label_column)}" if request.label_column else ""
    return (
        f"Evaluate the dataset {dataset} with the scorer {scorer} and explain its mistakes.\n\n"
        "1. If you are unsure of the dataset or scorer, call list_datasets and list_scorers first.\n"
        f"2. Call create_evaluation(type={_value(request.type)}, dataset={dataset}, "
        f"scorer={scorer}{label}). It answers at once with an evaluation_id.\n"
        "3. Follow it with get_evaluation(evaluation_id) (or subscribe to plexus://evaluations/{evaluation_id}) "
        "until its status is COMPLETED, FAILED or CANCELLED; report progress and the remaining time meanwhile.\n"
        "4. Once COMPLETED, report accuracy with its 95% interval, macro F1, Cohen's kappa and the class "
        "balance from get_evaluation's metrics.\n"
        "5. Call get_evaluation_results(evaluation_id, only_mismatches=true) and page through next_cursor "
        "(at most a few pages). Group the mistakes by (label, prediction) pair, quote two or three item ids "
        "and inputs per group, and say what the scorer seems to get wrong and how it could be fixed.\n"
        "If it FAILED, quote its error_message and say what to change."
    )


def watch_task(request: WatchTask) -> str:
    task_id = _value(request.task_id)
    return (
        f"Watch the task {task_id} and report on it.\n\n"
        f"1. Call get_task(task_id={task_id}): report its type, status, current stage, items "
        "processed and ETA (or, while QUEUED, its queue position and why it waits).\n"
        f"2. Subscribe to plexus://tasks/{short(request.task_id.strip(), 80, quote=False)} if your client can, or "
        "call get_task again about every 10 seconds; report only real changes (a new stage, every 25% of progress).\n"
        "3. When it ends: COMPLETED, summarise its output; FAILED, quote error_message and the last lines of "
        "stderr_tail and suggest a fix (retry_tasks(task_ids=[...]) once the cause is gone); CANCELLED, say "
        "so. Stop it only if the user asks: cancel_tasks(task_ids=[...])."
    )


def compare_evaluations(request: CompareEvaluations) -> str:
    baseline, candidate = _value(request.baseline_id), _value(request.candidate_id)
    return (
        f"Compare the evaluation {candidate} with the baseline {baseline}.\n\n"
        f"1. Call get_evaluation(evaluation_id={baseline}) and "
        f"get_evaluation(evaluation_id={candidate}). If either is not COMPLETED, say so and stop.\n"
        "2. Check they are comparable: the same dataset and label column (their definitions); say if not.\n"
        "3. Tabulate accuracy (with its 95% interval), macro and weighted F1, Cohen's kappa and Gwet's AC1 "
        "for both, and the per-class F1 that changed most. Say whether the accuracy intervals overlap.\n"
        "4. Call get_evaluation_results(evaluation_id=..., only_mismatches=true) for both and list the item "
        "ids the candidate fixed and the ones it broke (a few examples each, with their inputs).\n"
        "5. Conclude: is the candidate better, worse or not distinguishable, and why."
    )


def triage_failed_tasks(request: TriageFailedTasks) -> str:
    filters = 'status="FAILED"'
    if request.type and request.type.strip():
        filters += f", type={_value(request.type)}"
    if request.since and request.since.strip():
        filters += f", since={_value(request.since)}"
    return (
        "Triage the failed tasks.\n\n"
        f"1. Call list_tasks({filters}) and follow next_cursor until you have them all (or 200).\n"
        "2. Group them by error_message (the same message with different numbers is one cause). For the "
        "largest groups call get_task(task_id) on one example and read error_details and stderr_tail.\n"
        "3. For each cause, say whether a retry can help (a transient failure) or the input must change.\n"
        "4. For the retryable ones, call retry_tasks(task_ids=[...], dry_run=true) and show the count; retry "
        "for real (dry_run=false) only if the user agrees. Report the new task ids; follow them with get_task "
        "or plexus://tasks/{task_id}."
    )


# name -> (arguments, render, title, description)
PROMPTS: dict[str, tuple[type[RequestModel], Callable[[Any], str], str, str]] = {
    "evaluate_dataset": (
        EvaluateDataset,
        evaluate_dataset,
        "Evaluate a dataset and explain the mistakes",
        "Run an accuracy evaluation of a dataset with a scorer, wait for it, then read the items it got wrong and "
        "explain the patterns behind them.",
    ),
    "watch_task": (
        WatchTask,
        watch_task,
        "Watch a task and report",
        "Follow one task until it ends, reporting its stage, progress and ETA, then its outcome.",
    ),
    "compare_evaluations": (
        CompareEvaluations,
        compare_evaluations,
        "Compare two evaluations",
        "Compare the metrics and the mistakes of two evaluations (e.g. two scorers on one dataset).",
    ),
    "triage_failed_tasks": (
        TriageFailedTasks,
        triage_failed_tasks,
        "Triage failed tasks",
        "Find the failed tasks, group them by cause, and propose what to retry.",
    ),
}


def register_prompts(server: MCPServer) -> None:
    for name, (model, render, title, description) in PROMPTS.items():
        server.add_prompt(ModelPrompt.of(model, render, name=name, title=title, description=description))
