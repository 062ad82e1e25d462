"""Large MCP request bodies (hardening): parsed off the event loop, and charged to their key by size.

A body near max_request_bytes (4 MiB) of many small JSON objects takes 60-200 ms of CPU to parse; parsed on the
event loop (as the SDK does), one key posting such bodies at its request rate stalls every other client. Real
Jupyter server, real HTTP, the loop's thread measured by tests/loop_watch.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import re
import threading
import time
from urllib.parse import urlsplit

import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic_core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClosedError, websocket_connect

from plexus_mcp_jupyter.handlers.health import HealthHandler
from plexus_mcp_jupyter.handlers.request_body import StreamedBody
from plexus_mcp_jupyter.security.bodies import JSON_ON_LOOP_BYTES, charge_identity, cooperative_loads, utf8_json_refusal

from .conftest import MODERN, poll
from .loop_watch import HealthWatch
from .raw_http import answer_before_body, chunked_answer, read_answer, request_head
from .test_speed_paths import MODERN_META

ITEM = {"k": 1, "v": "ab"}
HANDSHAKE = "2025-11-25"


def big_call(size: int, *, shape: str = "array", era: str = MODERN) -> bytes:
    """A tools/call of list_tasks (which refuses the unknown argument) with an argument of about `size` bytes."""
    if shape == "array":  # (each string its own: no parser's cache of strings makes them cheap)
        value: object = [{"k": i, "v": f"{i:x}"} for i in range(size // 28)]
    else:
        value = "a" * size
    params = {"name": "list_tasks", "arguments": {"junk": value}, "_meta": MODERN_META if era == MODERN else {}}
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}).encode()


def modern_headers(credential: str) -> dict[str, str]:
    return {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "list_tasks",
        "Authorization": f"Bearer {credential}",
    }


async def call_headers(http: httpx2.AsyncClient, url: str, credential: str, era: str) -> dict[str, str]:
    """The headers of a call in `era`: for the handshake era, of a session opened here."""
    if era == MODERN:
        return modern_headers(credential)
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {credential}",
    }
    hello = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    opened = await http.post(
        url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}, headers=headers
    )
    assert opened.status_code == 200, opened.text
    headers |= {"Mcp-Session-Id": opened.headers["mcp-session-id"], "MCP-Protocol-Version": HANDSHAKE}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await http.post(url, json=initialized, headers=headers)).status_code == 202
    return headers


@pytest.fixture
def plexus_config(plexus_config):
    plexus_config["rate_limit"] = 1000.0  # the request rate is not what bounds these floods
    plexus_config["rate_burst"] = 1000
    plexus_config["ws_message_rate"] = 5.0
    return plexus_config


@pytest.mark.parametrize("era", [MODERN, HANDSHAKE])
async def test_big_bodies_are_parsed_off_the_loop_while_small_calls_keep_answering(server_url, keys, runtime, era):
    runtime.body_budget.rate = runtime.body_budget.burst = 1e12  # the flood is bounded by its count, not its bytes
    # bodies of ~450,000 values: parsed here, not refused for their count (max_json_values, tests/test_hardening_inputs)
    runtime.settings.max_json_values = runtime.endpoint.max_json_values = 10**7
    url = f"{server_url}plexus/mcp"
    body = big_call(runtime.settings.max_request_bytes - 4096, era=era)
    assert len(body) < runtime.settings.max_request_bytes
    answers: list[int] = []
    async with httpx2.AsyncClient(timeout=120) as http:

        async def ask() -> None:  # another key's small call: health, anonymous, on the same loop
            response = await http.get(f"{server_url}plexus/api/health")
            assert response.status_code == 200, response.text

        headers = await call_headers(http, url, keys["viewer"], era)
        watch = HealthWatch(ask, None)
        await watch.measure_idle()

        async def flood() -> None:
            async def post(call_id: bytes) -> None:  # (a session's calls in flight must have their own ids)
                own = body.replace(b'"id": 7', b'"id": ' + call_id, 1)
                for _ in range(2):
                    answer = await http.post(url, content=own, headers=headers)
                    answers.append(answer.status_code)
                    assert "unknown argument(s) junk" in answer.text, answer.text[:300]

            await asyncio.gather(post(b"7"), post(b"8"), post(b"9"))

        await watch.around(flood())
    assert answers == [200] * 6
    # Parsed on the loop (as the SDK does), a body is 40-200 ms of it, and a stretch between two health answers has
    # 130-600 ms; off it, what is left of a body on the loop (its bytes read, the call answered) is 10-20 ms.
    cpu = max(c for c, _ in watch.during)
    print(f"largest loop CPU between two health answers during the flood: {cpu * 1000:.1f} ms")
    assert cpu < max(0.1, 3 * max(c for c, _ in watch.idle)), [round(c, 3) for c, _ in watch.during]


@pytest.mark.parametrize("era", [MODERN, HANDSHAKE])
async def test_a_parsed_body_is_not_kept_once_answered(server_url, keys, runtime, era):
    # Each parsed 4 MiB body was kept for seconds by the contexts copied while it was served (a cancelled timer
    # keeps its context until its deadline): 2.4 GB under a flood.
    runtime.body_budget.rate = runtime.body_budget.burst = 1e12
    runtime.settings.max_json_values = runtime.endpoint.max_json_values = 10**7  # parsed, not refused for its count
    url = f"{server_url}plexus/mcp"
    body = big_call(2 * 1024 * 1024, era=era)
    async with httpx2.AsyncClient(timeout=60) as http:
        headers = await call_headers(http, url, keys["viewer"], era)
        for _ in range(3):
            answer = await http.post(url, content=body, headers=headers)
            assert "unknown argument(s) junk" in answer.text, answer.text[:300]
        # (a session's dispatcher holds its last message until the next one: a small call replaces it)
        answer = await http.post(url, content=big_call(10, era=era), headers=headers)
        assert "unknown argument(s) junk" in answer.text, answer.text[:300]
    gc.collect()
    kept = [o for o in gc.get_objects() if type(o) is list and len(o) > 50_000]
    assert not kept, f"{len(kept)} parsed bodies still alive"


@pytest.mark.parametrize(
    "text",
    [
        '{"a": [1, 2.5, "x,y]", {"b": [true, false, null]}, [], {}], "c": "\\u00e9\\"", "d": {"e": {"f": [[[]]]}}}',
        json.dumps({"items": [ITEM] * 5000, "s": "q" * 70_000, "o": {str(i): [i, {"z": "}],"}] for i in range(3000)}}),
        json.dumps([[{"deep": [[["x,", {"y": "]"}]]] * 3}] * 2000, {"k": "v"}]),
        '{"dup": 1, "pad": "' + "p" * 70_000 + '", "dup2": [' + "1, " * 40_000 + '1], "dup": 2}',
        " [ 1 , 2 ,\n 3 ] ",
        json.dumps({str(i): {"a": i, "b": [i, i]} for i in range(3000)}),
        json.dumps([f'{i},a,"b",[{i}]' for i in range(5000)]),
        json.dumps([i * 1.5 for i in range(5000)] + [1e400, -0.0, 10**40]),
    ],
)
def test_the_cooperative_parse_reads_what_json_loads_reads(text):
    assert cooperative_loads(text, window=256) == json.loads(text)
    assert cooperative_loads(text) == json.loads(text)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(',[]{}":\\ ab\u00e9'),
    lambda children: st.lists(children) | st.dictionaries(st.text(',]}" ab', max_size=4), children),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, indent=st.sampled_from([None, 1]), window=st.sampled_from([8, 16, 64]))
def test_the_cooperative_parse_reads_any_json_as_json_loads_does(value, indent, window):
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    assert cooperative_loads(text, window=window) == json.loads(text)
    for cut in (len(text) // 3, len(text) // 2, len(text) - 1):  # truncated or spoilt: the same error
        for spoilt in (text[:cut], text[:cut] + "," + text[cut:], text[:cut] + "]" + text[cut:]):
            try:
                expected = json.loads(spoilt)
            except json.JSONDecodeError as wanted:
                with pytest.raises(json.JSONDecodeError) as got:
                    cooperative_loads(spoilt, window=window)
                assert (got.value.msg, got.value.pos) == (wanted.msg, wanted.pos), spoilt
            else:
                assert cooperative_loads(spoilt, window=window) == expected


TRAILING_COMMAS = [
    "[" + "1," * 5000 + "]",
    "[" + ", ".join(["[0, 1]"] * 2000) + " ,\n ]",
    "{" + ",".join(f'"k{n}": {n}' for n in range(3000)) + ",}",
    '{"a": [' + "0," * 3000 + '0], "b": {"c": 1, }}',
]


@pytest.mark.parametrize("text", TRAILING_COMMAS)
def test_a_trailing_comma_is_refused_as_this_python_s_json_loads_refuses_it(text):
    """A comma before a closing bracket, found walking element by element: the message and position json.loads has
    on the running Python (3.13 says "Illegal trailing comma before end of array" at the comma; 3.12 and earlier
    "Expecting value" after it)."""
    with pytest.raises(json.JSONDecodeError) as wanted:
        json.loads(text)
    for window in (8, 64, 4096):
        with pytest.raises(json.JSONDecodeError) as got:
            cooperative_loads(text, window=window)
        assert (got.value.msg, got.value.pos) == (wanted.value.msg, wanted.value.pos), window


@pytest.mark.parametrize(
    "text",
    [
        # a 200 kB string first spends the refused runs' budget; then each [0,0] was tried in a 4-character piece,
        # then in a 64 KiB one (copied, and a sleep): 90 times json.loads's CPU
        '[["' + "x" * 200_000 + '",0,0,0],' + ",".join(["0,[0,0]"] * 24_000) + ',"' + "y" * 70_000 + '"]',
        # small elements before a last one larger than the window: no comma past the window to cut a run at
        "[" + ",".join(["0,[0,0]"] * 8000) + ',"' + "y" * 70_000 + '"]',
    ],
)
def test_the_cooperative_parse_copies_at_most_a_few_times_the_text(monkeypatch, text):
    """What the cooperative parse costs beyond json.loads is the pieces it copies for the C parser (each a slice of
    the text): counted, not timed, they add up to at most a few times the text's length."""
    from plexus_mcp_jupyter.security import bodies

    copied = [0, 0]  # characters, pieces
    scan = bodies._SCAN

    def counted(piece: str, index: int):
        if piece is not text:  # (the text itself is scanned in place, not copied)
            copied[0] += len(piece)
            copied[1] += 1
        return scan(piece, index)

    monkeypatch.setattr(bodies, "_SCAN", counted)
    assert cooperative_loads(text) == json.loads(text)
    assert copied[0] <= 4 * len(text), copied
    assert copied[1] <= len(text) // 1000, copied  # (a few hundred at most: not one per element)


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2,",
        '{"a": [1, 2, 3], "b": ',
        "[" + "1, " * 30_000 + "]",
        "[[" + "1, " * 30_000 + "], 2]",  # (a run that closes early is kept only if it read an element)
        '{"a": [' + "1, " * 30_000 + "1],}",
        '{"a": 1,}',
        "[1] x",
        "",
        '"abc',
    ],
)
def test_the_cooperative_parse_refuses_what_json_loads_refuses(text):
    with pytest.raises(json.JSONDecodeError) as wanted:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        cooperative_loads(text, window=256)
    assert got.value.msg == wanted.value.msg


