"""Scorers: specs, column / rules / python scoring, per-item errors, import failures."""

from __future__ import annotations

import pandas as pd
import pytest

from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.evaluations.scorers import (
    ColumnScorer,
    PythonScorer,
    RulesScorer,
    SpecError,
    kernel_scorer_spec,
    normalize_spec,
    scorer_from_spec,
    vectorized,
)

CHUNK = pd.DataFrame(
    {
        "text": ["Please REFUND me", "where is my parcel", "boom goes the app", "hi", None],
        "prediction": ["billing", "shipping", None, "other", "other"],
    },
    index=[10, 11, 12, 13, 14],  # not 0..n-1: results must follow the chunk's own index
)
TEXTS = CHUNK.dropna(subset=["text"])
FUNCTIONS = "tests.scorer_functions"


# --- column ---------------------------------------------------------------------------------------------------


def test_a_column_scorer_returns_the_column_as_labels():
    scorer = scorer_from_spec("column:prediction")
    assert isinstance(scorer, ColumnScorer) and scorer.name == "column:prediction"
    batch = scorer.score(CHUNK)
    # A text column stays pandas' str dtype (Arrow strings, no Python object per value): missing is its NA.
    labels = {k: None if pd.isna(v) else v for k, v in batch.predictions.to_dict().items()}
    assert labels == {10: "billing", 11: "shipping", 12: None, 13: "other", 14: "other"}
    assert batch.explanations is None and batch.errors is None


def test_a_column_scorer_names_a_missing_column():
    with pytest.raises(InvalidArgument, match="prediction column 'guess' not found; the columns are: text, prediction"):
        scorer_from_spec({"kind": "column", "column": "guess"}).score(CHUNK)


def test_non_string_predictions_become_strings():
    batch = scorer_from_spec("column:n").score(pd.DataFrame({"n": [1, 2, None]}))
    assert batch.predictions.tolist() == ["1.0", "2.0", None]


# --- rules ----------------------------------------------------------------------------------------------------

RULES = {
    "kind": "rules",
    "rules": [
        {"pattern": r"refund|money back", "label": "billing"},
        {"keywords": ["parcel", "tracking"], "label": "shipping"},
        {"pattern": r"\bapp\b|parcel", "label": "technical"},  # 'parcel' again: the earlier rule wins
    ],
    "default": "other",
}


def test_rules_first_match_wins_case_insensitively_with_a_default():
    batch = scorer_from_spec(RULES).score(CHUNK)
    assert batch.predictions.to_dict() == {10: "billing", 11: "shipping", 12: "technical", 13: "other", 14: "other"}
    assert batch.explanations is not None
    assert batch.explanations[10] == "rule 1 (pattern 'refund|money back') matched"
    assert batch.explanations[11] == "rule 2 (keywords 'parcel', 'tracking') matched"
    assert batch.explanations[13] == "no rule matched; default label"


def test_rules_can_be_case_sensitive_and_have_no_default():
    scorer = scorer_from_spec({**RULES, "case_sensitive": True, "default": None})
    assert scorer.score(CHUNK).predictions.to_dict() == {10: None, 11: "shipping", 12: "technical", 13: None, 14: None}


def test_keywords_are_literal_not_regexes():
    scorer = scorer_from_spec({"kind": "rules", "rules": [{"keywords": ["a.b"], "label": "dot"}]})
    assert scorer.score(pd.DataFrame({"text": ["a.b", "axb"]})).predictions.tolist() == ["dot", None]


def test_rules_read_the_input_column_given_by_the_spec_or_the_caller():
    frame = pd.DataFrame({"body": ["refund please"]})
    assert scorer_from_spec(RULES, input_column="body").score(frame).predictions.tolist() == ["billing"]
    assert scorer_from_spec({**RULES, "input_column": "body"}, input_column="x").columns == ("body",)
    with pytest.raises(InvalidArgument, match="input column 'text' not found; the columns are: body"):
        scorer_from_spec(RULES).score(frame)


def test_a_scorer_rebuilds_from_its_description():
    for spec in (RULES, "column:prediction", f"python:{FUNCTIONS}:shout"):
        scorer = scorer_from_spec(spec)
        again = scorer_from_spec(scorer.describe())
        assert again.describe() == scorer.describe()
        assert again.score(TEXTS).predictions.equals(scorer.score(TEXTS).predictions)


