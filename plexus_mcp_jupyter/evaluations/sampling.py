"""Sampling a dataset before an evaluation: a fixed number of rows or a fraction, reproducible by seed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import InvalidArgument


def check_sample(n: Any = None, fraction: Any = None, seed: Any = None) -> None:
    """Check sample settings without data: exactly one of n (>= 1) and fraction (0 < f <= 1), seed whole."""
    if (n is None) == (fraction is None):
        raise InvalidArgument("a sample needs exactly one of n (a number of rows) and fraction (0 < fraction <= 1)")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InvalidArgument(f"sample n must be a whole number of at least 1, not {n!r}")
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1
    ):
        raise InvalidArgument(f"sample fraction must be a number above 0 and at most 1, not {fraction!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidArgument(f"sample seed must be a whole number of at least 0, not {seed!r}")


def sampled_rows(rows: int, n: int | None = None, fraction: float | None = None) -> int:
    """How many of `rows` rows a sample keeps: n, at most every row; or a fraction, rounded down."""
    if n is not None:
        return min(n, rows)
    if fraction is not None:
        return math.floor(rows * float(fraction))
    return rows


def sample_frame(
    df: pd.DataFrame, n: int | None = None, fraction: float | None = None, seed: int | None = None
) -> pd.DataFrame:
    """A random subset of `df`'s rows, kept in their original order and with their original index.

    `n` larger than the frame takes every row (a sample cannot be bigger than its population, and a
    scorecard written for a big dataset should still run on a small one). A fraction rounds down; if
    that selects no row, InvalidArgument says so. The same seed gives the same rows.
    """
    positions = sample_positions(len(df), n, fraction, seed)
    return df if positions is None else df.iloc[positions]


def sample_positions(
    rows: int, n: int | None = None, fraction: float | None = None, seed: int | None = None
) -> np.ndarray | None:
    """The positions, in order, of the rows a sample of `rows` rows keeps (None: every row), as sample_frame
    draws them: drawn before a file is read, an evaluation keeps only these rows of each batch (SampledFrames)."""
    check_sample(n, fraction, seed)
    size = sampled_rows(rows, n, fraction)
    if size == 0:
        what = f"fraction {fraction}" if fraction is not None else f"n={n}"
        raise InvalidArgument(
            f"sampling {what} of {rows} row(s) selects no rows; use a larger fraction or a number of rows n"
        )
    if size == rows:
        return None
    return _draw(np.random.default_rng(seed), rows, size)


# Up to this many rows a sample is drawn in one go; numpy's choice without replacement permutes every row (8 bytes
# a row) once the sample is over 1/50 of them. A larger population is drawn chunk by chunk.
WHOLE_DRAW_ROWS = 1 << 24
_HYPERGEOMETRIC_MAX = 10**9  # numpy's bound on each of its two counts


def _draw(rng: np.random.Generator, rows: int, size: int) -> np.ndarray:
    """`size` distinct positions of `rows`, sorted, uniformly drawn. Above WHOLE_DRAW_ROWS rows each chunk's share of
    the sample is drawn first (from the hypergeometric law of what is left: exact), then its positions: memory is
    the sample and one chunk, not every row (1e8 rows, half sampled: 800 MB in one go)."""
    if rows <= WHOLE_DRAW_ROWS:
        return np.sort(rng.choice(rows, size=size, replace=False))
    parts: list[np.ndarray] = []
    rows_left, size_left = rows, size
    for start in range(0, rows, WHOLE_DRAW_ROWS):
        chunk = min(WHOLE_DRAW_ROWS, rows - start)
        rest = rows_left - chunk
        if rest == 0:
            k = size_left
        elif rest < _HYPERGEOMETRIC_MAX:
            k = int(rng.hypergeometric(chunk, rest, size_left))
        else:  # over a billion rows left: the binomial law, kept within what the rest can still take
            k = min(chunk, size_left, max(size_left - rest, int(rng.binomial(size_left, chunk / rows_left))))
        if k:
            parts.append(start + np.sort(rng.choice(chunk, size=k, replace=False)))
        rows_left, size_left = rest, size_left - k
    return np.concatenate(parts)