@pytest.mark.parametrize(
    "text",
    [
        rb'["\ud800"]',
        rb'["\udc00x"]',
        rb'["\ud83d\ude00", "\uD83D\uDE00", "\u00e9"]',
        rb'["\\ud800", "\\\\udc00"]',
        rb'["\\\ud800"]',
        rb'["\ud800\\\udc00"]',
        rb'["\ud800\ud800\udc00"]',
        rb'["\ud800\u0041"]',
        '["\u00e9"]'.encode("utf-16"),
        '["x"]'.encode("utf-16-le"),
        '["x"]'.encode("utf-32"),
        '["x"]'.encode("utf-8-sig"),
        b'["\xed\xa0\x80"]',
        '["\u00e9 \U0001f600"]'.encode(),
    ],
)
def test_the_utf8_refusal_refuses_what_the_sdk_parse_refuses_and_json_loads_reads(text):
    json.loads(text)  # (each is JSON to json.loads)
    try:
        pydantic_core.from_json(text)
        refused = False
    except ValueError:
        refused = True
    assert (utf8_json_refusal(text) is not None) == refused, text
    padded = text[:-1] + b", " + b'"' + b"p" * JSON_ON_LOOP_BYTES + b'"]' if text.startswith(b"[") else None
    if padded is not None:  # the same, past a piece of the scan
        assert (utf8_json_refusal(padded) is not None) == refused, text


