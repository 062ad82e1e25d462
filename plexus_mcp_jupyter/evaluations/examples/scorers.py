"""Example scorer functions for the shipped datasets, usable as python scorers in tests and docs.

``python:plexus_mcp_jupyter.evaluations.examples.scorers:keyword_sentiment`` is vectorised (it takes the
whole ``text`` column of ``example:sentiment``); ``...:ticket_topic`` is called once per item of
``example:topics`` and raises on a missing text, to show how per-item errors are recorded.
"""

from __future__ import annotations

import pandas as pd

_POSITIVE = r"\b(love|excellent|fantastic|happy|great|perfect|wonderful|best|fine|no complaints)"
_NEGATIVE = r"\b(broke|terrible|awful|refund|disappointed|poor|worst|useless|horrible|damaged|bad|fails|flimsy)"


def keyword_sentiment(texts: pd.Series) -> pd.Series:
    """'positive' or 'negative' for each text: negative when it has more negative than positive words."""
    lowered = texts.fillna("").str.lower()
    positive = lowered.str.count(_POSITIVE)
    negative = lowered.str.count(_NEGATIVE)
    return (negative > positive).map({True: "negative", False: "positive"})


_TOPIC_WORDS = {
    "billing": ("charged", "refund", "invoice", "bill", "payment", "card"),
    "shipping": ("parcel", "tracking", "ship", "delivery"),
    "account": ("account", "password", "email", "user"),
    "technical": ("crash", "error", "sync", "slow", "login", "button"),
}


def ticket_topic(text: str | None) -> tuple[str, str]:
    """The topic of one support ticket with the word that decided it; 'feedback' when no word matches."""
    if text is None:
        raise ValueError("ticket has no text")
    lowered = text.lower()
    for topic, words in _TOPIC_WORDS.items():
        for word in words:
            if word in lowered:
                return topic, f"mentions {word!r}"
    return "feedback", "no topic word"
