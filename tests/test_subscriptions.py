"""Resource subscriptions in both protocol eras: task and list URIs, filters, coalescing, cleanup."""

from __future__ import annotations

import gc
import json

import anyio
import pytest
from mcp import MCPError
from mcp.shared.subscriptions import ResourceUpdated
from mcp.types import ResourceUpdatedNotification, ServerNotification

from plexus_mcp_jupyter.core.events import Event
from plexus_mcp_jupyter.core.models import TaskStatus
from plexus_mcp_jupyter.core.store import TaskFilter
from plexus_mcp_jupyter.endpoint.subscriptions import _list_matcher

from .conftest import MODERN, poll

# Client.subscribe_resource is deprecated for the 2026 era; the 2025-11-25 era still uses it.
pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")


def updates_collector():
    """A message handler recording the URIs of notifications/resources/updated, and the list."""
    uris: list[str] = []

    async def on_message(message):
        if isinstance(message, ServerNotification) and isinstance(message, ResourceUpdatedNotification):
            uris.append(str(message.params.uri))
        elif isinstance(getattr(message, "root", None), ResourceUpdatedNotification):
            uris.append(str(message.root.params.uri))

    return uris, on_message


async def read_json(client, uri: str) -> dict:
    return json.loads((await client.read_resource(uri)).contents[0].text)


async def test_a_subscribed_task_is_announced_through_to_its_final_state(mcp_client, runtime):
    uris, on_message = updates_collector()
    seen: list[str] = []
    sent_at_final: list[int] = []
    async with mcp_client(message_handler=on_message) as client:
        task_id = (await client.call_tool("run_demo_task", {"items": 300, "item_delay_ms": 2})).structured_content[
            "task_id"
        ]
        uri = f"plexus://tasks/{task_id}"
        await client.subscribe_resource(uri)
        follower = next(iter(runtime.mcp.resource_watch._sessions.values()))
        # Server-side truth: how many notifications had been sent when the final state was published.
        runtime.bus.add_listener(
            lambda e: (
                sent_at_final.append(follower.sent) if e.kind == "task.completed" and e.entity_id == task_id else None
            )
        )

        async def latest_status():
            while uris:
                uris.pop()
                seen.append((await read_json(client, uri))["status"])
            return seen[-1] if seen else None

        assert await poll(latest_status, lambda s: s == "COMPLETED", timeout=30) == "COMPLETED"
        # A notification was sent after the final state (not only earlier ones that a read happened to
        # catch up with).
        await poll(lambda: follower.sent, lambda n: sent_at_final and n > sent_at_final[0])
    assert "RUNNING" in seen or "QUEUED" in seen


async def test_list_subscriptions_honour_their_filters(mcp_client, runtime):
    matcher = _list_matcher(TaskFilter(statuses=(TaskStatus.FAILED,)))
    event = lambda status: Event(1, 0.0, "task.updated", "task", "t", {"status": status, "type": "demo"})  # noqa: E731
    assert not matcher(event("RUNNING"), "QUEUED")
    assert matcher(event("FAILED"), "RUNNING")  # it enters the list
    assert matcher(event("QUEUED"), "FAILED")  # it leaves the list (a retry)
    assert matcher(event("RUNNING"), None)  # unknown before: it may have been in the list
    assert not matcher(event("QUEUED"), "")  # a new task that is not in the list
    assert not _list_matcher(TaskFilter(types=("other",)))(event("RUNNING"), None)

    uris, on_message = updates_collector()
    async with mcp_client(message_handler=on_message) as client:
        await client.subscribe_resource("plexus://tasks?status=FAILED")
        follower = next(iter(runtime.mcp.resource_watch._sessions.values()))
        ok = runtime.manager.dispatch("demo", {"items": 20, "item_delay_ms": 0})
        await runtime.manager.wait_final([ok.id], 20)
        # Server-side truth: nothing was owed or sent for a task that never entered the FAILED list.
        assert follower.sent == 0 and not follower.pending
        bad = runtime.manager.dispatch("demo", {"items": 20, "item_delay_ms": 0, "fail_at": 3})
        await runtime.manager.wait_final([bad.id], 20)
        await poll(lambda: len(uris), lambda n: n >= 1)
        listing = await read_json(client, "plexus://tasks?status=FAILED")
    assert set(uris) == {"plexus://tasks?status=FAILED"}
    assert [t["task_id"] for t in listing["tasks"]] == [bad.id]