@pytest.mark.parametrize("era", [MODERN, HANDSHAKE])
@pytest.mark.parametrize("size", [1000, 200_000])
@pytest.mark.parametrize("encoding", ["lone surrogate", "utf-16"])
async def test_a_body_the_sdk_parse_refuses_is_refused_at_any_size(server_url, keys, runtime, era, size, encoding):
    # The handshake-era SDK parses a body with pydantic_core.from_json, which refuses a lone surrogate escape and a
    # text that is not UTF-8; a body over 64 KiB is parsed here (json.loads's reading) and must be refused alike. The
    # 2026-07-28 entry parses with json.loads, which reads both: the call reaches the tool at any size.
    url = f"{server_url}plexus/mcp"
    call = json.loads(big_call(size, shape="string", era=era))
    call["params"]["arguments"]["junk"] += "\ud800"
    body = json.dumps(call).encode()  # (the lone surrogate escaped: \ud800)
    if encoding == "utf-16":
        body = json.dumps(json.loads(big_call(size, shape="string", era=era))).encode("utf-16")
    assert (len(body) > JSON_ON_LOOP_BYTES) == (size > JSON_ON_LOOP_BYTES)
    async with httpx2.AsyncClient(timeout=60) as http:
        headers = await call_headers(http, url, keys["operator"], era)
        answer = await http.post(url, content=body, headers=headers)
    if era == MODERN:
        assert "unknown argument(s) junk" in answer.text, answer.text[:300]
        return
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["code"] == -32700 and error["message"].startswith("Parse error: "), error


