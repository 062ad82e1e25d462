"""Writes the example datasets shipped with the package (sentiment.csv, topics.csv, fraud.csv).

Run `python -m plexus_mcp_jupyter.evaluations.examples.make_examples` after changing it; the output
is committed. Only the standard library is used, with fixed seeds, so the files are the same on every
machine and Python version. Each has id, text, label and a `prediction` column from a plausible but
imperfect classifier, so an evaluation of the `prediction` column has something to find.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240611

# --- sentiment: 200 product reviews, positive / negative ---------------------------------------------

_PRODUCTS = [
    "headphones",
    "kettle",
    "backpack",
    "phone case",
    "desk lamp",
    "blender",
    "keyboard",
    "jacket",
    "water bottle",
    "coffee grinder",
]
_POSITIVE = [
    "I love this {p}, it works great",
    "Excellent {p}, would buy again",
    "The {p} is fantastic value",
    "Really happy with the {p}",
    "Great quality {p}, arrived quickly",
    "This {p} is perfect for me",
    "Wonderful {p}, my family loves it",
    "Best {p} I have owned",
]
_NEGATIVE = [
    "The {p} broke after a week, terrible",
    "Awful {p}, asked for a refund",
    "Very disappointed with this {p}",
    "The {p} is poor quality and cheap",
    "Worst {p} ever, do not buy",
    "The {p} stopped working, useless",
    "Horrible {p}, returned it",
    "The {p} arrived damaged and support was bad",
]
# Reviews a keyword classifier gets wrong: the sentiment is carried by negation or sarcasm.
_TRICKY_POSITIVE = [
    "Not bad at all, the {p} does the job",
    "I was worried it would be awful but the {p} is fine",
    "No complaints about the {p}",
]
_TRICKY_NEGATIVE = [
    "Great, another {p} that fails on day two",
    "I wanted to love this {p} but it is not good",
    "Not great, the {p} feels flimsy",
]
_POSITIVE_WORDS = ("love", "excellent", "fantastic", "happy", "great", "perfect", "wonderful", "best", "fine")
_NEGATIVE_WORDS = (
    "broke",
    "terrible",
    "awful",
    "refund",
    "disappointed",
    "poor",
    "worst",
    "useless",
    "horrible",
    "damaged",
    "bad",
    "fails",
    "flimsy",
)


def keyword_sentiment(text: str) -> str:
    """The classifier behind sentiment.csv's prediction column: more negative words than positive -> negative."""
    words = text.lower().replace(",", " ").split()
    positive = sum(word.startswith(_POSITIVE_WORDS) for word in words)
    negative = sum(word.startswith(_NEGATIVE_WORDS) for word in words)
    return "negative" if negative > positive else "positive"


def sentiment_rows(rng: random.Random, count: int = 200) -> list[dict[str, str]]:
    rows = []
    for i in range(1, count + 1):
        label = "positive" if rng.random() < 0.55 else "negative"
        tricky = rng.random() < 0.12
        if label == "positive":
            template = rng.choice(_TRICKY_POSITIVE if tricky else _POSITIVE)
        else:
            template = rng.choice(_TRICKY_NEGATIVE if tricky else _NEGATIVE)
        text = template.format(p=rng.choice(_PRODUCTS))
        prediction = keyword_sentiment(text)
        if rng.random() < 0.04:  # a little noise on top of the systematic errors
            prediction = "negative" if prediction == "positive" else "positive"
        rows.append({"id": f"s{i:03d}", "text": text, "label": label, "prediction": prediction})
    return rows


# --- topics: 300 support tickets in 5 classes ---------------------------------------------------------

