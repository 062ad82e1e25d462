"""redact_columns: named dataset columns never appear in results, metrics or dataset descriptions."""

from __future__ import annotations

import json

import pytest

from .test_evaluations import create, finished


@pytest.fixture
def plexus_config(plexus_config):
    return {**plexus_config, "redact_columns": "text,id"}


async def test_redacted_columns_are_scored_but_never_shown(mcp_client, jp_fetch, runtime):
    async with mcp_client() as client:
        started = await create(
            client,
            type="accuracy",
            dataset="example:sentiment",
            label_column="label",
            prediction_column="prediction",
            input_column="text",
            id_column="id",
        )
        await finished(client, started["evaluation_id"])
        page = (
            await client.call_tool("get_evaluation_results", {"evaluation_id": started["evaluation_id"], "limit": 5})
        ).structured_content
        assert {i["input"] for i in page["items"]} == {"[redacted]"} and {i["item_id"] for i in page["items"]} == {
            "[redacted]"
        }
        refused = await client.call_tool(
            "create_evaluation",
            {"type": "accuracy", "dataset": "example:sentiment", "label_column": "label", "prediction_column": "text"},
        )
        assert refused.is_error and "redacted" in refused.content[0].text
    with pytest.raises(Exception) as hidden:
        await jp_fetch("plexus", "api", "datasets", "example:sentiment", params={"label_column": "text"})
    assert hidden.value.code == 400 and "redacted" in json.loads(hidden.value.response.body)["error"]["message"]
