"""Evaluation metrics: normalisation, accuracy and its interval, per-class figures, kappa, AC1, balance, consistency.

Pure: no server. Every figure is checked against scikit-learn on generated data (hypothesis) or against
arithmetic written out by hand.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.evaluations.metrics import (
    LabelNormalization,
    Metrics,
    compute_metrics,
    consistency_metrics,
    normalize_labels,
    wilson_interval,
)

KINDS = ["list", "array", "series"]
RAW_VALUES = ["yes", "Yes", "  Yes ", "YES", "no", "No ", "maybe", "", "  ", None, float("nan"), "na", "N/A", "Nan"]


def naive_normalize(value: Any) -> str:
    """The normalisation rule, applied one value at a time (the reference the fast path must match)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "na"
    return str(value).strip().lower() or "na"


def as_container(values: list[Any], kind: str) -> Any:
    if kind == "series":
        return pd.Series(values, dtype=object)
    if kind == "array":
        return np.array(values, dtype=object)
    return list(values)


def naive_ac1(ref: list[str], pred: list[str]) -> float:
    classes = sorted(set(ref) | set(pred))
    n = len(ref)
    if len(classes) == 1:
        return 1.0
    pa = sum(r == p for r, p in zip(ref, pred, strict=True)) / n
    counts = Counter(ref) + Counter(pred)
    pe = sum((counts[c] / (2 * n)) * (1 - counts[c] / (2 * n)) for c in classes) / (len(classes) - 1)
    return (pa - pe) / (1 - pe)


def naive_balanced(counts: list[int]) -> bool:
    k, total = len(counts), sum(counts)
    return all(abs(c / total - 1 / k) <= 0.2 / k + 1e-12 for c in counts)


pairs = st.integers(min_value=1, max_value=60).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from(RAW_VALUES), min_size=n, max_size=n),
        st.lists(st.sampled_from(RAW_VALUES), min_size=n, max_size=n),
        st.sampled_from(KINDS),
    )
)


# -- normalisation ---------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=100)
@given(st.lists(st.sampled_from([*RAW_VALUES, 7, 2.5, True]), max_size=40), st.sampled_from(KINDS))
def test_normalize_labels_matches_the_rule_applied_value_by_value(values, kind):
    got = normalize_labels(as_container(values, kind))
    assert got.tolist() == [naive_normalize(v) for v in values]


def test_values_equal_in_python_are_one_class_named_after_the_first_seen():
    # Distinct values are found by hashing, where 1 == 1.0 == True.
    assert normalize_labels([1, True, 1.0]).tolist() == ["1", "1", "1"]
    assert normalize_labels([True, 1]).tolist() == ["true", "true"]


def test_normalisation_options_are_honoured():
    values = ["  Yes ", None, ""]
    assert normalize_labels(values, LabelNormalization(strip=False, lower=False)).tolist() == ["  Yes ", "na", "na"]
    assert normalize_labels(values, LabelNormalization(lower=False, na_label="MISSING")).tolist() == [
        "Yes",
        "MISSING",
        "MISSING",
    ]
    # Whitespace only is empty once stripped, but not when stripping is off.
    assert normalize_labels(["  "], LabelNormalization(strip=False)).tolist() == ["  "]


@dataclass(frozen=True)
class CountingNormalization(LabelNormalization):
    calls: list[object] | None = None

    def normalize(self, value: object) -> str:
        assert self.calls is not None
        self.calls.append(value)
        return super().normalize(value)


def test_only_distinct_values_are_normalised():
    calls: list[object] = []
    labels = np.array(["Yes", "no", None] * 10_000, dtype=object)
    metrics = compute_metrics(labels, labels[::-1], CountingNormalization(calls=calls))
    assert metrics.n == 30_000
    assert sorted(map(str, calls)) == ["Yes", "Yes", "no", "no"]  # two distinct values per column; None is NA