async def test_a_key_over_its_byte_budget_gets_a_429_with_retry_after(server_url, keys, runtime):
    budget = runtime.body_budget
    budget.rate, budget.burst = 100_000.0, 700_000.0  # bytes per second, bytes at once
    body = big_call(300_000, shape="string")
    url = f"{server_url}plexus/mcp"
    async with httpx2.AsyncClient(timeout=60) as http:
        statuses = []
        for _ in range(3):
            answer = await http.post(url, content=body, headers=modern_headers(keys["viewer"]))
            statuses.append(answer.status_code)
        assert statuses[:2] == [200, 200], statuses
        assert statuses[2] == 429, (statuses, answer.text[:300])
        assert int(answer.headers["Retry-After"]) >= 1
        message = answer.json()["error"]["message"]
        assert "request_bytes_rate" in message and "\n" not in message, message
        # Another key's budget is its own; small bodies are not charged.
        answer = await http.post(url, content=body, headers=modern_headers(keys["operator"]))
        assert answer.status_code == 200, answer.text[:300]
        small = big_call(1000, shape="string")
        answer = await http.post(url, content=small, headers=modern_headers(keys["viewer"]))
        assert answer.status_code == 200, answer.text[:300]
        # A REST JSON body over 64 KiB is charged to the same budget.
        rest = json.dumps({"task_ids": ["x" * 300_000]})
        auth = {"Authorization": f"Bearer {keys['operator2']}"}
        statuses = [
            (await http.post(f"{server_url}plexus/api/tasks/cancel", content=rest, headers=auth)).status_code
            for _ in range(3)
        ]
        assert statuses[2] == 429 and 429 not in statuses[:2], statuses


async def route_of(server_url: str, credential: str, route: str) -> tuple[str, dict[str, str]]:
    """The URL and headers of a POST with a body: "rest" (tasks/cancel), "mcp modern", "mcp handshake" (a session's)."""
    if route == "rest":
        return f"{server_url}plexus/api/tasks/cancel", {"Authorization": f"Bearer {credential}"}
    url = f"{server_url}plexus/mcp"
    async with httpx2.AsyncClient(timeout=30) as http:
        return url, await call_headers(http, url, credential, MODERN if route == "mcp modern" else HANDSHAKE)


def drain_budget(runtime, credential: str) -> None:
    """Empty the byte budget of a key: its next large body is over it."""
    identity, _ = charge_identity(runtime.admit_key(credential))
    runtime.body_budget.take(identity, cost=runtime.body_budget.burst)


@pytest.mark.parametrize("route", ["mcp modern", "mcp handshake", "rest"])
async def test_a_body_over_the_byte_budget_gets_its_429_after_it_is_read_and_others_are_refused_unread(
    server_url, keys, runtime, route
):
    # Tornado read a whole body before the handler ran: a refusal cost the loop the read of 4 MiB, kept and joined.
    # Now an unauthenticated body is refused once its headers are in, unread; a 429 of a key over its byte budget
    # waits for the body (read, not kept), so that a client writing its whole body first (httpx, the MCP SDK's)
    # reads the 429 and its Retry-After rather than a reset.
    budget = runtime.body_budget
    budget.rate, budget.burst = 1000.0, 8 * 1024 * 1024
    declared = runtime.settings.max_request_bytes - 1000
    url, headers = await route_of(server_url, keys["operator"], route)
    drain_budget(runtime, keys["operator"])
    answer = await answer_before_body(url, headers, declared, b'{"jsonrpc": "2.0", "id": 1, ' + b" " * 1000, wait=1.0)
    assert answer.status is None and not answer.closed, answer  # the server waits for the body
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"' + b" " * (declared - 45) + b"}"
    assert len(body) == declared
    async with httpx2.AsyncClient(timeout=60) as http:
        for _ in range(2):  # (and the connection stays open for the next request)
            refused = await http.post(url, content=body, headers=headers)
            assert refused.status_code == 429, refused.text[:300]
            assert int(refused.headers["Retry-After"]) >= 1 and "request_bytes_rate" in refused.text, refused.text
            assert refused.headers.get("connection") != "close", refused.headers
    # Unauthenticated, the same declared body is refused unread.
    anonymous = {k: v for k, v in headers.items() if k != "Authorization"}
    answer = await answer_before_body(url, anonymous, declared, b"{")
    assert answer.status == 401 and answer.closed, answer
    # A small body's refusal waits for it: the client that wrote it all reads the answer, the connection stays open.
    answer = await answer_before_body(url, anonymous, 100, b"{" + b" " * 98 + b"}")
    assert answer.status == 401 and not answer.closed and "connection" not in answer.headers, answer
    answer = await answer_before_body(url, anonymous, 2, b"{}", method="PUT")  # (a method it lacks: still a 401)
    assert answer.status == 401, answer


