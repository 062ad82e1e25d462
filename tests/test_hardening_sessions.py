"""MCP sessions under attack: a key's share of the sessions, room kept for admins, sessions bound to their opener.

Issue 11, items 2 and 11: a viewer key opened 790 sessions and locked the token out for the idle timeout;
a viewer key that knew an admin's `Mcp-Session-Id` could use and DELETE that session. Both servers (the
Jupyter extension and `plexus mcp serve --transport http`) share the endpoint, so both are driven here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import pytest
from mcp import MCPError

from plexus_mcp_jupyter.core import Store
from plexus_mcp_jupyter.security.keys import KeyStore

from .conftest import MODERN, open_client, poll
from .test_standalone import plexus_env, start_http, stop

LEGACY_VERSION = "2025-11-25"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
LIST_TOOLS = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": LEGACY_VERSION,
}
PER_KEY, MAX_SESSIONS, RESERVED_SHARE = 3, 12, 0.25  # viewer and operator keys together: 9 sessions


@pytest.fixture
def plexus_config(plexus_config: dict[str, Any]) -> dict[str, Any]:
    return {
        **plexus_config,
        "max_sessions": MAX_SESSIONS,
        "max_sessions_per_key": PER_KEY,
        "reserved_session_share": RESERVED_SHARE,
    }


def headers_of(credential: str, session_id: str | None = None) -> dict[str, str]:
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {credential}"}
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    return headers


async def initialize(http: httpx2.AsyncClient, url: str, credential: str) -> httpx2.Response:
    """One `initialize` without a session id: the request that opens a session."""
    return await http.post(url, json=INIT, headers=headers_of(credential))


async def open_sessions(http: httpx2.AsyncClient, url: str, credential: str, count: int) -> list[str]:
    opened = []
    for _ in range(count):
        response = await initialize(http, url, credential)
        assert response.status_code == 200, response.text
        opened.append(response.headers["mcp-session-id"])
    return opened


async def delete_session(http: httpx2.AsyncClient, url: str, credential: str, session_id: str) -> httpx2.Response:
    return await http.delete(url, headers=headers_of(credential, session_id))


def leaves(error: BaseException) -> list[BaseException]:
    """The errors inside (nested) exception groups, as the SDK client's task groups raise them."""
    inner = getattr(error, "exceptions", None)
    return [leaf for e in inner for leaf in leaves(e)] if inner else [error]


def refusal(response: httpx2.Response) -> str:
    """The JSON-RPC error message of a refused request (the SDK's error envelope, no request id)."""
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["id"] is None and body["error"]["code"] < 0
    return str(body["error"]["message"])


# -- item 2: a key's share of the sessions -------------------------------------------------------


async def test_a_key_opens_at_most_its_share_and_deleting_one_makes_room(mcp_url, token, keys):
    async with httpx2.AsyncClient(timeout=30) as http:
        opened = await open_sessions(http, mcp_url, keys["viewer"], PER_KEY)
        refused = await initialize(http, mcp_url, keys["viewer"])
        assert refused.status_code == 429
        message = refusal(refused)
        assert f"{PER_KEY} MCP sessions open" in message and f"max_sessions_per_key={PER_KEY}" in message
        assert "DELETE" in message and "session_idle_timeout" in message
        assert keys["viewer"] not in refused.text  # the credential is never echoed
        # the token and another key are not held back by the viewer's share
        assert (await initialize(http, mcp_url, token)).status_code == 200
        assert (await initialize(http, mcp_url, keys["operator"])).status_code == 200
        # a session ended by DELETE gives its slot back at once, and only one
        assert (await delete_session(http, mcp_url, keys["viewer"], opened[0])).status_code == 200
        assert (await initialize(http, mcp_url, keys["viewer"])).status_code == 200
        assert (await initialize(http, mcp_url, keys["viewer"])).status_code == 429


