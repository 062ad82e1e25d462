"""The Streamable HTTP transport through the tornado bridge: sessions, bad bodies, SSE resumption."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import httpx2
import pytest

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
    async with session() as http:
        huge = await http.post(mcp_url, content=b"x" * (5 * 1024 * 1024))
    assert huge.status_code == 413


async def test_a_dropped_sse_stream_resumes_with_last_event_id(mcp_url, session):
    async with session() as http:
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "list_tasks", "arguments": {}}}
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
