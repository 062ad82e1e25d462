"""Creating evaluations cannot stall the server or fill its store (issue 11, items 1, 3 and 8).

Each test replays an attack on a real server: the Jupyter extension over REST, and `plexus mcp serve
--transport http` over MCP, with an operator API key, while `health` is polled to show the server answers
throughout.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from plexus_mcp_jupyter.core.models import Task, TaskStatus
from plexus_mcp_jupyter.core.store import Store
from plexus_mcp_jupyter.evaluations.limits import MAX_NESTING, MAX_NUMBER_CHARS
from plexus_mcp_jupyter.evaluations.store import EvaluationStore
from plexus_mcp_jupyter.security.keys import KeyStore

from .conftest import open_client, poll
from .loop_watch import health_watch
from .test_standalone import plexus_env, start_http, stop

REPO = Path(__file__).resolve().parent.parent

HEADER = "name: flood\ndataset: example:sentiment\ninput_column: text\nlabel_column: label\nscores:\n"


def card(scores: int, dataset: str = "example:sentiment", scorer: str = "column:prediction", **extra: str) -> str:
    """A scorecard of `scores` scores (about 45 bytes each), all reading `scorer`."""
    lines = [f"  - {{name: s{i}, scorer: '{scorer}'}}\n" for i in range(scores)]
    more = "".join(f"{k}: {v}\n" for k, v in extra.items())
    return HEADER.replace("example:sentiment", dataset) + "".join(lines) + more


MEBIBYTE_CARD = card(22_000)  # just under 1 MiB: the attack's size (under the old bound) and its 22,000 scores
DEEP = "name: " + "[" * 100_000 + "]" * 100_000  # the nested `[`
HUGE_NUMBER = HEADER + "sample: {n: " + "9" * 100_000 + "}\n"  # the 100,000-digit integer


async def two_at_a_time(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the calls two at once, as the attack did; their answers in order."""
    gate = asyncio.Semaphore(2)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


def one_line(message: str) -> str:
    assert "\n" not in message and len(message) < 400 and "Traceback" not in message, message
    return message


# -- the Jupyter extension, over REST --------------------------------------------------------------------


@pytest.fixture
def operator(runtime) -> str:
    return runtime.keys.create("an operator", "operator")[1]


async def post_evaluation(server_url: str, key: str, body: dict[str, Any]) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=60) as http:
        return await http.post(
            f"{server_url}plexus/api/evaluations", json=body, headers={"Authorization": f"Bearer {key}"}
        )


async def test_mebibyte_scorecards_are_refused_unparsed_while_health_answers(server_url, operator):
    async with health_watch(f"{server_url}plexus/api/health"):
        answers = await two_at_a_time(
            [
                lambda: post_evaluation(server_url, operator, {"type": "accuracy", "scorecard": MEBIBYTE_CARD})
                for _ in range(6)
            ]
        )
    for answer in answers:
        assert answer.status_code == 400
        message = one_line(answer.json()["error"]["message"])
        assert f"scorecard text is {len(MEBIBYTE_CARD.encode()):,} bytes, more than the 65,536" in message
        assert "max_scorecard_bytes" in message


@pytest.fixture
def generous(plexus_config) -> None:
    """Bounds an admin raised: a 1 MiB card of 22,000 scores is parsed whole, which must happen off the loop."""
    plexus_config.update(max_scorecard_bytes=2 * 1024 * 1024, max_scorecard_scores=100_000)


