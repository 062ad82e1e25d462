"""The request path's fast answers keep the protocol's behaviour: what may stream still streams."""

from __future__ import annotations

import json

import httpx2
from mcp.server.mcpserver import Context

from plexus_mcp_jupyter.endpoint.sdk_compat import wants_json

from .conftest import MODERN
from .test_transport import _messages

MODERN_META = {"io.modelcontextprotocol/protocolVersion": MODERN,
               "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
               "io.modelcontextprotocol/clientCapabilities": {}}


async def modern_call(mcp_url: str, token: str, name: str, meta: dict | None = None) -> httpx2.Response:
    """One self-contained 2026-07-28 tools/call."""
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": name, "arguments": {}, "_meta": {**MODERN_META, **(meta or {})}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name,
               "Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(mcp_url, content=json.dumps(body), headers=headers)


async def test_a_2026_call_that_asks_for_its_log_lines_streams_them_and_a_plain_one_is_one_body(
        mcp_url, token, runtime):
    async def log_then_answer(ctx: Context) -> str:
        await ctx.log("warning", "on the way")
        return "answered"

    runtime.mcp.add_tool(log_then_answer, name="log_then_answer")
    try:
        plain = await modern_call(mcp_url, token, "log_then_answer")
        logged = await modern_call(mcp_url, token, "log_then_answer", {"io.modelcontextprotocol/logLevel": "info"})
    finally:
        runtime.mcp.remove_tool("log_then_answer")
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/json")
    assert plain.json()["result"]["content"][0]["text"] == "answered"
    assert logged.headers["content-type"].startswith("text/event-stream")
    messages = _messages(logged)
    assert [m.get("method") for m in messages[:-1]] == ["notifications/message"]
    assert messages[-1]["id"] == 7 and messages[-1]["result"]["content"][0]["text"] == "answered"


def test_a_log_level_or_progress_token_in_any_spelling_keeps_the_stream():
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_task", "arguments": {}}}
    assert wants_json(json.dumps(call).encode())
    for key in ("io.modelcontextprotocol/logLevel", "progressToken"):
        with_meta = {**call, "params": {**call["params"], "_meta": {key: "info"}}}
        assert not wants_json(json.dumps(with_meta).encode())
        escaped = json.dumps(with_meta).replace(key[-5:], "".join(f"\\u{ord(c):04x}" for c in key[-5:]))
        assert key.encode() not in escaped.encode() and not wants_json(escaped.encode())
