"""The plain MCP route (handlers/mcp_plain.py) answers as the MCP handler does: the same requests sent through
both (the route turned off for the second) get the same status, headers and body; what it answers is what it
should, and everything else reaches the handler. On a real Jupyter server, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import re

import httpx2
import pytest
from prometheus_client import REGISTRY

from plexus_mcp_jupyter.handlers import mcp_plain

from .conftest import MODERN, poll
from .test_speed_paths import MODERN_META


@pytest.fixture
def plexus_config(plexus_config):
    plexus_config["rate_burst"] = 3  # a key's fourth call at once is refused (429)
    return plexus_config


def call_body(name: str = "list_tasks", arguments: dict | None = None, method: str = "tools/call", **params) -> bytes:
    named = {"name": name, "arguments": arguments or {}} if method == "tools/call" else {}
    params = {**named, "_meta": MODERN_META, **params}
    return json.dumps({"jsonrpc": "2.0", "id": 3, "method": method, "params": params}).encode()


def call_headers(credential: str | None, name: str = "list_tasks", method: str = "tools/call", **more) -> dict:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": method,
        "Mcp-Name": name,
        **more,
    }
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    return {k: v for k, v in headers.items() if v is not None}


def compared(response: httpx2.Response) -> tuple:
    """What must be alike on both routes: status, headers (all but Date, and the values that are new each time),
    body."""
    fresh = {"mcp-session-id": "a new session's id"}  # (the handshake era's refusal opens a session first)
    headers = sorted(
        (k.lower(), fresh.get(k.lower(), v)) for k, v in response.headers.multi_items() if k.lower() != "date"
    )
    body = response.content
    if response.status_code == 429:  # the wait is the bucket's at that instant
        body = re.sub(rb"\d+(\.\d+)?", b"N", body)
        headers = [(k, "N" if k == "retry-after" else v) for k, v in headers]
    return response.status_code, headers, body


@pytest.fixture
def routes(jp_serverapp, runtime, monkeypatch):
    """The route, with a record of the requests it answered and of those it handed to the handler."""
    router = jp_serverapp.web_app.settings["plexus_mcp_plain"]
    seen: dict[str, int] = {"plain": 0, "handler": 0}
    write, fall_back = mcp_plain.PlainMCPDelegate._write, mcp_plain.PlainMCPDelegate.fall_back

    def counted_write(self, *args):
        seen["plain"] += 1
        return write(self, *args)

    def counted_fall_back(self):
        seen["handler"] += 1
        return fall_back(self)

    monkeypatch.setattr(mcp_plain.PlainMCPDelegate, "_write", counted_write)
    monkeypatch.setattr(mcp_plain.PlainMCPDelegate, "fall_back", counted_fall_back)
    return router, seen


async def test_the_same_requests_get_the_same_answers_on_both_routes(mcp_url, token, runtime, keys, routes):
    router, seen = routes
    async with httpx2.AsyncClient(timeout=30) as http:
        # A first call through the handler: the Host is then known as allowed, as on a running server.
        warm = await http.post(mcp_url, content=call_body(), headers=call_headers(token))
        assert warm.status_code == 200
        started = await http.post(
            mcp_url,
            content=call_body("run_demo_task", {"items": 1, "item_delay_ms": 0}),
            headers=call_headers(token, "run_demo_task"),
        )
        task_id = started.json()["result"]["structuredContent"]["task_id"]
        await poll(
            lambda: http.post(
                mcp_url, content=call_body("get_task", {"task_id": task_id}), headers=call_headers(token, "get_task")
            ),
            lambda r: r.json()["result"]["structuredContent"]["status"] == "COMPLETED",
        )

        big = call_body("get_task", {"task_id": "x" * 70_000})
        cases = {  # name: (body, headers, answered by the plain route)
            "get_task": (call_body("get_task", {"task_id": task_id}), call_headers(token, "get_task"), True),
            "list_tasks": (call_body(), call_headers(token), True),
            "unknown task": (call_body("get_task", {"task_id": "nope"}), call_headers(token, "get_task"), True),
            "unknown tool": (call_body("no_such_tool"), call_headers(token, "no_such_tool"), True),
            "bad arguments": (call_body("list_tasks", {"limit": "many"}), call_headers(token), True),
            "tools/list": (call_body(method="tools/list"), call_headers(token, None, "tools/list"), True),
            "admin key": (call_body(), call_headers(keys["admin"]), True),
            "viewer key, a write": (
                call_body("cancel_tasks", {"task_ids": [task_id]}),
                call_headers(keys["viewer"], "cancel_tasks"),
                True,
            ),
            "bad token": (call_body(), call_headers(token + "x"), False),
            "no credential": (call_body(), call_headers(None), False),
            "revoked key": (call_body(), call_headers(keys["revoked"]), False),
            "expired key": (call_body(), call_headers(keys["expired"]), False),
            "bad key": (call_body(), call_headers(keys["bad"]), False),
            "malformed key": (call_body(), call_headers(keys["malformed"]), False),
            "foreign Origin": (call_body(), call_headers(token, Origin="http://evil.example"), False),
            "same Origin": (call_body(), call_headers(token, Origin=mcp_url.split("/plexus")[0].rstrip("/")), False),
            "foreign Host": (call_body(), call_headers(token, Host="evil.example"), False),
            "a cookie": (call_body(), call_headers(token, Cookie="a=b"), False),
            "oversized for the route": (big, call_headers(token, "get_task"), False),
            "malformed JSON": (b'{"jsonrpc": "2.0", "id": 3, "method": ', call_headers(token), False),
            "not an object": (b"[1, 2]", call_headers(token), False),
            "wrong content type": (call_body(), call_headers(token, **{"Content-Type": "text/plain"}), False),
            "no JSON accepted": (call_body(), call_headers(token, Accept="text/html"), False),
            "mismatched Mcp-Name": (call_body(), call_headers(token, "get_task"), False),
            "no Mcp headers": (call_body(), call_headers(token, None, None), False),
            "a progress token": (
                call_body(_meta={**MODERN_META, "progressToken": 1}),
                call_headers(token),
                False,
            ),
            "handshake era": (call_body(), call_headers(token, **{"MCP-Protocol-Version": "2025-11-25"}), False),
        }
        answers: dict[str, dict[bool, tuple]] = {}
        for enabled in (True, False):
            router.enabled = enabled
            for name, (body, headers, plain) in cases.items():
                before = dict(seen)
                response = await http.post(mcp_url, content=body, headers=headers)
                answers.setdefault(name, {})[enabled] = compared(response)
                if enabled:
                    assert seen["plain"] - before["plain"] == int(plain), name
                else:
                    assert seen == before, name
        router.enabled = True
    for name, pair in answers.items():
        assert pair[True] == pair[False], name
    assert answers["get_task"][True][0] == 200 and task_id.encode() in answers["get_task"][True][2]
    assert answers["bad token"][True][0] == 401 and answers["revoked key"][True][0] == 401
    assert answers["foreign Origin"][True][0] == 403 and answers["foreign Host"][True][0] == 403
    assert answers["mismatched Mcp-Name"][True][0] == 400 and answers["malformed JSON"][True][0] == 400


async def test_a_key_is_admitted_once_per_call_and_its_refusal_is_the_handler_s(mcp_url, runtime, routes):
    router, seen = routes
    answers = {}
    async with httpx2.AsyncClient(timeout=30) as http:
        await http.post(mcp_url, content=call_body(), headers=call_headers(runtime.keys.create("w", "admin")[1]))
        for enabled in (True, False):
            router.enabled = enabled
            credential = runtime.keys.create(f"limited {enabled}", "admin", rate_limit=0.001)[1]
            statuses = []
            for _ in range(4):  # a burst of 3, one token a call
                response = await http.post(mcp_url, content=call_body(), headers=call_headers(credential))
                statuses.append(response.status_code)
            answers[enabled] = compared(response)
            assert statuses == [200, 200, 200, 429], (enabled, statuses)
    assert answers[True] == answers[False]
    assert seen["plain"] >= 3 and seen["handler"] >= 1


async def test_plain_calls_are_recorded_as_the_handler_records_them(mcp_url, token, jp_serverapp, runtime, routes):
    _router, seen = routes
    labels = {"method": "POST", "handler": "plexus_mcp_jupyter.handlers.mcp.MCPHandler", "status_code": "200"}
    settings = jp_serverapp.web_app.settings
    async with httpx2.AsyncClient(timeout=30) as http:
        await http.post(mcp_url, content=call_body(), headers=call_headers(token))
        before = REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0.0
        settings.pop("api_last_activity", None)
        plain_before = seen["plain"]
        for _ in range(3):
            response = await http.post(mcp_url, content=call_body(), headers=call_headers(token))
            assert response.status_code == 200
    assert seen["plain"] - plain_before == 3
    assert REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) - before == 3.0
    assert settings["api_last_activity"].tzinfo is not None


async def test_plain_calls_keep_their_connection(server_url, mcp_url, token, runtime, routes):
    """Calls answered by the route leave the connection open for the next request (keep-alive), as the handler does."""
    _router, seen = routes
    async with httpx2.AsyncClient(timeout=30) as http:
        await http.post(mcp_url, content=call_body(), headers=call_headers(token))  # the Host is then known
    host, port = httpx2.URL(server_url).host, httpx2.URL(server_url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        path = httpx2.URL(mcp_url).raw_path.decode()
        body = call_body()
        head = "".join(f"{k}: {v}\r\n" for k, v in call_headers(token).items())
        request = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}Content-Length: {len(body)}\r\n\r\n"
        before = seen["plain"]
        for _ in range(3):
            writer.write(request.encode() + body)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            headers = {}
            while (line := await asyncio.wait_for(reader.readline(), 10)) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            assert headers.get("connection", "keep-alive").lower() != "close"
            answer = json.loads(await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10))
            assert answer["id"] == 3 and "result" in answer
        assert seen["plain"] - before == 3
    finally:
        writer.close()


async def test_a_chunked_body_is_answered_when_it_ends(mcp_url, token, runtime, routes):
    """A body without Content-Length (chunked) is answered once tornado has read all of it (from its finish()), or
    handed to the handler then, alike on both routes."""
    router, seen = routes

    async def chunked(body: bytes):
        for start in range(0, len(body), 40):
            yield body[start : start + 40]

    async with httpx2.AsyncClient(timeout=30) as http:
        await http.post(mcp_url, content=call_body(), headers=call_headers(token))  # the Host is then known
        answers = {}
        for enabled in (True, False):
            router.enabled = enabled
            before = dict(seen)
            plain = await http.post(mcp_url, content=chunked(call_body()), headers=call_headers(token))
            refused = await http.post(mcp_url, content=chunked(call_body()), headers=call_headers(token + "x"))
            assert plain.request.headers.get("transfer-encoding") == "chunked"
            answers[enabled] = (compared(plain), compared(refused))
            if enabled:
                assert (seen["plain"] - before["plain"], seen["handler"] - before["handler"]) == (1, 1)
    assert answers[True] == answers[False]
    assert answers[True][0][0] == 200 and answers[True][1][0] == 401


async def test_revoking_a_key_ends_its_call_on_the_plain_route(mcp_url, runtime, routes):
    """A key's call in progress on the plain route ends with its connection when the key is revoked, as on the
    handler's (MCPBridge.end)."""
    _router, seen = routes
    entered, gate = asyncio.Event(), asyncio.Event()

    async def hold() -> str:
        entered.set()
        await gate.wait()
        return "answered late"

    runtime.mcp.add_tool(hold, name="hold")
    key, credential = runtime.keys.create("held", "admin")
    try:
        async with httpx2.AsyncClient(timeout=30) as http:
            await http.post(mcp_url, content=call_body(), headers=call_headers(credential))  # the Host is then known
            before = seen["plain"]
            call = asyncio.ensure_future(
                http.post(mcp_url, content=call_body("hold"), headers=call_headers(credential, "hold"))
            )
            await asyncio.wait_for(entered.wait(), 10)
            runtime.revoke_key(key.id)
            with pytest.raises(httpx2.TransportError):
                await asyncio.wait_for(call, 10)
    finally:
        gate.set()
        runtime.mcp.remove_tool("hold")
    await poll(lambda: seen["plain"] - before, lambda answered: answered == 1)  # the late answer meets a closed stream