@pytest.mark.parametrize("route", ["mcp modern", "rest"])
async def test_a_body_over_max_request_bytes_is_refused_before_it_is_read(server_url, keys, runtime, route):
    runtime.body_budget.rate = runtime.body_budget.burst = 1e12
    url, headers = await route_of(server_url, keys["operator"], route)
    answer = await answer_before_body(url, headers, 512 * 1024 * 1024, b"{")  # (Jupyter's max_body_size)
    assert answer.status == 413 and "(max_request_bytes)" in answer.body.decode() and answer.closed, answer


def live_streamed_handlers() -> int:
    gc.collect()
    return sum(isinstance(o, StreamedBody) for o in gc.get_objects())


async def closed_mid_body(url: str, headers: dict[str, str], declared: int, sent: bytes, method: str = "POST") -> None:
    """Send the headers of a request declaring `declared` bytes and `sent` of them, then close the connection."""
    parts = urlsplit(url)
    _, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(request_head(url, method, {**headers, "Content-Length": str(declared)}) + sent)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()


@pytest.mark.parametrize("route", ["mcp modern", "mcp handshake", "rest", "events"])
async def test_a_connection_closed_mid_body_leaves_no_handler_behind(server_url, keys, runtime, route):
    # A streamed handler waits for the rest of its body after prepare(); only tornado's on_connection_close ends
    # that wait, and the MCP handlers' own one did not call it: each such request's handler, task and body so far
    # were kept for good (an anonymous client could pile them up).
    # (The event WebSocket's GET too: WebSocketHandler's on_connection_close does not call tornado's.)
    method = "GET" if route == "events" else "POST"
    if route == "events":
        url, headers = f"{server_url}plexus/api/events", {"Authorization": f"Bearer {keys['operator']}"}
    else:
        url, headers = await route_of(server_url, keys["operator"], route)
    anonymous = {k: v for k, v in headers.items() if k != "Authorization"}
    before = live_streamed_handlers()
    for _ in range(4):
        await closed_mid_body(url, headers, 60_000, b"{" + b" " * 1000, method)
        await closed_mid_body(url, anonymous, 1000, b"{", method)
    await poll(live_streamed_handlers, lambda n: n <= before, timeout=20)


@pytest.mark.parametrize("route", ["mcp modern", "rest"])
async def test_a_large_body_on_a_method_that_takes_none_is_refused_unread(server_url, keys, runtime, route):
    url, headers = await route_of(server_url, keys["operator"], route)
    answer = await answer_before_body(url, headers, 4 * 1024 * 1024, b"{", method="GET")
    assert answer.status == 413 and answer.closed and "GET" in answer.body.decode(), answer


async def test_a_body_a_little_over_max_request_bytes_gets_its_413_through_the_sdk_s_http_client(
    server_url, keys, runtime
):
    # A client that writes its whole body before it reads (httpx, the MCP SDK's) saw a reset rather than the 413
    # when the body outgrew the sockets' buffers: up to twice the bound the body is read, dropped, and answered.
    runtime.body_budget.rate = runtime.body_budget.burst = 1e12
    url, headers = await route_of(server_url, keys["operator"], "mcp modern")
    size = runtime.settings.max_request_bytes + 512 * 1024
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"' + b" " * (size - 45) + b"}"
    async with httpx2.AsyncClient(timeout=60) as http:
        for _ in range(3):
            answer = await http.post(url, content=body, headers=headers)
            assert answer.status_code == 413 and "max_request_bytes" in answer.text, answer.text[:300]


