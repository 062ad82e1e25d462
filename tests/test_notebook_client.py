"""The notebook client against a real Jupyter server: tables, handles, widgets, evaluations, kernel scorers.

The server runs on this test's event loop, so every blocking client call is made in a thread
(`asyncio.to_thread`) while the loop serves it; the client's event thread talks to the same real port.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading

import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from plexus_mcp_jupyter.core.models import TaskStatus
from plexus_mcp_jupyter.evaluations.datasets import EXAMPLES_DIR
from plexus_mcp_jupyter.evaluations.store import EvaluationStatus
from plexus_mcp_jupyter.notebook import (
    Plexus,
    PlexusAuthError,
    PlexusConflict,
    PlexusConnectionError,
    PlexusInputError,
    PlexusTaskFailed,
    resolve_connection,
)
from plexus_mcp_jupyter.notebook.client import ENV_CONNECTION_FILE, ENV_TOKEN, ENV_URL, PlexusClient
from plexus_mcp_jupyter.notebook.mirror import EVALUATION_STATUSES, TASK_STATUSES, TaskState
from plexus_mcp_jupyter.notebook.scoring import KernelScorer, check_scorer, score

from .conftest import poll

run = asyncio.to_thread


@pytest.fixture
def plexus(server_url, token, runtime):
    """A `Plexus` connected to the test server (the health check is made in a thread by `connected`)."""
    p = Plexus()
    p._client = PlexusClient(server_url, token, check=False)
    yield p
    p.close()


def normalised(series: pd.Series) -> pd.Series:
    return series.fillna("").astype(str).str.strip().str.lower().replace("", "na")


# -- connection -----------------------------------------------------------------------------------------


def test_the_server_is_found_from_arguments_environment_or_connection_file(monkeypatch, tmp_path):
    for name in (ENV_URL, ENV_TOKEN, ENV_CONNECTION_FILE):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PlexusConnectionError, match=r"plexus\.connect\(url, token\)"):
        resolve_connection()
    assert resolve_connection("http://h:1/base", "t") == ("http://h:1/base/", "t")
    connection = tmp_path / "plexus.json"
    connection.write_text(json.dumps({"url": "http://file:2/", "token": "from-file"}))
    os.chmod(connection, 0o600)
    monkeypatch.setenv(ENV_CONNECTION_FILE, str(connection))
    assert resolve_connection() == ("http://file:2/", "from-file")
    monkeypatch.setenv(ENV_URL, "http://env:3/")
    monkeypatch.setenv(ENV_TOKEN, "from-env")
    assert resolve_connection() == ("http://env:3/", "from-env")
    monkeypatch.delenv(ENV_URL)
    connection.write_text("{not json")
    with pytest.raises(PlexusConnectionError, match="cannot read the Plexus connection file"):
        resolve_connection()
    with pytest.raises(PlexusConnectionError, match="must start with http"):
        resolve_connection("localhost:8888", "t")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_wrong_token_or_no_server_is_a_clear_error(server_url, token, runtime):
    with pytest.raises(PlexusAuthError, match=r"wrong token.*plexus\.connect"):
        await run(Plexus().connect, server_url, "not-the-token")
    with pytest.raises(PlexusConnectionError, match=r"cannot reach the Plexus server.*plexus\.connect"):
        await run(Plexus().connect, f"http://127.0.0.1:{free_port()}/", token)
    p = Plexus()
    client = await run(p.connect, server_url, token)
    assert client.server_info["version"] and p.client is client
    p.close()


def test_the_client_knows_the_servers_statuses():
    assert [s.value for s in TaskStatus] == list(TASK_STATUSES)
    assert tuple(EvaluationStatus.ALL) == EVALUATION_STATUSES


# -- tables ---------------------------------------------------------------------------------------------


async def test_tasks_and_evaluations_are_typed_dataframes(plexus, runtime):
    manager = runtime.manager
    ids = [manager.dispatch("demo", {"items": 3, "item_delay_ms": 0}).id for _ in range(5)]
    failing = manager.dispatch("demo", {"items": 5, "item_delay_ms": 0, "fail_at": 2})
    await manager.wait_final([*ids, failing.id], 20)
    frame = await run(plexus.tasks)
    assert set(frame["task_id"]) >= {*ids, failing.id}
    assert isinstance(frame["status"].dtype, pd.CategoricalDtype)
    assert list(frame["status"].cat.categories) == list(TASK_STATUSES)
    assert isinstance(frame["type"].dtype, pd.CategoricalDtype)
    for column in ("created_at", "started_at", "completed_at"):
        assert isinstance(frame[column].dtype, pd.DatetimeTZDtype) and str(frame[column].dt.tz) == "UTC"
    assert str(frame["processed"].dtype) == "Int64"
    row = frame.set_index("task_id").loc[failing.id]
    assert row["status"] == "FAILED" and "2" in row["error_message"]
    assert (await run(plexus.tasks, "FAILED"))["task_id"].tolist() == [failing.id]
    # Pages are followed up to the limit.
    assert len(await run(plexus.client.pages, "tasks", "tasks", {}, 4, 3)) == 4
    assert len(await run(plexus.tasks, None, "demo", 2)) == 2

    ev = await run(plexus.evaluate, "example:sentiment", None, "label", "prediction", "accuracy", "text")
    await run(ev.wait, 30)
    evaluations = await run(plexus.evaluations)
    assert ev.id in set(evaluations["evaluation_id"])
    assert list(evaluations["status"].cat.categories) == list(EVALUATION_STATUSES)
    assert evaluations.set_index("evaluation_id").loc[ev.id, "status"] == "COMPLETED"
    assert isinstance(evaluations["completed_at"].dtype, pd.DatetimeTZDtype)


# -- handles and widgets --------------------------------------------------------------------------------


async def test_a_task_started_over_mcp_appears_and_its_widget_reaches_the_end_by_events(plexus, mcp_client):
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 300, "item_delay_ms": 2})
    task_id = started.structured_content["task_id"]
    assert task_id in set((await run(plexus.tasks))["task_id"])
    handle = await run(plexus.task, task_id)
    widget = handle.progress()
    values: list[int] = []
    widget.bar.observe(lambda change: values.append(change["new"]), names="value")
    await run(handle.wait, 30)
    assert handle.status == "COMPLETED"
    assert widget.bar.value == widget.bar.max and widget.bar.bar_style == "success"
    assert widget.label.value.startswith("COMPLETED")
    assert len(values) >= 2 and values[-1] == widget.bar.max  # moved by events, more than once
    assert (await run(handle.result))["items_processed"] == 300


async def test_run_demo_handle_waits_times_out_clearly_and_cancels(plexus):
    handle = await run(plexus.run_demo, 20000, 5.0)
    with pytest.raises(TimeoutError, match=r"still (QUEUED|RUNNING|PENDING).*\.cancel\(\)"):
        await run(handle.wait, 0.3)
    outcome = await run(handle.cancel)
    assert outcome["outcome"] in ("cancelled", "cancelling")
    await run(handle.wait, 20)
    assert handle.status == "CANCELLED"
    with pytest.raises(PlexusTaskFailed, match="ended CANCELLED"):
        await run(handle.result)
    assert handle.progress().bar.bar_style == "warning"


async def test_the_dashboard_shows_new_tasks_live_and_its_cancel_button_cancels(plexus, runtime):
    dashboard = await run(plexus.dashboard)
    # A task created by someone else (an assistant, say) appears as its event arrives.
    task = runtime.manager.dispatch("demo", {"items": 20000, "item_delay_ms": 5})
    row = await poll(lambda: dashboard._rows.get(task.id), lambda r: r is not None)
    assert dashboard.table.children[0] is row
    await poll(lambda: row.state.processed, lambda n: n > 0)
    assert row.bar.value > 0 and row.cancel.disabled is False
    await run(row.cancel.click)
    await poll(lambda: row.state.status, lambda s: s == "CANCELLED")
    assert row.cancel.disabled and row.status.value == "CANCELLED" and row.bar.bar_style == "warning"
    assert (await run(plexus.client.get_task, task.id))["status"] == "CANCELLED"
    dashboard.close()


def test_progress_updates_are_coalesced_and_the_final_state_always_applies():
    state = TaskState("t", min_interval=0.05)
    seen: list[int] = []
    state.observe(lambda change: seen.append(change["new"]), names="processed")
    for i in range(1, 2001):
        state.offer({"status": "RUNNING", "progress": {"stage": "Processing", "processed": i, "total": 2000}}, seq=i)
    assert len(seen) < 10
    state.offer({"status": "COMPLETED", "progress": {"stage": "Finalizing", "processed": 2, "total": 2}}, seq=2001)
    assert state.final and state.done.is_set() and state.processed == 2
    state.offer({"status": "RUNNING", "progress": {"stage": "Processing", "processed": 5, "total": 2000}}, seq=2002)
    assert state.status == "COMPLETED"  # nothing after the final state
    state.offer({"status": "RUNNING"}, seq=1)
    assert state.status == "COMPLETED"


# -- evaluations ----------------------------------------------------------------------------------------


async def test_evaluating_a_dataframe_gives_metrics_that_match_scikit_learn(plexus):
    frame = pd.read_csv(EXAMPLES_DIR / "sentiment.csv")
    ev = await run(plexus.evaluate, frame, None, "label", "prediction")
    assert ev.view["dataset"].startswith("registered:nb-")
    await run(ev.wait, 30)
    assert ev.status == "COMPLETED"
    metrics = await run(lambda: ev.metrics)
    labels, predictions = normalised(frame["label"]), normalised(frame["prediction"])
    classes = sorted(set(labels) | set(predictions))
    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=classes, zero_division=0)
    assert list(metrics.index) == classes
    assert metrics["precision"].tolist() == pytest.approx(list(p))
    assert metrics["recall"].tolist() == pytest.approx(list(r))
    assert metrics["f1"].tolist() == pytest.approx(list(f))
    assert metrics["support"].tolist() == list(s)
    summary = metrics.attrs["summary"]
    assert summary["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert summary["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))
    assert summary["cohen_kappa"] == pytest.approx(cohen_kappa_score(labels, predictions))
    assert summary["accuracy_ci_low"] < summary["accuracy"] < summary["accuracy_ci_high"]
    styled = await run(ev.confusion_matrix)
    assert styled.data.to_numpy().tolist() == confusion_matrix(labels, predictions, labels=classes).tolist()
    assert styled.data.index.name == "actual" and styled.data.columns.name == "predicted"
    assert "background-color" in styled.to_html()
    wrong = await run(ev.results, True)
    assert len(wrong) == int((labels != predictions).sum()) and not wrong["correct"].any()
    everything = await run(ev.results)
    assert len(everything) == len(frame) and isinstance(everything["label"].dtype, pd.CategoricalDtype)
    assert str(everything["correct"].dtype) == "boolean"
    assert len(await run(ev.results, False, None, 7)) == 7
    # A client that never saw its events takes hold of it finished.
    fresh = Plexus()
    fresh._client = PlexusClient(plexus.client.url, plexus.client.token, check=False)
    again = await run(fresh.evaluation, ev.id)
    assert again.status == "COMPLETED" and again.done
    assert again.summary["accuracy"] == summary["accuracy"]
    fresh.close()


def keyword(text: str) -> str:
    if "refund" in text.lower():
        raise ValueError("no refunds here")
    return "positive" if any(w in text.lower() for w in ("great", "love", "excellent", "good")) else "negative"


async def test_a_python_callable_scores_an_evaluation_in_this_process(plexus):
    frame = pd.read_csv(EXAMPLES_DIR / "sentiment.csv")
    calls = []

    def per_item(text: str) -> str:
        calls.append(threading.current_thread().name)
        return keyword(text)

    ev = await run(lambda: plexus.evaluate(frame, per_item, input_column="text", batch=False))
    assert ev.view["definition"]["scores"][0]["scorer"]["function"] == "nb-per_item"
    await run(ev.wait, 60)
    assert ev.status == "COMPLETED", ev.refresh()["error_message"]
    assert calls and all(name.startswith("plexus-scorer") for name in calls)  # never the socket's reader thread
    ok = ~frame["text"].str.lower().str.contains("refund")
    summary = (await run(lambda: ev.metrics)).attrs["summary"]
    expected = [keyword(t) for t in frame["text"][ok]]
    assert summary["accuracy"] == pytest.approx(accuracy_score(frame["label"][ok], expected))
    errors = (await run(ev.results))["error"].dropna()
    assert len(errors) == int((~ok).sum()) and errors.str.startswith("ValueError: no refunds here").all()

    # A batch scorer that raises fails the evaluation with its message.
    def broken(texts: pd.Series) -> list[str]:
        raise RuntimeError("model not loaded")

    ev = await run(lambda: plexus.evaluate(frame, broken, input_column="text"))
    with pytest.raises(PlexusTaskFailed, match="model not loaded"):
        await run(ev.result, 60)


async def test_scorers_survive_a_dropped_event_stream(plexus, runtime):
    await run(plexus.register_scorer, "survivor", lambda texts: ["positive"] * len(texts))
    stream = plexus.client.stream
    assert runtime.kernel_scorers.names() == ["survivor"]
    messages: list[dict] = []
    plexus.on_event(messages.append)
    long = await run(plexus.run_demo, 20000, 5.0)
    stream.epoch = "an-earlier-server"  # as if the server restarted meanwhile: it cannot replay, says "gap"
    stream.drop()  # as if the network dropped the socket
    await poll(lambda: stream.connections, lambda n: n >= 2)
    # The client re-read what it follows by REST and told the listeners.
    refresh = await poll(lambda: [m for m in messages if m["type"] == "refresh"], bool)
    assert long.id in [t["task_id"] for t in refresh[0]["tasks"]]
    await run(long.cancel)
    await run(long.wait, 20)
    await poll(runtime.kernel_scorers.names, lambda names: names == ["survivor"])
    frame = pd.DataFrame({"text": ["a", "b"], "label": ["positive", "negative"]})
    ev = await run(lambda: plexus.evaluate(frame, "kernel:survivor", input_column="text"))
    assert (await run(ev.result, 30))["metrics"]["score"]["accuracy"] == 0.5


def test_the_scoring_function_handles_pairs_per_item_errors_and_bad_shapes():
    def batch(texts: pd.Series) -> pd.Series:
        return texts.map(lambda t: (t.upper(), f"because {t}") if t else None)

    out = score(KernelScorer("b", batch, True), ["a", None, "c"])
    assert out == {"predictions": ["A", None, "C"], "explanations": ["because a", None, "because c"], "errors": None}
    out = score(KernelScorer("i", lambda t: 1 / len(t), False), ["ab", ""])
    assert out["predictions"] == ["0.5", None] and out["errors"] == [None, "ZeroDivisionError: division by zero"]
    with pytest.raises(ValueError, match="returned 1 values for 2 inputs"):
        score(KernelScorer("w", lambda texts: ["x"], True), ["a", "b"])
    with pytest.raises(PlexusInputError, match="must be callable"):
        check_scorer("name", "not a function", True)
    with pytest.raises(PlexusInputError, match="1 to 64 letters"):
        check_scorer("bad name!", len, True)


# -- bad input ------------------------------------------------------------------------------------------


async def test_bad_input_is_refused_with_the_fix(plexus):
    frame = pd.DataFrame({"text": ["good", "bad"], "gold": ["positive", "negative"], "guess": ["positive", "x"]})
    with pytest.raises(PlexusInputError, match=r"label='label' is not a column.*'text', 'gold', 'guess'"):
        await run(plexus.evaluate, frame, None, "label", "guess")
    with pytest.raises(PlexusInputError, match=r"input_column \(default 'text'\)='text' is not a column"):
        await run(plexus.evaluate, frame[["gold", "guess"]], "kernel:x", "gold")
    with pytest.raises(PlexusInputError, match="scorer must be a spec string, a rules mapping or a callable"):
        await run(plexus.evaluate, frame, 42, "gold")
    with pytest.raises(PlexusInputError, match="must be a pandas DataFrame or a dataset name"):
        await run(plexus.evaluate, [1, 2], None, "gold", "guess")
    await run(plexus.register_dataset, "mine", frame)
    with pytest.raises(PlexusConflict, match="pass replace=True"):
        await run(plexus.register_dataset, "mine", frame)
    assert (await run(plexus.register_dataset, "mine", frame, True))["rows"] == 2
    # A frame whose Parquet form passes a request's limit is sent in parts (tests/test_eval_uploads.py).
    plexus.max_upload_bytes = 10_000
    big = pd.DataFrame({"text": [f"{i:03d}" + "x" * 100 for i in range(200)]})
    assert (await run(plexus.register_dataset, "big", big))["rows"] == 200
    with pytest.raises(PlexusInputError, match="expected a pandas DataFrame"):
        await run(plexus.register_dataset, "odd", {"a": 1})
