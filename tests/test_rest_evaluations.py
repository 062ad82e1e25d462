"""Evaluations and datasets over REST: a DataFrame registered from outside, evaluated, read back."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from .conftest import poll
from .test_rest import call, error_of

PARQUET = {"Content-Type": "application/vnd.apache.parquet"}


def frame(n: int = 300, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["cat", "dog", "bird"], size=n, p=[0.5, 0.3, 0.2])
    noisy = np.where(rng.random(n) < 0.25, rng.choice(["cat", "dog", "bird"], size=n), labels)
    return pd.DataFrame(
        {"id": [f"r{i}" for i in range(n)], "text": [f"item {i}" for i in range(n)], "label": labels, "guess": noisy}
    )


def parquet(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    df.to_parquet(buffer)
    return buffer.getvalue()


async def register(jp_fetch, name: str, df: pd.DataFrame, **params):
    # A copy: jp_fetch adds its token to the headers it is given.
    response = await jp_fetch(
        "plexus",
        "api",
        "datasets",
        method="POST",
        body=parquet(df),
        headers=dict(PARQUET),
        params={"name": name, **params},
    )
    return response.code, json.loads(response.body)


async def test_a_registered_dataframe_is_evaluated_and_its_metrics_match_scikit_learn(jp_fetch, runtime):
    df = frame()
    code, info = await register(jp_fetch, "pets", df)
    assert code == 201 and info["ref"] == "registered:pets" and info["rows"] == len(df)
    _, listing = await call(jp_fetch, "datasets", params={"include_files": "false"})
    assert "registered:pets" in [d["ref"] for d in listing["datasets"]]

    code, created = await call(
        jp_fetch,
        "evaluations",
        method="POST",
        body={
            "type": "accuracy",
            "dataset": "registered:pets",
            "prediction_column": "guess",
            "label_column": "label",
            "id_column": "id",
        },
    )
    assert code == 201 and created["status"] == "SETUP"

    async def get():
        return (await call(jp_fetch, "evaluations", created["evaluation_id"]))[1]

    done = await poll(get, lambda e: e["status"] in ("COMPLETED", "FAILED"), timeout=60)
    assert done["status"] == "COMPLETED", done["error_message"]
    m = done["metrics"]["score"]
    assert m["accuracy"] == pytest.approx(accuracy_score(df["label"], df["guess"]))
    assert m["weighted_f1"] == pytest.approx(f1_score(df["label"], df["guess"], average="weighted"))

    _, page = await call(
        jp_fetch, "evaluations", created["evaluation_id"], "results", params={"only_mismatches": "true", "limit": "10"}
    )
    wrong = df[df["label"] != df["guess"]]
    assert [i["item_id"] for i in page["items"]] == wrong["id"].tolist()[:10] and page["next_cursor"]
    _, listed = await call(jp_fetch, "evaluations", params={"status": "COMPLETED"})
    assert [e["evaluation_id"] for e in listed["evaluations"]] == [created["evaluation_id"]]


async def test_registering_refuses_taken_names_bad_names_and_bodies(jp_fetch, runtime):
    await register(jp_fetch, "taken", frame(10))
    with pytest.raises(Exception) as err:
        await register(jp_fetch, "taken", frame(10))
    assert err.value.code == 409 and "replace=true" in err.value.response.body.decode()
    code, info = await register(jp_fetch, "taken", frame(20), replace="true")
    assert code == 201 and info["rows"] == 20
    with pytest.raises(Exception) as err:
        await register(jp_fetch, "../escape", frame(10))
    assert err.value.code == 400
    code, message = await error_of(jp_fetch, "datasets", method="POST", body="not parquet", params={"name": "x"})
    assert code == 400 and "Content-Type" in message


async def test_json_records_register_a_dataset_too(jp_fetch, runtime):
    records = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    response = await jp_fetch(
        "plexus",
        "api",
        "datasets",
        method="POST",
        body=json.dumps({"records": records}),
        headers={"Content-Type": "application/json"},
        params={"name": "tiny"},
    )
    info = json.loads(response.body)
    assert response.code == 201 and info["rows"] == 2 and [c["name"] for c in info["columns"]] == ["text", "label"]


async def test_rest_evaluation_errors_say_what_is_allowed(jp_fetch, runtime):
    code, message = await error_of(
        jp_fetch,
        "evaluations",
        method="POST",
        body={"type": "accuracy", "dataset": "example:sentiment", "colour": "red"},
    )
    assert code == 400 and "unknown field(s) ['colour']" in message
    code, message = await error_of(jp_fetch, "evaluations", "nope")
    assert code == 404 and "no evaluation 'nope'" in message
    code, message = await error_of(jp_fetch, "evaluations", params={"status": "DONE"})
    assert code == 400 and "SETUP, RUNNING, COMPLETED, FAILED, CANCELLED" in message


async def test_one_dataset_is_described_with_its_label_distribution(jp_fetch, runtime):
    _, info = await call(jp_fetch, "datasets", "example:fraud")
    counts = {d["label"]: d["count"] for d in info["label_distribution"]}
    assert info["rows"] == 500 and sum(counts.values()) == 500 and len(counts) == 2
    code, message = await error_of(jp_fetch, "datasets", "../secret.csv")
    assert code == 400 and ".." in message
