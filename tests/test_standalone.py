"""`plexus mcp serve` over stdio and HTTP, `plexus mcp config`, and restart recovery after a crash."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
from mcp import Client, StdioServerParameters

from plexus_mcp_jupyter.cli import main as cli_main
from plexus_mcp_jupyter.core import Store, Task, TaskStatus

from .conftest import LEGACY, MODERN, open_client, poll
from .raw_http import answer_before_body
from .test_mcp_tools import ALL_TOOLS


def plexus_env(tmp_path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"JUPYTER_DATA_DIR": str(tmp_path / "data"), "PLEXUS_MCP_DB_URL": f"sqlite:///{tmp_path / 's.db'}"})
    env.update(extra)
    return env


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_stdio_serves_the_same_tools_and_keeps_stdout_for_the_protocol(tmp_path, mode):
    # The server's demo tasks write to stdout (sys.stdout and fd 1) in their workers: none of it may
    # reach the protocol stream, or the client would fail to parse it.
    bootstrap = (
        "import sys; from tests.task_functions import use_noisy_demo; use_noisy_demo(); "
        "from plexus_mcp_jupyter.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    params = StdioServerParameters(
        command=sys.executable,
        args=["-c", bootstrap, "mcp", "serve", "--transport", "stdio", "--log-level", "DEBUG"],
        env=plexus_env(tmp_path, PLEXUS_MCP_PROGRESS_WRITE_INTERVAL="0.1"),
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    # A task queued before the server starts is started before the stdio transport takes over fd 1,
    # so its worker (and the forkserver) inherit the protocol stream as their stdout.
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    queued = Task(
        id="queued-before-start", type="demo", status=TaskStatus.QUEUED, params={"items": 30, "item_delay_ms": 1}
    )
    store.create_task(queued)
    store.close()
    garbage: list[Exception] = []

    async def on_message(message):
        if isinstance(message, Exception):  # a line on stdout that is not a JSON-RPC message
            garbage.append(message)

    async with Client(params, mode=mode, message_handler=on_message) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == ALL_TOOLS
        task_id = (await client.call_tool("run_demo_task", {"items": 30, "item_delay_ms": 1})).structured_content[
            "task_id"
        ]

        async def status(of: str = task_id) -> str:
            return str((await client.call_tool("get_task", {"task_id": of})).structured_content["status"])

        assert await poll(status, lambda s: s in ("COMPLETED", "FAILED")) == "COMPLETED"
        # Both ran at once, each on the first worker ready: either may end first.
        assert await poll(lambda: status(queued.id), lambda s: s in ("COMPLETED", "FAILED")) == "COMPLETED"
    # the same store is readable by anyone afterwards
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    task = store.get_task(task_id)
    store.close()
    assert task.status is TaskStatus.COMPLETED
    assert "noise on sys.stdout" in task.stdout_tail  # captured for the task, not sent to the client
    assert garbage == []


async def test_stdio_tells_the_endpoint_a_client_came_once_at_its_first_request(tmp_path):
    # As the HTTP routes do (after authentication): the evaluation service's start-up rehearsals stop when a
    # client's first MCP request arrives (MCPEndpoint.arrived -> EvaluationService.client_came), told once.
    came = tmp_path / "came"
    bootstrap = (
        "import os, sys; from tests.task_functions import record_client_came; "
        "record_client_came(os.environ['PLEXUS_TEST_CAME']); "
        "from plexus_mcp_jupyter.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    params = StdioServerParameters(
        command=sys.executable,
        args=["-c", bootstrap, "mcp", "serve", "--transport", "stdio"],
        env=plexus_env(tmp_path, PLEXUS_TEST_CAME=str(came)),
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    async with Client(params) as client:  # initialize, then two more requests
        assert {t.name for t in (await client.list_tools()).tools} == ALL_TOOLS
        await client.call_tool("list_tasks", {})
        assert came.read_text() == "came\n"


def start_http(tmp_path, *args: str, **env: str) -> tuple[subprocess.Popen, str, str | None]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "plexus_mcp_jupyter.cli", "mcp", "serve", "--transport", "http", "--port", "0", *args],
        env=plexus_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url, token = None, None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        url is None or (token is None and "--token" not in args and "PLEXUS_MCP_TOKEN" not in env)
    ):
        line = proc.stderr.readline()
        if not line:
            break
        if m := re.search(r"Plexus MCP endpoint: (\S+)", line):
            url = m.group(1)
        if m := re.search(r"Authorization: Bearer (\S+)", line):
            token = m.group(1)
    assert url, "the server did not print its URL"
    return proc, url, token


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


async def test_http_requires_the_printed_token(tmp_path):
    proc, url, token = start_http(tmp_path)
    try:
        assert token and proc.stdout is not None
        async with httpx2.AsyncClient() as http:
            denied = await http.post(url, json={}, headers={"Accept": "application/json, text/event-stream"})
            wrong = await http.post(url, json={}, headers={"Authorization": "Bearer nope"})
            health = await http.get(url.replace("/mcp", "/health"))
        assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert wrong.status_code == 401 and health.json() == {"status": "ok"}
        async with open_client(url, token) as client:
            started = await client.call_tool("run_demo_task", {"items": 5, "item_delay_ms": 0})
            assert started.structured_content["status"] == "QUEUED"
    finally:
        stop(proc)


async def test_http_takes_the_token_from_the_environment_and_does_not_print_it(tmp_path):
    proc, url, token = start_http(tmp_path, PLEXUS_MCP_TOKEN="s3cret-token-from-env")
    try:
        assert token is None
        async with open_client(url, "s3cret-token-from-env") as client:
            assert (await client.list_tools()).tools
    finally:
        stop(proc)
        assert "s3cret-token-from-env" not in proc.stderr.read()


async def test_a_task_running_when_the_server_crashes_is_failed_at_the_next_start(tmp_path):
    proc, url, token = start_http(tmp_path)
    try:
        async with open_client(url, token) as client:
            task_id = (
                await client.call_tool("run_demo_task", {"items": 100_000, "item_delay_ms": 5})
            ).structured_content["task_id"]

            async def status():
                return (await client.call_tool("get_task", {"task_id": task_id})).structured_content["status"]

            await poll(status, lambda s: s == "RUNNING")
            # Its worker has begun a stage, and the store has it (a task is RUNNING once claimed, before a
            # worker takes it): the crash below must find a stage to fail.
            store = Store(f"sqlite:///{tmp_path / 's.db'}")
            try:
                await poll(lambda: store.get_task(task_id).stages, bool)
            finally:
                store.close()
    finally:
        proc.kill()  # a crash: no chance to clean up
        proc.wait()
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    assert store.get_task(task_id).status is TaskStatus.RUNNING
    store.close()

    proc, url, token = start_http(tmp_path)
    try:
        async with open_client(url, token) as client:
            task = (await client.call_tool("get_task", {"task_id": task_id})).structured_content
    finally:
        stop(proc)
    assert task["status"] == "FAILED" and task["error_message"] == "server restarted while the task was running"
    assert task["stages"][-1]["status"] == "FAILED"


@pytest.mark.parametrize(
    ("client", "top", "extra"),
    [("claude", "mcpServers", {"type": "http"}), ("cursor", "mcpServers", {}), ("vscode", "servers", {"type": "http"})],
)
def test_config_prints_a_ready_client_configuration(capsys, client, top, extra):
    assert (
        cli_main(["mcp", "config", "--client", client, "--url", "http://localhost:8888/plexus/mcp", "--token", "abc"])
        == 0
    )
    config = json.loads(capsys.readouterr().out)
    entry = config[top]["plexus"]
    assert entry["url"] == "http://localhost:8888/plexus/mcp"
    assert entry["headers"] == {"Authorization": "Bearer abc"}
    for key, value in extra.items():
        assert entry[key] == value


def test_config_for_stdio_launches_this_installation_by_its_absolute_path(capsys):
    assert cli_main(["mcp", "config", "--client", "vscode", "--stdio"]) == 0
    entry = json.loads(capsys.readouterr().out)["servers"]["plexus"]
    assert entry["type"] == "stdio" and Path(entry["command"]).is_absolute() and Path(entry["command"]).exists()
    assert entry["args"][-4:] == ["mcp", "serve", "--transport", "stdio"]


def test_config_finds_the_running_jupyter_server(capsys, jp_serverapp, jp_runtime_dir):
    jp_serverapp.write_server_info_file()
    assert cli_main(["mcp", "config", "--client", "cursor"]) == 0
    entry = json.loads(capsys.readouterr().out)["mcpServers"]["plexus"]
    assert entry["url"].endswith("/plexus/mcp")
    assert entry["headers"]["Authorization"] == f"Bearer {jp_serverapp.identity_provider.token}"


async def test_http_refuses_foreign_hosts_and_origins_on_loopback(tmp_path):
    proc, url, token = start_http(tmp_path)
    try:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
        async with httpx2.AsyncClient() as http:
            rebinding = await http.post(url, json={}, headers={**headers, "Host": "evil.example"})
            foreign = await http.post(url, json={}, headers={**headers, "Origin": "http://evil.example"})
            missing = await http.get(url.replace("/mcp", "/health"), headers={"Host": "evil.example"})
    finally:
        stop(proc)
    assert rebinding.status_code == 403 and "Host" in rebinding.json()["error"]["message"]
    assert foreign.status_code == 403 and "Origin" in foreign.json()["error"]["message"]
    assert missing.status_code == 403


async def test_http_refuses_an_anonymous_body_before_reading_it(tmp_path):
    # Tornado reads a body before the handler runs unless it is a StreamedBody: the health route (anyone's) read
    # one of up to tornado's max_body_size (100 MiB) for any method; the MCP route's is read after auth.
    proc, url, _ = start_http(tmp_path)
    try:
        health = url.replace("/mcp", "/health")
        answers = [
            await answer_before_body(health, {}, 64 * 1024 * 1024, b"{", method=method, wait=5)
            for method in ("GET", "POST", "PUT", "DELETE")
        ]
        mcp = await answer_before_body(url, {}, 64 * 1024 * 1024, b"{", wait=5)
    finally:
        stop(proc)
    assert all(a.status == 413 and a.closed for a in answers), answers
    assert mcp.status == 401 and mcp.closed, mcp


def cli_key(env: dict[str, str], name: str, role: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """A key made with `plexus keys create`, as an admin would: its secret, and what the command printed."""
    created = subprocess.run(
        [sys.executable, "-m", "plexus_mcp_jupyter.cli", "keys", "create", name, "--role", role],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(created.stdout)["secret"], created


async def test_http_accepts_api_keys_with_their_roles(tmp_path):
    env = plexus_env(tmp_path)
    secret, created = cli_key(env, "a viewer", "viewer")
    assert secret not in created.stderr  # the secret goes to stdout once, nowhere else
    proc, url, _token = start_http(tmp_path)
    try:
        async with open_client(url, secret) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "list_tasks" in names and "run_demo_task" not in names
            refused = await client.call_tool("run_demo_task", {"items": 1})
            assert refused.is_error and "permission denied" in refused.content[0].text
        subprocess.run(
            [sys.executable, "-m", "plexus_mcp_jupyter.cli", "keys", "revoke", secret.split("_")[1]],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        async with httpx2.AsyncClient() as http:
            gone = await poll(
                lambda: http.post(url, json={}, headers={"Authorization": f"Bearer {secret}"}),
                lambda r: r.status_code == 401,
                timeout=10,
                interval=0.5,
            )
        assert "revoked" in gone.text and secret not in gone.text
    finally:
        stop(proc)
