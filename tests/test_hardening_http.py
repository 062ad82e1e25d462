"""Hardening of the HTTP faces (issue 11): slow clients, bad JSON, secrets in the log, Origin, health,
bad settings and the stdio audit log. Each test drives a real server the way the attack did."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
import sqlalchemy as sa
from mcp import Client, StdioServerParameters
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect
from traitlets.config import Config

from plexus_mcp_jupyter.handlers.health import HealthHandler
from plexus_mcp_jupyter.security.audit import audit_table
from plexus_mcp_jupyter.security.http import same_origin
from plexus_mcp_jupyter.security.redaction import SecretScrubber

from .conftest import open_client, poll
from .loop_watch import HealthWatch, watched
from .raw_http import answer_before_body, chunked_answer, read_answer, request_head
from .test_standalone import plexus_env, start_http, stop

TOO_DEEP = "nested more than the 64 levels allowed"
NESTED = '{"a":' * 5_000 + "1" + "}" * 5_000  # 5,000 levels (64 allowed), within max_json_values (100,000)
HUGE_NUMBER = '{"items": ' + "9" * 100_000 + "}"
REPO = Path(__file__).resolve().parent.parent


class Capture(logging.Handler):
    """Every formatted line (with its traceback) logged on the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    # The test's own HTTP clients run in the server's process: their request lines (httpx logs each URL at INFO
    # once something set the root logger to INFO) are what the client sent, not what the server logged.
    CLIENT_SIDE = ("httpx", "httpx2", "httpcore", "httpcore2")

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in self.CLIENT_SIDE:
            return
        self.lines.append(logging.Formatter("%(levelname)s %(name)s %(message)s").format(record))

    def attach(self, *loggers: logging.Logger) -> None:
        for logger in loggers:
            logger.addHandler(self)

    def text(self) -> str:
        return "\n".join(self.lines)


# -- item 8: one JSON parse, every failure a 400 with one line -------------------------------------------


@pytest.mark.parametrize("body", [NESTED, HUGE_NUMBER], ids=["nested", "huge-number"])
async def test_deep_nesting_and_huge_numbers_are_a_400_with_one_line_on_every_rest_route(
    server_url, token, runtime, body
):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        for route in ("tasks", "tasks/cancel", "evaluations", "keys"):
            answer = await http.post(f"{server_url}plexus/api/{route}", content=body)
            assert answer.status_code == 400, (route, answer.status_code, answer.text[:300])
            message = answer.json()["error"]["message"]
            assert "\n" not in message and len(message) < 300, message
            assert (TOO_DEEP if body is NESTED else "digits") in message
        assert (await http.get(f"{server_url}plexus/api/health")).status_code == 200


async def test_a_json_body_above_max_request_bytes_is_a_413_before_it_is_parsed(server_url, token, keys, runtime):
    # An operator key may post to tasks/cancel: a body near Jupyter's 512 MiB parsed into gigabytes of objects. It is
    # refused once its headers are in, unread (tests/raw_http.py: the client sends the headers and 1 kB of it), when it
    # declares more than twice the bound (up to twice, it is read and dropped first, so that the client reads the 413).
    body = ("[" + "1," * (runtime.settings.max_request_bytes // 2) + "1]").encode()
    declared = 2 * runtime.settings.max_request_bytes + 1
    for credential, routes in (
        (token, ("tasks", "tasks/cancel", "tasks/retry", "tasks/priority", "evaluations", "keys")),
        (keys["operator"], ("tasks/cancel", "tasks/retry")),
    ):
        for route in routes:
            url = f"{server_url}plexus/api/{route}"
            answer = await answer_before_body(url, {"Authorization": f"Bearer {credential}"}, declared, body[:1000])
            assert answer.status == 413, (route, answer)
            assert "(max_request_bytes)" in json.loads(answer.body)["error"]["message"]
    # The MCP endpoint's: the body neither charged nor counted first (its count took 2 x 4 MiB of scans)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    answer = await answer_before_body(
        f"{server_url}plexus/mcp", {**headers, "Content-Type": "application/json"}, declared, body[:1000]
    )
    assert answer.status == 413 and "(max_request_bytes)" in json.loads(answer.body)["error"]["message"], answer


async def test_a_deeply_nested_websocket_message_gets_an_error_and_the_socket_stays_open(server_url, token, runtime):
    url = server_url.replace("http://", "ws://") + "plexus/api/events"
    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"Bearer {token}"}))
    try:
        hello = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        assert hello["type"] == "hello"
        for bad, reason in ((NESTED, TOO_DEEP), (HUGE_NUMBER, "digits"), ("{nope", "not valid JSON")):
            await ws.write_message(bad)
            reply = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            assert reply["type"] == "error" and reason in reply["message"] and "\n" not in reply["message"]
        await ws.write_message(json.dumps({"type": "no-such-type"}))  # the same socket still answers
        reply = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        assert reply["type"] == "error" and "unknown message type" in reply["message"]
    finally:
        ws.close()