async def test_a_dataset_body_is_read_only_once_its_sender_is_admitted(server_url, token):
    # A DataFrame's bytes (up to Jupyter's 512 MiB) were read before the credential was checked: now an anonymous
    # one is refused unread, a registration's and an upload part's alike.
    api = f"{server_url}plexus/api/datasets"
    parquet = {"Content-Type": "application/vnd.apache.parquet"}
    answer = await answer_before_body(f"{api}?name=big", parquet, 64 * 1024 * 1024, b"PAR1")
    assert answer.status == 401 and answer.closed, answer
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        began = await http.post(f"{api}/uploads", params={"name": "parts"})
    assert began.status_code == 201, began.text
    part = f"{api}/uploads/{began.json()['upload_id']}?part=0"
    answer = await answer_before_body(part, {}, 64 * 1024 * 1024, b"x", method="PUT")
    assert answer.status == 401 and answer.closed, answer
    # An upload's commit or abort reads no body: past 64 KiB, refused unread, its sender's admitted or not.
    upload = part.removesuffix("?part=0")
    for method in ("POST", "DELETE"):
        answer = await answer_before_body(upload, {"Authorization": f"Bearer {token}"}, 64 * 1024 * 1024, b"x", method)
        assert answer.status == 413 and answer.closed and method in answer.body.decode(), answer


async def test_a_dataset_body_its_sender_may_not_register_is_refused_unread(server_url, token, keys, runtime):
    # A registration's role, its sender's quota of registered bytes and max_dataset_upload_bytes were checked once the
    # whole body (up to Jupyter's 512 MiB) had been read: now from its headers, the body unread (403, 413, 404).
    big = 64 * 1024 * 1024
    api = f"{server_url}plexus/api/datasets"
    parquet = {"Content-Type": "application/vnd.apache.parquet"}

    def as_(key: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[key]}", **(extra or {})}

    answer = await answer_before_body(f"{api}?name=big", as_("viewer", parquet), big, b"PAR1")
    assert answer.status == 403 and answer.closed and "register" in answer.body.decode(), answer
    # A sender already at its quota of registered bytes (max_registered_bytes_per_principal); one below it is read,
    # its stored size checked (a Parquet body is re-encoded: its size as sent is not what it adds)
    first = io.BytesIO()
    pq.write_table(pa.table({"label": ["a", "b"]}), first)
    async with httpx2.AsyncClient(headers=as_("operator", parquet), timeout=30) as http:
        registered = await http.post(f"{api}?name=first", content=first.getvalue())
        assert registered.status_code == 201, registered.text
    runtime.catalog.max_registered_bytes = (runtime.catalog.registered_dir / "first.parquet").stat().st_size
    answer = await answer_before_body(f"{api}?name=big", as_("operator", parquet), big, b"PAR1")
    assert answer.status == 403 and answer.closed and "max_registered_bytes_per_principal" in answer.body.decode()
    runtime.catalog.max_registered_bytes = 0
    runtime.uploads.max_bytes = 1024 * 1024  # (max_dataset_upload_bytes)
    answer = await answer_before_body(f"{api}?name=big", as_("operator", parquet), big, b"PAR1")
    assert answer.status == 413 and answer.closed and "max_dataset_upload_bytes" in answer.body.decode(), answer
    async with httpx2.AsyncClient(headers=as_("operator"), timeout=30) as http:
        began = await http.post(f"{api}/uploads", params={"name": "parts"})
        assert began.status_code == 201, began.text
        part = f"{api}/uploads/{began.json()['upload_id']}?part=0"
        answer = await answer_before_body(part, as_("viewer"), big, b"x", method="PUT")
        assert answer.status == 403 and answer.closed, answer
        answer = await answer_before_body(part, as_("operator2"), big, b"x", method="PUT")  # not theirs
        assert answer.status == 404 and answer.closed, answer
        # A part within what the upload has left is taken; one past it discards the upload (as once read), unread.
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, pa.schema([("label", pa.string())])) as writer:
            writer.write_table(pa.table({"label": ["a", "b"]}))
        taken = await http.put(part, content=sink.getvalue().to_pybytes())
        assert taken.status_code == 200 and taken.json()["rows"] == 2, taken.text
        next_part = part.replace("part=0", "part=1")
        answer = await answer_before_body(next_part, as_("operator"), big, b"x", method="PUT")
        assert answer.status == 413 and answer.closed, answer
        assert "max_dataset_upload_bytes setting) and was discarded" in answer.body.decode(), answer
        assert (await http.post(part.removesuffix("?part=0"))).status_code == 404  # (discarded)
        body = io.BytesIO()
        pq.write_table(pa.table({"label": ["a", "b"]}), body)
        registered = await http.post(f"{api}?name=small", content=body.getvalue(), headers=parquet)
        assert registered.status_code == 201, registered.text


