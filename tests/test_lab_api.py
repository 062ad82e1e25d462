"""What the lab panel reads beyond the task API: client configurations (`POST clients`) and the caller's role."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import HTTPClientError

from plexus_mcp_jupyter.cli import CLIENT_CHOICES, claude_code_command, client_text


async def post_clients(jp_fetch, body, headers=None):
    response = await jp_fetch("plexus", "api", "clients", method="POST", body=json.dumps(body), headers=headers or {})
    return json.loads(response.body)


async def test_the_notebook_user_gets_every_client_with_the_jupyter_token(jp_fetch, token, jp_http_port):
    data = await post_clients(jp_fetch, {})
    assert data["credential"] == "jupyter_token" and data["bearer"] == token
    assert data["url"].endswith("/plexus/mcp") and f":{jp_http_port}" in data["url"]
    assert [c["id"] for c in data["clients"]] == [c for c, _, _ in CLIENT_CHOICES]
    by_id = {c["id"]: c for c in data["clients"]}
    # The same texts as `plexus mcp config` builds (one source): the command line and the panel agree.
    assert by_id["vscode"]["text"] == client_text("vscode", data["url"], token)
    assert by_id["claude-code"]["format"] == "shell"
    assert by_id["claude-code"]["text"] == (
        f"claude mcp add --transport http plexus {data['url']} --header 'Authorization: Bearer {token}'"
    )
    # Whatever a request body names, the command only registers it: quoted for the shell, nothing runs.
    import shlex

    hostile = claude_code_command(data["url"], '$(touch /tmp/pwned)`id`"', name="x; rm -rf ~")
    assert shlex.split(hostile)[5:] == [
        "x; rm -rf ~",
        data["url"],
        "--header",
        'Authorization: Bearer $(touch /tmp/pwned)`id`"',
    ]
    desktop = json.loads(by_id["claude-desktop"]["text"])["mcpServers"]["plexus"]
    assert desktop["command"] == "npx" and data["url"] in desktop["args"]
    generic = json.loads(by_id["generic"]["text"])["mcpServers"]["plexus"]
    assert generic["headers"] == {"Authorization": f"Bearer {token}"}


async def test_a_minted_secret_replaces_the_token_and_is_not_audited(jp_fetch, runtime, token):
    _key, secret = runtime.keys.create("lab client", "operator")
    data = await post_clients(jp_fetch, {"secret": secret, "name": "plexus-lab"})
    assert data["credential"] == "api_key" and data["bearer"] == secret
    texts = "".join(c["text"] for c in data["clients"])
    assert secret in texts and token not in texts and "plexus-lab" in texts
    records, _ = runtime.audit.query(action="*clients*")
    assert records == []


async def test_a_key_caller_never_sees_the_server_token(jp_fetch, runtime, token):
    _key, secret = runtime.keys.create("viewer", "viewer")
    data = await post_clients(jp_fetch, {}, headers={"Authorization": f"Bearer {secret}"})
    assert data["credential"] == "placeholder" and data["bearer"] is None
    assert token not in json.dumps(data) and "<your API key>" in data["clients"][0]["text"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"secret": "has space"}, "secret: must be an API key or token"),
        ({"secret": 5}, "secret: must be an API key or token"),
        ({"name": "bad name!"}, "name: must be 1 to 64 letters"),
        ({"name": "plexus", "colour": "red"}, "unknown field(s) ['colour']; allowed: secret, name"),
    ],
)
async def test_bad_client_requests_say_what_is_allowed(jp_fetch, body, message):
    with pytest.raises(HTTPClientError) as err:
        await post_clients(jp_fetch, body)
    assert err.value.code == 400 and message in json.loads(err.value.response.body)["error"]["message"]


@pytest.mark.parametrize(
    "secret",
    ["pmk_" + "s3cr3t" * 5 + " with a space", "pmk_" + "s3cr3t" * 40, "pmk_s3cr3t\x07bell"],
    ids=["a space", "too long", "a control character"],
)
async def test_a_refused_secret_is_never_quoted_back_nor_logged(jp_fetch, caplog, secret):
    with pytest.raises(HTTPClientError) as err:
        await post_clients(jp_fetch, {"secret": secret, "name": "plexus-lab"})
    body = err.value.response.body.decode()
    message = json.loads(body)["error"]["message"]
    assert err.value.code == 400
    assert message == "secret: must be an API key or token: printable, no spaces, 1 to 200 characters"
    assert "s3cr3t" not in body and "s3cr3t" not in caplog.text  # neither the answer nor the 400's log line


async def test_health_states_the_callers_role(jp_fetch, runtime):
    admin = json.loads((await jp_fetch("plexus", "api", "health")).body)
    assert admin["role"] == "admin"
    _key, secret = runtime.keys.create("viewer", "viewer")
    viewer = json.loads((await jp_fetch("plexus", "api", "health", headers={"Authorization": f"Bearer {secret}"})).body)
    assert viewer == {"status": "ok", "authenticated": True, "version": viewer["version"], "role": "viewer"}
