"""Rate limits and caps per API key (a server configured with small limits)."""

from __future__ import annotations

import pytest

from .conftest import open_client, poll
from .test_security import post_mcp


@pytest.fixture
def plexus_config(plexus_config):
    return {**plexus_config, "rate_limit": 5.0, "rate_burst": 5, "max_tasks_per_key": 3}


async def test_rate_limits_answer_429_with_retry_after_and_recover(mcp_url, keys, runtime):
    statuses, retry_after = [], None
    for _ in range(12):
        response = await post_mcp(mcp_url, keys["viewer"])
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after = int(response.headers["Retry-After"])
            assert "rate limit" in response.json()["error"]["message"]
    assert statuses[0] == 200 and 429 in statuses and retry_after >= 1
    # The bucket refills at 5 per second: the key is served again.
    await poll(lambda: post_mcp(mcp_url, keys["viewer"]), lambda r: r.status_code == 200, timeout=10, interval=0.3)
    # Another key has its own bucket.
    assert (await post_mcp(mcp_url, keys["operator"])).status_code == 200


async def test_a_key_may_have_only_so_many_unfinished_tasks(mcp_url, runtime):
    _, fast = runtime.keys.create("fast operator", "operator", rate_limit=1000)  # not rate limited here
    async with open_client(mcp_url, fast) as client:
        for _ in range(3):
            assert not (await client.call_tool("run_demo_task", {"items": 100, "item_delay_ms": 50})).is_error
        fourth = await client.call_tool("run_demo_task", {"items": 1})
        assert fourth.is_error and "max_tasks_per_key" in fourth.content[0].text
        await client.call_tool("cancel_tasks", {"status": ["QUEUED", "RUNNING"]})
