"""Task resources: templates, filters, cursors, detail, and clear errors for bad URIs."""

from __future__ import annotations

import json

import pytest
from mcp import MCPError

from .conftest import LEGACY, MODERN
from .test_mcp_tools import wait_final


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_templates_and_the_static_listing_are_advertised(mcp_client, mode):
    async with mcp_client(mode) as client:
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
    assert templates == {
        "plexus://tasks{?status,type,since,batch,limit,cursor}",
        "plexus://tasks/{task_id}",
        "plexus://batches/{batch_id}",
        "plexus://evaluations{?status,type,limit,cursor}",
        "plexus://evaluations/{evaluation_id}",
        "plexus://evaluations/{evaluation_id}/results{?only_mismatches,label,score,limit,cursor}",
        "plexus://audit{?action,outcome,owner,since,limit,cursor}",
    }
    assert {"plexus://tasks", "plexus://evaluations", "plexus://datasets"} <= resources


async def test_task_detail_resource_has_stages_history_and_metadata(mcp_client):
    async with mcp_client() as client:
        task_id = (await client.call_tool("run_demo_task", {"items": 50, "item_delay_ms": 1})).structured_content[
            "task_id"
        ]
        await wait_final(client, task_id)
        result = await client.read_resource(f"plexus://tasks/{task_id}")
    content = result.contents[0]
    assert content.mime_type == "application/json"
    task = json.loads(content.text)
    assert task["task_id"] == task_id and task["status"] == "COMPLETED"
    assert [s["name"] for s in task["stages"]] == ["Setup", "Processing", "Finalizing"]
    assert task["history"] and task["history_total"] >= len(task["history"])
    assert task["params"]["items"] == 50 and task["owner"]


async def test_list_resource_honours_filters_and_cursors(mcp_client, runtime):
    runtime.manager.max_concurrency = 0
    async with mcp_client() as client:
        ids = [(await client.call_tool("run_demo_task", {"items": 5})).structured_content["task_id"] for _ in range(5)]
        runtime.manager.cancel(ids[:2])
        first = json.loads((await client.read_resource("plexus://tasks?status=QUEUED&limit=2")).contents[0].text)
        cursor = first["next_cursor"]
        second = json.loads(
            (await client.read_resource(f"plexus://tasks?status=QUEUED&limit=2&cursor={cursor}")).contents[0].text
        )
        cancelled = json.loads(
            (await client.read_resource("plexus://tasks?status=cancelled,failed&type=demo")).contents[0].text
        )
        everything = json.loads((await client.read_resource("plexus://tasks")).contents[0].text)
    queued = [t["task_id"] for t in first["tasks"] + second["tasks"]]
    assert queued == [ids[4], ids[3], ids[2]] and second["next_cursor"] is None
    assert {t["task_id"] for t in cancelled["tasks"]} == set(ids[:2])
    assert len(everything["tasks"]) == 5


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("plexus://tasks/does-not-exist", "no task with id 'does-not-exist'"),
        ("plexus://tasks?status=DONE", "status[0]: unknown status; expected one of QUEUED, RUNNING"),
        ("plexus://tasks?limit=lots", "limit: Input should be a valid integer"),
        ("plexus://tasks?limit=0", "limit: Input should be greater than or equal to 1 (got '0'); Page size, 1 to 100"),
        ("plexus://tasks?limit=%C2%B2", "limit: Input should be a valid integer"),
        ("plexus://tasks?since=yesterday", "'since' must be an ISO 8601"),
        ("plexus://tasks?cursor=xyz", "invalid cursor"),
        ("plexus://nothing-here", "Unknown resource"),
    ],
)
async def test_bad_resource_uris_get_a_clear_error(mcp_client, uri, message):
    async with mcp_client() as client:
        with pytest.raises(MCPError) as err:
            await client.read_resource(uri)
        assert message in err.value.message
        if not message.startswith("Unknown"):
            assert err.value.code == -32602  # invalid params, not an internal error
        assert (await client.list_resources()).resources  # still serving