# -- item 10: no secret in the log or the audit log -----------------------------------------------------


async def test_a_token_or_key_in_the_query_string_never_reaches_the_log_or_the_audit_log(
    jp_serverapp, server_url, mcp_url, token, runtime, keys
):
    capture = Capture()
    capture.attach(jp_serverapp.log, logging.getLogger(), logging.getLogger("tornado"))
    key = keys["viewer"]
    try:
        async with httpx2.AsyncClient(timeout=30) as http:
            # Jupyter accepts its token in the query: every Plexus 4xx was logged with the URL as sent.
            missing = await http.get(f"{server_url}plexus/api/tasks/no-such-task?token={token}")
            assert missing.status_code == 404
            denied = await http.delete(f"{server_url}plexus/api/keys/nope?token={token}&x={key}")
            assert denied.status_code == 404
            # Names and values are read percent-decoded: this is the token too, and must not be logged.
            encoded = await http.get(
                f"{server_url}plexus/api/tasks/nope?%74oken=%{ord(token[0]):02X}{token[1:]}&x=plx%5F{key[4:]}"
            )
            # x is no argument of GET tasks/{id} (GetTask): refused by its name, its value not echoed
            assert encoded.status_code == 400 and "unknown field(s) ['x']" in encoded.text
            assert key[4:] not in encoded.text and token[1:] not in encoded.text
        async with httpx2.AsyncClient(timeout=30) as http:  # no login cookie from the requests above
            refused = await http.get(f"{server_url}plexus/api/tasks?api_key={key}&other={key}")
            assert refused.status_code == 401
            as_key = await http.get(
                f"{server_url}plexus/api/tasks/nope?next={key}", headers={"Authorization": f"Bearer {key}"}
            )
            assert as_key.status_code == 400 and key[4:] not in as_key.text  # next: no argument, refused by name
            # The token's value where a client put it: a key's name, a tool argument.
            made = await http.post(
                f"{server_url}plexus/api/keys",
                json={"name": f"copy of {token}"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert made.status_code == 201
        async with open_client(mcp_url, token) as client:
            await client.call_tool("get_task", {"task_id": f"id-{token}"})
        runtime.audit.flush()
        with runtime.store.engine.connect() as conn:
            records = [dict(r) for r in conn.execute(sa.select(audit_table)).mappings()]
    finally:
        for logger in (jp_serverapp.log, logging.getLogger(), logging.getLogger("tornado")):
            logger.removeHandler(capture)
    logged = capture.text()
    assert "/plexus/api/tasks/no-such-task" in logged  # the lines are there, scrubbed
    assert token[1:] not in logged and key[4:] not in logged, logged
    audit = json.dumps(records, default=str)
    assert any(r["action"] == "key.create" for r in records) and any(r["action"] == "tool.get_task" for r in records)
    assert token not in audit and key not in audit, audit


async def test_the_standalone_server_keeps_its_token_and_keys_out_of_its_log(tmp_path):
    secret_token = "standalone-token-0123456789"
    proc, url, _ = start_http(tmp_path, PLEXUS_MCP_TOKEN=secret_token)
    key = "plx_abcdefabcdef_" + "S" * 40
    try:
        async with httpx2.AsyncClient(timeout=30) as http:
            for query in (f"token={secret_token}", f"x={key}", f"access_token={secret_token}"):
                answer = await http.post(f"{url}?{query}", json={})
                assert answer.status_code == 401
            assert (await http.get(url.replace("/mcp", f"/nowhere?t={secret_token}"))).status_code == 404
    finally:
        stop(proc)
    logged = proc.stderr.read()
    assert "/mcp" in logged and "/nowhere" in logged  # tornado's access lines, scrubbed
    assert secret_token not in logged and "S" * 40 not in logged, logged


async def test_jupyter_still_prints_the_login_url_with_its_token_while_requests_are_scrubbed(tmp_path):
    # `jupyter lab` prints the URL with the token it made, for its user to copy: Jupyter's own startup lines
    # are not a client's request, and must keep it.
    proc, base, _, log_path = start_jupyter(tmp_path, token=None)
    try:
        match = re.search(r"\?token=([0-9a-f]{48})", log_path.read_text())
        assert match, log_path.read_text()[-3000:]
        token = match.group(1)
        async with httpx2.AsyncClient(timeout=30) as http:
            assert (await http.get(f"{base}plexus/api/tasks/nope?token={token}")).status_code == 404
    finally:
        proc.terminate()
        proc.wait(20)
    logged = log_path.read_text()
    assert "/plexus/api/tasks/nope?token=[redacted]" in logged
    assert logged.count(token) == len(re.findall(r"\?token=[0-9a-f]{48}", logged)) >= 1  # the startup lines only


def test_the_scrubber_reads_query_parameters_percent_decoded():
    scrubber = SecretScrubber()
    scrubber.add("0123456789abcdef")
    line = (
        "GET /plexus/api/tasks?%74oken=%30123456789abcdef&next=%30%3123456789abcdef&a%75th=x&page=2"
        "&k=plx%5Fabc123abc123_SECRETSECRET (127.0.0.1)"
    )
    assert scrubber.scrub(line) == (
        "GET /plexus/api/tasks?%74oken=[redacted]&next=[redacted]&a%75th=[redacted]&page=2&k=[redacted] (127.0.0.1)"
    )


def test_the_scrubber_s_quick_answer_is_only_for_text_neither_pattern_can_match():
    """Text without `=` or `plx_` is returned as it is (the audited ids and names of most calls), once the server's
    own secrets were replaced in it; anything else goes through both patterns as before."""
    scrubber = SecretScrubber()
    scrubber.add("0123456789abcdef")
    assert scrubber.scrub("a0326a60-884f-4f28-9a24-04616e24128d") == "a0326a60-884f-4f28-9a24-04616e24128d"
    assert scrubber.scrub("task 0123456789abcdef") == "task [redacted]"
    assert scrubber.scrub("key plx_abc123abc123_SECRETSECRET here") == "key plx_abc123abc123_[redacted] here"
    assert scrubber.scrub("see /x?token=abc&page=2") == "see /x?token=[redacted]&page=2"


# -- the Origin check: scheme, host and port ------------------------------------------------------------


def test_same_origin_normalises_default_ports_and_compares_the_scheme():
    assert same_origin("http://localhost", "http", "localhost:80")
    assert same_origin("https://example.org:443", "https", "example.org")
    assert not same_origin("https://localhost:8888", "http", "localhost:8888")
    assert not same_origin("http://localhost:8889", "http", "localhost:8888")
    assert not same_origin("http://localhost:bad", "http", "localhost:8888")


async def test_an_origin_with_another_scheme_or_port_is_refused_on_jupyter(server_url, token, jp_http_port, runtime):
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:

        async def status(origin: str) -> int:
            return (await http.get(f"{server_url}plexus/api/tasks", headers={"Origin": origin})).status_code

        assert await status(f"http://localhost:{jp_http_port}") == 200
        assert await status(f"https://localhost:{jp_http_port}") == 403
        assert await status(f"http://localhost:{jp_http_port + 1}") == 403


async def test_an_origin_with_another_scheme_is_refused_by_the_standalone_server(tmp_path):
    proc, url, token = start_http(tmp_path)
    port = int(re.search(r":(\d+)/", url).group(1))
    try:
        async with httpx2.AsyncClient(timeout=30) as http:
            headers = {"Authorization": f"Bearer {token}"}
            own = await http.get(
                url.replace("/mcp", "/health"), headers={**headers, "Origin": f"http://localhost:{port}"}
            )
            other = await http.get(
                url.replace("/mcp", "/health"), headers={**headers, "Origin": f"https://localhost:{port}"}
            )
    finally:
        stop(proc)
    assert own.status_code == 200 and other.status_code == 403


# -- health needs no credential, whatever Jupyter's default ---------------------------------------------


class TestHealthWithUnauthenticatedAccessDisallowed:
    @pytest.fixture
    def jp_server_config(self, plexus_config):
        return Config(
            {
                "ServerApp": {
                    "jpserver_extensions": {"plexus_mcp_jupyter": True},
                    "allow_unauthenticated_access": False,
                },
                "PlexusMCPExtension": plexus_config,
            }
        )

    async def test_health_answers_without_credentials(self, server_url, runtime):
        # The marker Jupyter reads (jupyter_server.auth.decorator.allow_unauthenticated), not a mangled name.
        assert getattr(HealthHandler.get, "__allow_unauthenticated", False) is True
        async with httpx2.AsyncClient(timeout=30) as http:
            answer = await http.get(f"{server_url}plexus/api/health")
            tasks = await http.get(f"{server_url}plexus/api/tasks")
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}
        assert tasks.status_code == 401


# -- bad settings: one clear error, every Plexus route a 503 ---------------------------------------------


async def assert_plexus_unavailable(server_url: str, token: str, capture: Capture, setting: str) -> None:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        for method, route in (
            ("GET", "plexus/api/health"),
            ("POST", "plexus/mcp"),
            ("GET", "plexus/api/tasks"),
            ("POST", "plexus/api/keys"),
        ):
            answer = await http.request(method, f"{server_url}{route}", json={})
            assert answer.status_code == 503, (route, answer.status_code, answer.text[:300])
            message = answer.json()["error"]["message"]
            assert setting in message and "'ray'" in message and "'local'" in message, message
        assert (await http.get(f"{server_url}api/status")).status_code == 200  # Jupyter itself is served
    errors = [line for line in capture.lines if line.startswith("ERROR") and setting in line]
    assert len(errors) == 1 and "'ray'" in errors[0] and "'local'" in errors[0], capture.lines
    assert "Traceback" not in capture.text()


@pytest.fixture
def capture_server_log():
    capture = Capture()
    logger = logging.getLogger("plexus_mcp_jupyter")
    logger.addHandler(capture)
    yield capture
    logger.removeHandler(capture)


class TestBadEnvironmentSetting:
    @pytest.fixture
    def plexus_config(self, plexus_config, monkeypatch, capture_server_log):
        monkeypatch.setenv("PLEXUS_MCP_EXECUTOR", "ray")  # no such executor
        return plexus_config

    async def test_every_plexus_route_answers_503_naming_it(self, server_url, token, capture_server_log):
        await assert_plexus_unavailable(server_url, token, capture_server_log, "PLEXUS_MCP_EXECUTOR")

    async def test_a_large_body_is_answered_503_unread(self, server_url, token):
        """Tornado read a whole body (up to Jupyter's max_body_size, 512 MiB) before the 503's handler ran, for anyone:
        one over 64 KiB is answered once its headers are in and the connection ended, the body never read."""
        for headers in ({}, {"Authorization": f"Bearer {token}"}):
            for method, route in (("POST", "plexus/mcp"), ("PUT", "plexus/api/datasets/uploads/x"), ("GET", "plexus/")):
                url = f"{server_url}{route}"
                answer = await answer_before_body(url, headers, 64 * 1024 * 1024, b"{", method=method)
                assert answer.status == 503 and answer.closed, (method, route, headers, answer)
                assert "PLEXUS_MCP_EXECUTOR" in json.loads(answer.body)["error"]["message"], answer.body

    async def test_a_small_chunked_body_is_read_and_the_connection_kept(self, server_url, token):
        """Every chunked body had been answered unread and its connection ended, 2 bytes too: one within 64 KiB is
        read (and dropped), answered, and the connection kept; a larger one is answered once past 64 KiB, unread."""
        url = f"{server_url}plexus/mcp"
        headers = {"Authorization": f"Bearer {token}", "Transfer-Encoding": "chunked"}
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(request_head(url, "POST", headers) + b"2\r\n{}\r\n0\r\n\r\n")
            await writer.drain()
            answer = await read_answer(reader, 10)
        finally:
            writer.close()
        assert answer.status == 503 and not answer.closed, answer
        assert "PLEXUS_MCP_EXECUTOR" in json.loads(answer.body)["error"]["message"], answer.body
        answer, sent = await chunked_answer(url, {"Authorization": f"Bearer {token}"}, b" " * 32_768, 20)
        assert answer.status == 503 and answer.closed and sent <= 4, (answer, sent)


class TestBadCommandLineSetting:
    @pytest.fixture
    def jp_argv(self, capture_server_log):
        return ["--PlexusMCPExtension.executor=ray"]

    async def test_every_plexus_route_answers_503_naming_it(self, server_url, token, capture_server_log):
        await assert_plexus_unavailable(server_url, token, capture_server_log, "PlexusMCPExtension.executor")


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ((), {"PLEXUS_MCP_EXECUTOR": "ray"}, "PLEXUS_MCP_EXECUTOR='ray'"),
        (("--max-concurrency", "-1"), {}, "--max-concurrency -1"),
    ],
)
def test_plexus_mcp_serve_with_a_bad_setting_exits_2_with_one_line(tmp_path, args, env, named):
    done = subprocess.run(
        [sys.executable, "-m", "plexus_mcp_jupyter.cli", "mcp", "serve", "--transport", "http", "--port", "0", *args],
        env=plexus_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr, done.stderr


# -- the stdio server writes its last audit records when the client ends it -----------------------------


async def test_stdio_writes_the_audit_records_of_its_last_calls_when_the_client_closes_it(tmp_path):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "plexus_mcp_jupyter.cli", "mcp", "serve", "--transport", "stdio"],
        env=plexus_env(tmp_path),
        cwd=str(REPO),
    )
    async with Client(params) as client:
        for _ in range(3):
            await client.call_tool("list_tasks", {})
        await client.call_tool("get_task", {"task_id": "no-such-task"})
    engine = sa.create_engine(f"sqlite:///{tmp_path / 's.db'}")
    with engine.connect() as conn:
        actions = [r.action for r in conn.execute(sa.select(audit_table.c.action))]
    engine.dispose()
    assert actions.count("tool.list_tasks") == 3 and actions.count("tool.get_task") == 1, actions