async def test_a_big_scorecard_an_admin_allows_is_parsed_off_the_event_loop(generous, server_url, operator):
    # The card names a dataset that does not exist: everything is parsed and checked before that is found.
    body = {"type": "accuracy", "scorecard": MEBIBYTE_CARD.replace("example:sentiment", "missing.csv")}
    # Each card costs over a second of CPU in its checking thread, which shares the GIL with the event loop
    # (and, here, with this test's client): parsed on the loop, that CPU is the loop thread's (loop_watch.py).
    async with health_watch(f"{server_url}plexus/api/health"):
        answers = await two_at_a_time([lambda: post_evaluation(server_url, operator, body) for _ in range(4)])
    for answer in answers:
        assert answer.status_code == 404, answer.text
        assert "no dataset file 'missing.csv'" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("scorecard", "reason"),
    [
        (DEEP, "scorecard text is 200,006 bytes, more than the 65,536"),
        (HUGE_NUMBER, "scorecard text is 100,"),
        ("name: " + "[" * 30_000 + "]" * 30_000, "scorecard line 1: malformed YAML: exceeded maximum nesting depth"),
        ("name: " + "[" * 100 + "]" * 100, f"scorecard line 1: nested more than {MAX_NESTING} levels deep"),
        ("name:\n" + "- " * 30_000 + "x\n", f"scorecard line 2: nested more than {MAX_NESTING} levels deep"),
        (
            HEADER + "sample: {n: " + "9" * 60_000 + "}\n",
            f"line 6: a number of 60,000 characters; numbers in a scorecard have at most {MAX_NUMBER_CHARS}",
        ),
        ("name: 2024-13-45\n", "scorecard: a value cannot be read: month must be in 1..12"),
        ("name: x\nb: &b [1, 2]\nc: [*b, *b]\n", "scorecard line 3: anchors and aliases (*name) are not allowed"),
    ],
)
async def test_pathological_scorecards_get_a_400_with_one_line(server_url, operator, scorecard, reason):
    answer = await post_evaluation(server_url, operator, {"type": "accuracy", "scorecard": scorecard})
    assert answer.status_code == 400, answer.text
    assert reason in one_line(answer.json()["error"]["message"])


async def test_a_scorer_spec_error_quotes_a_bounded_excerpt_of_what_was_sent(server_url, operator):
    scorer = {"kind": "rules", "rules": [{"pattern": "a", "label": ["x" * 1_000_000]}]}
    answer = await post_evaluation(
        server_url,
        operator,
        {"type": "accuracy", "dataset": "example:sentiment", "label_column": "label", "scorer": scorer},
    )
    assert answer.status_code == 400
    assert one_line(answer.json()["error"]["message"]).startswith("rules[0].label: must be a non-empty string")


@pytest.fixture
def small_item_bound(plexus_config) -> None:
    # Cards of 1 MiB are allowed here, so that the bounds on scores and items are what refuses them.
    plexus_config.update(max_evaluation_items=1000, max_scorecard_bytes=2 * 1024 * 1024)


async def test_an_evaluation_of_more_items_than_allowed_is_refused_before_dispatch(
    small_item_bound, server_url, operator, runtime
):
    # The attack: 22,000 scores on the 200-row example made 4.4 million items. Refused by the number of scores:
    attack = await post_evaluation(server_url, operator, {"type": "accuracy", "scorecard": card(22_000)})
    assert attack.status_code == 400
    assert "22,000 scores, more than the 100 a scorecard may have (max_scorecard_scores)" in attack.text
    # Within every scorecard bound, the product of rows, scores and runs is what counts.
    many = await post_evaluation(server_url, operator, {"type": "accuracy", "scorecard": card(6)})
    assert many.status_code == 400
    assert one_line(many.json()["error"]["message"]).startswith(
        "this evaluation would score 1,200 items (200 rows x 6 score(s) x 1 run(s)), more than the 1,000 one "
        "evaluation may have (max_evaluation_items)"
    )
    runs = await post_evaluation(
        server_url,
        operator,
        {"type": "consistency", "dataset": "example:sentiment", "scorer": "column:prediction", "runs": 6},
    )
    assert runs.status_code == 400 and "200 rows x 1 score(s) x 6 run(s)" in runs.text
    sampled = await post_evaluation(
        server_url, operator, {"type": "accuracy", "scorecard": card(6, sample="{n: 150, seed: 1}")}
    )
    assert sampled.status_code == 201, sampled.text  # 150 rows x 6 scores = 900 items
    assert len((await runtime.evaluations.list_evaluations())[0]) == 1  # nothing was dispatched for the refused ones


async def test_a_file_whose_rows_are_known_only_when_loaded_fails_at_setup_without_items(
    small_item_bound, server_url, operator, runtime, jp_root_dir
):
    rows = "".join(f"{i},text {i},{'yes' if i % 2 else 'no'}\n" for i in range(300))
    (jp_root_dir / "big.csv").write_text("id,text,label\n" + rows)
    created = await post_evaluation(
        server_url, operator, {"type": "accuracy", "scorecard": card(4, dataset="big.csv", scorer="column:label")}
    )
    assert created.status_code == 201, created.text
    evaluation_id = created.json()["evaluation_id"]
    done = await poll(lambda: runtime.evaluations.get(evaluation_id), lambda e: e["status"] in ("COMPLETED", "FAILED"))
    assert done["status"] == "FAILED"
    assert done["error_message"].startswith(
        "this evaluation would score 1,200 items (300 rows x 4 score(s) x 1 run(s)), more than the 1,000"
    )
    assert sum(runtime.evaluations.store.count_items(evaluation_id, f"s{i}") for i in range(4)) == 0


