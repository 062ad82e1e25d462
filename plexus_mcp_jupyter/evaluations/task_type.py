"""The evaluation task type, registered with the core's task types when the runtime is built (runtime.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.errors import InvalidArgument
from ..core.tasks import TaskType, register_task_type
from .requests import EvaluationParams

CREATED_BY = "create_evaluation (MCP) or POST plexus/api/evaluations"


def _evaluation_params(params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        EvaluationParams.parse(params)
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"evaluation tasks are created by {CREATED_BY}, which check their parameters ({exc})"
        ) from None
    return dict(params)


EVALUATION_TASK_TYPE = TaskType(
    name="evaluation",
    target="plexus_mcp_jupyter.evaluations.runner:run_evaluation",
    description="An evaluation of a scorer on a dataset (created by create_evaluation).",
    validate=_evaluation_params,
    idempotent=True,  # its items are keyed by position: a re-run after a crash rewrites them
    internal=True,  # its parameters name code to import and records to write: only the service makes them
    created_by=CREATED_BY,
    # Seconds long, so a fresh process costs nothing that matters; it loads whole datasets (memory a process keeps
    # after freeing it) and runs scorer code named by the caller: none of that may outlive the evaluation in a
    # worker that then serves another key's tasks.
    isolated=True,
    # pandas, pyarrow and SQLAlchemy cost 0.5-1.8 s to import in every worker: once, in the forkserver.
    preload=True,
)


def register_evaluation_task_type() -> None:
    """Make `evaluation` tasks known to the core (idempotent: a second runtime in the process replaces it)."""
    register_task_type(EVALUATION_TASK_TYPE)