# -- item 7: slow and idle clients ---------------------------------------------------------------------

# Timeouts longer than the refusal phase takes (a held connection closed early would free a slot).
SLOW = {"header": 4.0, "body": 4.0, "cap": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_jupyter(
    tmp_path: Path,
    *args: str,
    token: str | None = "jupyter-test-token-0123456789",
) -> tuple[subprocess.Popen[bytes], str, str | None, Path]:
    """A real `jupyter server` with the extension; its log goes to a file (a pipe would fill and block it).
    With `token` None, Jupyter makes one (and prints it for its user)."""
    port = free_port()
    log_path = tmp_path / "jupyter.log"
    env = plexus_env(
        tmp_path,
        JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--no-browser",
                "--allow-root",
                f"--port={port}",
                "--ServerApp.ip=127.0.0.1",
                *([f"--IdentityProvider.token={token}"] if token else []),
                "--ServerApp.jpserver_extensions=plexus_mcp_jupyter=True",
                *args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(tmp_path),
        )
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # Health answers as soon as the server listens; the connection guard is installed when it has started.
        if "HTTP connections time out after" in log_path.read_text():
            return proc, base, token, log_path
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("jupyter server did not start:\n" + log_path.read_text()[-3000:])


def slow_connection(port: int, host_header: str, path: str, *, idle: bool = False) -> socket.socket:
    """A connection from 127.0.0.1 that sends nothing (idle) or headers and a sliver of a long body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if not idle:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\n"
            'Content-Length: 100000\r\n\r\n{"a":'.encode()
        )
    return sock


def still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed `sock` (nothing to read, no EOF), without waiting."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (EOF or reset)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass  # an error response may come first; then the close
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def check_slow_clients(base: str, health_path: str, post_path: str) -> None:
    """The shared scenario: the cap's worth of slow/idle connections from 127.0.0.1, then more of them;
    health from another loopback address throughout; the slow ones closed after the timeouts."""
    port = int(re.search(r":(\d+)/", base).group(1))
    host_header = f"localhost:{port}"
    held = [slow_connection(port, host_header, post_path, idle=i % 2 == 1) for i in range(SLOW["cap"])]
    other_address = httpx2.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx2.AsyncClient(transport=other_address, timeout=30, headers={"Host": host_header}) as http:

        async def health() -> None:
            answer = await http.get(f"{base}{health_path}")
            assert answer.status_code == 200

        await asyncio.sleep(0.3)  # the held ones are accepted and counted
        await health()
        # Answered while every slow connection is still held: a server whose loop waited on one of them would
        # answer only once its timeouts closed them (an order, not a latency, which load would stretch).
        assert all(still_open(s) for s in held), "health was answered only after the slow connections were closed"
        extra = [slow_connection(port, host_header, post_path) for _ in range(40)]
        refused = await asyncio.gather(*(asyncio.to_thread(closed_by_server, s, 2) for s in extra))
        assert all(refused), f"{refused.count(False)} connection(s) past the cap were kept"
        await health()
        # The held ones: slow body and idle both closed after the (4 s) timeouts.
        kept = await asyncio.gather(*(asyncio.to_thread(closed_by_server, s, 15) for s in held))
        assert all(kept), "a slow or idle connection outlived the timeouts"
        await health()
        for sock in held + extra:
            sock.close()
    async with httpx2.AsyncClient(timeout=5) as http:  # 127.0.0.1 is welcome again
        assert (
            await poll(
                lambda: http.get(f"{base}{health_path}", headers={"Host": host_header}),
                lambda r: r.status_code == 200,
                timeout=10,
            )
        ).status_code == 200


def assert_refusals_logged_once(log: str) -> None:
    refusals = [line for line in log.splitlines() if "refused a connection" in line]
    assert 1 <= len(refusals) <= 2, refusals  # one line per minute, not one per connection


async def test_jupyter_closes_slow_and_idle_connections_and_caps_them_per_address(tmp_path):
    proc, base, _token, log_path = start_jupyter(
        tmp_path,
        f"--PlexusMCPExtension.http_header_timeout={SLOW['header']}",
        f"--PlexusMCPExtension.http_body_timeout={SLOW['body']}",
        f"--PlexusMCPExtension.max_connections_per_address={SLOW['cap']}",
    )
    try:
        await check_slow_clients(base, "plexus/api/health", "/plexus/api/tasks")
    finally:
        proc.terminate()
        proc.wait(20)
    assert_refusals_logged_once(log_path.read_text())


async def test_the_standalone_server_closes_slow_and_idle_connections_and_caps_them_per_address(tmp_path):
    proc, url, _token = start_http(
        tmp_path,
        PLEXUS_MCP_HTTP_HEADER_TIMEOUT=str(SLOW["header"]),
        PLEXUS_MCP_HTTP_BODY_TIMEOUT=str(SLOW["body"]),
        PLEXUS_MCP_MAX_CONNECTIONS_PER_ADDRESS=str(SLOW["cap"]),
    )
    base = url.replace("/mcp", "/").replace("localhost", "127.0.0.1")
    try:
        await check_slow_clients(base, "health", "/mcp")
    finally:
        stop(proc)
    assert_refusals_logged_once(proc.stderr.read())


@pytest.mark.skipif(not hasattr(__import__("resource"), "prlimit"), reason="needs Linux prlimit")
async def test_a_connection_flood_never_exhausts_file_descriptors_or_floods_the_log(tmp_path):
    """More connections than the server has descriptors: the surplus is refused before accept() fails, the
    log gains a line or two, and an established keep-alive connection keeps getting health answers."""
    import resource

    proc, url, _token = start_http(tmp_path)
    base = url.replace("/mcp", "/").replace("localhost", "127.0.0.1")
    port = int(re.search(r":(\d+)/", base).group(1))
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (300, 300))  # the server's limit, as in a small container
    flood: list[socket.socket] = []
    try:
        other_address = httpx2.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx2.AsyncClient(
            transport=other_address, timeout=30, headers={"Host": f"localhost:{port}"}
        ) as http:

            async def ask() -> None:
                assert (await http.get(f"{base}health")).status_code == 200

            # The server's loop thread's CPU between two answers (loop_watch.py), not their latency: accept()
            # failing in a loop would spend it; a machine at a load of 10 only delays the answers.
            watch = HealthWatch(ask, proc.pid)
            await watch.measure_idle()  # also opens the keep-alive connection the checks below reuse

            async def health() -> None:
                await watch.once(watch.during, pause=0.0)

            for _ in range(400):
                flood.append(slow_connection(port, f"localhost:{port}", "/mcp", idle=True))
                if len(flood) % 100 == 0:
                    await health()
            await health()
            refused = await asyncio.gather(*(asyncio.to_thread(closed_by_server, s, 2) for s in flood[-50:]))
            assert all(refused), "connections past the descriptor budget were kept"
    finally:
        for sock in flood:
            sock.close()
        stop(proc)
    log = proc.stderr.read()
    assert "Too many open files" not in log, log[-3000:]
    assert_refusals_logged_once(log)
    watch.check(away=False)


def test_accept_errors_for_lack_of_descriptors_are_one_line_per_interval():
    """What the event loop logs when accept() fails with EMFILE (a traceback per attempt, ~396k of them in
    the attack) becomes one line a minute with a count; other errors pass unchanged."""
    from plexus_mcp_jupyter.security.connections import limit_accept_error_logs

    limit_accept_error_logs()
    capture = Capture()
    loop_log = logging.getLogger("asyncio")
    loop_log.addHandler(capture)
    try:
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                loop_log.error("Exception in callback BaseSelectorEventLoop._accept_connection", exc_info=True)
        try:
            raise ValueError("something else")
        except ValueError:
            loop_log.error("Exception in callback", exc_info=True)
    finally:
        loop_log.removeHandler(capture)
    emfile = [line for line in capture.lines if "Too many open files" in line]
    assert len(emfile) == 1 and "Traceback" not in emfile[0] and "ulimit" in emfile[0], capture.lines
    assert "ValueError: something else" in capture.text()


def test_stdio_writes_its_last_audit_records_when_terminated(tmp_path):
    """SIGTERM with stdin still open (a client or service manager ending the server): the shutdown path runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "plexus_mcp_jupyter.cli", "mcp", "serve", "--transport", "stdio"],
        env=plexus_env(tmp_path),
        cwd=str(REPO),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    messages = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_tasks", "arguments": {}}},
    ]
    try:
        for message in messages:
            proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()
        while json.loads(proc.stdout.readline()).get("id") != 2:
            pass  # the answer to the tool call: its audit record is queued now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 's.db'}")
    with engine.connect() as conn:
        actions = [r.action for r in conn.execute(sa.select(audit_table.c.action))]
    engine.dispose()
    assert actions == ["tool.list_tasks"], actions