@pytest.mark.parametrize("route", ["mcp modern", "mcp handshake", "rest"])
async def test_a_chunked_body_is_charged_and_bounded_as_it_arrives(server_url, keys, runtime, route):
    # Without a Content-Length the body's size is known only as it comes: charged past 64 KiB, refused once over
    # the budget (429) or past max_request_bytes (413), before the rest is read.
    budget = runtime.body_budget
    budget.rate, budget.burst = 1000.0, 300_000
    url, headers = await route_of(server_url, keys["operator"], route)
    chunk = b" " * (64 * 1024)
    answer, sent = await chunked_answer(url, headers, chunk, 40)
    assert answer.status == 429 and "request_bytes_rate" in answer.body.decode(), (answer, sent)
    assert sent <= 6, sent  # (300,000 bytes: the fifth chunk is over)
    budget.rate = budget.burst = 1e12
    runtime.settings.max_request_bytes = 256 * 1024
    answer, sent = await chunked_answer(url, headers, chunk, 40)
    assert answer.status == 413 and "(max_request_bytes)" in answer.body.decode() and sent <= 6, (answer, sent)


async def test_an_event_websocket_is_metered_per_connection(server_url, keys, runtime):
    rate = runtime.settings.ws_message_rate  # 5 a second, 10 at once (plexus_config)
    url = server_url.replace("http://", "ws://") + "plexus/api/events"
    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"Bearer {keys['operator']}"}))
    try:
        json.loads(await asyncio.wait_for(ws.read_message(), 10))  # hello
        count = 20
        started = time.monotonic()
        for _ in range(count):
            await ws.write_message(json.dumps({"type": "no such type"}))
        for _ in range(count):  # each is answered (an error saying which types there are): slowed, never dropped
            answer = json.loads(await asyncio.wait_for(ws.read_message(), 30))
            assert answer["type"] == "error", answer
        took = time.monotonic() - started
        assert took >= (count - 2 * rate) / rate * 0.9, f"{count} messages answered in {took:.2f} s"
        # A message is charged to its sender's byte budget by its UTF-8 bytes: 80,000 here, in 40,000 characters.
        budget = runtime.body_budget
        charged: list[int] = []
        taken = budget.take

        def counted(identity: str, rate: float | None = None, cost: float = 1.0) -> float:
            charged.append(int(cost))
            return taken(identity, rate, cost)

        budget.take = counted
        try:
            wide = json.dumps({"type": "no such type", "pad": "\u00e9" * 40_000}, ensure_ascii=False)
            await ws.write_message(wide)
            answer = json.loads(await asyncio.wait_for(ws.read_message(), 30))
            assert answer["type"] == "error", answer
        finally:
            del budget.take
        assert charged == [len(wide.encode())], (charged, len(wide))
        # A message over max_request_bytes closes the socket before it is read.
        with contextlib.suppress(WebSocketClosedError):  # (closed as soon as the frame's header is read)
            await ws.write_message(json.dumps({"type": "x", "pad": "p" * runtime.settings.max_request_bytes}))
        while await asyncio.wait_for(ws.read_message(), 10) is not None:
            pass
        assert ws.close_code == 1009, ws.close_code
    finally:
        ws.close()


# A sample for each of the Plexus routes' URL parameters: a route with a new one fails here until it has one.
ROUTE_SAMPLES = {
    "task_id": "t1",
    "batch_id": "b1",
    "evaluation_id": "e1",
    "upload_id": "0" * 32,
    "ref": "registered:x",
    "key_id": "k1",
}


def rules_of(router) -> list:
    """A router's rules, those of the routers it holds (each host's: Jupyter adds its handlers so) flattened."""
    rules = []
    for rule in router.rules:
        rules.extend(rules_of(rule.target) if hasattr(rule.target, "rules") else [rule])
    return rules


def plexus_routes(web_app) -> list[tuple[str, type]]:
    """Each Plexus route the running server has (from its router, not a list kept here): a sample path, its handler."""
    routes = []
    for rule in rules_of(web_app.default_router):
        pattern = getattr(rule.matcher, "regex", None)
        if pattern is None or "/plexus/" not in pattern.pattern:
            continue
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: ROUTE_SAMPLES[m[1]], pattern.pattern)
        path = path.removesuffix("$").replace("/?", "")
        assert pattern.fullmatch(path), (pattern.pattern, path)
        routes.append((path, rule.target))
    assert len(routes) >= 20, routes  # (the router's layout changed: this test would check nothing)
    return routes


async def test_every_route_refuses_an_anonymous_body_before_reading_it(jp_serverapp, server_url, jp_http_port):
    # Tornado reads a handler's whole body (up to Jupyter's max_body_size, 512 MiB) before the handler runs, unless
    # it is a StreamedBody: a cancel, a key's revocation, an upload's start or a dataset's deletion (and any route
    # with a method it lacks, or a GET with a body) let an anonymous client make the server buffer that much.
    # Every route, every method, from the server's own routes: refused once its headers are in, the body unread.
    origin = f"http://localhost:{jp_http_port}"
    asked = [
        (m, path, h)
        for path, h in plexus_routes(jp_serverapp.web_app)
        for m in ("POST", "PUT", "PATCH", "DELETE", "GET")
    ]
    answers = await asyncio.gather(
        *(answer_before_body(f"{origin}{path}", {}, 64 * 1024 * 1024, b"{", method=m, wait=2) for m, path, _ in asked)
    )
    refused = [
        (method, path, getattr(handler, "__name__", handler), answer.status, answer.closed)
        for (method, path, handler), answer in zip(asked, answers, strict=True)
        # (health answers anyone: its refusal is the 413 of a body it does not read)
        if answer.status not in ((413,) if handler is HealthHandler else (401, 403)) or not answer.closed
    ]
    assert not refused, refused


