"""Hardening (issue 11): no key starves the notebook user of worker slots, priorities have a ceiling by
role, and kernel scorer names are per owner. A real Jupyter server (and `plexus mcp serve --transport
http`), the SDK client over real HTTP, real worker processes, and kernels speaking over the real event
stream."""

from __future__ import annotations

import asyncio
import json

import pytest

from .conftest import open_client, poll
from .test_evaluations import create, finished
from .test_kernel_scorers import FakeKernel
from .test_standalone import cli_key, plexus_env, start_http, stop

LONG = {"items": 100_000, "item_delay_ms": 50}  # a demo task that would run for hours
SMALL = {"items": 5, "item_delay_ms": 0}


@pytest.fixture
def plexus_config(plexus_config):
    return {**plexus_config, "max_concurrency": 2}


async def flood(client, n: int, priority: int) -> list[str]:
    """What the attack did: long demo tasks at the highest priority the key may set."""
    ids = []
    for _ in range(n):
        started = await client.call_tool("run_demo_task", {**LONG, "priority": priority})
        assert not started.is_error, started.content[0].text
        ids.append(started.structured_content["task_id"])
    return ids


async def status_of(client, task_id: str) -> str:
    return (await client.call_tool("get_task", {"task_id": task_id})).structured_content["status"]


async def starved_or_not(flooder, notebook_user) -> None:
    """The flooder holds its share of the slots, never all: the notebook user's small task runs at once."""
    flood_ids = await flood(flooder, 4, priority=10)
    running = await poll(lambda: _statuses(flooder, flood_ids), lambda s: s.count("RUNNING") >= 1)
    small = (await notebook_user.call_tool("run_demo_task", SMALL)).structured_content["task_id"]
    assert await poll(lambda: status_of(notebook_user, small), lambda s: s == "COMPLETED", timeout=15) == "COMPLETED"
    running = await _statuses(flooder, flood_ids)
    assert running.count("RUNNING") == 1 and running.count("QUEUED") == 3  # half of max_concurrency=2
    cancelled = await flooder.call_tool("cancel_tasks", {"status": ["QUEUED", "RUNNING"], "wait_seconds": 10})
    assert not cancelled.is_error


async def _statuses(client, ids: list[str]) -> list[str]:
    return [await status_of(client, task_id) for task_id in ids]


async def test_an_operator_key_cannot_take_every_slot_from_the_notebook_user(mcp_url, token, keys, runtime):
    _, flooder = runtime.keys.create("flooder", "operator", rate_limit=1000)
    async with open_client(mcp_url, flooder) as key, open_client(mcp_url, token) as notebook_user:
        await starved_or_not(key, notebook_user)


async def test_a_capped_keys_queue_does_not_block_the_next_owner_in_line(runtime):
    # The scheduler skips a capped owner's queued tasks, however many, and starts the next eligible one.
    manager = runtime.manager
    manager.max_unfinished_per_key = 0  # a queue longer than the scheduler reads at once (several keys' floods)
    first = manager.dispatch("demo", LONG, owner="key:flooder", priority=10)
    queued = [manager.dispatch("demo", SMALL, owner="key:flooder", priority=10) for _ in range(80)]
    mine = manager.dispatch("demo", SMALL, owner="jupyter")
    await asyncio.sleep(0)  # one scheduling pass: the key's cap is reached in it, and the queue read again
    assert manager.get(mine.id).status.value != "QUEUED"
    await manager.wait_final([mine.id], 20)
    assert manager.get(mine.id).status.value == "COMPLETED"
    assert all(manager.get(t.id).status.value == "QUEUED" for t in queued)
    manager.cancel([first.id, *(t.id for t in queued)])


@pytest.mark.parametrize(
    ("max_concurrency", "share", "per_owner", "key_cap", "notebook_cap"),
    [
        (4, 0.5, 0, 2, 0),  # the defaults: half the slots for a key, none for the notebook user
        (2, 0.5, 0, 1, 0),
        (5, 0.5, 0, 2, 0),  # rounded down
        (1, 0.5, 0, 1, 0),  # at least one: with a single slot a key can still hold it
        (8, 1.0, 0, 0, 0),  # 1 turns the share off
        (8, 0.5, 3, 3, 3),  # max_concurrency_per_owner caps everyone; a key gets the smaller cap
    ],
)
def test_the_slot_share_of_a_key(tmp_path, max_concurrency, share, per_owner, key_cap, notebook_cap):
    from plexus_mcp_jupyter.core import Store
    from plexus_mcp_jupyter.core.events import EventBus
    from plexus_mcp_jupyter.core.executors import LocalExecutor
    from plexus_mcp_jupyter.core.manager import TaskManager

    manager = TaskManager(
        Store(f"sqlite:///{tmp_path / 'caps.db'}"),
        EventBus(),
        LocalExecutor(),
        max_concurrency=max_concurrency,
        max_concurrency_per_owner=per_owner,
        key_slot_share=share,
    )
    assert (manager.slot_cap("key:k1"), manager.slot_cap("jupyter"), manager.slot_cap(None)) == (
        key_cap,
        notebook_cap,
        notebook_cap,
    )
    manager.store.close()