def test_log_scrubbing_covers_the_sdk_loggers_and_never_breaks_a_malformed_log_call():
    from plexus_mcp_jupyter.security.redaction import LogScrubber, scrub_logs

    scrubber = SecretScrubber()
    scrubber.add("0123456789abcdef")
    sdk = logging.getLogger("mcp.server.streamable_http")
    capture = Capture()
    sdk.addHandler(capture)
    detach = scrub_logs(scrubber)
    try:
        sdk.error("Error handling POST request: %s", "bad argument 0123456789abcdef")
        assert any(isinstance(f, LogScrubber) for f in logging.getLogger("tornado.general").filters)
        # A malformed call is reported by logging's handlers, as without the filter, which must not raise.
        bad = logging.LogRecord("tornado.general", logging.WARNING, __file__, 1, "%d requests", ("many",), None)
        assert LogScrubber(scrubber).filter(bad)
    finally:
        detach()
        sdk.removeHandler(capture)
    assert "0123456789abcdef" not in capture.text() and "[redacted]" in capture.text()


async def test_a_url_full_of_question_marks_is_logged_without_stalling_the_server(server_url):
    # Unauthenticated: the 401 is logged with its URL, and every logged line passes the scrubber.
    # The scrubber runs on the event loop: its CPU there (loop_watch.py), not the request's latency, is bounded.
    async with httpx2.AsyncClient(timeout=120) as http:

        async def ask() -> None:
            assert (await http.get(f"{server_url}plexus/api/health")).status_code == 200

        refused = await watched(ask, lambda: http.get(f"{server_url}plexus/api/tasks?" + "?" * 30_000))
        assert refused.status_code in (401, 403)


@pytest.mark.parametrize(
    "text", ["?" * 200_000, "?a" * 100_000, "&" * 200_000, "?=" * 100_000, "?token" * 30_000, "plx_" * 50_000]
)
def test_scrubbing_is_linear_in_the_text(text):
    # Every log record and audit string passes the scrubber on the event loop, and a URL or a tool argument
    # is the client's to choose: 40 KB of '?' once took 10 s (quadratic), 200 KB would take minutes.
    scrubber = SecretScrubber()
    scrubber.add("0123456789abcdef")
    started = time.thread_time()  # CPU time: waiting for a core on a loaded machine does not count
    scrubber.scrub(text)
    assert time.thread_time() - started < 1.0
