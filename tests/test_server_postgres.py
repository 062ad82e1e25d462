"""A real Jupyter server whose store is a real PostgreSQL database (tests/postgres.py): the demo task and an
evaluation over MCP, the same tests as on SQLite (imported from their modules, run here with this store)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from .test_batches import (
    test_a_batch_is_dispatched_in_one_call_and_its_resource_counts_reach_completed as test_a_batch_on_postgresql,
)
from .test_evaluations import (
    test_an_accuracy_evaluation_of_a_prediction_column_matches_scikit_learn as test_an_evaluation_on_postgresql,
)
from .test_mcp_tools import (
    test_a_demo_task_runs_to_completed_with_stages_counts_and_monotonic_history as test_a_demo_task_on_postgresql,
)

__all__ = ["test_a_batch_on_postgresql", "test_a_demo_task_on_postgresql", "test_an_evaluation_on_postgresql"]


@pytest.fixture
def plexus_config(postgres_url) -> dict[str, Any]:
    """The settings of conftest.py's server, on a PostgreSQL database of its own."""
    return {"db_url": postgres_url, "cancel_grace_seconds": 1.0, "poll_interval": 0.2, "progress_write_interval": 0.2}


async def test_the_server_really_runs_on_postgresql(mcp_client, runtime):
    assert runtime.store.engine.dialect.name == "postgresql"
    async with mcp_client() as client:
        started = (await client.call_tool("run_demo_task", {"items": 5, "item_delay_ms": 0})).structured_content
    with runtime.store.engine.connect() as conn:  # the row is in PostgreSQL, not in a SQLite file
        assert (
            conn.execute(sa.text("SELECT type FROM tasks WHERE id = :id"), {"id": started["task_id"]}).scalar()
            == "demo"
        )
