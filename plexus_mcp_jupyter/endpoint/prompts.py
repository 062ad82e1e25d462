"""MCP prompts: the guided workflows an assistant (or its user, from a prompt menu) starts from.

Each prompt is one user message naming the tools and resources to use, in order, with the caller's
arguments filled in; it reads nothing and changes nothing itself, so rendering one is free. Every tool and
resource a prompt names exists on the server that serves it (tests/test_mcp_surface.py checks).
Arguments complete through `completion/complete` (endpoint/completion.py): PROMPT_ARGUMENT_KINDS says what
each argument is.
"""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from .tools import short

# What each prompt argument is, for completion: the kind of value (see endpoint/completion.py).
PROMPT_ARGUMENT_KINDS: dict[str, dict[str, str]] = {
    "evaluate_dataset": {"dataset": "dataset", "scorer": "scorer", "label_column": "column", "type": "evaluation_type"},
    "watch_task": {"task_id": "task_id"},
    "compare_evaluations": {"baseline_id": "evaluation_id", "candidate_id": "evaluation_id"},
    "triage_failed_tasks": {"type": "task_type", "since": "none"},
}


def _value(text: str) -> str:
    """An argument as the prompt quotes it: one line, bounded (prompt arguments are the client's text)."""
    return short(text.strip(), 200)


def register_prompts(server: MCPServer) -> None:
    @server.prompt(
        title="Evaluate a dataset and explain the mistakes",
        description="Run an accuracy evaluation of a dataset with a scorer, wait for it, then read the items it "
        "got wrong and explain the patterns behind them.",
    )
    def evaluate_dataset(
        dataset: Annotated[
            str,
            Field(
                description="Dataset ref (example:sentiment, registered:<name> or a file "
                "path); list_datasets shows them"
            ),
        ],
        scorer: Annotated[
            str,
            Field(
                description="Scorer spec (column:<col>, python:<module>:<function>, "
                "kernel:<name>); list_scorers shows them"
            ),
        ],
        label_column: Annotated[str, Field(description="Column of correct labels (default: label)")] = "",
        type: Annotated[str, Field(description="accuracy (default) or consistency")] = "accuracy",
    ) -> str:
        label = f", label_column={_value(label_column)}" if label_column.strip() else ""
        return (
            f"Evaluate the dataset {_value(dataset)} with the scorer {_value(scorer)} and explain its mistakes.\n\n"
            "1. If you are unsure of the dataset or scorer, call list_datasets and list_scorers first.\n"
            f"2. Call create_evaluation(type={_value(type or 'accuracy')}, dataset={_value(dataset)}, "
            f"scorer={_value(scorer)}{label}). It answers at once with an evaluation_id.\n"
            "3. Follow it with get_evaluation(evaluation_id) (or subscribe to plexus://evaluations/{evaluation_id}) "
            "until its status is COMPLETED, FAILED or CANCELLED; report progress and the remaining time meanwhile.\n"
            "4. Once COMPLETED, report accuracy with its 95% interval, macro F1, Cohen's kappa and the class "
            "balance from get_evaluation's metrics.\n"
            "5. Call get_evaluation_results(evaluation_id, only_mismatches=true) and page through next_cursor "
            "(at most a few pages). Group the mistakes by (label, prediction) pair, quote two or three item ids "
            "and inputs per group, and say what the scorer seems to get wrong and how it could be fixed.\n"
            "If it FAILED, quote its error_message and say what to change."
        )

    @server.prompt(
        title="Watch a task and report",
        description="Follow one task until it ends, reporting its stage, progress and ETA, then its outcome.",
    )
    def watch_task(
        task_id: Annotated[str, Field(description="The task's full id (list_tasks shows them)")],
    ) -> str:
        return (
            f"Watch the task {_value(task_id)} and report on it.\n\n"
            f"1. Call get_task(task_id={_value(task_id)}): report its type, status, current stage, items "
            "processed and ETA (or, while QUEUED, its queue position and why it waits).\n"
            f"2. Subscribe to plexus://tasks/{short(task_id.strip(), 80, quote=False)} if your client can, or call "
            "get_task again about every 10 seconds; report only real changes (a new stage, every 25% of progress).\n"
            "3. When it ends: COMPLETED, summarise its output; FAILED, quote error_message and the last lines of "
            "stderr_tail and suggest a fix (retry_tasks(task_ids=[...]) once the cause is gone); CANCELLED, say "
            "so. Stop it only if the user asks: cancel_tasks(task_ids=[...])."
        )

    @server.prompt(
        title="Compare two evaluations",
        description="Compare the metrics and the mistakes of two evaluations (e.g. two scorers on one dataset).",
    )
    def compare_evaluations(
        baseline_id: Annotated[str, Field(description="The evaluation to compare against")],
        candidate_id: Annotated[str, Field(description="The evaluation to judge")],
    ) -> str:
        return (
            f"Compare the evaluation {_value(candidate_id)} with the baseline {_value(baseline_id)}.\n\n"
            f"1. Call get_evaluation(evaluation_id={_value(baseline_id)}) and "
            f"get_evaluation(evaluation_id={_value(candidate_id)}). If either is not COMPLETED, say so and stop.\n"
            "2. Check they are comparable: the same dataset and label column (their definitions); say if not.\n"
            "3. Tabulate accuracy (with its 95% interval), macro and weighted F1, Cohen's kappa and Gwet's AC1 "
            "for both, and the per-class F1 that changed most. Say whether the accuracy intervals overlap.\n"
            "4. Call get_evaluation_results(evaluation_id=..., only_mismatches=true) for both and list the item "
            "ids the candidate fixed and the ones it broke (a few examples each, with their inputs).\n"
            "5. Conclude: is the candidate better, worse or not distinguishable, and why."
        )

    @server.prompt(
        title="Triage failed tasks",
        description="Find the failed tasks, group them by cause, and propose what to retry.",
    )
    def triage_failed_tasks(
        type: Annotated[str, Field(description="Only tasks of this type (e.g. demo, evaluation)")] = "",
        since: Annotated[str, Field(description="Only tasks created at or after this ISO 8601 time")] = "",
    ) -> str:
        filters = 'status="FAILED"'
        if type.strip():
            filters += f", type={_value(type)}"
        if since.strip():
            filters += f", since={_value(since)}"
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
