"""The REST face: same filters, cursors and errors as MCP, JSON errors a person can act on."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import HTTPClientError

from .conftest import poll


async def call(jp_fetch, *path, method="GET", body=None, params=None):
    kwargs = {"method": method, "params": params or {}}
    if body is not None:
        kwargs["body"] = body if isinstance(body, str) else json.dumps(body)
    response = await jp_fetch("plexus", "api", *path, **kwargs)
    return response.code, json.loads(response.body)


async def error_of(jp_fetch, *path, **kwargs):
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, *path, **kwargs)
    return err.value.code, json.loads(err.value.response.body)["error"]["message"]


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_dispatch_follow_and_list_a_demo_task(jp_fetch):
    code, task = await call(
        jp_fetch, "tasks", method="POST", body={"type": "demo", "params": {"items": 20, "item_delay_ms": 1}}
    )
    assert code == 201 and task["status"] == "QUEUED" and task["params"]["items"] == 20

    async def get():
        return (await call(jp_fetch, "tasks", task["task_id"], params={"history": "true"}))[1]

    done = await poll(get, lambda t: t["status"] == "COMPLETED")
    assert done["history"] and done["stages"][1]["processed_items"] == 20
    code, page = await call(jp_fetch, "tasks", params={"status": "COMPLETED", "type": "demo", "limit": "5"})
    assert [t["task_id"] for t in page["tasks"]] == [task["task_id"]] and page["next_cursor"] is None


async def test_cancel_one_and_many(jp_fetch, jp_serverapp):
    jp_serverapp.web_app.settings["plexus"].manager.max_concurrency = 0
    ids = [
        (await call(jp_fetch, "tasks", method="POST", body={"params": {"items": 5}}))[1]["task_id"] for _ in range(3)
    ]
    code, one = await call(jp_fetch, "tasks", ids[0], "cancel", method="POST", body={})
    assert code == 200 and one["outcome"] == "cancelled"
    code, many = await call(jp_fetch, "tasks", "cancel", method="POST", body={"task_ids": ids})
    assert [r["outcome"] for r in many["results"]] == ["already_finished", "cancelled", "cancelled"]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "message"),
    [
        (("tasks", "nope"), {}, 404, "no task with id 'nope'"),
        (("tasks", "nope", "cancel"), {"method": "POST", "body": {}}, 404, "no task with id 'nope'"),
        (("tasks",), {"params": {"status": "DONE"}}, 400, "status[0]: unknown status; expected one of"),
        (("tasks",), {"params": {"type": "mining"}}, 400, "unknown task type 'mining'"),
        (
            ("tasks",),
            {"params": {"limit": "0"}},
            400,
            "limit: Input should be greater than or equal to 1 (got '0'); Page size, 1 to 100 (max_page_size)",
        ),
        (("tasks",), {"params": {"limit": "x"}}, 400, "limit: Input should be a valid integer"),
        (("tasks",), {"params": {"colour": "red"}}, 400, "unknown field(s) ['colour']; allowed: status, type,"),
        (("tasks",), {"params": {"cursor": "garbage"}}, 400, "invalid cursor"),
        (("tasks",), {"method": "POST", "body": "{not json"}, 400, "not valid JSON"),
        (("tasks",), {"method": "POST", "body": "[1, 2]"}, 400, "must be a JSON object"),
        (("tasks",), {"method": "POST", "body": {"type": "mining"}}, 400, "unknown task type 'mining'"),
        (
            ("tasks",),
            {"method": "POST", "body": {"params": {"items": -1}}},
            400,
            "items: Input should be greater than or equal to 1 (got -1); Items to process in the Processing stage",
        ),
        (
            ("tasks",),
            {"method": "POST", "body": {"priority": 10**6}},
            400,
            "priority: Input should be less than or equal to 1000",
        ),
        (("tasks",), {"method": "POST", "body": {"colour": 1}}, 400, "unknown field(s) ['colour']"),
        (
            ("tasks", "cancel"),
            {"method": "POST", "body": {"task_ids": [1]}},
            400,
            "task_ids[0]: Input should be a valid string",
        ),
        (
            ("tasks",),
            {"method": "POST", "body": {"description": {"a": 1}}},
            400,
            "description: Input should be a valid string",
        ),
        (("tasks",), {"method": "POST", "body": {"type": ["demo"]}}, 400, "type: Input should be a valid string"),
        (("tasks", "x"), {"params": {"history": "true"}}, 404, "no task with id 'x'"),
        (
            ("tasks", "x"),
            {"params": {"history": "true", "history_limit": "0"}},
            400,
            "history_limit: Input should be greater than or equal to 1 (got '0'); Most recent samples to include",
        ),
        (("tasks", "%s"), {}, 404, "no task with id '%s'"),
    ],
)
async def test_bad_requests_get_json_errors_that_say_what_is_allowed(
    jp_fetch, jp_serverapp, path, kwargs, status, message
):
    before = jp_serverapp.web_app.settings["plexus"].manager.counts()
    code, text = await error_of(jp_fetch, *path, **kwargs)
    assert code == status and message in text
    assert jp_serverapp.web_app.settings["plexus"].manager.counts() == before
