"""The metrics of an evaluation, pure and vectorised (numpy/pandas; no server, no I/O).

Labels and predictions are normalised first (`LabelNormalization`: strip, lower-case, missing or empty
-> "na"). Normalisation runs on the *distinct* values only (`pd.factorize`, then a lookup), so a column
of a million rows with a handful of classes costs one hashing pass, not a million string operations.

`compute_metrics` builds ONE confusion matrix with `np.bincount` over the factorised codes and derives
every other figure from it (`Metrics.from_confusion`), so confusion matrices of chunks can also be summed
and turned into metrics as an evaluation progresses. `consistency_metrics` measures agreement between
N runs of the same scorer over the same items.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core.errors import InvalidArgument

__all__ = [
    "BALANCE_TOLERANCE",
    "Z_95",
    "ConfusionCounter",
    "ConsistencyMetrics",
    "LabelNormalization",
    "Metrics",
    "compute_metrics",
    "consistency_metrics",
    "normalize_labels",
    "wilson_interval",
]

Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975: a two-sided 95% interval."""

BALANCE_TOLERANCE = 0.2
"""A class's share may differ from an even split (1/K) by at most this fraction of 1/K."""


@dataclass(frozen=True)
class LabelNormalization:
    """How raw labels and predictions become class names.

    A value that is missing (None, NaN, pd.NA, NaT) or empty once stripped becomes `na_label`. Other values
    become `str(value)`, stripped of surrounding whitespace when `strip` and lower-cased when `lower`. The
    string "NaN" is a value like any other (it becomes "nan"), not a missing one. Distinct values are found
    by hashing, so values equal in Python (1, 1.0, True) are one value, named after the first one seen.
    `na_label` is used as given (not stripped or lower-cased), so a value that normalises to it ("NA" by
    default) is counted with the missing ones.
    """

    strip: bool = True
    lower: bool = True
    na_label: str = "na"

    def normalize(self, value: object) -> str:
        """The class name of one raw value."""
        if value is None or (np.ndim(value) == 0 and bool(pd.isna(value))):  # type: ignore[arg-type]
            return self.na_label
        text = str(value)
        if self.strip:
            text = text.strip()
        if self.lower:
            text = text.lower()
        return text or self.na_label


def _column(values: Any, name: str) -> Any:
    """`values` as something `pd.factorize` takes, checked to be one-dimensional."""
    if isinstance(values, (pd.Series, pd.Index, pd.api.extensions.ExtensionArray)):
        return values
    if isinstance(values, pd.DataFrame):
        raise InvalidArgument(f"{name} must be one column (a Series, 1-D array or list), not a DataFrame")
    if isinstance(values, (str, bytes)):
        raise InvalidArgument(f"{name} must be a sequence of values, not a single string")
    if not isinstance(values, np.ndarray):
        values = np.asarray(values if isinstance(values, (list, tuple)) else list(values), dtype=object)
    if values.ndim != 1:
        raise InvalidArgument(f"{name} must be one-dimensional; got an array of shape {values.shape}")
    return values