# -- cross-check against scikit-learn --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(deadline=None, max_examples=100)
@given(pairs)
def test_every_metric_matches_scikit_learn_on_normalised_labels(case):
    raw_ref, raw_pred, kind = case
    metrics = compute_metrics(as_container(raw_ref, kind), as_container(raw_pred, kind))
    ref = [naive_normalize(v) for v in raw_ref]
    pred = [naive_normalize(v) for v in raw_pred]
    labels = sorted(set(ref) | set(pred))

    assert metrics.labels == tuple(labels)
    assert metrics.n == len(ref)
    assert metrics.correct == sum(r == p for r, p in zip(ref, pred, strict=True))
    assert metrics.accuracy == pytest.approx(accuracy_score(ref, pred))
    np.testing.assert_array_equal(metrics.confusion_matrix, confusion_matrix(ref, pred, labels=labels))
    precision, recall, f1, support = precision_recall_fscore_support(ref, pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(metrics.precision, precision)
    np.testing.assert_allclose(metrics.recall, recall)
    np.testing.assert_allclose(metrics.f1, f1)
    np.testing.assert_array_equal(metrics.support, support)
    assert metrics.macro_f1 == pytest.approx(f1_score(ref, pred, labels=labels, average="macro", zero_division=0))
    assert metrics.weighted_f1 == pytest.approx(f1_score(ref, pred, labels=labels, average="weighted", zero_division=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(ref, pred)
    if math.isnan(kappa):
        assert math.isnan(metrics.cohen_kappa)
    else:
        assert metrics.cohen_kappa == pytest.approx(kappa, abs=1e-9)
    assert metrics.gwet_ac1 == pytest.approx(naive_ac1(ref, pred), abs=1e-9)
    assert metrics.label_distribution == {c: ref.count(c) for c in labels}
    assert metrics.prediction_distribution == {c: pred.count(c) for c in labels}
    assert metrics.labels_balanced == naive_balanced([ref.count(c) for c in labels if c in ref])
    assert metrics.predictions_balanced == naive_balanced([pred.count(c) for c in labels])
    low, high = metrics.accuracy_ci
    assert 0.0 <= low <= metrics.accuracy <= high <= 1.0
    json.dumps(metrics.to_dict(), allow_nan=False)


def test_a_large_column_matches_scikit_learn():
    rng = np.random.default_rng(7)
    classes = np.array(["alpha", "Beta ", " gamma", "delta", None, ""], dtype=object)
    ref = classes[rng.integers(0, len(classes), 20_000)]
    pred = np.where(rng.random(20_000) < 0.7, ref, classes[rng.integers(0, len(classes), 20_000)])
    metrics = compute_metrics(pd.Series(ref), pd.Series(pred, dtype="str"))
    ref_n, pred_n = normalize_labels(ref), normalize_labels(pred)
    labels = sorted(set(ref_n) | set(pred_n))
    assert metrics.labels == ("alpha", "beta", "delta", "gamma", "na")
    np.testing.assert_array_equal(metrics.confusion_matrix, confusion_matrix(ref_n, pred_n, labels=labels))
    assert metrics.cohen_kappa == pytest.approx(cohen_kappa_score(ref_n, pred_n))
    assert metrics.macro_f1 == pytest.approx(f1_score(ref_n, pred_n, average="macro"))


# -- hand-computed cases ---------------------------------------------------------------------------------


def from_rows(rows: list[list[int]], labels: list[str]) -> tuple[list[str], list[str]]:
    """Label and prediction lists whose confusion matrix is `rows` (rows actual, columns predicted)."""
    ref: list[str] = []
    pred: list[str] = []
    for actual, row in zip(labels, rows, strict=True):
        for predicted, count in zip(labels, row, strict=True):
            ref += [actual] * count
            pred += [predicted] * count
    return ref, pred


def test_kappa_and_ac1_of_a_two_class_case():
    # confusion [[4, 1], [2, 3]], N = 10: Pa = 7/10; labels a 5, b 5; predictions a 6, b 4.
    # kappa: Pe = .5*.6 + .5*.4 = .5, kappa = (.7 - .5) / .5 = .4
    # AC1: pi_a = (5 + 6) / 20 = .55, pi_b = .45, Pe = (.55*.45 + .45*.55) / 1 = .495,
    #      AC1 = (.7 - .495) / .505 = .205 / .505
    metrics = compute_metrics(*from_rows([[4, 1], [2, 3]], ["a", "b"]))
    assert metrics.accuracy == pytest.approx(0.7)
    assert metrics.cohen_kappa == pytest.approx(0.4)
    assert metrics.gwet_ac1 == pytest.approx(0.205 / 0.505)


def test_ac1_stays_high_where_kappa_collapses_on_a_skewed_class():
    # confusion [[90, 5], [5, 0]], N = 100: Pa = .9; labels and predictions both a 95, b 5.
    # kappa: Pe = .95^2 + .05^2 = .905, kappa = (.9 - .905) / .095 = -1/19
    # AC1: pi_a = .95, pi_b = .05, Pe = 2 * .95 * .05 / 1 = .095, AC1 = (.9 - .095) / .905
    metrics = compute_metrics(*from_rows([[90, 5], [5, 0]], ["a", "b"]))
    assert metrics.cohen_kappa == pytest.approx(-1 / 19)
    assert metrics.gwet_ac1 == pytest.approx(0.805 / 0.905)


def test_kappa_and_ac1_of_a_three_class_case():
    # confusion [[2, 1, 0], [0, 2, 1], [0, 0, 3]], N = 9: Pa = 7/9; labels 3, 3, 3; predictions 2, 3, 4.
    # kappa: Pe = (3*2 + 3*3 + 3*4) / 81 = 1/3, kappa = (7/9 - 1/3) / (2/3) = 2/3
    # AC1: pi = 5/18, 6/18, 7/18; sum pi(1 - pi) = (5*13 + 6*12 + 7*11) / 324 = 214/324; Pe = 107/324;
    #      AC1 = (252/324 - 107/324) / (217/324) = 145/217
    metrics = compute_metrics(*from_rows([[2, 1, 0], [0, 2, 1], [0, 0, 3]], ["a", "b", "c"]))
    assert metrics.cohen_kappa == pytest.approx(2 / 3)
    assert metrics.gwet_ac1 == pytest.approx(145 / 217)
    # a: P = 2/2, R = 2/3; b: P = 2/3, R = 2/3; c: P = 3/4, R = 3/3
    np.testing.assert_allclose(metrics.precision, [1, 2 / 3, 3 / 4])
    np.testing.assert_allclose(metrics.recall, [2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(metrics.f1, [0.8, 2 / 3, 6 / 7])


def test_a_single_class_everywhere_has_ac1_one_and_no_kappa():
    metrics = compute_metrics(["Yes", "yes ", " YES"], ["yes", "YES", "Yes"])
    assert metrics.labels == ("yes",)
    assert metrics.accuracy == 1.0
    assert metrics.gwet_ac1 == 1.0
    assert math.isnan(metrics.cohen_kappa)
    assert metrics.to_dict()["cohen_kappa"] is None
    assert metrics.labels_balanced and metrics.predictions_balanced


def test_a_class_never_predicted_has_precision_zero_and_missing_predictions_are_a_class():
    metrics = compute_metrics(["a", "b", "b", None], ["a", "a", None, ""])
    assert metrics.labels == ("a", "b", "na")
    assert metrics.confusion_matrix.tolist() == [[1, 0, 0], [1, 0, 1], [0, 0, 1]]
    assert metrics.precision.tolist() == [0.5, 0.0, 0.5]
    assert metrics.recall.tolist() == [1.0, 0.0, 1.0]


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (score interval):
    # 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605; 0/20 -> 0 to 0.1611; 1/29 -> 0.0061 to 0.1718
    for successes, n, low, high in [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ]:
        got = wilson_interval(successes, n)
        assert got == pytest.approx((low, high), abs=5e-5)
    assert wilson_interval(20, 20)[1] == 1.0
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))
    with pytest.raises(InvalidArgument, match="0 <= successes <= n"):
        wilson_interval(5, 4)


def test_accuracy_interval_is_the_wilson_interval_of_correct_over_n():
    metrics = compute_metrics(*from_rows([[4, 1], [2, 3]], ["a", "b"]))
    assert metrics.accuracy_ci == wilson_interval(7, 10)


@pytest.mark.parametrize(
    ("counts", "balanced"),
    [
        ([60, 40], True),  # |.6 - .5| = .1 = .2 * .5: on the bound, which is inclusive
        ([61, 39], False),
        ([40, 30, 30], True),  # |.4 - 1/3| = 1/15 = .2 * 1/3
        ([42, 29, 29], False),
        ([1], True),
    ],
)
def test_label_balance_is_every_share_within_20_percent_of_an_even_split(counts, balanced):
    labels = [name for name, count in zip("abc", counts, strict=False) for _ in range(count)]
    assert compute_metrics(labels, labels).labels_balanced is balanced


def test_prediction_balance_counts_the_dataset_classes_a_scorer_never_predicts():
    metrics = compute_metrics(["a", "a", "b", "b"], ["a", "a", "a", "a"])
    assert metrics.labels_balanced is True
    assert metrics.predictions_balanced is False  # b has a share of 0 of the predictions, not 1/2 +- 20%
    # A class only predicted (here "na") does not make the labels unbalanced.
    metrics = compute_metrics(["a", "a", "b", "b"], ["a", None, "b", "b"])
    assert metrics.labels_balanced is True
    assert metrics.label_distribution == {"a": 2, "b": 2, "na": 0}


def test_to_dict_is_json_with_stable_keys():
    metrics = compute_metrics(np.array(["a", "b", "b"]), pd.Series(["a", "b", "a"]))
    data = json.loads(json.dumps(metrics.to_dict(), allow_nan=False))
    assert list(data) == [
        "n",
        "correct",
        "accuracy",
        "accuracy_ci",
        "macro_f1",
        "weighted_f1",
        "cohen_kappa",
        "gwet_ac1",
        "labels",
        "per_class",
        "confusion_matrix",
        "label_distribution",
        "prediction_distribution",
        "labels_balanced",
        "predictions_balanced",
    ]
    assert data["per_class"][1] == {"label": "b", "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert data["confusion_matrix"] == [[1, 0], [1, 1]]
    assert type(data["n"]) is int and type(data["confusion_matrix"][0][0]) is int


def test_chunk_confusion_matrices_sum_to_the_whole():
    ref, pred = from_rows([[4, 1], [2, 3]], ["a", "b"])
    whole = compute_metrics(ref, pred)
    first, second = compute_metrics(ref[:5], pred[:5]), compute_metrics(ref[5:], pred[5:])
    assert first.labels == second.labels == whole.labels
    summed = Metrics.from_confusion(first.confusion_matrix + second.confusion_matrix, whole.labels)
    assert summed.to_dict() == whole.to_dict()


def test_metrics_are_read_only():
    metrics = compute_metrics(["a", "b"], ["a", "a"])
    with pytest.raises(ValueError):
        metrics.confusion_matrix[0, 0] = 5


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "predictions", "message"),
    [
        (["a", "b"], ["a"], "2 labels and 1 predictions"),
        ([], [], "empty"),
        (np.array([["a"], ["b"]]), ["a", "b"], "one-dimensional"),
        (pd.DataFrame({"x": ["a"]}), ["a"], "not a DataFrame"),
        ("ab", ["a", "b"], "not a single string"),
    ],
)
def test_bad_input_is_refused_with_a_message(labels, predictions, message):
    with pytest.raises(InvalidArgument, match=message):
        compute_metrics(labels, predictions)


def test_a_confusion_matrix_that_does_not_fit_its_labels_is_refused():
    with pytest.raises(InvalidArgument, match="K x K"):
        Metrics.from_confusion([[1, 2], [3, 4]], ["a"])
    with pytest.raises(InvalidArgument, match="non-negative integer"):
        Metrics.from_confusion([[1, -1], [0, 1]], ["a", "b"])
    with pytest.raises(InvalidArgument, match="empty"):
        Metrics.from_confusion([[0]], ["a"])


# -- consistency -----------------------------------------------------------------------------------------


def test_consistency_of_a_hand_case():
    # item 1: a a b  -> 2 of 6 ordered run pairs agree, modal share 2/3
    # item 2: b b b  -> 6/6, unanimous
    # item 3: na na a (None and "" are both "na") -> 2/6, modal share 2/3
    # pairwise agreement = (1/3 + 1 + 1/3) / 3 = 5/9; unanimous 1/3; mean modal share 7/9
    # shares over all 9 predictions: a 3/9, b 4/9, na 2/9
    # Fleiss: Pe = (9 + 16 + 4) / 81 = 29/81, kappa = (45/81 - 29/81) / (52/81) = 16/52
    # AC1: Pe = (3*6 + 4*5 + 2*7) / 81 / 2 = 52/162, AC1 = (90/162 - 52/162) / (110/162) = 38/110
    result = consistency_metrics([["a", "A", "b"], ["b", " b", "B"], [None, "", "a"]])
    assert (result.n_items, result.n_runs) == (3, 3)
    assert result.labels == ("a", "b", "na")
    assert result.mean_pairwise_agreement == pytest.approx(5 / 9)
    assert result.unanimous_share == pytest.approx(1 / 3)
    assert result.mean_modal_share == pytest.approx(7 / 9)
    assert result.fleiss_kappa == pytest.approx(16 / 52)
    assert result.gwet_ac1 == pytest.approx(38 / 110)
    np.testing.assert_allclose(result.run_agreement, [[1, 1, 1 / 3], [1, 1, 1 / 3], [1 / 3, 1 / 3, 1]])
    assert result.modal_prediction.tolist() == ["a", "b", "na"]
    np.testing.assert_allclose(result.modal_share, [2 / 3, 1, 2 / 3])
    assert result.prediction_distribution == {"a": 3, "b": 4, "na": 2}
    json.dumps(result.to_dict(), allow_nan=False)


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) as worked on Wikipedia ("Fleiss' kappa"): 10 subjects, 14 raters, 5 categories, kappa 0.210
    counts = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    runs = np.array([np.repeat(list("12345"), row) for row in counts])
    result = consistency_metrics(pd.DataFrame(runs))
    assert result.fleiss_kappa == pytest.approx(0.210, abs=5e-4)
    assert result.mean_pairwise_agreement == pytest.approx(0.378, abs=5e-4)


@settings(deadline=None, max_examples=60)
@given(pairs)
def test_two_runs_agree_like_accuracy_and_share_the_two_rater_ac1(case):
    first, second, _kind = case
    result = consistency_metrics(np.array([first, second], dtype=object).T)
    metrics = compute_metrics(first, second)
    assert result.mean_pairwise_agreement == pytest.approx(metrics.accuracy)
    assert result.unanimous_share == pytest.approx(metrics.accuracy)
    assert result.gwet_ac1 == pytest.approx(metrics.gwet_ac1)
    assert result.run_agreement[0, 1] == pytest.approx(metrics.accuracy)


def test_consistency_of_identical_runs_of_one_class():
    result = consistency_metrics([["x", "x"], ["x", "X"]])
    assert result.mean_pairwise_agreement == 1.0
    assert result.gwet_ac1 == 1.0
    assert math.isnan(result.fleiss_kappa)
    assert result.to_dict()["fleiss_kappa"] is None


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([["a"], ["b"]], "at least 2 runs"),
        (np.empty((0, 3), dtype=object), "no rows"),
        (["a", "b"], "two-dimensional"),
    ],
)
def test_consistency_refuses_bad_shapes(runs, message):
    with pytest.raises(InvalidArgument, match=message):
        consistency_metrics(runs)