async def test_a_flood_of_initializes_from_one_key_gets_exactly_its_share(mcp_url, token, keys, runtime):
    # The attack: a viewer key opening sessions as fast as it can. Concurrent requests must not slip past the cap.
    async with httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_connections=30)) as http:
        flood = await asyncio.gather(*(initialize(http, mcp_url, keys["viewer"]) for _ in range(30)))
        assert sorted(r.status_code for r in flood) == [200] * PER_KEY + [429] * (30 - PER_KEY)
        assert runtime.endpoint.session_count == PER_KEY
        assert (await initialize(http, mcp_url, token)).status_code == 200


async def test_requests_that_open_no_session_never_keep_a_slot(mcp_url, keys, runtime):
    refused_by_the_sdk: list[Any] = [
        b"{not json",
        {"jsonrpc": "2.0", "id": 1, "result": {}},  # a response to nothing
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},  # not an initialize
    ]
    async with httpx2.AsyncClient(timeout=30) as http:
        for _ in range(PER_KEY + 1):
            for body in refused_by_the_sdk:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                response = await http.post(mcp_url, content=content, headers=headers_of(keys["viewer"]))
                assert response.status_code == 400, response.text
        assert runtime.endpoint.session_count == 0
        opened = await open_sessions(http, mcp_url, keys["viewer"], PER_KEY)
        assert (await initialize(http, mcp_url, keys["viewer"])).status_code == 429
        for session_id in opened:
            assert (await delete_session(http, mcp_url, keys["viewer"], session_id)).status_code == 200
        # An initialize refused inside a 200 response (a JSON-RPC error) leaves a session the SDK keeps: it counts.
        bad_initialize = {**INIT, "params": {"protocolVersion": 7}}
        for _ in range(PER_KEY):
            response = await http.post(mcp_url, json=bad_initialize, headers=headers_of(keys["viewer"]))
            assert response.status_code == 200 and "Invalid request parameters" in response.text
        refused = await http.post(mcp_url, json=bad_initialize, headers=headers_of(keys["viewer"]))
        assert refused.status_code == 429
        assert runtime.endpoint.session_count == PER_KEY


async def test_the_sdk_client_reports_the_cap_and_the_2026_era_is_not_capped(mcp_url, keys):
    async with httpx2.AsyncClient(timeout=30) as http:
        await open_sessions(http, mcp_url, keys["viewer"], PER_KEY)
    with pytest.raises(Exception) as refused:  # the client's task group carries the SDK's MCPError
        async with open_client(mcp_url, keys["viewer"]) as client:
            await client.list_tools()
    errors = [e for e in leaves(refused.value) if isinstance(e, MCPError)]
    assert errors and f"max_sessions_per_key={PER_KEY}" in str(errors[0]), refused.value
    # The 2026-07-28 era opens no session: a key at its cap still works there.
    async with open_client(mcp_url, keys["viewer"], MODERN) as client:
        assert "list_tasks" in {t.name for t in (await client.list_tools()).tools}


async def test_keys_together_leave_room_for_the_token_and_admins(mcp_url, token, keys, runtime):
    extra = runtime.keys.create("a third operator", "operator")[1]
    async with httpx2.AsyncClient(timeout=30) as http:
        for credential in (keys["viewer"], keys["operator"], keys["operator2"]):
            await open_sessions(http, mcp_url, credential, PER_KEY)
        # 9 sessions (MAX_SESSIONS less the admins' share) are held by viewer and operator keys: no more for them
        refused = await initialize(http, mcp_url, extra)
        assert refused.status_code == 503
        message = refusal(refused)
        assert f"reserved_session_share={RESERVED_SHARE:g}" in message and f"max_sessions={MAX_SESSIONS}" in message
        # admins still get in: an admin key (up to its own cap) and the token, up to max_sessions
        await open_sessions(http, mcp_url, keys["admin"], 2)
        await open_sessions(http, mcp_url, token, 1)
        full = await initialize(http, mcp_url, token)
        assert full.status_code == 503 and f"max_sessions={MAX_SESSIONS}" in refusal(full)