def _codes(values: Any, normalization: LabelNormalization) -> tuple[np.ndarray, np.ndarray]:
    """Factorised codes and the class name of each code.

    Missing values get code -1, and the names end with `na_label`, so `names[codes]` is the normalised
    column (numpy's index -1 is the last element). Only the distinct values are normalised.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    names = [normalization.normalize(u) for u in np.asarray(uniques, dtype=object)]
    names.append(normalization.na_label)
    return np.asarray(codes, dtype=np.intp), np.array(names, dtype=object)


def normalize_labels(values: Iterable[Any], normalization: LabelNormalization = LabelNormalization()) -> np.ndarray:
    """The normalised class name of every value, as a 1-D object array of str.

    Raises InvalidArgument when `values` is not one-dimensional.
    """
    codes, names = _codes(_column(values, "values"), normalization)
    return names[codes]


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of the proportion successes/n (95% with the default z).

    Returns (nan, nan) when n == 0: with no trials there is no interval (`to_dict` turns nan into null).
    Raises InvalidArgument unless 0 <= successes <= n.
    """
    if n < 0 or successes < 0 or successes > n:
        raise InvalidArgument(f"a Wilson interval needs 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # The bounds are exactly 0 at p == 0 and 1 at p == 1; say so rather than trust the rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half_width)
    high = 1.0 if successes == n else min(1.0, centre + half_width)
    return (low, high)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _balanced(counts: np.ndarray, classes: np.ndarray) -> bool:
    """Whether every class in `classes` (a boolean mask) has a share within tolerance of 1/K.

    Shares are of counts.sum(); K is the number of classes in the mask. The bound is inclusive (with a
    1e-12 allowance so that a share exactly on it is not lost to rounding).
    """
    k = int(classes.sum())
    total = counts.sum()
    if k == 0 or total == 0:
        return False
    shares = counts[classes] / total
    return bool(np.all(np.abs(shares - 1 / k) <= BALANCE_TOLERANCE / k + 1e-12))


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Metrics:
    """The metrics of predictions against reference labels, all derived from one confusion matrix.

    Arrays are indexed like `labels` (sorted class names) and read-only.

    - precision of a class that is never predicted, recall of a class that never occurs, and F1 when
      both are 0 are 0.0 (scikit-learn's zero_division=0).
    - macro_f1 is the mean F1 over `labels`; weighted_f1 weights each class's F1 by its support.
    - cohen_kappa = (Pa - Pe) / (1 - Pe) with Pe = sum_k (n_ref_k / N) (n_pred_k / N); it is nan when
      Pe == 1 (a single class everywhere), as in scikit-learn.
    - gwet_ac1 = (Pa - Pe) / (1 - Pe) with pi_k = (n_ref_k + n_pred_k) / 2N and
      Pe = sum_k pi_k (1 - pi_k) / (K - 1). With K == 1 (one class in both labels and predictions, so
      every item agrees) AC1 is 1.0. Pe <= 1/K < 1 whenever K >= 2, so Pe == 1 cannot occur; it would
      give nan.
    - labels_balanced: every class that occurs in the labels has a label share s with
      |s - 1/K| <= 0.2 * (1/K), K being the number of classes that occur in the labels.
      predictions_balanced: the same for prediction shares over all `labels` (classes of the labels or
      the predictions), so a scorer that never predicts one of the dataset's classes is not balanced.
    """

    n: int
    correct: int
    accuracy: float
    accuracy_ci: tuple[float, float]
    labels: tuple[str, ...]
    confusion_matrix: np.ndarray = field(repr=False)
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)
    f1: np.ndarray = field(repr=False)
    support: np.ndarray = field(repr=False)
    predicted: np.ndarray = field(repr=False)
    macro_f1: float
    weighted_f1: float
    cohen_kappa: float
    gwet_ac1: float
    labels_balanced: bool
    predictions_balanced: bool

    @classmethod
    def from_confusion(cls, confusion: Any, labels: Iterable[str]) -> Metrics:
        """Metrics of a confusion matrix (rows actual, columns predicted, both in the order of `labels`).

        Confusion matrices of chunks with the same labels can be summed before this is called. Raises
        InvalidArgument when the matrix is not square, negative, empty, or does not match `labels`.
        """
        names = tuple(str(label) for label in labels)
        cm = np.asarray(confusion)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(names):
            raise InvalidArgument(
                f"a confusion matrix must be K x K for K labels; got shape {cm.shape} for {len(names)} labels"
            )
        if cm.size and (not np.issubdtype(cm.dtype, np.integer) or cm.min() < 0):
            raise InvalidArgument("a confusion matrix must hold non-negative integer counts")
        cm = cm.astype(np.int64, copy=True)
        n = int(cm.sum())
        if n == 0:
            raise InvalidArgument("no items to compute metrics over: the confusion matrix is empty")
        k = len(names)
        tp = np.diagonal(cm).astype(np.float64)
        support = cm.sum(axis=1)
        predicted = cm.sum(axis=0)
        correct = int(np.trace(cm))

        precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
        # 2tp / (2tp + fp + fn), which is 2PR / (P + R) wherever that is defined, and 0 where tp == 0
        f1 = np.divide(2 * tp, predicted + support, out=np.zeros(k), where=(predicted + support) > 0)

        pa = correct / n
        ref_share = support / n
        pred_share = predicted / n
        pe_kappa = float(ref_share @ pred_share)
        kappa = (pa - pe_kappa) / (1 - pe_kappa) if pe_kappa < 1 else math.nan
        if k == 1:
            ac1 = 1.0
        else:
            pi = (ref_share + pred_share) / 2
            pe_ac1 = float(pi @ (1 - pi)) / (k - 1)
            ac1 = (pa - pe_ac1) / (1 - pe_ac1) if pe_ac1 < 1 else math.nan

        return cls(
            n=n,
            correct=correct,
            accuracy=pa,
            accuracy_ci=wilson_interval(correct, n),
            labels=names,
            confusion_matrix=_readonly(cm),
            precision=_readonly(precision),
            recall=_readonly(recall),
            f1=_readonly(f1),
            support=_readonly(support),
            predicted=_readonly(predicted),
            macro_f1=float(f1.mean()),
            weighted_f1=float(f1 @ support) / n,
            cohen_kappa=kappa,
            gwet_ac1=ac1,
            labels_balanced=_balanced(support, support > 0),
            predictions_balanced=_balanced(predicted, np.ones(k, dtype=bool)),
        )

    @property
    def label_distribution(self) -> dict[str, int]:
        """How many items carry each class as their label (every class in `labels`, zeros included)."""
        return dict(zip(self.labels, self.support.tolist(), strict=True))

    @property
    def prediction_distribution(self) -> dict[str, int]:
        """How many items were predicted as each class (every class in `labels`, zeros included)."""
        return dict(zip(self.labels, self.predicted.tolist(), strict=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict with stable keys (nan -> None; Python ints and floats; floats not rounded)."""
        return {
            "n": self.n,
            "correct": self.correct,
            "accuracy": _json_float(self.accuracy),
            "accuracy_ci": [_json_float(bound) for bound in self.accuracy_ci],
            "macro_f1": _json_float(self.macro_f1),
            "weighted_f1": _json_float(self.weighted_f1),
            "cohen_kappa": _json_float(self.cohen_kappa),
            "gwet_ac1": _json_float(self.gwet_ac1),
            "labels": list(self.labels),
            "per_class": [
                {"label": label, "precision": p, "recall": r, "f1": f, "support": s}
                for label, p, r, f, s in zip(
                    self.labels,
                    self.precision.tolist(),
                    self.recall.tolist(),
                    self.f1.tolist(),
                    self.support.tolist(),
                    strict=True,
                )
            ],
            "confusion_matrix": self.confusion_matrix.tolist(),
            "label_distribution": self.label_distribution,
            "prediction_distribution": self.prediction_distribution,
            "labels_balanced": self.labels_balanced,
            "predictions_balanced": self.predictions_balanced,
        }


def compute_metrics(
    labels: Iterable[Any], predictions: Iterable[Any], normalization: LabelNormalization = LabelNormalization()
) -> Metrics:
    """Metrics of `predictions` against reference `labels` (Series, 1-D arrays or lists, item by item).

    Both are normalised with `normalization`; the classes are the sorted union of the class names seen
    in either. Raises InvalidArgument when either is not one-dimensional, their lengths differ, or they
    are empty.
    """
    ref = _column(labels, "labels")
    pred = _column(predictions, "predictions")
    if len(ref) != len(pred):
        raise InvalidArgument(
            f"labels and predictions must have one value per item; got {len(ref)} labels and {len(pred)} predictions"
        )
    if len(ref) == 0:
        raise InvalidArgument("no items to compute metrics over: labels and predictions are empty")
    ref_codes, ref_names = _codes(ref, normalization)
    pred_codes, pred_names = _codes(pred, normalization)
    # Distinct raw values may share a class ("Yes", " yes"): merge them by class name.
    classes, class_of = np.unique(np.concatenate([ref_names, pred_names]), return_inverse=True)
    k = len(classes)
    ref_class = class_of[: len(ref_names)]
    pred_class = class_of[len(ref_names) :]
    cell = (ref_class * k)[ref_codes]
    cell += pred_class[pred_codes]
    confusion = np.bincount(cell, minlength=k * k).reshape(k, k)
    # The names always include na_label; drop it (and nothing else can be unused) when nothing is missing.
    seen = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    if not seen.all():
        confusion = confusion[np.ix_(seen, seen)]
        classes = classes[seen]
    return Metrics.from_confusion(confusion, classes.tolist())


class ConfusionCounter:
    """A confusion matrix counted batch by batch, so an evaluation keeps its counts, never its rows.

    :meth:`classes` turns a batch of raw values into class numbers: an Arrow-backed column is
    dictionary-encoded by pyarrow and only its distinct values are normalised (a batch of a million labels
    of five classes costs five `normalize` calls); anything else is factorised by pandas, as in
    :func:`compute_metrics`. Class numbers are stable for the counter's life, so items' classes can be
    compared as integers. :meth:`metrics` gives what :func:`compute_metrics` would give for the same pairs.
    """

    def __init__(self, normalization: LabelNormalization = LabelNormalization()) -> None:
        self.normalization = normalization
        self.names: list[str] = []
        self._numbers: dict[str, int] = {}
        self._counts = np.zeros((0, 0), dtype=np.int64)

    def number(self, name: str) -> int:
        """The class number of a class name (a new one for a name not seen before)."""
        found = self._numbers.get(name)
        if found is None:
            found = self._numbers[name] = len(self.names)
            self.names.append(name)
        return found

    def classes(self, values: Any) -> np.ndarray:
        """The class number of every value (normalised first), as an intp array."""
        arrow = _arrow_column(values)
        if arrow is not None:
            encoded = pc.dictionary_encode(arrow)
            distinct, codes = encoded.dictionary.to_pylist(), encoded.indices
            if codes.null_count:
                codes = codes.fill_null(len(distinct))
            raw = codes.to_numpy(zero_copy_only=False)
        else:
            raw, uniques = pd.factorize(_column(values, "values"), use_na_sentinel=True)
            distinct = list(np.asarray(uniques, dtype=object))
        lookup = [self.number(self.normalization.normalize(value)) for value in distinct]
        lookup.append(self.number(self.normalization.na_label))  # numpy's -1 and the filled nulls
        return np.asarray(lookup, dtype=np.intp)[raw]

    def add(self, labels: np.ndarray, predictions: np.ndarray) -> None:
        """Count pairs of class numbers (from :meth:`classes`), item by item."""
        k = len(self.names)
        if self._counts.shape[0] < k:
            grown = np.zeros((k, k), dtype=np.int64)
            grown[: self._counts.shape[0], : self._counts.shape[1]] = self._counts
            self._counts = grown
        self._counts += np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)

    def label_classes(self, labels: np.ndarray) -> set[int]:
        """The distinct class numbers among `labels` (for checking that a label column has two classes)."""
        return set(np.unique(labels).tolist())

    def metrics(self) -> Metrics:
        """The metrics of every pair counted so far (classes sorted by name, unseen ones left out)."""
        k = len(self.names)
        counts = np.zeros((k, k), dtype=np.int64)
        counts[: self._counts.shape[0], : self._counts.shape[1]] = self._counts
        seen = (counts.sum(axis=0) + counts.sum(axis=1)) > 0
        order = [i for i in np.argsort(np.asarray(self.names, dtype=object)) if seen[i]]
        return Metrics.from_confusion(counts[np.ix_(order, order)], [self.names[i] for i in order])


def _arrow_column(values: Any) -> pa.Array | None:
    """`values` as one Arrow array when they are Arrow already (pandas' Arrow-backed dtypes), else None."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    dtype = getattr(values, "dtype", None)
    if isinstance(dtype, pd.ArrowDtype) or (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"):
        array = pa.array(values)
        return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    return None


@dataclass(frozen=True, eq=False)
class ConsistencyMetrics:
    """Agreement between N >= 2 runs of one scorer over the same items.

    - mean_pairwise_agreement: the share of (item, pair of runs) with the same prediction; equally, the
      mean over all pairs of runs of the share of items on which the pair agrees.
    - unanimous_share: the share of items on which every run predicts the same class.
    - mean_modal_share: the mean over items of (runs predicting the item's most frequent class) / N.
    - fleiss_kappa: Fleiss' kappa, (P - Pe) / (1 - Pe) with P = mean_pairwise_agreement and
      Pe = sum_k p_k^2, p_k the share of all predictions in class k; nan when Pe == 1 (one class only).
    - gwet_ac1: Gwet's multi-rater AC1, (P - Pe) / (1 - Pe) with Pe = sum_k p_k (1 - p_k) / (K - 1);
      1.0 when K == 1 (every run predicts the same single class for every item).
    - run_agreement: N x N, the share of items on which runs i and j agree (1.0 on the diagonal).
    - modal_prediction / modal_share: per item, its most frequent class (ties go to the earliest run's
      prediction) and that class's share of the runs. Not part of `to_dict` (one entry per item).

    A missing prediction is the class `na_label` like any other: two runs that both miss agree.
    """

    n_items: int
    n_runs: int
    labels: tuple[str, ...]
    mean_pairwise_agreement: float
    unanimous_share: float
    mean_modal_share: float
    fleiss_kappa: float
    gwet_ac1: float
    run_agreement: np.ndarray = field(repr=False)
    prediction_counts: np.ndarray = field(repr=False)
    modal_prediction: np.ndarray = field(repr=False)
    modal_share: np.ndarray = field(repr=False)

    @property
    def prediction_distribution(self) -> dict[str, int]:
        """How many predictions (over all items and runs) fell in each class."""
        return dict(zip(self.labels, self.prediction_counts.tolist(), strict=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict with stable keys (nan -> None); per-item arrays are left out."""
        return {
            "n_items": self.n_items,
            "n_runs": self.n_runs,
            "labels": list(self.labels),
            "mean_pairwise_agreement": _json_float(self.mean_pairwise_agreement),
            "unanimous_share": _json_float(self.unanimous_share),
            "mean_modal_share": _json_float(self.mean_modal_share),
            "fleiss_kappa": _json_float(self.fleiss_kappa),
            "gwet_ac1": _json_float(self.gwet_ac1),
            "run_agreement": self.run_agreement.tolist(),
            "prediction_distribution": self.prediction_distribution,
        }


def consistency_metrics(runs: Any, normalization: LabelNormalization = LabelNormalization()) -> ConsistencyMetrics:
    """Agreement between runs: `runs` is items x runs (a DataFrame with one column per run, a 2-D array,
    or a list of per-item rows), at least one item and two runs.

    Predictions are normalised like `compute_metrics`'s. Raises InvalidArgument on any other shape.
    """
    if isinstance(runs, pd.DataFrame):
        grid = runs.to_numpy(dtype=object)
    else:
        grid = np.asarray(runs if isinstance(runs, np.ndarray) else list(runs), dtype=object)
    if grid.ndim != 2:
        raise InvalidArgument(f"runs must be two-dimensional (items x runs); got shape {grid.shape}")
    n_items, n_runs = grid.shape
    if n_items == 0:
        raise InvalidArgument("no items to compare: runs has no rows")
    if n_runs < 2:
        raise InvalidArgument(f"consistency needs at least 2 runs (columns) per item; got {n_runs}")

    codes, names = _codes(grid.ravel(), normalization)
    classes, class_of = np.unique(names, return_inverse=True)
    cells = class_of[codes].reshape(n_items, n_runs)
    prediction_counts = np.bincount(cells.ravel(), minlength=len(classes))
    seen = prediction_counts > 0
    if not seen.all():  # the unused na slot: renumber the classes that occur
        classes = classes[seen]
        cells = (np.cumsum(seen) - 1)[cells]
        prediction_counts = prediction_counts[seen]
    k = len(classes)

    # agree_with[r][i]: how many runs (itself included) predict for item i what run r predicts.
    run_agreement = np.eye(n_runs)
    agree_with = np.ones((n_runs, n_items), dtype=np.int64)
    for a in range(n_runs):
        for b in range(a + 1, n_runs):
            same = cells[:, a] == cells[:, b]
            agree_with[a] += same
            agree_with[b] += same
            run_agreement[a, b] = run_agreement[b, a] = same.mean()
    modal_run = agree_with.argmax(axis=0)
    modal_count = agree_with[modal_run, np.arange(n_items)]
    # sum over runs of agree_with = sum over classes of count^2; minus the N self-pairs = ordered agreeing pairs
    pairwise = float((agree_with.sum(axis=0) - n_runs).sum()) / (n_items * n_runs * (n_runs - 1))

    share = prediction_counts / prediction_counts.sum()
    pe_fleiss = float(share @ share)
    fleiss = (pairwise - pe_fleiss) / (1 - pe_fleiss) if pe_fleiss < 1 else math.nan
    if k == 1:
        ac1 = 1.0
    else:
        pe_ac1 = float(share @ (1 - share)) / (k - 1)
        ac1 = (pairwise - pe_ac1) / (1 - pe_ac1) if pe_ac1 < 1 else math.nan

    modal_share = modal_count / n_runs
    return ConsistencyMetrics(
        n_items=n_items,
        n_runs=n_runs,
        labels=tuple(classes.tolist()),
        mean_pairwise_agreement=pairwise,
        unanimous_share=float((modal_count == n_runs).mean()),
        mean_modal_share=float(modal_share.mean()),
        fleiss_kappa=fleiss,
        gwet_ac1=ac1,
        run_agreement=_readonly(run_agreement),
        prediction_counts=_readonly(prediction_counts),
        modal_prediction=_readonly(classes[cells[np.arange(n_items), modal_run]]),
        modal_share=_readonly(modal_share),
    )
