"""Evaluations end to end: a real server, the SDK client, real worker processes and the SQLite store."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from mcp import MCPError
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

from plexus_mcp_jupyter.evaluations.datasets import EXAMPLES_DIR
from plexus_mcp_jupyter.evaluations.requests import CreateEvaluation
from plexus_mcp_jupyter.evaluations.sampling import sample_frame

from .conftest import poll
from .test_subscriptions import updates_collector

BY_COLUMN = CreateEvaluation(
    type="accuracy", dataset="example:sentiment", prediction_column="prediction", label_column="label"
)

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


async def create(client, **arguments) -> dict:
    result = await client.call_tool("create_evaluation", arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def finished(client, evaluation_id: str, timeout: float = 60) -> dict:
    async def get():
        return (await client.call_tool("get_evaluation", {"evaluation_id": evaluation_id})).structured_content

    return await poll(get, lambda e: e["status"] in FINAL, timeout=timeout, interval=0.1)


async def all_results(client, evaluation_id: str, **arguments) -> list[dict]:
    items, cursor = [], None
    while True:
        page = (
            await client.call_tool(
                "get_evaluation_results",
                {"evaluation_id": evaluation_id, "limit": 37, **arguments, **({"cursor": cursor} if cursor else {})},
            )
        ).structured_content
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def normalised(series: pd.Series) -> pd.Series:
    return series.fillna("").astype(str).str.strip().str.lower().replace("", "na")


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_an_accuracy_evaluation_of_a_prediction_column_matches_scikit_learn(mcp_client, runtime):
    frame = pd.read_csv(EXAMPLES_DIR / "sentiment.csv")
    async with mcp_client() as client:
        started = await create(
            client,
            type="accuracy",
            dataset="example:sentiment",
            prediction_column="prediction",
            label_column="label",
            input_column="text",
            id_column="id",
        )
        assert started["status"] == "SETUP" and started["task_id"]
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "COMPLETED", done["error_message"]
        assert done["processed_items"] == done["total_items"] == len(frame)
        m = done["metrics"]["score"]
        labels, predictions = normalised(frame["label"]), normalised(frame["prediction"])
        assert m["n"] == len(frame)
        assert m["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
        assert m["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))
        assert m["cohen_kappa"] == pytest.approx(cohen_kappa_score(labels, predictions))
        assert m["accuracy_ci"][0] < m["accuracy"] < m["accuracy_ci"][1]

        # Every item once, in order, across pages; the mismatches are exactly the wrong ones.
        items = await all_results(client, started["evaluation_id"])
        assert [i["seq"] for i in items] == list(range(len(frame)))
        assert [i["item_id"] for i in items] == frame["id"].tolist()
        wrong = await all_results(client, started["evaluation_id"], only_mismatches=True)
        assert [i["item_id"] for i in wrong] == frame["id"][labels != predictions].tolist()
        assert all(i["correct"] is False for i in wrong)
        positives = await all_results(client, started["evaluation_id"], label="positive")
        assert len(positives) == int((frame["label"] == "positive").sum())

        # The same through the resources.
        resource = json.loads((await client.read_resource(done["resource_uri"])).contents[0].text)
        assert resource["metrics"]["score"]["accuracy"] == m["accuracy"]
        page = json.loads(
            (
                await client.read_resource(
                    f"plexus://evaluations/{started['evaluation_id']}/results?only_mismatches=true&limit=5"
                )
            )
            .contents[0]
            .text
        )
        assert [i["item_id"] for i in page["items"]] == [i["item_id"] for i in wrong[:5]]


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_a_scorer_failing_on_some_items_records_them_and_completes(mcp_client, runtime):
    frame = pd.read_csv(EXAMPLES_DIR / "sentiment.csv")
    failing = frame["text"].str.lower().str.contains("refund")
    assert failing.any() and not failing.all()
    async with mcp_client() as client:
        started = await create(
            client,
            type="accuracy",
            dataset="example:sentiment",
            label_column="label",
            scorer="python:tests.scorer_functions:sentiment_or_boom",
        )
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "COMPLETED", done["error_message"]
        assert done["counts"]["score"] == {
            "items": len(frame),
            "scored": int((~failing).sum()),
            "errors": int(failing.sum()),
        }
        assert done["metrics"]["score"]["n"] == int((~failing).sum())
        errors = [i for i in await all_results(client, started["evaluation_id"], only_mismatches=True) if i["error"]]
        assert len(errors) == int(failing.sum())
        assert all("model cannot handle refunds" in i["error"] and i["correct"] is None for i in errors)


async def test_a_consistency_evaluation_measures_agreement_between_runs(mcp_client, runtime):
    async with mcp_client() as client:
        steady = await create(client, type="consistency", dataset="example:topics", scorer="column:prediction", runs=3)
        random = await create(
            client,
            type="consistency",
            dataset="example:topics",
            scorer="python:tests.scorer_functions:coin",
            runs=4,
            label_column="label",
        )
        steady_done = await finished(client, steady["evaluation_id"])
        random_done = await finished(client, random["evaluation_id"])
        assert steady_done["status"] == random_done["status"] == "COMPLETED"
        assert steady_done["metrics"]["score"]["unanimous_share"] == 1.0
        m = random_done["metrics"]["score"]
        assert m["n_runs"] == 4 and 0.2 < m["mean_pairwise_agreement"] < 0.8 and m["unanimous_share"] < 0.5
        assert "accuracy_of_modal" in m
        disagreeing = await all_results(client, random["evaluation_id"], only_mismatches=True)
        assert disagreeing and all(len(i["explanation"].split(", ")) == 4 for i in disagreeing)


async def test_a_feedback_evaluation_and_listing_by_type_and_status(mcp_client, runtime):
    async with mcp_client() as client:
        fb = await create(
            client,
            type="feedback",
            dataset="example:fraud",
            prediction_column="prediction",
            label_column="label",
            sample_n=100,
            seed=3,
        )
        done = await finished(client, fb["evaluation_id"])
        assert done["status"] == "COMPLETED" and done["total_items"] == 100
        listed = await client.call_tool("list_evaluations", {"type": ["feedback"], "status": ["COMPLETED"]})
        assert [e["evaluation_id"] for e in listed.structured_content["evaluations"]] == [fb["evaluation_id"]]
        none = await client.call_tool("list_evaluations", {"status": ["RUNNING"], "type": ["feedback"]})
        assert none.structured_content["evaluations"] == []


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_cancelling_an_evaluation_mid_way_stops_it(mcp_client, runtime):
    async with mcp_client() as client:
        started = await create(
            client,
            type="accuracy",
            dataset="example:fraud",
            label_column="label",
            scorer="python:tests.scorer_functions:slow",
            input_column="text",
        )

        async def status():
            return (
                await client.call_tool("get_evaluation", {"evaluation_id": started["evaluation_id"]})
            ).structured_content

        await poll(status, lambda e: e["status"] == "RUNNING" and e["processed_items"] > 0, timeout=30)
        await client.call_tool("cancel_tasks", {"task_ids": [started["task_id"]]})
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "CANCELLED" and done["processed_items"] < done["total_items"]
        assert done["metrics"] is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"type": "precision", "dataset": "example:sentiment"}, "unknown evaluation type 'precision'"),
        (
            {"type": "accuracy", "dataset": "missing.csv", "prediction_column": "p", "label_column": "l"},
            "no dataset file 'missing.csv'",
        ),
        ({"type": "accuracy", "dataset": "../outside.csv", "prediction_column": "p", "label_column": "l"}, ".."),
        (
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "prediction_column": "prediction",
                "label_column": "gold",
            },
            "label column 'gold' is not in dataset 'example:sentiment'; its columns: id, text",
        ),
        ({"type": "accuracy", "dataset": "example:sentiment", "label_column": "label"}, "give either scorer"),
        ({"type": "consistency", "dataset": "example:sentiment", "scorer": "column:prediction", "runs": 1}, "runs"),
        (
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "label_column": "label",
                "scorer": {"kind": "rules", "rules": [{"pattern": "(", "label": "x"}]},
            },
            "pattern",
        ),
    ],
)
async def test_bad_requests_are_refused_at_once_with_what_is_allowed(mcp_client, runtime, arguments, message):
    async with mcp_client() as client:
        result = await client.call_tool("create_evaluation", arguments)
        assert result.is_error and message in result.content[0].text
        assert (await client.call_tool("list_evaluations", {})).structured_content["evaluations"] == []


async def test_problems_found_by_the_worker_fail_the_evaluation_clearly(mcp_client, runtime, jp_root_dir):
    (jp_root_dir / "one_class.csv").write_text("text,label\na,yes\nb,yes\n")
    async with mcp_client() as client:
        missing = await create(
            client,
            type="accuracy",
            dataset="example:sentiment",
            label_column="label",
            scorer="python:tests.no_such_module:score",
        )
        one_class = await create(
            client, type="accuracy", dataset="one_class.csv", label_column="label", prediction_column="text"
        )
        failed = await finished(client, missing["evaluation_id"])
        assert failed["status"] == "FAILED" and "tests.no_such_module" in failed["error_message"]
        failed = await finished(client, one_class["evaluation_id"])
        assert failed["status"] == "FAILED" and "single class" in failed["error_message"]
        health = await client.call_tool("list_tasks", {})
        assert not health.is_error  # the server is unaffected


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_evaluation_resources_are_subscribable_to_their_final_state(mcp_client, runtime):
    uris, on_message = updates_collector()
    async with mcp_client(message_handler=on_message) as client:
        # The list first, and items enough (150 x 20 ms) for the evaluation to outlast two more subscriptions
        # on a busy machine: a subscription made after the last change would rightly hear nothing.
        await client.subscribe_resource("plexus://evaluations?status=COMPLETED&type=accuracy")
        started = await create(
            client,
            type="accuracy",
            dataset="example:fraud",
            label_column="label",
            scorer="python:tests.scorer_functions:slow",
            input_column="text",
            sample_n=150,
        )
        uri = started["resource_uri"]
        await client.subscribe_resource(uri)
        await client.subscribe_resource(uri + "/results?only_mismatches=true")
        await finished(client, started["evaluation_id"])
        await poll(
            lambda: set(uris),
            lambda seen: (
                {uri, uri + "/results?only_mismatches=true", "plexus://evaluations?status=COMPLETED&type=accuracy"}
                <= seen
            ),
        )
        for bad, message in [
            ("plexus://evaluations/nope", "no evaluation 'nope'"),
            ("plexus://evaluations?status=DONE", "status[0]: unknown evaluation status; expected one of SETUP"),
            (uri + "/items", "cannot subscribe"),
        ]:
            with pytest.raises(MCPError, match=re.escape(message)):
                await client.subscribe_resource(bad)


async def test_a_scorecard_gives_metrics_per_score_and_streams_progress_with_a_token(mcp_client, runtime, jp_root_dir):
    (jp_root_dir / "cards").mkdir()
    (jp_root_dir / "cards" / "triage.yaml").write_text(
        "name: triage\n"
        "dataset: example:topics\n"
        "input_column: text\n"
        "label_column: label\n"
        "id_column: id\n"
        "scores:\n"
        "  - name: stored\n"
        "    scorer: column:prediction\n"
        "  - name: python\n"
        "    scorer: python:plexus_mcp_jupyter.evaluations.examples.scorers:ticket_topic\n"
    )
    progress: list[tuple[float, float | None]] = []

    async def on_progress(done, total, message):
        progress.append((done, total))

    async with mcp_client() as client:
        result = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "scorecard": "cards/triage.yaml"}, progress_callback=on_progress
        )
        assert not result.is_error, result.content[0].text
        done = result.structured_content
        assert done["status"] == "COMPLETED" and done["scores"] == ["stored", "python"]
        assert set(done["metrics"]) == {"stored", "python"}
        assert done["metrics"]["stored"]["n"] == 300
        # Every item of every stage is reported. The last step (the task's end, at total) is sent before the result,
        # but the SDK client sometimes does not hand it to the callback (seen in 2 of ~10 loaded runs; open:
        # test_live_updates checks the final step of run_demo_task after the client closes).
        await poll(
            lambda: progress[-1] if progress else None,
            lambda last: last is not None and last[0] >= last[1] - 1,
            timeout=10,
        )
        assert [p[0] for p in progress] == sorted(p[0] for p in progress)
        page = (
            await client.call_tool(
                "get_evaluation_results", {"evaluation_id": done["evaluation_id"], "score": "python", "limit": 3}
            )
        ).structured_content
        assert page["score"] == "python" and len(page["items"]) == 3
        bad = await client.call_tool(
            "get_evaluation_results", {"evaluation_id": done["evaluation_id"], "score": "nope"}
        )
        assert bad.is_error and "its scores: stored, python" in bad.content[0].text
        (jp_root_dir / "cards" / "broken.yaml").write_text("name: x\ndataset: example:topics\nscores: 3\n")
        broken = await client.call_tool("create_evaluation", {"type": "accuracy", "scorecard": "cards/broken.yaml"})
        assert broken.is_error and "line" in broken.content[0].text


async def test_sampled_items_keep_their_dataset_rows_and_a_seed_is_kept_for_reruns(mcp_client, runtime):
    frame = pd.read_csv(EXAMPLES_DIR / "topics.csv")
    async with mcp_client() as client:
        first = await create(
            client,
            type="accuracy",
            dataset="example:topics",
            prediction_column="prediction",
            label_column="label",
            sample_n=40,
        )
        seed = first["definition"]["sample"]["seed"]
        assert isinstance(seed, int)  # chosen at creation, so a re-run scores the same rows
        again = await create(
            client,
            type="accuracy",
            dataset="example:topics",
            prediction_column="prediction",
            label_column="label",
            sample_n=40,
            seed=seed,
        )
        await finished(client, first["evaluation_id"])
        await finished(client, again["evaluation_id"])
        items = await all_results(client, first["evaluation_id"])
        # Item ids come from the dataset's id column by default; its row of each.
        row_of = {item_id: row for row, item_id in enumerate(frame["id"])}
        rows_again = [row_of[i["item_id"]] for i in await all_results(client, again["evaluation_id"])]
    rows = [row_of[i["item_id"]] for i in items]
    assert rows == rows_again and len(rows) == 40 and max(rows) >= 40  # dataset rows, not sample positions
    # the rows drawn as the file streams are those a sample of the whole frame draws (the same seed, the same rows)
    assert rows == sample_frame(frame, n=40, seed=seed).index.tolist()
    assert [i["label"] for i in items] == frame["label"][rows].tolist()


async def test_the_label_filter_matches_labels_as_the_metrics_normalise_them(mcp_client, runtime, jp_root_dir):
    (jp_root_dir / "messy.csv").write_text("text,label,guess\na, Yes ,yes\nb,YES,no\nc,no,no\nd,No ,yes\n")
    async with mcp_client() as client:
        started = await create(
            client, type="accuracy", dataset="messy.csv", prediction_column="guess", label_column="label"
        )
        await finished(client, started["evaluation_id"])
        yes = await all_results(client, started["evaluation_id"], label="yes")
        no_wrong = await all_results(client, started["evaluation_id"], label="NO", only_mismatches=True)
    assert [i["label"] for i in yes] == [" Yes ", "YES"]
    assert [i["label"] for i in no_wrong] == ["No "]


async def test_a_consistency_scorer_failing_on_some_items_records_their_errors(mcp_client, runtime):
    async with mcp_client() as client:
        started = await create(
            client,
            type="consistency",
            dataset="example:sentiment",
            runs=2,
            scorer="python:tests.scorer_functions:sentiment_or_boom",
        )
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "COMPLETED" and done["counts"]["score"]["errors"] > 0
        failed = [
            i for i in await all_results(client, started["evaluation_id"], only_mismatches=True) if i["correct"] is None
        ]
    assert len(failed) == done["counts"]["score"]["errors"]
    assert all("model cannot handle refunds" in i["error"] for i in failed)


async def test_scorecards_with_aliases_are_refused(mcp_client, runtime):
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nname: x\n"
    async with mcp_client() as client:
        result = await client.call_tool("create_evaluation", {"type": "accuracy", "scorecard": bomb})
    assert result.is_error and "aliases" in result.content[0].text


async def test_an_evaluation_started_at_once_finds_its_record_while_another_writer_holds_the_store(runtime, db_path):
    """On an idle server a new task starts at once (TaskManager._create_started): the evaluation's record is
    stored in the transaction that stores its task, so a worker never looks for a record not yet written,
    however long other writers (an evaluation's item batches, the pruner) hold SQLite's write lock."""
    import sqlite3
    import threading
    import time as clock

    stop = threading.Event()

    def other_writer() -> None:
        conn = sqlite3.connect(str(db_path), timeout=30, isolation_level=None)
        conn.execute("CREATE TABLE IF NOT EXISTS other_writes (x)")
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO other_writes VALUES (1)")
            clock.sleep(0.2)
            conn.execute("COMMIT")
            clock.sleep(0.03)
        conn.close()

    thread = threading.Thread(target=other_writer, daemon=True)
    thread.start()
    try:
        tasks = []
        for _ in range(5):
            _, task = await runtime.evaluations.create(BY_COLUMN)
            await runtime.manager.wait_final([task.id], 60)
            tasks.append(runtime.manager.get(task.id))
    finally:
        stop.set()
        thread.join()
    assert [t.status.value for t in tasks] == ["COMPLETED"] * 5, [t.error_message for t in tasks]


async def test_create_answers_the_record_it_stored_without_reading_it_back(runtime, monkeypatch):
    """create's answer is made from the record as inserted and the task in memory (no store read: a thread's
    wake-up and ~1 ms per call); it is the record the store then holds, as get_evaluation shows it."""
    service = runtime.evaluations
    reads = []
    read_one = service._read_one
    monkeypatch.setattr(service, "_read_one", lambda *a: reads.append(a) or read_one(*a))
    view, task = await service.create(BY_COLUMN, owner="ann")
    assert reads == [] and view["status"] in ("SETUP", "RUNNING") and view["metrics"] is None
    stored = await service.get(view["evaluation_id"])
    record_fields = ("evaluation_id", "task_id", "type", "dataset", "scores", "created_at", "definition")
    assert {k: view[k] for k in record_fields} == {k: stored[k] for k in record_fields}
    assert view["task_id"] == task.id and view["resource_uri"] == stored["resource_uri"]
    assert view["items_pruned_at"] is None and view["counts"] is None
    await runtime.manager.wait_final([task.id], 60)
