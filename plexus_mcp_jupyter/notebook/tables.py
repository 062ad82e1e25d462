"""pandas views of tasks, evaluations, results and metrics, with typed columns.

Times are `datetime64[ns, UTC]`, status and type are categoricals (with every status as a category, in
lifecycle order, so `value_counts()` shows the zeros and sorting follows the lifecycle), counts are
nullable integers, `correct` is a nullable boolean.

Metrics (`metrics_frame`): a DataFrame of per-class precision, recall, f1 and support indexed by label,
with the summary in `frame.attrs["summary"]` (n, correct, accuracy, accuracy_ci_low, accuracy_ci_high,
macro_f1, weighted_f1, cohen_kappa, gwet_ac1; for consistency evaluations their agreement figures).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from .mirror import EVALUATION_STATUSES, TASK_STATUSES

EVALUATION_TYPES = ("accuracy", "feedback", "consistency")
TASK_TIMES = ("created_at", "started_at", "completed_at", "estimated_completion_at")
TASK_COLUMNS = (
    "task_id",
    "type",
    "status",
    "description",
    "priority",
    "current_stage",
    "processed",
    "total",
    "percent",
    *TASK_TIMES,
    "error_message",
)
EVALUATION_COLUMNS = (
    "evaluation_id",
    "task_id",
    "type",
    "status",
    "dataset",
    "scores",
    "processed_items",
    "total_items",
    "elapsed_seconds",
    "remaining_seconds",
    "created_at",
    "started_at",
    "completed_at",
    "error_message",
)
ITEM_COLUMNS = ("seq", "item_id", "input", "label", "prediction", "correct", "explanation", "error")


def _frame(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    rows = list(rows)
    return pd.DataFrame({c: [r.get(c) for r in rows] for c in columns}, columns=list(columns))


def _times(frame: pd.DataFrame, columns: Iterable[str]) -> None:
    for column in columns:
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")


def _category(values: pd.Series, categories: Sequence[str] | None = None) -> pd.Series:
    if categories is None:
        return values.astype("category")
    return pd.Categorical(values, categories=list(categories), ordered=True)  # type: ignore[return-value]


def tasks_frame(summaries: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Task rows (REST `tasks`, `Task.list_row`) as a typed DataFrame, newest first. A row leaves out its null
    fields, a description that is the type's own text (NA here) and a current stage that progress names."""
    rows = []
    for s in summaries:
        progress = s.get("progress") or {}
        rows.append(
            {
                **s,
                "current_stage": s.get("current_stage", progress.get("stage")),
                "processed": progress.get("processed"),
                "total": progress.get("total"),
                "percent": progress.get("percent"),
            }
        )
    frame = _frame(rows, TASK_COLUMNS)
    frame["type"] = _category(frame["type"])
    frame["status"] = _category(frame["status"], TASK_STATUSES)
    frame["current_stage"] = _category(frame["current_stage"])
    for column in ("priority", "processed", "total"):
        frame[column] = frame[column].astype("Int64")
    frame["percent"] = frame["percent"].astype("Float64")
    for column in ("task_id", "description", "error_message"):
        frame[column] = frame[column].astype("string")
    _times(frame, TASK_TIMES)
    return frame


def evaluations_frame(views: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Evaluation summaries (REST `evaluations`) as a typed DataFrame, newest first."""
    frame = _frame(views, EVALUATION_COLUMNS)
    frame["type"] = _category(frame["type"], EVALUATION_TYPES)
    frame["status"] = _category(frame["status"], EVALUATION_STATUSES)
    for column in ("processed_items", "total_items"):
        frame[column] = frame[column].astype("Int64")
    for column in ("elapsed_seconds", "remaining_seconds"):
        frame[column] = frame[column].astype("Float64")
    for column in ("evaluation_id", "task_id", "dataset", "error_message"):
        frame[column] = frame[column].astype("string")
    _times(frame, ("created_at", "started_at", "completed_at"))
    return frame


def items_frame(items: Iterable[dict[str, Any]] | Any) -> pd.DataFrame:
    """Per-item results (dicts, or an Arrow table of them) as a typed DataFrame indexed by the item's position in
    the dataset (`seq`). Vectorised: an Arrow table of millions of items costs no Python step per item."""
    frame = items.to_pandas() if hasattr(items, "to_pandas") else _frame(items, ITEM_COLUMNS)
    frame["seq"] = frame["seq"].astype("Int64")
    labels = sorted({str(v) for c in ("label", "prediction") for v in pd.unique(frame[c].dropna())})
    frame["label"] = pd.Categorical(frame["label"], categories=labels)
    frame["prediction"] = pd.Categorical(frame["prediction"], categories=labels)
    frame["correct"] = frame["correct"].astype("boolean")
    for column in ("item_id", "input", "explanation", "error"):
        frame[column] = frame[column].astype("string")
    return frame.set_index("seq")


SUMMARY_KEYS = ("n", "correct", "accuracy", "macro_f1", "weighted_f1", "cohen_kappa", "gwet_ac1")


def metrics_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """One score's metrics: per-class rows (index `label`), the summary in `.attrs["summary"]`."""
    per_class = metrics.get("per_class") or []
    frame = pd.DataFrame(per_class, columns=["label", "precision", "recall", "f1", "support"]).set_index("label")
    frame = frame.astype({"precision": "Float64", "recall": "Float64", "f1": "Float64", "support": "Int64"})
    if "per_class" in metrics:
        summary: dict[str, Any] = {k: metrics.get(k) for k in SUMMARY_KEYS}
        low, high = (metrics.get("accuracy_ci") or [None, None])[:2]
        summary["accuracy_ci_low"], summary["accuracy_ci_high"] = low, high
    else:  # consistency: agreement between runs, no classes
        summary = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
    frame.attrs["summary"] = summary
    if metrics.get("truncated"):
        frame.attrs["truncated"] = metrics["truncated"]
    return frame


def confusion_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """The confusion matrix: rows actual, columns predicted, labels sorted."""
    matrix = metrics.get("confusion_matrix")
    labels = metrics.get("labels") or []
    if matrix is None:
        raise ValueError(metrics.get("truncated") or "these metrics have no confusion matrix")
    return pd.DataFrame(matrix, index=pd.Index(labels, name="actual"), columns=pd.Index(labels, name="predicted"))


def heatmap(frame: pd.DataFrame) -> Any:
    """A Styler heatmap of a count matrix: matplotlib's gradient when it is installed, plain CSS otherwise."""
    styler = frame.style
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        top = max(int(frame.to_numpy().max()), 1) if frame.size else 1

        def shade(column: pd.Series) -> list[str]:
            out = []
            for value in column:
                alpha = value / top
                ink = "white" if alpha > 0.55 else "black"
                out.append(f"background-color: rgba(31, 119, 180, {alpha:.2f}); color: {ink}")
            return out

        return styler.apply(shade, axis=0)
    return styler.background_gradient(cmap="Blues", axis=None)
