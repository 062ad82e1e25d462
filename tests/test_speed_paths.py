"""The request path's fast answers keep the protocol's behaviour: what may stream still streams."""

from __future__ import annotations

import json

import httpx2
from mcp.server.mcpserver import Context

from plexus_mcp_jupyter.endpoint.sdk_compat import wants_json

from .conftest import MODERN, poll
from .test_transport import _messages

MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


async def modern_call(
    mcp_url: str,
    token: str,
    name: str,
    meta: dict | None = None,
    arguments: dict | None = None,
    headers: dict | None = None,
) -> httpx2.Response:
    """One self-contained 2026-07-28 tools/call (`headers`: added to, or replacing, the SDK client's)."""
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments or {}, "_meta": {**MODERN_META, **(meta or {})}},
    }
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "Mcp-Name": name,
        "Authorization": f"Bearer {token}",
        **(headers or {}),
    }
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(mcp_url, content=json.dumps(body), headers=headers)


async def test_a_2026_call_that_asks_for_its_log_lines_streams_them_and_a_plain_one_is_one_body(
    mcp_url, token, runtime
):
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


async def test_a_foreign_host_stays_refused_after_local_ones_were_let_in(server_url, token):
    """Allowed Host values are remembered, refused ones are checked (and refused) every time."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        for host in ("evil.example", None, "evil.example", None, "evil.example:80"):
            extra = {"Host": host} if host else {}
            response = await http.get(server_url + "plexus/api/health", headers=extra)
            assert response.status_code == (403 if host else 200), (host, response.text)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no string for this one")


def test_audit_details_are_made_json_by_the_writer_and_one_that_cannot_be_costs_only_its_details(runtime):
    audit = runtime.audit
    audit.record(None, "speed.unwritable", details={"value": Unprintable()})
    audit.record(None, "speed.long", details={"text": "x" * 1500, "more": "y" * 1500})
    audit.record(None, "speed.plain", details={"n": 1, "token": "secret-value", "nested": {"a": [1, "b"]}})
    audit.flush()
    records, _ = audit.query(action="speed.*", limit=10)
    details = {r["action"]: r["details"] for r in records}
    assert details["speed.unwritable"] == {"unwritable": True}
    assert details["speed.long"] == {"truncated": True}
    assert details["speed.plain"]["n"] == 1 and details["speed.plain"]["nested"] == {"a": [1, "b"]}
    assert "secret-value" not in json.dumps(details["speed.plain"])


async def test_a_plain_2026_call_is_answered_past_the_sdk_s_http_entry_with_the_same_bytes(
    mcp_url, token, runtime, mcp_client, monkeypatch
):
    """Plain 2026-07-28 calls are answered by `ModernJSONEntry` (sdk_compat): the official client reads the same
    results as in the handshake era, a raw call gets the status, type and body the SDK's own entry gives (checked by
    turning the entry off), calls are audited with their client, and what the entry must not answer (a mismatched
    `Mcp-Name`) still gets the SDK's refusal."""
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 2, "item_delay_ms": 0})
        task_id = started.structured_content["task_id"]

        await poll(
            lambda: client.call_tool("get_task", {"task_id": task_id}),
            lambda result: result.structured_content["status"] == "COMPLETED",
            timeout=30,
        )
        legacy = (await client.call_tool("get_task", {"task_id": task_id})).structured_content
        legacy_page = (await client.call_tool("list_tasks", {"limit": 5})).structured_content

    entry = runtime.endpoint.modern_json
    check = entry.check
    answered: list[bool] = []

    async def counted(request, message):  # both the plain route (mcp_plain.py) and the bridge go through check
        call = await check(request, message)
        answered.append(call is not None)
        return call

    monkeypatch.setattr(entry, "check", counted)
    async with mcp_client(MODERN) as client:
        modern = await client.call_tool("get_task", {"task_id": task_id})
        modern_page = await client.call_tool("list_tasks", {"limit": 5})
    assert modern.structured_content == legacy and modern_page.structured_content == legacy_page
    assert len(answered) >= 2 and all(answered)  # the two calls (and the client's own listing of the tools)

    calls = [("get_task", {"task_id": task_id}), ("get_task", {"task_id": "no-such-task"}), ("no_such_tool", {})]
    fast = [await modern_call(mcp_url, token, name, arguments=arguments) for name, arguments in calls]

    async def declined(request, message):
        return None

    monkeypatch.setattr(entry, "check", declined)
    through_sdk = [await modern_call(mcp_url, token, name, arguments=arguments) for name, arguments in calls]
    for mine, theirs in zip(fast, through_sdk, strict=True):
        assert mine.headers["content-type"] == theirs.headers["content-type"] == "application/json"
        assert (mine.status_code, mine.content) == (theirs.status_code, theirs.content)
    assert fast[1].json()["result"]["isError"] and fast[2].json()["result"]["isError"]

    monkeypatch.setattr(entry, "check", counted)
    answered.clear()
    mismatched = await modern_call(
        mcp_url, token, "get_task", arguments={"task_id": task_id}, headers={"Mcp-Name": "x"}
    )
    assert answered and not any(answered)  # checked on the plain route, then in the bridge: both decline
    assert mismatched.status_code == 400 and "mcp-name" in mismatched.json()["error"]["message"].lower()

    runtime.audit.flush()
    records, _ = runtime.audit.query(action="tool.get_task", limit=20)
    assert any(r["target"] == task_id and r["client"] == "127.0.0.1" for r in records)


def test_the_mcp_routes_are_matched_before_the_other_extensions(jp_serverapp, runtime):
    from plexus_mcp_jupyter.handlers.mcp import MCPHandler

    first = jp_serverapp.web_app.default_router.rules[0].target
    assert any(getattr(rule.target, "handler_class", rule.target) is MCPHandler for rule in first.rules)
