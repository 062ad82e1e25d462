"""The request to create an evaluation, declared once: MCP's `create_evaluation` publishes it as its input
schema, REST's `POST evaluations` validates its body with it, a `dispatch_batch` evaluation spec's params
are one, the notebook client builds one, and `EvaluationService.create` takes it.

The model checks each field on its own (types, bounds, the allowed names); what depends on several fields
or on the dataset (a scorecard excludes dataset and scorer, the columns exist, ...) is checked by
`EvaluationService.plan`, whose errors say so in the same words on every face.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, WithJsonSchema

from ..core.errors import one_line
from ..core.requests import MAX_PRIORITY, MIN_PRIORITY, Number, RequestModel
from .scorers import SCORER_SPEC_SCHEMA

EVALUATION_TYPES = ("accuracy", "feedback", "consistency")
MAX_RUNS = 10


def evaluation_type(value: str) -> str:
    if value not in EVALUATION_TYPES:
        raise ValueError(
            f"unknown evaluation type {one_line(repr(value), 60)}; expected one of {', '.join(EVALUATION_TYPES)}"
        )
    return value


class CreateEvaluation(RequestModel):
    """Evaluate predictions against labels on a dataset (one `evaluation` task)."""

    type: Annotated[
        str,
        AfterValidator(evaluation_type),
        Field(description=f"One of {', '.join(EVALUATION_TYPES)}", json_schema_extra={"enum": list(EVALUATION_TYPES)}),
    ]
    dataset: str | None = Field(None, description="Dataset ref (not with scorecard)")
    # The published schema is the scorer spec union's (SCORER_SPEC_SCHEMA: one model per kind); normalize_spec
    # checks a spec with it, in messages that name the field inside it, in EvaluationService.plan as in a scorecard.
    scorer: Annotated[
        str | dict[str, Any] | None,
        WithJsonSchema(
            {
                "anyOf": [SCORER_SPEC_SCHEMA, {"type": "null"}],
                "default": None,
                "description": "Scorer spec: 'column:<col>', 'python:<module>:<function>', 'kernel:<name>', or a "
                "mapping with kind (column, rules, python, kernel) and that kind's fields",
            }
        ),
    ] = None
    scorecard: str | None = Field(None, description="Path of a scorecard YAML under the Jupyter root")
    label_column: str | None = Field(None, description="Column of correct labels")
    prediction_column: str | None = Field(None, description="Column of predictions (instead of scorer)")
    input_column: str | None = Field(None, description="Column the scorer reads (default 'text')")
    id_column: str | None = Field(None, description="Column of item ids for results (default row number)")
    sample_n: Annotated[int | None, Number] = Field(
        None, ge=1, description="Evaluate a random sample of this many rows"
    )
    sample_fraction: Annotated[float | None, Number] = Field(None, gt=0, le=1, description="Or of this share of rows")
    seed: Annotated[int | None, Number] = Field(None, description="Seed of the sample, for repeatable runs")
    runs: Annotated[int, Number] = Field(
        3, ge=2, le=MAX_RUNS, description=f"consistency: runs of the scorer, 2 to {MAX_RUNS}"
    )
    priority: Annotated[int, Number] = Field(
        0,
        ge=MIN_PRIORITY,
        le=MAX_PRIORITY,
        description="Queue priority (operator keys: at most max_priority_operator, default 10)",
    )