# --- python ---------------------------------------------------------------------------------------------------


def test_a_per_item_function_records_each_failure_and_scores_the_rest():
    scorer = scorer_from_spec(f"python:{FUNCTIONS}:shout")
    assert isinstance(scorer, PythonScorer) and not scorer.vectorized
    batch = scorer.score(CHUNK)
    assert batch.predictions.to_dict() == {
        10: "PLEASE REFUND ME",
        11: "WHERE IS MY PARCEL",
        12: None,
        13: "HI",
        14: None,
    }
    assert batch.errors is not None
    assert batch.errors.to_dict() == {
        10: None,
        11: None,
        12: "RuntimeError: cannot score 'boom goes the app'",
        13: None,
        14: "ValueError: no text",
    }


def test_a_per_item_function_may_return_label_and_explanation():
    batch = scorer_from_spec(f"python:{FUNCTIONS}:with_reason").score(TEXTS)
    assert batch.predictions.tolist() == ["long", "long", "long", "short"]
    assert batch.explanations is not None and batch.explanations[13] == "2 characters"
    assert batch.errors is None


@pytest.mark.parametrize("function", ["lengths", "untyped"])
def test_a_vectorised_function_is_called_once_per_chunk(function, monkeypatch):
    import tests.scorer_functions as module

    calls: list[int] = []
    original = getattr(module, function)

    def counting(texts: pd.Series) -> pd.Series:
        calls.append(len(texts))
        return original(texts)

    # 'lengths' is vectorised by its pd.Series annotation, 'untyped' only because the spec says so.
    monkeypatch.setattr(module, function, counting if function == "lengths" else vectorized(counting))
    scorer = scorer_from_spec(f"python:{FUNCTIONS}:{function}")
    assert isinstance(scorer, PythonScorer) and scorer.vectorized
    batch = scorer.score(TEXTS)
    assert calls == [4]
    assert batch.predictions.index.equals(TEXTS.index) and batch.predictions[13] in {"short", "2"}


def test_the_spec_can_force_vectorised_or_per_item():
    assert scorer_from_spec({"kind": "python", "function": f"{FUNCTIONS}:untyped", "vectorized": True}).score(
        TEXTS
    ).predictions.tolist() == ["16", "18", "17", "2"]
    per_item = scorer_from_spec({"kind": "python", "function": f"{FUNCTIONS}:lengths", "vectorized": False})
    assert not per_item.vectorized  # type: ignore[attr-defined]


def test_a_vectorised_function_may_return_a_frame_or_pairs():
    framed = scorer_from_spec(f"python:{FUNCTIONS}:lengths_with_reasons").score(TEXTS)
    assert framed.predictions.tolist() == ["16", "18", "17", "2"]
    assert framed.explanations is not None and set(framed.explanations) == {"counted"}
    paired = scorer_from_spec({"kind": "python", "function": f"{FUNCTIONS}:pairs", "vectorized": True}).score(TEXTS)
    assert paired.predictions.tolist() == ["P", "w", "b", "h"]
    assert paired.explanations is not None and paired.explanations[13] == "first letter of hi"


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("explodes", "KeyError: 'model offline'"),
        ("wrong_length", "ValueError: scorer returned 1 predictions for 4 items"),
    ],
)
def test_a_failing_vectorised_call_marks_every_item_of_the_chunk(function, error):
    batch = scorer_from_spec({"kind": "python", "function": f"{FUNCTIONS}:{function}", "vectorized": True}).score(TEXTS)
    assert batch.predictions.tolist() == [None] * 4
    assert batch.errors is not None and set(batch.errors) == {error} and batch.errors.index.equals(TEXTS.index)


def test_the_shipped_example_scorers_work_on_the_examples(tmp_path):
    from plexus_mcp_jupyter.evaluations.datasets import DatasetCatalog

    catalog = DatasetCatalog(tmp_path, tmp_path / "registered")
    sentiment = catalog.load("example:sentiment")
    batch = scorer_from_spec("python:plexus_mcp_jupyter.evaluations.examples.scorers:keyword_sentiment").score(
        sentiment
    )
    assert 0.8 < (batch.predictions == sentiment["label"]).mean() < 1
    topics = catalog.load("example:topics").head(20)
    per_item = scorer_from_spec("python:plexus_mcp_jupyter.evaluations.examples.scorers:ticket_topic")
    assert not per_item.vectorized  # type: ignore[attr-defined]
    assert per_item.score(topics).explanations is not None


