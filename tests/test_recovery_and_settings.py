"""Restart recovery on a real Jupyter server, and settings precedence (CLI > env > config > default)."""

from __future__ import annotations

import pytest

from plexus_mcp_jupyter.config import PlexusSettings
from plexus_mcp_jupyter.core import Store, Task, TaskStatus
from plexus_mcp_jupyter.core.models import Stage, StageStatus


@pytest.fixture
def crashed_rows(db_path):
    """Rows a crashed server left behind, written before the Jupyter server starts."""
    store = Store(f"sqlite:///{db_path}")
    running = Task(
        id="left-running",
        type="demo",
        status=TaskStatus.RUNNING,
        params={"items": 10},
        worker="local:somehost-that-is-this-host:999999999",
        stages=[Stage("Processing", 0, StageStatus.RUNNING, total_items=10, processed_items=4)],
    )
    from plexus_mcp_jupyter.core.manager import HOST

    running.worker = f"local:{HOST}:999999999:1"
    queued = Task(id="left-queued", type="demo", status=TaskStatus.QUEUED, params={"items": 3, "item_delay_ms": 0})
    store.create_task(running)
    store.create_task(queued)
    store.close()


async def test_a_running_row_at_start_up_is_failed_and_queued_work_still_runs(crashed_rows, mcp_client):
    async with mcp_client() as client:
        running = (await client.call_tool("get_task", {"task_id": "left-running"})).structured_content
        assert running["status"] == "FAILED"
        assert running["error_message"] == "server restarted while the task was running"
        assert running["stages"][0]["status"] == "FAILED" and running["stages"][0]["processed_items"] == 4
        from .test_mcp_tools import wait_final

        queued = await wait_final(client, "left-queued")
        assert queued["status"] == "COMPLETED"


def test_environment_overrides_config_and_the_command_line_overrides_both(monkeypatch):
    monkeypatch.setenv("PLEXUS_MCP_MAX_CONCURRENCY", "7")
    monkeypatch.setenv("PLEXUS_MCP_CANCEL_GRACE_SECONDS", "2.5")
    settings = PlexusSettings(max_concurrency=3, cancel_grace_seconds=9.0)  # as from a config file
    settings.apply_env(protected={"cancel_grace_seconds"})  # given on the command line
    assert settings.max_concurrency == 7 and settings.cancel_grace_seconds == 9.0


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("PLEXUS_MCP_MAX_CONCURRENCY", "lots")
    with pytest.raises(ValueError, match="PLEXUS_MCP_MAX_CONCURRENCY='lots' is not a valid value"):
        PlexusSettings().apply_env()


class TestExtensionReadsTheEnvironment:
    @pytest.fixture
    def jp_server_config(self, plexus_config, monkeypatch):
        from traitlets.config import Config

        monkeypatch.setenv("PLEXUS_MCP_MAX_CONCURRENCY", "2")
        monkeypatch.setenv("PLEXUS_MCP_MAX_PAGE_SIZE", "50")
        return Config(
            {
                "ServerApp": {"jpserver_extensions": {"plexus_mcp_jupyter": True}},
                "PlexusMCPExtension": {**plexus_config, "max_page_size": 30},
            }
        )

    def test_env_beats_the_config_file(self, runtime):
        assert runtime.manager.max_concurrency == 2
        assert runtime.manager.max_page_size == 50


def test_building_the_server_leaves_the_host_process_logging_alone():
    import logging

    from plexus_mcp_jupyter.endpoint.server import build_mcp_server

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    build_mcp_server(None)  # type: ignore[arg-type]
    assert (list(root.handlers), root.level) == before
    assert logging.getLogger("mcp").getEffectiveLevel() >= logging.WARNING


def test_settings_refuse_values_that_cannot_work():
    from traitlets import TraitError

    with pytest.raises(TraitError, match="max_page_size"):
        PlexusSettings(max_page_size=0)
    with pytest.raises(TraitError, match="cancel_grace_seconds"):
        PlexusSettings(cancel_grace_seconds=-1)


async def test_the_event_store_is_bounded_in_bytes_and_still_replays_what_it_kept():
    from mcp.types import JSONRPCResponse

    from plexus_mcp_jupyter.endpoint.event_store import MemoryEventStore

    store = MemoryEventStore(max_events=1000, max_bytes=10_000)
    ids = [
        await store.store_event("s", JSONRPCResponse(jsonrpc="2.0", id=i, result={"blob": "x" * 1000}))
        for i in range(50)
    ]
    assert store.bytes <= 10_000 and store.size < 50
    replayed = []

    async def collect(event):
        replayed.append(event.message.id)

    assert await store.replay_events_after(ids[-3], collect) == "s"
    assert replayed == [48, 49]
    assert await store.replay_events_after(ids[0], collect) is None  # dropped: not replayable