async def test_listen_streams_of_the_2026_era_get_the_same_updates(mcp_client, runtime):
    # The task waits QUEUED until the stream is open: started at once, it could end before the listen began
    # and leave the stream nothing to say.
    slots, runtime.manager.max_concurrency = runtime.manager.max_concurrency, 0
    async with mcp_client(MODERN) as client:
        task = runtime.manager.dispatch("demo", {"items": 50, "item_delay_ms": 1})
        uri = f"plexus://tasks/{task.id}"
        with anyio.fail_after(30):
            async with client.listen(resource_subscriptions=[uri]) as subscription:
                runtime.manager.max_concurrency = slots
                runtime.manager.queue_changed()
                async for event in subscription:
                    assert event == ResourceUpdated(uri=uri)
                    if (await read_json(client, uri))["status"] == "COMPLETED":
                        break


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("plexus://nothing", "subscribable resources"),
        ("plexus://tasks/no-such-task", "no task with id 'no-such-task'"),
        ("plexus://tasks?status=DONE", "status[0]: unknown status; expected one of QUEUED"),
        (
            "plexus://tasks?colour=red",
            "unknown field(s) ['colour']; allowed: status, type, since, limit, cursor, batch",
        ),
    ],
)
async def test_subscribing_to_a_bad_uri_is_a_clear_error(mcp_client, uri, message):
    async with mcp_client() as client:
        with pytest.raises(MCPError) as err:
            await client.subscribe_resource(uri)
        assert message in err.value.message and err.value.code == -32602
        assert (await client.list_tools()).tools  # still serving


async def test_unsubscribing_and_session_end_release_everything(mcp_client, runtime):
    watch = runtime.mcp.resource_watch
    task = runtime.manager.dispatch("demo", {"items": 1, "item_delay_ms": 0})
    async with mcp_client() as client:
        for _ in range(200):  # a leak per cycle would leave 200 cleanups (asserted <= 2 below); 1,000 cost 16 s
            await client.subscribe_resource(f"plexus://tasks/{task.id}")
            await client.unsubscribe_resource(f"plexus://tasks/{task.id}")
        assert watch.followed() == 0 and watch.session_count == 0
        await client.subscribe_resource("plexus://tasks")
        assert watch.session_count == 1
        connection = next(iter(watch._sessions))
        assert len(connection.exit_stack._exit_callbacks) <= 2  # one cleanup per session, not per cycle
    await poll(lambda: (gc.collect(), watch.session_count)[1], lambda n: n == 0, timeout=10)


async def test_twenty_subscribed_sessions_each_see_every_final_state(mcp_client, runtime):
    manager = runtime.manager
    ready = anyio.Semaphore(0)
    started = anyio.Event()
    task_ids: list[str] = []
    finals: list[dict[str, str]] = []

    async def one_session():
        uris, on_message = updates_collector()
        states: dict[str, str] = {}
        async with mcp_client(message_handler=on_message) as client:
            await client.subscribe_resource("plexus://tasks")
            ready.release()
            await started.wait()

            async def read_announced():
                while uris:
                    uris.clear()  # coalesced: one read answers every update so far
                    listing = await read_json(client, "plexus://tasks")
                    states.update({t["task_id"]: t["status"] for t in listing["tasks"] if t["task_id"] in task_ids})
                return states

            await poll(read_announced, lambda s: len(s) == 3 and set(s.values()) == {"COMPLETED"}, timeout=60)
        finals.append(states)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one_session)
        for _ in range(20):
            await ready.acquire()
        task_ids.extend(manager.dispatch("demo", {"items": 100, "item_delay_ms": 1}).id for _ in range(3))
        started.set()
    assert len(finals) == 20
