"""Batch operations (issue 12, items 3 and 6): dispatch many tasks in one call, cancel, retry and re-prioritise by
ids or by a filter with a dry run, a batch id with its resource plexus://batches/{id}, roles and the audit log.
Real Jupyter server, real HTTP, the official SDK client, a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import anyio
import httpx2
import pytest
from mcp import MCPError
from mcp.server.subscriptions import ResourceUpdated

from plexus_mcp_jupyter.core.batches import BatchOperations
from plexus_mcp_jupyter.notebook.api import Plexus

from .conftest import MODERN, open_client, poll
from .test_standalone import start_http, stop

# Client.subscribe_resource is deprecated for the 2026 era; the 2025-11-25 era still uses it.
pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")

QUICK = {"type": "demo", "params": {"items": 1, "item_delay_ms": 0}}
SLOW = {"type": "demo", "params": {"items": 1000, "item_delay_ms": 10}}


async def batch_status(client, batch_id: str) -> dict:
    contents = (await client.read_resource(f"plexus://batches/{batch_id}")).contents
    return json.loads(contents[0].text)


async def call(client, tool: str, arguments: dict) -> dict:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def refused(client, tool: str, arguments: dict) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return result.content[0].text


# -- dispatch ---------------------------------------------------------------------------------------------


async def test_a_batch_is_dispatched_in_one_call_and_its_resource_counts_reach_completed(mcp_client, runtime):
    async with mcp_client() as client:
        out = await call(client, "dispatch_batch", {"tasks": [QUICK] * 20})
        batch_id, ids = out["batch_id"], out["task_ids"]
        assert len(ids) == len(set(ids)) == 20 and out["resource_uri"] == f"plexus://batches/{batch_id}"
        listed = await call(client, "list_tasks", {"batch": batch_id, "limit": 100})
        assert {t["task_id"] for t in listed["tasks"]} == set(ids)
        assert {t["batch_id"] for t in listed["tasks"]} == {batch_id}
        final = await poll(lambda: batch_status(client, batch_id), lambda b: b["done"], timeout=60)
    assert final["counts"]["COMPLETED"] == 20 and final["total"] == 20
    assert final["progress"]["finished"] == 20 and final["progress"]["percent"] == 100.0
    assert final["completed_at"] is not None


async def test_one_invalid_spec_dispatches_nothing_and_the_error_names_its_index(mcp_client, runtime):
    bad = {"type": "demo", "params": {"items": 0}}
    async with mcp_client() as client:
        text = await refused(client, "dispatch_batch", {"tasks": [QUICK, QUICK, bad, QUICK]})
        assert "tasks[2]" in text and "items" in text and "nothing was dispatched" in text
        unknown = await refused(client, "dispatch_batch", {"tasks": [QUICK, {"type": "nope"}]})
        assert "tasks[1]" in unknown and "unknown task type 'nope'" in unknown
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter()) == 0


async def test_a_batch_over_the_maximum_is_refused_with_the_count_and_the_bound(mcp_client, runtime):
    runtime.manager.max_batch_size = 5
    async with mcp_client() as client:
        text = await refused(client, "dispatch_batch", {"tasks": [QUICK] * 6})
    assert "6 tasks" in text and "5" in text and "max_batch_size" in text
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter()) == 0


async def test_a_thousand_task_batch_is_stored_in_one_quick_call(mcp_client, runtime):
    runtime.manager.max_concurrency = 0  # nothing starts: this measures dispatch alone
    async with mcp_client() as client:
        started = time.perf_counter()
        out = await call(client, "dispatch_batch", {"tasks": [QUICK] * 1000})
        elapsed = time.perf_counter() - started
    assert len(out["task_ids"]) == 1000
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter(batch=out["batch_id"])) == 1000
    print(f"1,000-task batch dispatched over MCP in {elapsed * 1000:.0f} ms", file=sys.stderr)
    assert elapsed < 10  # generous under load; the figure is printed


# -- cancel, retry, re-prioritise ---------------------------------------------------------------------------


async def test_cancel_by_filter_dry_run_counts_then_cancels(mcp_client, runtime):
    runtime.manager.max_concurrency = 0
    async with mcp_client() as client:
        batch = await call(client, "dispatch_batch", {"tasks": [QUICK] * 7})
        other = await call(client, "dispatch_batch", {"tasks": [QUICK] * 3})
        dry = await call(client, "cancel_tasks", {"batch": batch["batch_id"], "dry_run": True})
        assert dry["dry_run"] and dry["matched"] == 7 and set(dry["sample"]) == set(batch["task_ids"])
        assert dry["results"] == []
        statuses = await call(client, "list_tasks", {"batch": batch["batch_id"], "status": ["QUEUED"], "limit": 100})
        assert len(statuses["tasks"]) == 7  # the dry run changed nothing
        done = await call(client, "cancel_tasks", {"batch": batch["batch_id"]})
        assert done["matched"] == 7 and {r["outcome"] for r in done["results"]} == {"cancelled"}
        after = await batch_status(client, batch["batch_id"])
        assert after["counts"]["CANCELLED"] == 7 and after["done"]
        untouched = await batch_status(client, other["batch_id"])
        assert untouched["counts"]["QUEUED"] == 3
        nothing = await client.call_tool("cancel_tasks", {"batch": batch["batch_id"], "status": ["QUEUED"]})
    assert not nothing.is_error and nothing.structured_content["matched"] == 0
    assert "no task matched" in nothing.content[0].text.lower()


async def test_a_filter_over_the_maximum_is_refused_with_the_count_and_the_bound(mcp_client, runtime):
    runtime.manager.max_concurrency = 0
    async with mcp_client() as client:
        await call(client, "dispatch_batch", {"tasks": [QUICK] * 8})
        runtime.manager.max_batch_size = 5
        text = await refused(client, "cancel_tasks", {"status": ["QUEUED"]})
        assert "matches 8 tasks" in text and "5" in text and "max_batch_size" in text
        dry = await call(client, "cancel_tasks", {"status": ["QUEUED"], "dry_run": True})
        assert dry["matched"] == 8 and dry["max_per_call"] == 5
        ids = await refused(client, "retry_tasks", {"task_ids": [f"t{i}" for i in range(6)]})
        assert "6 task ids" in ids and "max_batch_size" in ids
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter(status="QUEUED")) == 8


async def test_retry_of_a_failed_task_makes_a_new_attempt_and_a_running_one_is_not_retryable(mcp_client, runtime):
    failing = {"type": "demo", "params": {"items": 3, "item_delay_ms": 0, "fail_at": 2}}
    async with mcp_client() as client:
        batch = await call(client, "dispatch_batch", {"tasks": [failing, SLOW]})
        failed_id, slow_id = batch["task_ids"]
        await poll(lambda: call(client, "get_task", {"task_id": failed_id}), lambda t: t["status"] == "FAILED")
        await poll(lambda: call(client, "get_task", {"task_id": slow_id}), lambda t: t["status"] == "RUNNING")
        out = await call(client, "retry_tasks", {"task_ids": [failed_id, slow_id]})
        by_id = {r["task_id"]: r for r in out["results"]}
        assert by_id[slow_id]["outcome"] == "not_retryable" and "not retryable: running" in by_id[slow_id]["message"]
        retried = by_id[failed_id]
        assert retried["outcome"] == "retried" and retried["new_task_id"] not in (None, failed_id)
        attempt = await call(client, "get_task", {"task_id": retried["new_task_id"]})
        assert attempt["retry_of"] == failed_id and attempt["batch_id"] == batch["batch_id"]
        assert attempt["params"]["fail_at"] == 2
        again = await call(client, "retry_tasks", {"task_ids": [failed_id]})
        assert again["results"][0]["outcome"] == "not_retryable" and "already retried" in again["results"][0]["message"]
        status = await batch_status(client, batch["batch_id"])
        assert status["total"] == 2 and status["superseded"] == 1  # the old attempt counts through the new one
        await call(client, "cancel_tasks", {"task_ids": [slow_id]})


async def test_re_prioritised_queued_tasks_start_in_the_new_order(mcp_client, runtime):
    manager = runtime.manager
    manager.max_concurrency = 0  # hold the queue while it is arranged
    async with mcp_client() as client:
        first = await call(client, "dispatch_batch", {"tasks": [QUICK] * 3})
        second = await call(client, "dispatch_batch", {"tasks": [QUICK] * 3})
        moved = await call(client, "set_task_priority", {"batch": second["batch_id"], "priority": 5})
        assert moved["matched"] == 3 and {r["outcome"] for r in moved["results"]} == {"updated"}
        manager.max_concurrency = 1
        manager._schedule_soon()
        await poll(lambda: batch_status(client, first["batch_id"]), lambda b: b["done"], timeout=60)
        tasks = (await call(client, "list_tasks", {"limit": 10}))["tasks"]
        late = await call(client, "set_task_priority", {"task_ids": [first["task_ids"][0]], "priority": 1})
    started = sorted(tasks, key=lambda t: t["started_at"])
    assert [t["batch_id"] for t in started] == [second["batch_id"]] * 3 + [first["batch_id"]] * 3
    assert late["results"][0]["outcome"] == "not_queued" and "completed" in late["results"][0]["message"]


# -- roles and the audit log -----------------------------------------------------------------------------------


async def test_viewers_see_batches_but_cannot_change_them(mcp_url, token, keys, runtime):
    runtime.manager.max_concurrency = 0
    async with open_client(mcp_url, token) as admin:
        batch = await call(admin, "dispatch_batch", {"tasks": [QUICK] * 2})
    async with open_client(mcp_url, keys["viewer"]) as viewer:
        assert (await batch_status(viewer, batch["batch_id"]))["total"] == 2
        for tool, arguments in (
            ("dispatch_batch", {"tasks": [QUICK]}),
            ("retry_tasks", {"batch": batch["batch_id"]}),
            ("set_task_priority", {"batch": batch["batch_id"], "priority": 1}),
            ("cancel_tasks", {"batch": batch["batch_id"]}),
        ):
            text = await refused(viewer, tool, arguments)
            assert "permission denied" in text, (tool, text)
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter(status="QUEUED")) == 2


async def test_an_operators_filter_never_touches_another_keys_or_the_notebook_users_tasks(
    mcp_url, token, keys, runtime
):
    runtime.manager.max_concurrency = 0
    async with (
        open_client(mcp_url, token) as notebook,
        open_client(mcp_url, keys["operator"]) as a,
        open_client(mcp_url, keys["operator2"]) as b,
    ):
        theirs = await call(notebook, "dispatch_batch", {"tasks": [QUICK] * 2})
        other = await call(b, "dispatch_batch", {"tasks": [QUICK] * 2})
        mine = await call(a, "dispatch_batch", {"tasks": [QUICK] * 3})
        dry = await call(a, "cancel_tasks", {"status": ["QUEUED"], "dry_run": True})
        assert dry["matched"] == 3 and set(dry["sample"]) == set(mine["task_ids"])
        assert (await call(a, "cancel_tasks", {"batch": theirs["batch_id"]}))["matched"] == 0
        denied = await refused(a, "cancel_tasks", {"owner": "jupyter"})
        assert "permission denied" in denied and "only your own" in denied
        by_id = await call(a, "cancel_tasks", {"task_ids": [*theirs["task_ids"], *other["task_ids"]]})
        assert {r["outcome"] for r in by_id["results"]} == {"forbidden", "not_found"}
        with pytest.raises(MCPError, match="no batch with id"):  # another key's batch does not exist for it
            await batch_status(a, other["batch_id"])
        priority = await refused(a, "set_task_priority", {"status": ["QUEUED"], "priority": 500})
        assert "max_priority_operator" in priority
        over = await refused(a, "dispatch_batch", {"tasks": [QUICK, {**QUICK, "priority": 500}]})
        assert "tasks[1]" in over and "max_priority_operator" in over
        done = await call(a, "cancel_tasks", {"status": ["QUEUED"]})
        assert done["matched"] == 3
    queued = runtime.manager.store.find_task_ids(runtime.manager.build_filter(status="QUEUED"), limit=100)
    assert set(queued) == {*theirs["task_ids"], *other["task_ids"]}


async def test_the_per_key_task_cap_applies_to_the_whole_batch(mcp_url, keys, runtime):
    runtime.manager.max_concurrency = 0
    runtime.manager.max_unfinished_per_key = 5
    async with open_client(mcp_url, keys["operator"]) as client:
        await call(client, "dispatch_batch", {"tasks": [QUICK] * 3})
        text = await refused(client, "dispatch_batch", {"tasks": [QUICK] * 3})
    assert "3 unfinished tasks and asks for 3 more" in text and "max_tasks_per_key" in text
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter()) == 3


async def test_batch_operations_are_audited_with_the_filter_and_the_count_not_every_id(mcp_client, runtime):
    runtime.manager.max_concurrency = 0
    async with mcp_client() as client:
        batch = await call(client, "dispatch_batch", {"tasks": [QUICK] * 30})
        await call(client, "cancel_tasks", {"batch": batch["batch_id"], "dry_run": True})
        await call(client, "cancel_tasks", {"batch": batch["batch_id"]})
    runtime.audit.flush()
    records, _ = runtime.audit.query(action="tool.*", limit=10)
    by_action = {}
    for record in records:
        by_action.setdefault(record["action"], []).append(record["details"])
    dispatched = by_action["tool.dispatch_batch"][0]
    assert dispatched["count"] == 30 and dispatched["batch_id"] == batch["batch_id"] and "arguments" not in dispatched
    real, dry = by_action["tool.cancel_tasks"]
    assert dry["dry_run"] and dry["count"] == 30 and dry["filter"] == {"batch": batch["batch_id"]}
    assert real["count"] == 30 and real["outcomes"] == {"cancelled": 30}
    assert not any(task_id in json.dumps(records) for task_id in batch["task_ids"])


# -- subscriptions ---------------------------------------------------------------------------------------------


async def test_a_subscription_to_a_batch_reaches_its_final_counts(mcp_client, runtime):
    updates: list[str] = []

    async def on_message(message) -> None:
        uri = getattr(getattr(getattr(message, "root", message), "params", None), "uri", None)
        if uri is not None:
            updates.append(str(uri))

    runtime.manager.max_concurrency = 0
    async with mcp_client(message_handler=on_message) as client:
        batch = await call(client, "dispatch_batch", {"tasks": [QUICK] * 5})
        uri = f"plexus://batches/{batch['batch_id']}"
        await client.subscribe_resource(uri)
        runtime.manager.max_concurrency = 4
        runtime.manager._schedule_soon()

        async def final_after_notification() -> bool:
            return bool(updates) and (await batch_status(client, batch["batch_id"]))["done"]

        await poll(final_after_notification, bool, timeout=60)
        status = await batch_status(client, batch["batch_id"])
    assert set(updates) == {uri}
    assert status["counts"]["COMPLETED"] == 5


async def test_a_listen_stream_of_the_2026_era_follows_a_batch_to_its_end(mcp_client, runtime):
    runtime.manager.max_concurrency = 0  # held until the stream is open, or it could all end before
    async with mcp_client(MODERN) as client:
        batch = await call(client, "dispatch_batch", {"tasks": [QUICK] * 3})
        uri = f"plexus://batches/{batch['batch_id']}"
        with anyio.fail_after(60):
            async with client.listen(resource_subscriptions=[uri]) as subscription:
                runtime.manager.max_concurrency = 4
                runtime.manager._schedule_soon()
                async for event in subscription:
                    assert event == ResourceUpdated(uri=uri)
                    if (await batch_status(client, batch["batch_id"]))["done"]:
                        break
        assert (await batch_status(client, batch["batch_id"]))["counts"]["COMPLETED"] == 3


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("plexus://batches/no-such-batch", "no batch with id 'no-such-batch'"),
        ("plexus://batches/", "subscribable resources"),
        ("plexus://tasks?batch=x&colour=red", "unknown field(s) ['colour']; allowed: status, type, since"),
    ],
)
async def test_subscribing_to_a_bad_batch_uri_is_a_clear_error(mcp_client, uri, message):
    async with mcp_client() as client:
        with pytest.raises(MCPError) as err:
            await client.subscribe_resource(uri)
    assert message in err.value.message and err.value.code == -32602


async def test_the_standalone_http_server_runs_batches_too(tmp_path):
    proc, url, token = start_http(tmp_path)
    try:
        async with open_client(url, token) as client:
            batch = await call(client, "dispatch_batch", {"tasks": [QUICK] * 3})
            final = await poll(lambda: batch_status(client, batch["batch_id"]), lambda b: b["done"], timeout=60)
            assert final["counts"]["COMPLETED"] == 3
            retried = await call(client, "retry_tasks", {"batch": batch["batch_id"], "dry_run": True})
            assert retried["matched"] == 0  # nothing failed: a clear zero
    finally:
        stop(proc)


# -- REST and the CLI --------------------------------------------------------------------------------------------


async def test_rest_dispatches_a_batch_and_operates_on_it(server_url, token, runtime):
    runtime.manager.max_concurrency = 0
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(base_url=f"{server_url}plexus/api/", headers=headers) as http:
        created = await http.post("tasks", json={"tasks": [QUICK] * 4})
        assert created.status_code == 201, created.text
        batch_id, ids = created.json()["batch_id"], created.json()["task_ids"]
        bad = await http.post("tasks", json={"tasks": [QUICK, {"type": "demo", "params": {"items": -1}}]})
        assert bad.status_code == 400 and "tasks[1]" in bad.json()["error"]["message"]
        status = await http.get(f"batches/{batch_id}")
        assert status.status_code == 200 and status.json()["counts"]["QUEUED"] == 4
        listed = await http.get("tasks", params={"batch": batch_id})
        assert {t["task_id"] for t in listed.json()["tasks"]} == set(ids)
        moved = await http.post("tasks/priority", json={"batch": batch_id, "priority": 3})
        assert moved.status_code == 200 and moved.json()["matched"] == 4
        dry = await http.post("tasks/cancel", json={"batch": batch_id, "dry_run": True})
        assert dry.json()["matched"] == 4 and dry.json()["results"] == []
        cancelled = await http.post("tasks/cancel", json={"batch": batch_id})
        assert {r["outcome"] for r in cancelled.json()["results"]} == {"cancelled"}
        retried = await http.post("tasks/retry", json={"batch": batch_id})
        assert {r["outcome"] for r in retried.json()["results"]} == {"retried"}
        missing = await http.get("batches/nope")
        assert missing.status_code == 404 and "no batch" in missing.json()["error"]["message"]
        unknown = await http.post("tasks/cancel", json={"batch": batch_id, "colour": "red"})
        assert unknown.status_code == 400 and "colour" in unknown.json()["error"]["message"]
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter(status="QUEUED")) == 4
    runtime.audit.flush()
    records, _ = runtime.audit.query(action="http.POST", limit=20)
    details = [r["details"] for r in records if r["target"].endswith("tasks/cancel") and r["outcome"] == "ok"]
    assert {
        "operation": "cancel",
        "dry_run": False,
        "filter": {"batch": batch_id},
        "count": 4,
        "outcomes": {"cancelled": 4},
        "status": 200,
    }.items() <= details[0].items()
    assert not any(task_id in json.dumps(records) for task_id in ids)


async def test_the_cli_dispatches_a_batch_and_cancels_it_by_filter(server_url, token, runtime, tmp_path):
    runtime.manager.max_concurrency = 0
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([QUICK] * 3))
    env = {"PLEXUS_MCP_URL": server_url, "PLEXUS_MCP_TOKEN": token}

    async def plexus(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "plexus_mcp_jupyter.cli",
            *args,
            env={**_env(), **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await plexus("tasks", "dispatch", str(specs))
    assert code == 0, err
    batch_id = json.loads(out)["batch_id"]
    code, out, err = await plexus("tasks", "cancel", "--batch", batch_id, "--dry-run")
    assert code == 0 and json.loads(out)["matched"] == 3, err
    code, out, err = await plexus("tasks", "cancel", "--batch", batch_id)
    assert code == 0 and json.loads(out)["matched"] == 3, err
    code, out, err = await plexus("tasks", "batch", batch_id)
    assert code == 0 and json.loads(out)["counts"]["CANCELLED"] == 3, err
    code, out, err = await plexus("tasks", "cancel", "--status", "QUEUED", "--owner", "x", "--type", "nope")
    assert code == 2 and "unknown task type 'nope'" in err and "Traceback" not in err


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_MCP_")}


async def test_the_notebook_client_runs_the_same_batch_operations(server_url, token, runtime):
    runtime.manager.max_concurrency = 0
    nb = Plexus()

    def session() -> tuple[dict, dict, dict, dict, dict]:
        nb.connect(server_url, token)
        try:
            batch = nb.dispatch_batch([QUICK] * 3)
            dry = nb.cancel(batch=batch["batch_id"], dry_run=True)
            moved = nb.set_priority(2, batch=batch["batch_id"])
            cancelled = nb.cancel(task_ids=batch["task_ids"][:2])
            retried = nb.retry(batch=batch["batch_id"])
            return batch, dry, moved, cancelled, retried
        finally:
            nb.close()

    batch, dry, moved, cancelled, retried = await asyncio.to_thread(session)
    assert len(batch["task_ids"]) == 3 and dry["matched"] == 3 and moved["matched"] == 3
    assert [r["outcome"] for r in cancelled["results"]] == ["cancelled", "cancelled"]
    assert {r["outcome"] for r in retried["results"]} == {"retried"} and retried["matched"] == 2
    status = await BatchOperations(runtime.manager).status(batch["batch_id"])
    assert status["counts"]["QUEUED"] == 3 and status["superseded"] == 2


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("tasks", {"tasks": "demo"}, "tasks: Input should be a valid list (got 'demo'); The task specs, in order"),
        ("tasks", {"tasks": []}, "tasks: List should have at least 1 item after validation, not 0"),
        ("tasks", {"tasks": [1]}, "tasks[0]: Input should be a valid dictionary or instance of DispatchTask"),
        ("tasks", {"tasks": [{**QUICK, "colour": "red"}]}, "unknown field(s) ['tasks[0].colour']; allowed: type,"),
        ("tasks", {"tasks": [QUICK], "priority": 3}, "unknown field(s) ['priority']; allowed: tasks"),
        ("tasks", {"tasks": [{"type": "evaluation"}]}, "tasks[0]: params.type is required: One of accuracy"),
        ("tasks/cancel", {}, "give either task_ids"),
        ("tasks/cancel", {"task_ids": ["a"], "status": "QUEUED"}, "not both"),
        ("tasks/cancel", {"status": "DONE"}, "status[0]: unknown status; expected one of QUEUED"),
        ("tasks/cancel", {"batch": "b", "dry_run": "yes"}, "dry_run: Input should be a valid boolean (got 'yes')"),
        ("tasks/cancel", {"created_after": "yesterday"}, "'created_after' must be an ISO 8601 date"),
        ("tasks/retry", {"created_before": "soon"}, "'created_before' must be an ISO 8601 date"),
        ("tasks/priority", {"batch": "b"}, "priority is required"),
        ("tasks/priority", {"batch": "b", "priority": "high"}, "priority: Input should be a valid integer"),
    ],
)
async def test_bad_batch_requests_get_clear_errors_and_change_nothing(server_url, token, runtime, path, body, says):
    runtime.manager.max_concurrency = 0
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(base_url=f"{server_url}plexus/api/", headers=headers) as http:
        response = await http.post(path, json=body)
    assert response.status_code == 400 and says in response.json()["error"]["message"], response.text
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter()) == 0


# -- evaluations as a batch ------------------------------------------------------------------------------


def accuracy_of(dataset: str) -> dict:
    return {
        "type": "evaluation",
        "params": {"type": "accuracy", "dataset": dataset, "label_column": "label", "prediction_column": "prediction"},
    }


async def test_an_evaluation_per_dataset_is_one_batch_and_each_gets_its_record_and_metrics(mcp_client, runtime):
    async with mcp_client() as client:
        out = await call(
            client, "dispatch_batch", {"tasks": [accuracy_of("example:sentiment"), accuracy_of("example:topics")]}
        )
        batch_id, ids = out["batch_id"], out["task_ids"]
        final = await poll(lambda: batch_status(client, batch_id), lambda b: b["done"], timeout=120)
        assert final["counts"]["COMPLETED"] == 2
        evaluations = [runtime.evaluations.store.by_task(task_id) for task_id in ids]
        assert [e["dataset"] for e in evaluations] == ["example:sentiment", "example:topics"]
        for evaluation in evaluations:
            got = await call(client, "get_evaluation", {"evaluation_id": evaluation["id"]})
            assert got["status"] == "COMPLETED" and 0 < got["metrics"]["score"]["accuracy"] <= 1


async def test_a_batch_with_one_bad_evaluation_spec_dispatches_nothing_and_names_its_index(mcp_client, runtime):
    before = runtime.manager.store.count_tasks(runtime.manager.build_filter())
    async with mcp_client() as client:
        text = await refused(
            client, "dispatch_batch", {"tasks": [accuracy_of("example:sentiment"), accuracy_of("example:nope"), QUICK]}
        )
        assert "tasks[1]: no example dataset 'nope'" in text and "nothing was dispatched" in text
        wrong = {"type": "evaluation", "params": {"type": "accuracy", "dataset": "example:topics", "colour": "red"}}
        text = await refused(client, "dispatch_batch", {"tasks": [wrong]})
        assert "tasks[0]: unknown field(s) ['params.colour']" in text and "prediction_column" in text
        text = await refused(client, "dispatch_batch", {"tasks": [{"type": "evaluation", "params": {}}]})
        assert "params.type is required: One of accuracy" in text
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter()) == before