async def test_the_items_of_a_cancelled_evaluation_are_pruned_and_its_record_stays(jp_fetch, runtime, jp_root_dir):
    rows = "".join(f"{i},text {i},{'yes' if i % 2 else 'no'}\n" for i in range(3000))
    (jp_root_dir / "many.csv").write_text("id,text,label\n" + rows)
    # Three fast scores (9,000 items, more than one pruning batch), then a slow one to cancel during.
    scorecard = card(3, dataset="many.csv", scorer="column:label")
    scorecard += "  - {name: slow, scorer: 'python:tests.scorer_functions:slow'}\n"
    response = await jp_fetch(
        "plexus", "api", "evaluations", method="POST", body=json.dumps({"type": "accuracy", "scorecard": scorecard})
    )
    created = json.loads(response.body)
    evaluation_id, task_id = created["evaluation_id"], created["task_id"]
    store = runtime.evaluations.store

    def written() -> int:
        return sum(store.count_items(evaluation_id, name) for name in ("s0", "s1", "s2", "slow"))

    await poll(written, lambda n: n > 9000, timeout=60)
    await jp_fetch("plexus", "api", "tasks", "cancel", method="POST", body=json.dumps({"task_ids": [task_id]}))
    pruned = await poll(
        lambda: runtime.evaluations.get(evaluation_id), lambda e: e["items_pruned_at"] is not None, timeout=30
    )
    assert pruned["status"] == "CANCELLED" and written() == 0
    assert pruned["definition"]["scores"][0]["name"] == "s0"  # the record is whole
    with pytest.raises(Exception) as refused:
        await jp_fetch("plexus", "api", "evaluations", evaluation_id, "results")
    assert refused.value.code == 400 and "were pruned" in refused.value.response.body.decode()


# -- `plexus mcp serve --transport http`, over MCP ------------------------------------------------------------


async def test_the_standalone_server_refuses_the_same_scorecards_and_stays_responsive(tmp_path):
    store = Store(plexus_env(tmp_path)["PLEXUS_MCP_DB_URL"])  # the store the server is about to open
    key = KeyStore(store.engine).create("an operator", "operator")[1]
    store.close()
    proc, url, _token = start_http(tmp_path, PLEXUS_MCP_MAX_EVALUATION_ITEMS="1000")
    try:
        async with open_client(url, key) as client:

            async def create(scorecard: str) -> Any:
                return await client.call_tool("create_evaluation", {"type": "accuracy", "scorecard": scorecard})

            async with health_watch(url.replace("/mcp", "/health"), pid=proc.pid):
                flood = await two_at_a_time([lambda: create(MEBIBYTE_CARD) for _ in range(6)])
            for answer in flood:
                assert answer.is_error and "more than the 65,536" in one_line(answer.content[0].text)
            for scorecard, reason in [
                (DEEP, "more than the 65,536"),
                (HUGE_NUMBER, "more than the 65,536"),
                ("name: " + "[" * 30_000 + "]" * 30_000, "nesting depth"),
                ("name: " + "[" * 100 + "]" * 100, "nested more than"),
                (HEADER + "sample: {n: " + "9" * 60_000 + "}\n", "a number of 60,000 characters"),
                (card(6), "would score 1,200 items (200 rows x 6 score(s) x 1 run(s)), more than the 1,000"),
            ]:
                answer = await create(scorecard)
                assert answer.is_error and reason in one_line(answer.content[0].text)
            listed = await client.call_tool("list_evaluations", {})
            assert listed.structured_content["evaluations"] == []
    finally:
        stop(proc)