async def test_a_chunked_upload_part_past_what_the_upload_has_left_discards_it(server_url, keys, runtime):
    """A part declaring more than its upload has left of max_dataset_upload_bytes is refused 413 and the upload
    discarded (as a part read past it is); a chunked one was refused 413 as it arrived, its upload kept. The upload
    is discarded before the 413 is sent: its discard had been queued on the catalog's threads, and a commit sent at
    once after the 413 that said "discarded" ran first."""
    api = f"{server_url}plexus/api/datasets/uploads"
    headers = {"Authorization": f"Bearer {keys['operator']}"}
    runtime.uploads.max_bytes = 200_000
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        began = await http.post(api, params={"name": "chunked"})
        assert began.status_code == 201, began.text
        upload = f"{api}/{began.json()['upload_id']}"
        answer, sent = await chunked_answer(f"{upload}?part=0", headers, b"x" * 65_536, 10, method="PUT")
        assert answer.status == 413 and answer.closed and sent <= 5, (answer, sent)
        assert "max_dataset_upload_bytes setting), and the upload was discarded" in answer.body.decode(), answer
        committed = await http.post(upload)
        assert committed.status_code == 404, committed.text  # (over: not "has no rows")
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, pa.schema([("label", pa.string())])) as writer:
            writer.write_table(pa.table({"label": ["a", "b"]}))

        async def part() -> int:
            return (await http.put(upload, params={"part": "0"}, content=sink.getvalue().to_pybytes())).status_code

        assert await poll(part, lambda status: status == 404, timeout=10) == 404  # (discarded: no such upload)


async def test_a_chunked_part_past_its_bound_waits_for_a_commit_under_way(server_url, keys, runtime, monkeypatch):
    """A chunked part that passes what its upload has left while a commit of that upload is under way (past its
    check that the upload is open) is answered once the commit is done, saying the upload was over already: it had
    been marked over without the upload's lock, the 413 saying "discarded" while the commit registered it."""
    api = f"{server_url}plexus/api/datasets/uploads"
    headers = {"Authorization": f"Bearer {keys['operator']}"}
    uploads = runtime.uploads
    uploads.max_bytes = 200_000
    admitted, committing, closing, release = (threading.Event() for _ in range(4))
    admit_part, admit, close_upload = uploads.admit_part, uploads.catalog.admit, uploads.close_upload

    def admitted_part(*args):
        left = admit_part(*args)
        admitted.set()
        return left

    def held_admit(*args, **kwargs):
        committing.set()
        assert release.wait(30)
        return admit(*args, **kwargs)

    def closed(*args):
        closing.set()
        return close_upload(*args)

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("label", pa.string())])) as writer:
        writer.write_table(pa.table({"label": ["a", "b"]}))
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        began = await http.post(api, params={"name": "raced"})
        assert began.status_code == 201, began.text
        upload = f"{api}/{began.json()['upload_id']}"
        first = await http.put(upload, params={"part": "0"}, content=sink.getvalue().to_pybytes())
        assert first.status_code == 200, first.text
        monkeypatch.setattr(uploads, "admit_part", admitted_part)
        monkeypatch.setattr(uploads.catalog, "admit", held_admit)
        monkeypatch.setattr(uploads, "close_upload", closed)
        parts = urlsplit(upload)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            writer.write(request_head(f"{upload}?part=1", "PUT", {**headers, "Transfer-Encoding": "chunked"}))
            chunk = b"x" * 65_536
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
            assert await asyncio.to_thread(admitted.wait, 30)  # the part admitted, its body arriving
            commit = asyncio.ensure_future(http.post(upload))
            assert await asyncio.to_thread(committing.wait, 30)  # the commit past its check, the upload's lock held
            for _ in range(3):  # past what the upload has left
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
            assert await asyncio.to_thread(closing.wait, 30)
            release.set()
            committed = await commit
            answer = await read_answer(reader, 30)
        finally:
            release.set()
            writer.close()
    assert committed.status_code == 201, committed.text
    assert answer.status == 413, answer
    assert "and the upload was over already (committed or aborted" in answer.body.decode(), answer
