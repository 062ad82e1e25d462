"""Jupyter's authentication on the MCP endpoint and REST API: 401, 403 and the auth-disabled mode."""

from __future__ import annotations

import httpx2
import pytest
from traitlets.config import Config

from .conftest import open_client

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["plexus/mcp", "plexus/api/tasks"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "token wrong-token", "Basic dXNlcjpwYXNz"])
async def test_missing_or_bad_credentials_get_401_with_www_authenticate(server_url, path, auth):
    headers = dict(MCP_HEADERS)
    if auth:
        headers["Authorization"] = auth
    async with httpx2.AsyncClient() as http:
        response = await http.post(server_url + path, json=INIT, headers=headers, follow_redirects=False)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "wrong-token" not in response.text
    assert "Authorization: Bearer" in response.text


@pytest.mark.parametrize("scheme", ["Bearer", "token"])
async def test_the_jupyter_token_in_either_header_form_is_accepted(server_url, token, scheme):
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            server_url + "plexus/mcp", json=INIT, headers={**MCP_HEADERS, "Authorization": f"{scheme} {token}"}
        )
    assert response.status_code == 200
    assert response.headers.get("mcp-session-id")


async def test_a_foreign_origin_is_refused_with_403_even_with_a_valid_token(server_url, token):
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}", "Origin": "http://evil.example"}
    async with httpx2.AsyncClient() as http:
        response = await http.post(server_url + "plexus/mcp", json=INIT, headers=headers)
        same = await http.post(
            server_url + "plexus/mcp", json=INIT, headers={**headers, "Origin": server_url.split("/a%40b")[0]}
        )
    assert response.status_code == 403 and "Origin" in response.json()["error"]["message"]
    assert same.status_code == 200


class TestAllowOrigin:
    @pytest.fixture
    def jp_server_config(self, plexus_config):
        return Config(
            {
                "ServerApp": {
                    "jpserver_extensions": {"plexus_mcp_jupyter": True},
                    "allow_origin": "http://lab.example",
                },
                "PlexusMCPExtension": plexus_config,
            }
        )

    async def test_an_origin_allowed_by_jupyter_is_accepted(self, server_url, token):
        headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient() as http:
            ok = await http.post(
                server_url + "plexus/mcp", json=INIT, headers={**headers, "Origin": "http://lab.example"}
            )
            bad = await http.post(
                server_url + "plexus/mcp", json=INIT, headers={**headers, "Origin": "http://x.example"}
            )
        assert ok.status_code == 200 and bad.status_code == 403


async def test_health_answers_liveness_without_auth_and_details_with_it(server_url, token):
    async with httpx2.AsyncClient() as http:
        anonymous = await http.get(server_url + "plexus/api/health")
        detailed = await http.get(server_url + "plexus/api/health", headers={"Authorization": f"token {token}"})
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    body = detailed.json()
    assert body["status"] == "ok" and body["store"]["status"] == "ok" and body["version"]
    assert body["executor"]["name"] == "local" and "QUEUED" in body["tasks"]


class TestAuthDisabled:
    @pytest.fixture
    def jp_server_config(self, plexus_config):
        return Config(
            {
                "ServerApp": {"jpserver_extensions": {"plexus_mcp_jupyter": True}, "token": ""},
                "IdentityProvider": {"token": ""},
                "PlexusMCPExtension": plexus_config,
            }
        )

    async def test_the_endpoint_follows_jupyter_and_says_it_is_open(self, mcp_url, server_url, jp_serverapp):
        assert not jp_serverapp.identity_provider.auth_enabled
        async with open_client(mcp_url, token=None) as client:
            assert (await client.list_tools()).tools
        async with httpx2.AsyncClient() as http:
            health = (await http.get(server_url + "plexus/api/health")).json()
        assert health["auth"]["enabled"] is False
        assert "accepts anyone" in health["auth"]["warning"]


@pytest.mark.parametrize("path", ["plexus/mcp", "plexus/api/tasks", "plexus/api/health"])
async def test_a_cors_preflight_is_answered_not_crashed(server_url, path):
    async with httpx2.AsyncClient() as http:
        response = await http.request(
            "OPTIONS",
            server_url + path,
            headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"},
        )
    assert response.status_code in (200, 204)


async def test_a_cookie_authenticated_write_needs_the_xsrf_token(server_url, token):
    async with httpx2.AsyncClient() as http:
        # Behave as a browser: the login page (which sets the _xsrf cookie), the token in a URL once
        # (which sets the login cookie), then only cookies.
        await http.get(server_url + "login")
        xsrf = http.cookies.get("_xsrf")
        login = await http.get(server_url + f"api/status?token={token}")
        assert xsrf and login.status_code == 200 and len(http.cookies) >= 2
        forged = await http.post(server_url + "plexus/api/tasks", json={"params": {"items": 1}})
        assert forged.status_code == 403
        with_token = await http.post(
            server_url + "plexus/api/tasks", json={"params": {"items": 1}}, headers={"X-XSRFToken": xsrf}
        )
        assert with_token.status_code == 201


async def test_a_foreign_host_is_refused_when_remote_access_is_off(server_url, token):
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            server_url + "plexus/mcp",
            json=INIT,
            headers={**MCP_HEADERS, "Authorization": f"Bearer {token}", "Host": "evil.example"},
        )
    assert response.status_code == 403 and "Host" in response.json()["error"]["message"]
