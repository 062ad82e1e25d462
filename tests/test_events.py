"""The WebSocket event stream: filters, resume from a sequence number, bad filters, slow readers."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
from tornado.httpclient import HTTPClientError

from .conftest import poll


async def next_message(ws, timeout: float = 10.0) -> dict:
    message = await asyncio.wait_for(ws.read_message(), timeout)
    assert message is not None, f"closed: {ws.close_code} {ws.close_reason}"
    return json.loads(message)


async def events_until(ws, predicate, timeout: float = 20.0) -> list[dict]:
    seen: list[dict] = []

    async def read():
        while True:
            message = await next_message(ws, timeout)
            seen.append(message)
            if predicate(message):
                return seen

    return await asyncio.wait_for(read(), timeout)


async def test_filters_deliver_only_matching_events_in_sequence_and_the_final_state(jp_ws_fetch, runtime):
    manager = runtime.manager
    other = manager.dispatch("demo", {"items": 20, "item_delay_ms": 1})
    mine = manager.dispatch("demo", {"items": 200, "item_delay_ms": 1})
    ws = await jp_ws_fetch("plexus", "api", "events", params={"ids": mine.id, "entity_type": "task"})
    hello = await next_message(ws)
    assert hello["type"] == "hello" and hello["seq"] >= 2
    seen = await events_until(ws, lambda m: m.get("data", {}).get("status") == "COMPLETED")
    ws.close()
    assert {m["entity_id"] for m in seen} == {mine.id}
    seqs = [m["seq"] for m in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seen[-1]["kind"] == "task.completed"
    await manager.wait_final([other.id], 20)


async def test_status_filter_and_resume_from_a_sequence_number(jp_ws_fetch, runtime):
    manager = runtime.manager
    first = manager.dispatch("demo", {"items": 5, "item_delay_ms": 0})
    await manager.wait_final([first.id], 20)
    ws = await jp_ws_fetch("plexus", "api", "events", params={"status": "COMPLETED,FAILED"})
    hello = await next_message(ws)
    failing = manager.dispatch("demo", {"items": 10, "item_delay_ms": 0, "fail_at": 5})
    failed = await next_message(ws)
    ws.close()
    assert failed["entity_id"] == failing.id and failed["data"]["status"] == "FAILED"
    # Reconnect from before everything: the history replays what matched, in order.
    ws = await jp_ws_fetch("plexus", "api", "events", params={"status": "COMPLETED,FAILED", "since": "0"})
    await next_message(ws)
    replayed = [await next_message(ws), await next_message(ws)]
    ws.close()
    assert [m["entity_id"] for m in replayed] == [first.id, failing.id]
    assert replayed[0]["seq"] <= hello["seq"] < replayed[1]["seq"]  # hello.seq: the last event before connecting


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"status": "DONE"}, "status[0]: unknown status; expected one of QUEUED"),
        ({"entity_type": "kettle"}, "entity_type[0]: unknown entity_type; expected one of task (got 'kettle')"),
        ({"since": "yesterday"}, "since: Input should be a valid integer"),
        ({"since": "-1"}, "since: Input should be greater than or equal to 0 (got '-1')"),
        ({"colour": "red"}, "unknown field(s) ['colour']; allowed: entity_type, ids, status, type, since, epoch"),
    ],
)
async def test_bad_filters_close_with_4400_and_say_why(jp_ws_fetch, params, message):
    ws = await jp_ws_fetch("plexus", "api", "events", params=params)
    error = await next_message(ws)
    assert error["type"] == "error" and message in error["message"]
    assert await ws.read_message() is None
    assert ws.close_code == 4400 and message in ws.close_reason


async def test_the_stream_needs_credentials(jp_ws_fetch):
    with pytest.raises(HTTPClientError) as err:
        await jp_ws_fetch("plexus", "api", "events", headers={"Authorization": "token wrong"})
    assert err.value.code == 401


async def test_a_client_that_never_reads_costs_one_pending_event_per_task(
    jp_http_port, jp_base_url, token, runtime, jp_fetch
):
    reader, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {jp_base_url}plexus/api/events HTTP/1.1\r\nHost: 127.0.0.1:{jp_http_port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: token {token}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    assert b"101" in (await reader.readline())
    # Never read again. Run enough work to overflow the socket buffers many times over.
    manager = runtime.manager
    ids = [manager.dispatch("demo", {"items": 3000, "item_delay_ms": 0}).id for _ in range(3)]
    await manager.wait_final(ids, 60)
    subscriptions = list(runtime.bus._subscriptions)
    assert subscriptions and all(len(s._pending) <= len(ids) for s in subscriptions)
    # The server is fine for everyone else.
    response = await jp_fetch("plexus", "api", "tasks", params={"status": "COMPLETED"})
    assert len(json.loads(response.body)["tasks"]) == 3
    writer.close()
    await poll(lambda: len(runtime.bus._subscriptions), lambda n: n == 0, timeout=10)


async def test_resuming_with_a_number_from_another_server_start_gets_a_gap_then_live_events(jp_ws_fetch, runtime):
    ws = await jp_ws_fetch("plexus", "api", "events", params={"since": "1000000", "epoch": "an-old-epoch"})
    hello = await next_message(ws)
    gap = await next_message(ws)
    assert gap["type"] == "gap" and hello["epoch"] == runtime.bus.epoch
    task = runtime.manager.dispatch("demo", {"items": 5, "item_delay_ms": 0})
    seen = await events_until(ws, lambda m: m.get("data", {}).get("status") == "COMPLETED")
    ws.close()
    assert seen[-1]["entity_id"] == task.id


async def test_resuming_from_before_other_servers_events_that_were_not_kept_gets_a_gap(jp_ws_fetch, runtime):
    # Other servers' events are not kept while nobody here follows them (core/relay.py: EventBus.skip_remote).
    task = runtime.manager.dispatch("demo", {"items": 1, "item_delay_ms": 0})
    await runtime.manager.wait_final([task.id], 30)
    before = runtime.bus.last_seq
    runtime.bus.skip_remote()
    ws = await jp_ws_fetch("plexus", "api", "events", params={"since": str(before), "epoch": runtime.bus.epoch})
    hello = await next_message(ws)
    gap = await next_message(ws)
    ws.close()
    assert gap["type"] == "gap" and gap["since"] == before and hello["seq"] > before
    # From a number after them, nothing is missing: no gap, live events.
    ws = await jp_ws_fetch("plexus", "api", "events", params={"since": str(hello["seq"]), "epoch": hello["epoch"]})
    await next_message(ws)
    task = runtime.manager.dispatch("demo", {"items": 1, "item_delay_ms": 0})
    seen = await events_until(ws, lambda m: m.get("data", {}).get("status") == "COMPLETED")
    ws.close()
    assert all(m["type"] == "event" for m in seen) and seen[-1]["entity_id"] == task.id


def test_a_failing_subscriber_does_not_break_the_core_or_the_others():
    from plexus_mcp_jupyter.core.events import EventBus

    bus = EventBus()
    got = []

    def broken(event):
        raise RuntimeError("boom")

    bus.add_listener(broken)
    bus.add_listener(got.append)
    event = bus.publish("task.updated", "task", "t", {"status": "RUNNING"})
    assert got == [event]
