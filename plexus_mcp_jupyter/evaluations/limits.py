"""Bounds on what one evaluation may ask for: scorecard size, number of scores, items to score.

A request is checked against them before anything is parsed or dispatched, so one API key cannot make
the server parse megabytes of YAML or a worker write millions of rows; the worker checks the item bound
again once it knows the rows (a CSV or JSON Lines file is counted only when it is loaded). The defaults
are the settings' (config.py: max_scorecard_bytes, max_scorecard_scores, max_evaluation_items).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PlexusSettings
from ..core.errors import InvalidArgument

_SETTINGS = PlexusSettings.settings_traits()  # the defaults are the settings' (one source of truth)
DEFAULT_MAX_SCORECARD_BYTES: int = _SETTINGS["max_scorecard_bytes"].default_value
DEFAULT_MAX_SCORES: int = _SETTINGS["max_scorecard_scores"].default_value
DEFAULT_MAX_ITEMS: int = _SETTINGS["max_evaluation_items"].default_value
DEFAULT_MAX_PARQUET_BYTES: int = _SETTINGS["max_parquet_uncompressed_bytes"].default_value
# A scorecard needs 7 levels (card, scores, score, scorer, rules, rule, keywords); deeper is not a scorecard.
MAX_NESTING = 16
# A scorecard's numbers are sample sizes and seeds; a longer one is an attack on int() (and on JSON).
MAX_NUMBER_CHARS = 30


@dataclass(frozen=True)
class EvaluationLimits:
    """The bounds one EvaluationService applies (from the settings of the same names)."""

    max_scorecard_bytes: int = DEFAULT_MAX_SCORECARD_BYTES
    max_scorecard_scores: int = DEFAULT_MAX_SCORES
    max_evaluation_items: int = DEFAULT_MAX_ITEMS


def check_items(rows: int, scores: int, runs: int, limit: int, *, at_least: bool = False) -> None:
    """Refuse an evaluation of more than `limit` items (rows x scores x runs), saying by how much and what to do.
    `at_least`: the rows are those read so far of a file whose rows are not known in advance."""
    total = rows * scores * runs
    if total > limit:
        more = "at least " if at_least else ""
        raise InvalidArgument(
            f"this evaluation would score {more}{total:,} items ({more}{rows:,} rows x {scores:,} score(s) x {runs} "
            "run(s)), "
            f"more than the {limit:,} one evaluation may have (max_evaluation_items): sample fewer rows "
            "(sample_n or a scorecard's sample), use fewer scores or runs, or ask an admin to raise the bound"
        )


DEFAULT_LIMITS = EvaluationLimits()
