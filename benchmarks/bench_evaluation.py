"""Evaluation metrics on a 1,000,000-row prediction column: ours against plain pandas/numpy and scikit-learn.

One data set (string labels, 5 classes written with stray case and whitespace, ~20% wrong predictions,
~2% missing labels and ~1% missing predictions) is scored the same way three times, in alternating
rounds, and the medians are compared:

  ours     plexus_mcp_jupyter.evaluations.metrics.compute_metrics
  numpy    what a good data scientist writes in plain pandas/numpy: `.str.strip().str.lower()` on the
           column, categorical codes, one np.bincount confusion matrix and the formulas (`numpy_peer`)
  numpy-u  the same, normalising only the distinct values (pd.factorize), i.e. the fastest peer we know
  sklearn  classification_report + cohen_kappa_score + confusion_matrix + accuracy_score on the
           normalised columns, with the same `.str` normalisation as `numpy` (timed with and without it)

Every way includes label normalisation (sklearn is also shown without it). The column dtype is pandas'
default for strings (`str`, Arrow-backed in pandas 3) and, in a second pass, `object`. Peak memory is
tracemalloc's peak in a separate, untimed call: Python objects and numpy buffers, NOT Arrow buffers.

    python benchmarks/bench_evaluation.py [--rows 1000000] [--rounds 7] [--sklearn-rounds 3] [--dtypes str,object]

Goal: within 1.3x of raw pandas/numpy, faster than scikit-learn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, classification_report, cohen_kappa_score, confusion_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed copy

from plexus_mcp_jupyter.evaluations.metrics import compute_metrics, wilson_interval

CLASSES = ["billing", "cancellation", "complaint", "praise", "question"]
SPELLINGS = {name: [name, name.title(), f" {name}", f"{name.upper()} "] for name in CLASSES}


def make_data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw label and prediction columns (object arrays) with noise, odd spellings and missing values."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(len(CLASSES), size=rows, p=[0.35, 0.25, 0.2, 0.1, 0.1])
    wrong = rng.random(rows) < 0.2
    predicted = np.where(wrong, rng.integers(0, len(CLASSES), rows), truth)
    spellings = np.array([SPELLINGS[c] for c in CLASSES], dtype=object)  # classes x 4
    labels = spellings[truth, rng.integers(0, 4, rows)]
    predictions = spellings[predicted, rng.integers(0, 4, rows)]
    labels[rng.random(rows) < 0.01] = None
    labels[rng.random(rows) < 0.01] = ""
    predictions[rng.random(rows) < 0.01] = None
    return labels, predictions


# -- the plain pandas/numpy peer ------------------------------------------------------------------------


def normalise_column(s: pd.Series) -> pd.Series:
    s = s.fillna("").astype(str).str.strip().str.lower()
    return s.mask(s == "", "na")


def metrics_from_codes(ref: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Every figure of compute_metrics from integer codes, written out the way a notebook would."""
    k = len(labels)
    cm = np.bincount(ref * k + pred, minlength=k * k).reshape(k, k)
    n = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * tp, predicted + support, out=np.zeros(k), where=(predicted + support) > 0)
    accuracy = tp.sum() / n
    pe = (support / n) @ (predicted / n)
    pi = (support + predicted) / (2 * n)
    pe_ac1 = pi @ (1 - pi) / (k - 1)
    ref_share, pred_share = support[support > 0] / n, predicted / n
    return {
        "accuracy": accuracy,
        "accuracy_ci": wilson_interval(int(tp.sum()), int(n)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "macro_f1": f1.mean(),
        "weighted_f1": f1 @ support / n,
        "cohen_kappa": (accuracy - pe) / (1 - pe),
        "gwet_ac1": (accuracy - pe_ac1) / (1 - pe_ac1),
        "confusion_matrix": cm,
        "labels_balanced": bool(np.all(np.abs(ref_share - 1 / len(ref_share)) <= 0.2 / len(ref_share))),
        "predictions_balanced": bool(np.all(np.abs(pred_share - 1 / k) <= 0.2 / k)),
        "labels": labels,
    }


def numpy_peer(df: pd.DataFrame) -> dict[str, Any]:
    y = normalise_column(df["label"])
    p = normalise_column(df["prediction"])
    labels = np.union1d(y.unique(), p.unique())
    ref = pd.Categorical(y, categories=labels).codes.astype(np.intp)
    pred = pd.Categorical(p, categories=labels).codes.astype(np.intp)
    return metrics_from_codes(ref, pred, labels)


def _normalise_distinct(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(s)
    names = pd.Series(np.asarray(uniques, dtype=object)).str.strip().str.lower().replace("", "na").to_numpy()
    return codes, np.append(names, "na")  # code -1 (missing) indexes the trailing "na"


def numpy_unique_peer(df: pd.DataFrame) -> dict[str, Any]:
    ref_codes, ref_names = _normalise_distinct(df["label"])
    pred_codes, pred_names = _normalise_distinct(df["prediction"])
    ref_used = np.zeros(len(ref_names), dtype=bool)
    ref_used[ref_codes] = True
    pred_used = np.zeros(len(pred_names), dtype=bool)
    pred_used[pred_codes] = True
    labels = np.union1d(ref_names[ref_used], pred_names[pred_used])
    ref = np.searchsorted(labels, ref_names)[ref_codes]
    pred = np.searchsorted(labels, pred_names)[pred_codes]
    return metrics_from_codes(ref, pred, labels)


# -- scikit-learn ---------------------------------------------------------------------------------------


def sklearn_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    labels = np.union1d(np.unique(y), np.unique(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = classification_report(y, p, labels=labels, output_dict=True, zero_division=0)
    return {
        "accuracy": accuracy_score(y, p),
        "report": report,
        "cohen_kappa": cohen_kappa_score(y, p),
        "confusion_matrix": confusion_matrix(y, p, labels=labels),
    }


def sklearn_peer(df: pd.DataFrame) -> dict[str, Any]:
    return sklearn_metrics(normalise_column(df["label"]).to_numpy(), normalise_column(df["prediction"]).to_numpy())


# -- the run --------------------------------------------------------------------------------------------


def check_same(ours: Any, peer: dict[str, Any], unique_peer: dict[str, Any], sk: dict[str, Any]) -> None:
    """All ways must agree, or the timings compare different work."""
    for other in (peer, unique_peer):
        assert list(ours.labels) == list(other["labels"]), (ours.labels, other["labels"])
        np.testing.assert_array_equal(ours.confusion_matrix, other["confusion_matrix"])
        for key in ("accuracy", "macro_f1", "weighted_f1", "cohen_kappa", "gwet_ac1"):
            assert abs(getattr(ours, key) - other[key]) < 1e-12, key
        np.testing.assert_allclose(ours.f1, other["f1"])
        assert (ours.labels_balanced, ours.predictions_balanced) == (
            other["labels_balanced"],
            other["predictions_balanced"],
        )
    np.testing.assert_array_equal(ours.confusion_matrix, sk["confusion_matrix"])
    assert abs(ours.cohen_kappa - sk["cohen_kappa"]) < 1e-9
    assert abs(ours.macro_f1 - sk["report"]["macro avg"]["f1-score"]) < 1e-12


def peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run(df: pd.DataFrame, rounds: int, sklearn_rounds: int) -> None:
    normalised = (normalise_column(df["label"]).to_numpy(), normalise_column(df["prediction"]).to_numpy())
    ways: dict[str, Callable[[], Any]] = {
        "ours": lambda: compute_metrics(df["label"], df["prediction"]),
        "numpy": lambda: numpy_peer(df),
        "numpy-u": lambda: numpy_unique_peer(df),
        "sklearn": lambda: sklearn_peer(df),
        "sklearn (no norm.)": lambda: sklearn_metrics(*normalised),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    first: dict[str, Any] = {}
    for r in range(max(rounds, sklearn_rounds)):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))  # alternate, so warm-up and drift even out
        for name in order:
            if r >= (sklearn_rounds if name.startswith("sklearn") else rounds):
                continue
            t0 = time.perf_counter()
            result = ways[name]()
            times[name].append(time.perf_counter() - t0)
            first.setdefault(name, result)
    check_same(first["ours"], first["numpy"], first["numpy-u"], first["sklearn"])
    median = {name: statistics.median(ts) for name, ts in times.items()}
    peaks = {name: peak_mib(fn) for name, fn in ways.items()}
    for name in ways:
        print(f"  {name:<19} median {1000 * median[name]:8.1f} ms   tracemalloc peak {peaks[name]:7.1f} MiB")
    ours = median["ours"]
    print(
        f"  ours / numpy {ours / median['numpy']:.2f}   ours / numpy-u {ours / median['numpy-u']:.2f}   "
        f"ours / sklearn {ours / median['sklearn']:.3f} (sklearn without normalisation: "
        f"{ours / median['sklearn (no norm.)']:.3f})"
    )
    within = ours <= 1.3 * median["numpy"]
    faster = ours < median["sklearn (no norm.)"]
    print(
        f"  goal within 1.3x of pandas/numpy: {'met' if within else 'NOT met'}; "
        f"faster than scikit-learn (even without its normalisation): {'met' if faster else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sklearn-rounds", type=int, default=3, help="scikit-learn takes seconds a round")
    parser.add_argument("--dtypes", default="str,object", help="column dtypes to run, comma-separated")
    args = parser.parse_args()
    labels, predictions = make_data(args.rows)
    print(
        f"{args.rows:,} rows, {len(CLASSES)} classes + na; medians of {args.rounds} alternating rounds "
        f"({args.sklearn_rounds} for scikit-learn)"
    )
    for dtype in args.dtypes.split(","):
        df = pd.DataFrame({"label": pd.Series(labels, dtype=dtype), "prediction": pd.Series(predictions, dtype=dtype)})
        print(f"column dtype {df['label'].dtype!s}:")
        run(df, args.rounds, args.sklearn_rounds)


if __name__ == "__main__":
    main()