# --- import failures and bad specs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "python:no_such_module_xyz:fn",
            "cannot import module 'no_such_module_xyz' for 'no_such_module_xyz:fn': "
            "No module named 'no_such_module_xyz'",
        ),
        (f"python:{FUNCTIONS}:missing", f"module '{FUNCTIONS}' has no attribute 'missing'"),
        (f"python:{FUNCTIONS}:NOT_A_FUNCTION", "is a int, not a function"),
        (
            "python:broken_scorer_module:fn",
            "importing module 'broken_scorer_module' for 'broken_scorer_module:fn' "
            "failed: ZeroDivisionError: division by zero",
        ),
        ("python:just_a_name", "'just_a_name' is not an import path; expected 'package.module:function'"),
    ],
)
def test_import_failures_say_what_failed(spec, message, tmp_path, monkeypatch):
    (tmp_path / "broken_scorer_module.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InvalidArgument) as caught:
        scorer_from_spec(spec)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "message", "field"),
    [
        ("magic:x", "unknown scorer kind 'magic' in 'magic:x'; a scorer spec is 'column:<column>'", "kind"),
        ({"kind": "magic"}, "unknown scorer kind 'magic'; expected one of column, rules, python, kernel", "kind"),
        ("prediction", "cannot read scorer spec 'prediction'", None),
        ("rules:x", "a rules scorer needs a mapping with 'rules'", None),
        (42, "got int", None),
        ({"kind": "column"}, "a column scorer needs 'column'", "column"),
        ({"kind": "python"}, "a python scorer needs 'function'", "function"),
        (
            {"kind": "column", "column": "p", "colour": 1},
            "unknown field 'colour' for a column scorer; allowed: column, name",
            "colour",
        ),
        ({"kind": "column", "column": ""}, "must be a non-empty string", "column"),
        ({"kind": "rules", "rules": []}, "must be a non-empty list", "rules"),
        (
            {"kind": "rules", "rules": [{"pattern": "(", "label": "x"}]},
            "invalid regular expression '(': missing )",
            "rules[0].pattern",
        ),
        (
            {"kind": "rules", "rules": [{"pattern": "a", "label": "x"}, {"label": "y"}]},
            "exactly one of 'pattern'",
            "rules[1]",
        ),
        ({"kind": "rules", "rules": [{"pattern": "a"}]}, "must be a non-empty string, not None", "rules[0].label"),
        (
            {"kind": "rules", "rules": [{"keywords": "refund", "label": "b"}]},
            "non-empty list of non-empty strings",
            "rules[0].keywords",
        ),
        (
            {"kind": "rules", "rules": [{"pattern": "a", "label": "x"}], "default": 3},
            "a label (a string) or null",
            "default",
        ),
        ({"kind": "python", "function": "m:f", "vectorized": "yes"}, "must be true or false", "vectorized"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(spec, message, field):
    with pytest.raises(SpecError) as caught:
        normalize_spec(spec)
    assert message in str(caught.value)
    assert caught.value.field == field


def test_kernel_scorers_are_checked_here_and_run_by_the_service():
    with pytest.raises(InvalidArgument, match="runs in its Jupyter kernel and is executed by the evaluation service"):
        scorer_from_spec("kernel:my_scorer")
    spec = kernel_scorer_spec({"kind": "kernel", "function": "my_scorer", "kernel_id": "k1"}, input_column="body")
    assert (spec.function, spec.kernel_id, spec.input_column, spec.vectorized) == ("my_scorer", "k1", "body", False)
    assert spec.describe()["name"] == "kernel:my_scorer"
    with pytest.raises(InvalidArgument, match="expected a kernel scorer, not a column scorer"):
        kernel_scorer_spec("column:x")


def test_a_rules_scorer_is_a_rules_scorer():
    assert isinstance(scorer_from_spec(RULES), RulesScorer)
