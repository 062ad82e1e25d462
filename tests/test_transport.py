"""The Streamable HTTP transport through the tornado bridge: sessions, bad bodies, SSE resumption."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import httpx2
import pytest
from mcp.server.mcpserver import Context

from .raw_http import answer_before_body
from .test_auth import INIT, MCP_HEADERS


def sse_events(text: str) -> list[dict]:
    events, current = [], {}
    for line in text.splitlines():
        if not line:
            if current:
                events.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key] = value.lstrip()
    if current:
        events.append(current)
    return events


@pytest.fixture
def session(mcp_url, token):
    """`async with session() as http`: a raw HTTP client with an initialized MCP session (2025-11-25)."""

    @asynccontextmanager
    async def open_session():
        async with httpx2.AsyncClient(headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}, timeout=30) as http:
            response = await http.post(mcp_url, json=INIT)
            assert response.status_code == 200
            http.headers["mcp-session-id"] = response.headers["mcp-session-id"]
            http.headers["mcp-protocol-version"] = "2025-11-25"
            await http.post(mcp_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            yield http

    return open_session


async def test_malformed_json_rpc_bodies_get_json_rpc_errors_and_the_session_survives(mcp_url, session):
    async with session() as http:
        bad_json = await http.post(mcp_url, content=b"{this is not json")
        assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == -32700
        not_rpc = await http.post(mcp_url, json={"hello": "world"})
        assert not_rpc.status_code == 400 and "error" in not_rpc.json()
        unknown = await http.post(mcp_url, json={"jsonrpc": "2.0", "id": 5, "method": "no/such/method"})
        body = [json.loads(e["data"]) for e in sse_events(unknown.text) if e.get("data")]
        assert body and body[-1]["error"]["code"] == -32601
        ok = await http.post(mcp_url, json={"jsonrpc": "2.0", "id": 6, "method": "tools/list"})
        assert ok.status_code == 200 and "run_demo_task" in ok.text


async def test_a_request_after_the_session_was_deleted_gets_404(mcp_url, session):
    async with session() as http:
        deleted = await http.delete(mcp_url)
        assert deleted.status_code == 200
        after = await http.post(mcp_url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert after.status_code == 404 and "Session not found" in after.text


async def test_an_oversized_body_is_refused_with_413(mcp_url, session):
    async with session() as http:  # (its headers: the session's; the body is refused unread, once they are in)
        headers = {k: v for k, v in http.headers.items() if k.lower() not in ("host", "connection", "accept-encoding")}
    huge = await answer_before_body(mcp_url, headers, 9 * 1024 * 1024, b"x" * 1000)  # (> 2 x max_request_bytes)
    assert huge.status == 413, huge


async def test_a_dropped_sse_stream_resumes_with_last_event_id(mcp_url, session):
    async with session() as http:
        # A progress token asks for a stream (a plain call is answered as one JSON body, nothing to resume).
        call = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "list_tasks", "arguments": {}, "_meta": {"progressToken": "p7"}},
        }
        # Read only the priming event of the response stream, then drop the connection.
        async with http.stream("POST", mcp_url, json=call) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            first = ""
            async for line in stream.aiter_lines():
                if line.startswith("id:"):
                    first = line.partition(":")[2].strip()
                    break
        assert first
        # Reconnect with Last-Event-ID: the response we never read is replayed.
        replayed = []
        headers = {"Last-Event-ID": first, "Accept": "text/event-stream"}
        async with http.stream("GET", mcp_url, headers=headers) as resumed:
            assert resumed.status_code == 200
            async for line in resumed.aiter_lines():
                if line.startswith("data:") and line[5:].strip():
                    replayed.append(json.loads(line[5:]))
                    if replayed[-1].get("id") == 7:
                        break
    assert replayed[-1]["id"] == 7 and replayed[-1]["result"]["structuredContent"]["tasks"] == []


async def test_the_standalone_sse_stream_sends_its_headers_at_once(mcp_url, session):
    async with session() as http:
        started = asyncio.get_running_loop().time()
        async with http.stream("GET", mcp_url, headers={"Accept": "text/event-stream"}) as stream:
            waited = asyncio.get_running_loop().time() - started
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
    assert waited < 2.0  # not held back until the first event or keep-alive ping (15 s)


async def test_a_progress_token_of_the_wrong_type_is_refused_and_the_session_survives(mcp_url, session):
    async with session() as http:
        bad = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {"name": "run_demo_task", "arguments": {"items": 1}, "_meta": {"progressToken": {"x": 1}}},
        }
        response = await http.post(mcp_url, json=bad)
        messages = [json.loads(e["data"]) for e in sse_events(response.text) if e.get("data")] or [response.json()]
        assert messages[-1]["error"]["code"] == -32602
        ok = await http.post(mcp_url, json={"jsonrpc": "2.0", "id": 10, "method": "tools/list"})
        assert ok.status_code == 200 and "run_demo_task" in ok.text


def _messages(response: httpx2.Response) -> list[dict]:
    """The JSON-RPC messages of a POST's answer, whichever shape the server chose."""
    if response.headers["content-type"].startswith("application/json"):
        return [response.json()]
    return [json.loads(e["data"]) for e in sse_events(response.text) if e.get("data")]


