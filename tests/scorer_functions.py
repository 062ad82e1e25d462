"""Python scorer functions used by the tests (found by import path, as a user's would be)."""

from __future__ import annotations

import pandas as pd

NOT_A_FUNCTION = 42


def shout(text):
    """Per item: upper-cases the text; raises on the word 'boom' and on missing text."""
    if text is None:
        raise ValueError("no text")
    if "boom" in text:
        raise RuntimeError(f"cannot score {text!r}")
    return text.upper()


def with_reason(text):
    return ("long" if len(text) > 3 else "short"), f"{len(text)} characters"


def lengths(texts: pd.Series) -> pd.Series:
    """Vectorised by its annotation: labels every text by its length."""
    return texts.str.len().map(lambda n: "long" if n > 3 else "short")


def lengths_with_reasons(texts: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({"prediction": texts.str.len().astype(str), "explanation": "counted"})


def pairs(texts: pd.Series) -> list:
    return [(text[:1], f"first letter of {text}") for text in texts]


def wrong_length(texts: pd.Series) -> list:
    return ["x"]


def explodes(texts: pd.Series) -> pd.Series:
    raise KeyError("model offline")


def untyped(texts):
    return texts.str.len()


def sentiment_or_boom(text):
    """Per item: a keyword sentiment, but raises on texts containing 'refund' (a scorer failing on some items)."""
    if "refund" in str(text).lower():
        raise RuntimeError("model cannot handle refunds")
    return "positive" if any(w in str(text).lower() for w in ("great", "love", "excellent", "good")) else "negative"


def coin(texts: pd.Series) -> pd.Series:
    """Vectorised and random on purpose: a consistency evaluation must see disagreement between runs."""
    import numpy as np

    return pd.Series(np.random.default_rng().choice(["a", "b"], size=len(texts)), index=texts.index)


def slow(text):
    """Per item, 20 ms: long enough to cancel an evaluation mid-way."""
    import time

    time.sleep(0.02)
    return "positive"
