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

from ..core.errors import InvalidArgument, one_line
from ..core.requests import (
    LISTED,
    MAX_PAGE_SIZE,
    Cursor,
    Limit,
    Number,
    OptionalText,
    Priority,
    RequestModel,
    names_schema,
    page_field,
)
from .datasets import REGISTERED_NAME_HELP, DatasetCatalog
from .scorers import SCORER_SPEC_SCHEMA
from .store import EvaluationStatus

EVALUATION_TYPES = ("accuracy", "feedback", "consistency")
MAX_RUNS = 10


def evaluation_type(value: str) -> str:
    if value not in EVALUATION_TYPES:
        raise ValueError(
            f"unknown evaluation type {one_line(repr(value), 60)}; expected one of {', '.join(EVALUATION_TYPES)}"
        )
    return value


EvaluationType = Annotated[
    str,
    AfterValidator(evaluation_type),
    Field(description=f"One of {', '.join(EVALUATION_TYPES)}", json_schema_extra={"enum": list(EVALUATION_TYPES)}),
]


class CreateEvaluation(RequestModel):
    """Evaluate predictions against labels on a dataset (one `evaluation` task)."""

    type: EvaluationType
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
    priority: Priority = 0


def evaluation_status(value: str) -> str:
    """An evaluation status, any case, as the store spells it (pydantic reports it per element: `status[0]`)."""
    if value.strip().upper() not in EvaluationStatus.ALL:
        raise ValueError(f"unknown evaluation status; expected one of {', '.join(EvaluationStatus.ALL)}")
    return value.strip().upper()


class ListEvaluations(RequestModel):
    """List evaluations, newest first: list_evaluations (MCP), GET plexus/api/evaluations, plexus://evaluations{?...},
    plexus.evaluations()."""

    status: Annotated[
        tuple[Annotated[str, AfterValidator(evaluation_status)], ...],
        LISTED,
        WithJsonSchema(names_schema("Only evaluations with these statuses", EvaluationStatus.ALL)),
    ] = ()
    type: Annotated[
        tuple[Annotated[str, AfterValidator(evaluation_type)], ...],
        LISTED,
        WithJsonSchema(names_schema("Only evaluations of these types", EVALUATION_TYPES)),
    ] = ()
    limit: Limit = page_field(MAX_PAGE_SIZE)
    cursor: Cursor = None


EvaluationId = Annotated[str, Field(min_length=1, max_length=64, description="The evaluation's id")]


class GetEvaluation(RequestModel):
    """One evaluation: get_evaluation (MCP), GET plexus/api/evaluations/{evaluation_id}."""

    evaluation_id: EvaluationId


class GetEvaluationResults(RequestModel):
    """One page of an evaluation's per-item results: get_evaluation_results (MCP), GET
    plexus/api/evaluations/{id}/results (all of them as Arrow when asked: limit and cursor then unused), the
    results resource, the notebook's `.results()` and `plexus evaluations export`."""

    evaluation_id: EvaluationId
    only_mismatches: bool = Field(False, description="Only items scored wrong or not scored")
    label: OptionalText = Field(None, description="Only items with this label (as in the dataset)")
    score: OptionalText = Field(None, description="Which score of a scorecard (default: the first)")
    limit: Limit = page_field(MAX_PAGE_SIZE)
    cursor: Cursor = None


DEFAULT_CHUNK_SIZE = 50_000  # the largest chunk the runner scores at once; chunks are sized by time


class EvaluationScore(RequestModel):
    """One score of an evaluation task: its name, its checked scorer spec, and its own label column if any."""

    name: str
    scorer: dict[str, Any] = Field(description="A normalised scorer spec (scorers.normalize_spec)")
    label_column: str | None = None


class EvaluationParams(RequestModel):
    """The `evaluation` task's parameters, declared once: `EvaluationService.planned_spec` builds them from a
    checked CreateEvaluation (stored as the task's params), the task type checks them (evaluations/task_type.py),
    and the runner reads them (`run_evaluation(ctx, **params)`) as this model, not as a dict."""

    evaluation_id: str
    type: str
    dataset: str
    scores: list[EvaluationScore] = Field(min_length=1)
    label_column: str | None = None
    input_column: str | None = None
    id_column: str | None = None
    sample: dict[str, Any] | None = Field(None, description="sampling.sample_frame's arguments (n, fraction, seed)")
    runs: int = Field(1, ge=1, le=MAX_RUNS)
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=1)
    normalization: dict[str, Any] | None = Field(None, description="metrics.LabelNormalization's arguments")
    scorer_modules: list[str] | None = Field(
        None, description="Set for an API key's evaluation: python scorers must be defined in these modules"
    )

    def stored(self) -> dict[str, Any]:
        """The params as stored with the task: the fields given (JSON-ready)."""
        return self.model_dump(mode="json", exclude_unset=True)


# -- datasets: the catalog's reads and registration -----------------------------------------------------------


def registered_name(value: str) -> str:
    """A name a registered dataset may have (the catalog's rule), as sent: a name with a control character in it
    is refused, never cleaned into another name."""
    try:
        return DatasetCatalog.check_registered_name(value)
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None


class ListDatasets(RequestModel):
    """Datasets an evaluation can use: list_datasets (MCP), GET plexus/api/datasets, plexus.datasets()."""

    include_files: bool = Field(True, description="Also look for data files under the root")


class DescribeDataset(RequestModel):
    """One dataset, with the label distribution of a column: GET plexus/api/datasets/{ref}."""

    ref: str = Field(
        min_length=1,
        max_length=4096,
        description="Dataset ref (example:<name>, registered:<name> or a file path under the Jupyter root)",
    )
    label_column: OptionalText = Field(
        None, max_length=1024, description="Column whose label distribution is shown (default 'label')"
    )


class RegisterDataset(RequestModel):
    """Register a DataFrame as `registered:<name>`: POST plexus/api/datasets (the frame in the body) and, with
    `bytes`, POST plexus/api/datasets/uploads (the frame in parts); the notebook's `register_dataset` builds it."""

    name: Annotated[
        str, AfterValidator(registered_name), Field(description=f"The dataset's name: {REGISTERED_NAME_HELP}")
    ]
    replace: bool = Field(False, description="Replace a dataset of that name (its owner's or, for an admin, any)")


class BeginUpload(RegisterDataset):
    """Begin registering a DataFrame in parts: POST plexus/api/datasets/uploads."""

    bytes: Annotated[int | None, Number] = Field(
        None, ge=0, description="The frame's size in bytes, when the client knows it: checked against the quota now"
    )


class UploadPart(RequestModel):
    """One part of an upload: PUT plexus/api/datasets/uploads/{upload_id}?part=N (the body an Arrow IPC stream)."""

    upload_id: str = Field(min_length=1, max_length=64, description="The upload's id (POST datasets/uploads gave it)")
    part: Annotated[int, Number] = Field(ge=0, description="The part's number: 0 first, then one more for each part")