async def test_a_priority_above_the_ceiling_of_a_role_is_refused_and_admins_keep_the_full_range(
    jp_fetch, mcp_url, token, keys, runtime
):
    async with open_client(mcp_url, keys["operator"]) as operator:
        refused = await operator.call_tool("run_demo_task", {**SMALL, "priority": 1000})
        assert refused.is_error
        text = refused.content[0].text
        assert "priority 1000" in text and "10" in text and "max_priority_operator" in text, text
        assert not (await operator.call_tool("run_demo_task", {**SMALL, "priority": 10})).is_error
        evaluation = await operator.call_tool(
            "create_evaluation",
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "label_column": "label",
                "prediction_column": "prediction",
                "priority": 11,
            },
        )
        assert evaluation.is_error and "max_priority_operator" in evaluation.content[0].text
    for body, path in (
        ({"type": "demo", "params": SMALL, "priority": 500}, "tasks"),
        (
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "label_column": "label",
                "prediction_column": "prediction",
                "priority": 500,
            },
            "evaluations",
        ),
    ):
        with pytest.raises(Exception) as rest:
            await jp_fetch(
                "plexus",
                "api",
                path,
                method="POST",
                body=json.dumps(body),
                headers={"Authorization": f"Bearer {keys['operator']}"},
            )
        assert rest.value.code == 400 and "max_priority_operator" in rest.value.response.body.decode()
    for credential in (keys["admin"], token):
        async with open_client(mcp_url, credential) as admin:
            allowed = await admin.call_tool("run_demo_task", {**SMALL, "priority": 1000})
            assert not allowed.is_error and allowed.structured_content["priority"] == 1000
    async with open_client(mcp_url, keys["viewer"]) as viewer:
        assert "permission denied" in (await viewer.call_tool("run_demo_task", SMALL)).content[0].text
    assert runtime.manager.store.count_tasks(runtime.manager.build_filter()) == 3  # nothing refused was stored


async def test_the_standalone_http_server_is_fair_too(tmp_path):
    flooder, _ = cli_key(plexus_env(tmp_path), "flooder", "operator")
    proc, url, token = start_http(tmp_path, "--max-concurrency", "2")
    try:
        async with open_client(url, flooder) as key, open_client(url, token) as notebook_user:
            refused = await key.call_tool("run_demo_task", {**SMALL, "priority": 1000})
            assert refused.is_error and "max_priority_operator" in refused.content[0].text
            await starved_or_not(key, notebook_user)
    finally:
        stop(proc)


# -- kernel scorer names are per owner ------------------------------------------------------------------


async def kernel(jp_ws_fetch, credential: str, fn) -> FakeKernel:
    ws = await jp_ws_fetch(
        "plexus", "api", "events", params={"ids": "none"}, headers={"Authorization": f"Bearer {credential}"}
    )
    return FakeKernel(ws, fn)


async def kernel_scorers(client) -> list[dict]:
    return (await client.call_tool("list_scorers", {})).structured_content["kernel_scorers"]


async def test_a_keys_scorer_name_never_blocks_the_notebook_users_and_each_evaluation_gets_its_own(
    jp_ws_fetch, mcp_url, token, keys, runtime
):
    squatter = await kernel(jp_ws_fetch, keys["operator"], lambda text: "key")
    assert (await squatter.register("my_scorer"))[0]["type"] == "scorer_registered"
    notebook = await kernel(jp_ws_fetch, token, lambda text: "notebook")
    answer = await notebook.register("my_scorer")
    assert answer[0] == {"type": "scorer_registered", "name": "my_scorer"}, answer
    # Within one owner, a name still belongs to one kernel.
    again = await kernel(jp_ws_fetch, token, lambda text: "again")
    taken = await again.register("my_scorer")
    assert taken[0]["type"] == "error" and "already registered by another kernel" in taken[0]["message"]
    arguments = {
        "type": "accuracy",
        "dataset": "example:sentiment",
        "label_column": "label",
        "scorer": "kernel:my_scorer",
        "input_column": "text",
    }
    async with (
        open_client(mcp_url, token) as notebook_user,
        open_client(mcp_url, keys["operator"]) as key,
        open_client(mcp_url, keys["operator2"]) as other_key,
    ):
        for client in (notebook_user, key, other_key):
            assert await kernel_scorers(client) == [{"spec": "kernel:my_scorer", "batch": True}]
        answered_by = {}
        for name, client in (("notebook user", notebook_user), ("key", key), ("other key", other_key)):
            done = await finished(client, (await create(client, **arguments))["evaluation_id"])
            assert done["status"] == "COMPLETED", done["error_message"]
            answered_by[name] = set(
                item["prediction"]
                for item in (
                    await client.call_tool(
                        "get_evaluation_results", {"evaluation_id": done["evaluation_id"], "limit": 100}
                    )
                ).structured_content["items"]
            )
    # The caller's own scorer first; a key without one of that name gets the notebook user's, never
    # another key's.
    assert answered_by == {"notebook user": {"notebook"}, "key": {"key"}, "other key": {"notebook"}}
    notebook.ws.close()
    await poll(lambda: runtime.kernel_scorers.names(), lambda names: names == ["my_scorer"])
    async with open_client(mcp_url, token) as notebook_user, open_client(mcp_url, keys["operator2"]) as other_key:
        for client in (notebook_user, other_key):  # the key's scorer serves only that key
            assert await kernel_scorers(client) == []
            refused = await client.call_tool("create_evaluation", arguments)
            assert refused.is_error and "no kernel scorer 'my_scorer'" in refused.content[0].text
    for socket in (squatter, again):
        socket.ws.close()