async def test_revoking_a_key_ends_its_sessions_and_frees_their_slots(jp_fetch, mcp_url, keys, runtime):
    key_id = {k.name: k.id for k in runtime.keys.list()}
    async with httpx2.AsyncClient(timeout=30) as http:
        await open_sessions(http, mcp_url, keys["viewer"], PER_KEY)
        await open_sessions(http, mcp_url, keys["operator"], PER_KEY)
        # on this server (REST): at once
        await jp_fetch("plexus", "api", "keys", key_id["viewer key"], method="DELETE")
        await poll(lambda: runtime.endpoint.session_count, lambda n: n == PER_KEY, timeout=5)
        # elsewhere (the CLI or another server on the store): at the key watcher's next look
        runtime.keys.revoke(key_id["operator key"])
        await poll(lambda: runtime.endpoint.session_count, lambda n: n == 0, timeout=15)


class TestIdleSessions:
    @pytest.fixture
    def plexus_config(self, plexus_config: dict[str, Any]) -> dict[str, Any]:
        # Long enough that opening the key's sessions and asking once more, on a loaded machine, never outlasts it.
        return {**plexus_config, "session_idle_timeout": 4.0}

    async def test_a_session_closed_by_the_idle_timeout_gives_its_slot_back(self, mcp_url, keys):
        async with httpx2.AsyncClient(timeout=30) as http:
            await open_sessions(http, mcp_url, keys["viewer"], PER_KEY)
            assert (await initialize(http, mcp_url, keys["viewer"])).status_code == 429
            await poll(lambda: initialize(http, mcp_url, keys["viewer"]), lambda r: r.status_code == 200, timeout=15)


# -- item 11: a session belongs to the principal that opened it ----------------------------------------


@pytest.mark.parametrize(("owner", "intruder"), [("admin", "viewer"), ("jupyter", "admin"), ("operator", "operator2")])
async def test_another_principal_gets_404_for_a_session_it_did_not_open(mcp_url, token, keys, owner, intruder):
    owner_credential = token if owner == "jupyter" else keys[owner]
    async with httpx2.AsyncClient(timeout=10) as http:
        (session_id,) = await open_sessions(http, mcp_url, owner_credential, 1)
        unknown = await http.post(mcp_url, json=LIST_TOOLS, headers=headers_of(keys[intruder], "0" * 32))
        assert unknown.status_code == 404
        for method in ("POST", "GET", "DELETE"):
            request = http.build_request(
                method,
                mcp_url,
                headers=headers_of(keys[intruder], session_id),
                json=LIST_TOOLS if method == "POST" else None,
            )
            response = await http.send(request, stream=True)  # a hijacked GET would stream forever
            try:
                assert response.status_code == 404, method
                assert await response.aread() == unknown.content, method  # exactly as for an unknown session
            finally:
                await response.aclose()
        # the owner's session is untouched
        listed = await http.post(mcp_url, json=LIST_TOOLS, headers=headers_of(owner_credential, session_id))
        assert listed.status_code == 200 and "list_tasks" in listed.text


# -- both items on `plexus mcp serve --transport http` -------------------------------------------------------


async def test_the_standalone_server_caps_and_binds_sessions_too(tmp_path):
    store = Store(plexus_env(tmp_path)["PLEXUS_MCP_DB_URL"])  # the store the server will use
    viewer = KeyStore(store.engine).create("a viewer", "viewer")[1]
    store.close()
    proc, url, token = start_http(tmp_path, PLEXUS_MCP_MAX_SESSIONS_PER_KEY="2")
    try:
        assert token
        async with httpx2.AsyncClient(timeout=30) as http:
            opened = await open_sessions(http, url, viewer, 2)
            refused = await initialize(http, url, viewer)
            assert refused.status_code == 429 and "max_sessions_per_key=2" in refusal(refused)
            assert (await delete_session(http, url, viewer, opened[0])).status_code == 200
            await open_sessions(http, url, viewer, 1)
            (admin_session,) = await open_sessions(http, url, token, 1)  # the token is not capped per key
            hijack = await delete_session(http, url, viewer, admin_session)
            assert hijack.status_code == 404 and refusal(hijack) == "Session not found"
            listed = await http.post(url, json=LIST_TOOLS, headers=headers_of(token, admin_session))
            assert listed.status_code == 200
    finally:
        stop(proc)