def cancelled_with_items(store: Store, items: int) -> EvaluationStore:
    """A cancelled evaluation ("e-cancelled", its task "t-cancelled") whose `items` items ("score") are still in
    `store`, as a server that stopped before it pruned them left it; the evaluation store over `store`."""
    evaluations = EvaluationStore(store.engine)
    store.create_task(Task(id="t-cancelled", type="evaluation", status=TaskStatus.CANCELLED))
    evaluations.create(
        {
            "id": "e-cancelled",
            "task_id": "t-cancelled",
            "type": "accuracy",
            "owner": None,
            "dataset": "example:sentiment",
            "definition": {"scores": [{"name": "score"}]},
            "created_at": time.time(),
        }
    )
    evaluations.add_items(
        "e-cancelled", "score", [(i, str(i), "x", "a", "a", "a", True, None, None) for i in range(items)]
    )
    return evaluations


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_a_server_prunes_at_start_what_a_stopped_one_left(tmp_path, transport):
    # A cancelled evaluation whose items were still there when its server stopped (12,000: three batches).
    store = Store(plexus_env(tmp_path)["PLEXUS_MCP_DB_URL"])
    evaluations = cancelled_with_items(store, 12_000)
    if transport == "http":
        proc, _url, _token = start_http(tmp_path)
    else:  # serving until its client closes stdin
        proc = subprocess.Popen(
            [sys.executable, "-m", "plexus_mcp_jupyter.cli", "mcp", "serve", "--transport", "stdio"],
            env=plexus_env(tmp_path),
            cwd=str(REPO),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        record = await poll(lambda: evaluations.get("e-cancelled"), lambda r: r["items_pruned_at"] is not None)
    finally:
        stop(proc)
    assert evaluations.count_items("e-cancelled", "score") == 0 and record["definition"]["scores"]
    store.close()


def test_a_pruning_transaction_gives_up_on_a_lock_held_elsewhere_after_its_lock_wait(store_url):
    """A pruning batch (`delete_items(lock_wait=)`) while another connection holds a lock it needs (SQLite: a write
    transaction; PostgreSQL: the items' rows): it fails after about its lock wait, as a lock that timed out
    (`lock_timed_out`: the pruning tries it again unless the service closes), rolled back, not after the store's
    own timeouts (SQLite's busy timeout 5 s, PostgreSQL's statement timeout 30 s); the connection's wait is the
    store's again after it."""
    import sqlite3

    import sqlalchemy as sa

    from plexus_mcp_jupyter.evaluations.store import lock_timed_out

    store = Store(store_url)
    evaluations = cancelled_with_items(store, 9)
    sqlite = store_url.startswith("sqlite")
    holder: Any = None
    try:
        if sqlite:
            holder = sqlite3.connect(store.engine.url.database, isolation_level=None, check_same_thread=False)
            holder.execute("BEGIN IMMEDIATE")
        else:
            holder = store.engine.connect()
            holder.exec_driver_sql("SELECT seq FROM evaluation_items FOR UPDATE").all()
        began = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as failed:
            evaluations.delete_items("e-cancelled", 100, lock_wait=0.3)
        took = time.monotonic() - began
        assert lock_timed_out(failed.value), failed.value
        assert took < 3.0, took  # 0.3 s and a margin for a loaded machine (the store's own: 5 s, 30 s)
    finally:
        if holder is not None:
            holder.rollback() if not sqlite else holder.execute("ROLLBACK")
            holder.close()
    try:
        assert evaluations.count_items("e-cancelled", "score") == 9, "rolled back"
        if sqlite:
            with store.engine.connect() as conn:  # the pooled connection's wait is the store's again
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 5000
        assert evaluations.delete_items("e-cancelled", 100, lock_wait=0.3) == 9
    finally:
        store.close()


async def test_the_column_names_an_error_echoes_are_bounded(server_url, operator, jp_root_dir, caplog):
    # A column name the client sent (a megabyte of it), and a file's columns as long as the bounds allow: the
    # answer, and the warning tornado logs with it, quote a few hundred characters, not the lot.
    (jp_root_dir / "long_names.csv").write_text(
        ",".join(f"{i:02}" + "c" * 998 for i in range(30)) + "\n" + ",".join("1" for _ in range(30)) + "\n"
    )
    for body in (
        {
            "type": "accuracy",
            "dataset": "example:sentiment",
            "prediction_column": "label",
            "label_column": "x" * 1_000_000,
        },
        {
            "type": "accuracy",
            "dataset": "long_names.csv",
            "prediction_column": "p" + "c" * 999,
            "label_column": "label",
        },
        {"type": "t" * 1_000_000},
    ):  # any message that quotes what was sent, as for a tool error
        answer = await post_evaluation(server_url, operator, body)
        assert answer.status_code == 400 and len(answer.content) < 2000, answer.content[:300]
        assert "is not in dataset" in answer.json()["error"]["message"] or "unknown evaluation type" in answer.text
    assert all(len(record.getMessage()) < 4000 for record in caplog.records)