_TOPICS: dict[str, Sequence[str]] = {
    "billing": [
        "I was charged twice for my {m} subscription",
        "Please refund the payment from {m}",
        "My invoice for {m} shows the wrong amount",
        "How do I update the card used for billing?",
        "Why did my bill go up this month?",
    ],
    "technical": [
        "The app crashes when I open {m}",
        "I get an error 500 when uploading files",
        "Sync stopped working after the update",
        "The page is very slow to load since {m}",
        "Login button does nothing on my phone",
    ],
    "account": [
        "How do I change the email on my account?",
        "I want to delete my account",
        "Please reset my password, the link expired",
        "Can I add a second user to my account?",
        "My account was locked after too many attempts",
    ],
    "shipping": [
        "My parcel has not arrived since {m}",
        "The tracking number does not work",
        "Can you ship to a different address?",
        "The delivery came with a missing item",
        "How long does shipping take to Canada?",
    ],
    "feedback": [
        "Just wanted to say the new design is lovely",
        "It would be nice to have a dark mode",
        "Your support team was very helpful in {m}",
        "Please add an export to spreadsheet feature",
        "I like the product but the onboarding is confusing",
    ],
}
_MONTHS = ["January", "February", "March", "April", "May", "June"]
# Plausible confusions of a weak classifier: which topic a ticket is mistaken for.
_TOPIC_CONFUSIONS = {
    "billing": "account",
    "technical": "account",
    "account": "technical",
    "shipping": "billing",
    "feedback": "technical",
}


def topic_rows(rng: random.Random, count: int = 300) -> list[dict[str, str]]:
    rows = []
    weights = {"billing": 0.26, "technical": 0.28, "account": 0.2, "shipping": 0.16, "feedback": 0.1}
    labels, probabilities = list(weights), list(weights.values())
    for i in range(1, count + 1):
        label = rng.choices(labels, probabilities)[0]
        text = rng.choice(_TOPICS[label]).format(m=rng.choice(_MONTHS))
        roll = rng.random()
        if roll < 0.12:
            prediction = _TOPIC_CONFUSIONS[label]
        elif roll < 0.16:
            prediction = rng.choice([other for other in labels if other != label])
        else:
            prediction = label
        rows.append({"id": f"t{i:03d}", "text": text, "label": label, "prediction": prediction})
    return rows


# --- fraud: 500 card transactions, about 5% fraud -----------------------------------------------------

_MERCHANTS = ["grocery", "fuel", "restaurant", "online retail", "travel", "electronics", "pharmacy"]
_COUNTRIES = ["GB", "FR", "DE", "US", "ES", "NL"]


def fraud_rows(rng: random.Random, count: int = 500) -> list[dict[str, str]]:
    rows = []
    for i in range(1, count + 1):
        fraud = rng.random() < 0.06
        if fraud:
            merchant = rng.choice(["online retail", "electronics", "travel"])
            amount = round(rng.uniform(300, 2500), 2)
            hour = rng.choice([0, 1, 2, 3, 4, 23])
            foreign = rng.random() < 0.7
        else:
            merchant = rng.choice(_MERCHANTS)
            amount = round(rng.lognormvariate(3.3, 0.9), 2)
            hour = rng.randint(7, 22)
            foreign = rng.random() < 0.06
        country = rng.choice(_COUNTRIES[1:]) if foreign else "GB"
        text = f"{merchant} purchase of {amount:.2f} GBP at {hour:02d}:00 in {country}"
        # A rule-based detector: catches most fraud, with a few false alarms on big night-time buys.
        score = (amount > 250) + (hour < 6 or hour == 23) + foreign
        predicted_fraud = score >= 2
        if rng.random() < 0.02:
            predicted_fraud = not predicted_fraud
        rows.append(
            {
                "id": f"f{i:03d}",
                "text": text,
                "amount": f"{amount:.2f}",
                "merchant_category": merchant,
                "hour": str(hour),
                "country": country,
                "label": "fraud" if fraud else "legit",
                "prediction": "fraud" if predicted_fraud else "legit",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(directory: Path = HERE) -> None:
    """Write the three example files into `directory`."""
    write_csv(directory / "sentiment.csv", sentiment_rows(random.Random(SEED)))
    write_csv(directory / "topics.csv", topic_rows(random.Random(SEED + 1)))
    write_csv(directory / "fraud.csv", fraud_rows(random.Random(SEED + 2)))


if __name__ == "__main__":
    main()