async def test_a_call_that_streams_nothing_is_one_json_body_and_one_with_a_progress_token_a_stream(mcp_url, session):
    async with session() as http:
        plain = await http.post(
            mcp_url,
            json={
                "jsonrpc": "2.0",
                "id": 11,
                "method": "tools/call",
                "params": {"name": "list_tasks", "arguments": {"limit": 1}},
            },
        )
        assert plain.headers["content-type"].startswith("application/json")
        assert plain.json()["id"] == 11 and "structuredContent" in plain.json()["result"]
        streamed = await http.post(
            mcp_url,
            json={
                "jsonrpc": "2.0",
                "id": 12,
                "method": "tools/call",
                "params": {"name": "run_demo_task", "arguments": {"items": 3}, "_meta": {"progressToken": "t12"}},
            },
        )
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert _messages(streamed)[-1]["id"] == 12
        # initialize and anything with a task keep the stream too
        tasked = await http.post(
            mcp_url,
            json={
                "jsonrpc": "2.0",
                "id": 13,
                "method": "tools/call",
                "params": {"name": "run_demo_task", "arguments": {"items": 1}, "task": {"ttl": 60000}},
            },
        )
        assert tasked.headers["content-type"].startswith("text/event-stream")


async def test_streamed_and_one_body_calls_mixed_on_one_session_each_get_their_own_answer(mcp_url, session):
    """The response mode is the request's, not the session's: concurrent calls of both kinds on one session
    each get their own response, and the streamed ones all their progress notifications."""
    async with session() as http:

        async def streamed(i: int) -> list[dict]:
            response = await http.post(
                mcp_url,
                json={
                    "jsonrpc": "2.0",
                    "id": 100 + i,
                    "method": "tools/call",
                    "params": {"name": "list_tasks", "arguments": {}, "_meta": {"progressToken": f"p{i}"}},
                },
            )
            assert response.headers["content-type"].startswith("text/event-stream")
            return _messages(response)

        async def plain(i: int) -> list[dict]:
            response = await http.post(
                mcp_url,
                json={
                    "jsonrpc": "2.0",
                    "id": 200 + i,
                    "method": "tools/call",
                    "params": {"name": "list_tasks", "arguments": {"limit": 1}},
                },
            )
            assert response.headers["content-type"].startswith("application/json")
            return _messages(response)

        answers = await asyncio.gather(*(f(i) for i in range(8) for f in (streamed, plain)))
    ids = sorted(messages[-1]["id"] for messages in answers)
    assert ids == sorted([100 + i for i in range(8)] + [200 + i for i in range(8)])
    assert all("result" in messages[-1] for messages in answers)


async def test_a_notification_tied_to_a_one_body_call_is_dropped_not_taken_for_its_answer(mcp_url, session, runtime):
    """The session's router asks the mode of the request that sent a message: a log tied to a call answered
    as one JSON body is dropped (there is no wire for it), and the body is still the call's own result;
    the same call with a progress token streams the log before its result."""

    async def log_then_answer(ctx: Context) -> str:
        await ctx.log("info", "on the way")
        return "answered"

    runtime.mcp.add_tool(log_then_answer, name="log_then_answer")
    try:
        async with session() as http:
            plain = await http.post(
                mcp_url,
                json={
                    "jsonrpc": "2.0",
                    "id": 31,
                    "method": "tools/call",
                    "params": {"name": "log_then_answer", "arguments": {}},
                },
            )
            streamed = await http.post(
                mcp_url,
                json={
                    "jsonrpc": "2.0",
                    "id": 32,
                    "method": "tools/call",
                    "params": {"name": "log_then_answer", "arguments": {}, "_meta": {"progressToken": "t"}},
                },
            )
    finally:
        runtime.mcp.remove_tool("log_then_answer")
    assert plain.headers["content-type"].startswith("application/json")
    assert plain.json()["id"] == 31 and plain.json()["result"]["content"][0]["text"] == "answered"
    messages = _messages(streamed)
    assert [m.get("method") for m in messages[:-1]] == ["notifications/message"]
    assert messages[-1]["id"] == 32 and messages[-1]["result"]["content"][0]["text"] == "answered"
