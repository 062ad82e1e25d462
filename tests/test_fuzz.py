"""Property-based fuzzing (hypothesis) of every tool's arguments and of raw JSON-RPC bodies.

What the server must do with anything a client sends: answer with a clear, short error (a tool error or a
JSON-RPC error), never an HTTP 500, never a JSON-RPC internal error, never a traceback or an internal
exception dump, and stay alive. Examples are generated first (deterministically: `derandomize=True`, no
example database), then replayed through one session, so hypothesis never runs inside the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import patch

import httpx2
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mcp import MCPError

from plexus_mcp_jupyter.core.ownership import KEY_OWNER_PREFIX
from plexus_mcp_jupyter.core.store import TaskFilter

from .conftest import MODERN, open_client
from .raw_http import answer_before_body

MAX_BODY = 64 * 1024  # max_request_bytes of the server under test: a body just over it is cheap to send
TOOL_EXAMPLES = 40  # argument sets per tool
RAW_EXAMPLES = 220  # raw bodies per run
VIEWER_TOOL_EXAMPLES = 15
VIEWER_RAW_EXAMPLES = 80
MAX_MESSAGE = 500  # characters of an error message

INTERNAL_ERROR = -32603
LEAKS = re.compile(
    r"Traceback|File \"|pydantic_core|errors\.pydantic\.dev|validation errors? for|sqlalchemy|sqlite3\.|"
    r"tornado\.|anyio\.|starlette\.|object has no attribute|unexpected keyword argument|NoneType"
)
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
LEGACY_VERSION = "2025-11-25"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "fuzz", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


@pytest.fixture
def plexus_config(plexus_config):
    # Fuzzing is many requests quickly: the per-key rate limit would answer most of them with 429.
    return {**plexus_config, "max_request_bytes": MAX_BODY, "rate_limit": 100_000.0, "rate_burst": 100_000}


def generate(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """`n` examples of `strategy`, the same ones on every run."""
    examples: list[Any] = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        examples.append(example)

    with no_local_constants():
        collect()
    return examples


@contextmanager
def no_local_constants() -> Iterator[None]:
    """Hypothesis mixes in constants mined from the modules loaded so far, which vary from run to run (imports
    made by the server's threads): without them, the same examples come out every time."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - another hypothesis layout
        yield
        return
    if not hasattr(providers, "_get_local_constants") or not hasattr(providers, "CONSTANTS_CACHE"):
        yield  # pragma: no cover
        return
    empty = providers.Constants()
    providers.CONSTANTS_CACHE.cache.clear()
    with patch.object(providers, "_get_local_constants", lambda: empty):
        try:
            yield
        finally:
            providers.CONSTANTS_CACHE.cache.clear()


# -- strategies -------------------------------------------------------------------------------------------

HUGE = "x" * 20_000


def large(make: Callable[[], Any]) -> st.SearchStrategy[Any]:
    """A large constant, built when drawn (hypothesis would otherwise put it in the strategy's repr)."""
    return st.just(None).map(lambda _: make())


NASTY_STRINGS = (
    large(lambda: HUGE)
    | large(lambda: "é" * 3000)
    | st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\n",
            "..",
            "../../../../etc/passwd",
            "/etc/passwd",
            "%00",
            "a%00b",
            "%2e%2e%2f",
            "\\..\\",
            "' OR 1=1 --",
            '"; DROP TABLE tasks; --',
            "${jndi:x}",
            "{{7*7}}",
            "\u202e\u200b",
            "😀" * 50,
            "null",
            "NaN",
            "-1",
            "1e999",
            "0x10",
            "QUEUED",
            "queued",
            "example:sentiment",
            "example:../../x",
            "file:///etc/passwd",
            "python:os:system",
            "python:plexus_mcp_jupyter.evaluations.examples.scorers:nope",
            "column:",
            "column:label",
            "a" * 65,
            "\ud7ff\ue000",
            "*",
            "%",
            "_",
        ]
    )
)
TEXT = st.text(max_size=30) | NASTY_STRINGS
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=8
)
ODD_VALUES = large(lambda: HUGE) | st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        1,
        0.5,
        -0.0,
        1e308,
        -1e308,
        2**63,
        -(2**63) - 1,
        2**70,
        [],
        {},
        [None],
        {"a": {"b": [1, {"c": None}]}},
        [[[]]],
        "",
    ]
)


def schema_types(schema: dict[str, Any]) -> set[str]:
    found = {schema["type"]} if isinstance(schema.get("type"), str) else set(schema.get("type") or [])
    for option in schema.get("anyOf", []):
        found |= schema_types(option)
    return found


def bound(schema: dict[str, Any], key: str) -> Any:
    for option in [schema, *schema.get("anyOf", [])]:
        if key in option:
            return option[key]
    return None


def plausible(name: str, schema: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the right shape, valid or just outside what is allowed."""
    types = schema_types(schema)
    options: list[st.SearchStrategy[Any]] = []
    low, high = bound(schema, "minimum"), bound(schema, "maximum")
    if "integer" in types or "number" in types:
        edges = [v for v in (low, high) if v is not None]
        edges += [v + d for v in edges for d in (-1, 1)]
        options.append(st.sampled_from(edges or [0, 1, -1]))
        options.append(
            st.integers(
                min_value=int(low) if low is not None else None,
                max_value=min(int(high), 50) if high is not None else 50,
            )
        )
        if "number" in types:
            options.append(st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False))
    if "string" in types:
        options.append(TEXT)
        options.append(
            st.sampled_from(
                {
                    "type": ["accuracy", "feedback", "consistency", "ACCURACY", "nope"],
                    "dataset": ["example:sentiment", "example:fraud", "example:nope", "sentiment.csv", "../x.csv"],
                    "label_column": ["label", "nope"],
                    "prediction_column": ["prediction", "label", "nope"],
                    "input_column": ["text", "nope"],
                    "id_column": ["id", "nope"],
                    "scorer": ["column:prediction", "column:nope", "python:os:system", "rules", "python:"],
                    "scorecard": ["card.yaml", "../../etc/passwd", "/etc/passwd"],
                    "since": ["2024-01-01", "2024-01-01T00:00:00Z", "yesterday", "9999-99-99", "-1"],
                    "cursor": ["eyJ4IjogMX0=", "!!!", "e30", "Zm9v"],
                }.get(name, ["x"])
            )
        )
        if bound(schema, "maxLength"):
            options.append(st.just("t" * (bound(schema, "maxLength") + 1)))
    if "array" in types:
        items = next((o.get("items", {}) for o in [schema, *schema.get("anyOf", [])] if "items" in o), {})
        ref = items.get("$ref", "").rsplit("/", 1)[-1]
        enum = defs.get(ref, {}).get("enum") or ["demo", "evaluation", "accuracy"]
        element = st.sampled_from([*enum, *(e.lower() for e in enum if isinstance(e, str))]) | TEXT
        options.append(st.lists(element, max_size=5))
        options.append(st.lists(element, min_size=101, max_size=102))
    if "boolean" in types:
        options.append(st.booleans() | st.sampled_from(["true", "yes", 1, 0, "0"]))
    if "object" in types:
        options.append(
            st.fixed_dictionaries(
                {"kind": st.sampled_from(["rules", "nope"]) | TEXT},
                optional={"rules": st.lists(JSON, max_size=3), "default": TEXT, "input_column": TEXT},
            )
        )
    if "null" in types:
        options.append(st.none())
    return st.one_of(*options) if options else JSON


def arguments_for(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Schema-shaped argument sets (each value right, wrong-typed, out of range, odd) and random objects."""
    properties = schema.get("properties", {})
    defs = schema.get("$defs", {})
    value = {name: plausible(name, prop, defs) | ODD_VALUES | JSON for name, prop in properties.items()}
    shaped = st.tuples(
        st.fixed_dictionaries({}, optional=value),
        st.dictionaries(TEXT, JSON, max_size=2) | st.just({}),  # unknown extra keys, sometimes
        st.booleans(),
    ).map(lambda t: {**t[0], **t[1]} if t[2] else t[0])
    return st.one_of(shaped, shaped, st.dictionaries(TEXT, JSON, max_size=5))


def _coercible_number(value: Any) -> bool:
    """Whether pydantic (lax) might take `value` as a number: then it could start real work."""
    if isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
            return True
        except ValueError:
            return False
    return False


def cap(tool: Any, arguments: Any) -> Any:
    """Keep fuzzed calls from starting heavy work: a demo task that would run gets 2 items without delay."""
    if tool == "run_demo_task" and isinstance(arguments, dict):
        arguments = dict(arguments)
        if "items" not in arguments or _coercible_number(arguments["items"]):
            arguments["items"] = 2
        if "item_delay_ms" not in arguments or _coercible_number(arguments["item_delay_ms"]):
            arguments["item_delay_ms"] = 0
        if isinstance(arguments.get("fail_at"), (int, float, str)):
            arguments.pop("fail_at")
    if tool == "cancel_tasks" and isinstance(arguments, dict) and _coercible_number(arguments.get("wait_seconds")):
        arguments = {**arguments, "wait_seconds": 0}
    if tool == "dispatch_batch" and isinstance(arguments, dict) and isinstance(arguments.get("tasks"), list):
        arguments = {**arguments, "tasks": [cap_spec(spec) for spec in arguments["tasks"][:20]]}
    return arguments


def cap_spec(spec: Any) -> Any:
    """A fuzzed batch spec of the demo type gets the same light parameters as run_demo_task."""
    if isinstance(spec, dict) and isinstance(spec.get("params"), dict):
        return {**spec, "params": cap("run_demo_task", spec["params"])}
    return spec


# -- checks -----------------------------------------------------------------------------------------------


def problems_of(message: Any) -> list[str]:
    """What is wrong with an error message: it must say something, on one line, briefly, without internals."""
    if not isinstance(message, str) or not message.strip():
        return ["empty"]
    found = []
    if "\n" in message.strip() or "\r" in message.strip():
        found.append("multi-line")
    if len(message) > MAX_MESSAGE:
        found.append("too long")
    leak = LEAKS.search(message)
    if leak:
        found.append(f"leaks {leak.group(0)!r}")
    return found


class Findings:
    """Violations seen while fuzzing (the bugs it found are fixed: any violation now fails the test)."""

    def __init__(self) -> None:
        self.new: list[Any] = []

    def check(self, message: Any, where: Any, code: int | None = None) -> None:
        found = problems_of(message)
        if code == INTERNAL_ERROR:
            found.append("internal error (-32603)")
        if not found:
            return
        self.new.append((found, where, message[:MAX_MESSAGE] if isinstance(message, str) else message))

    def fail(self, *items: Any) -> None:
        self.new.append(items)

    def check_log(self, caplog: pytest.LogCaptureFixture) -> None:
        """The server logs an exception it did not expect: that is a bug even if the client saw a clear error."""
        for record in caplog.records:
            if "_shutdown_watcher" in record.getMessage():  # sse_starlette's per-loop task, left by an earlier test
                continue
            if record.levelno >= logging.ERROR or record.exc_info:
                self.fail(
                    "the server logged",
                    record.name,
                    record.getMessage()[:MAX_MESSAGE],
                    repr(record.exc_info[1])[:MAX_MESSAGE] if record.exc_info else None,
                )

    def assert_clean(self) -> None:
        assert not self.new, "\n".join(repr(item) for item in self.new[:20])


async def call_and_check(client: Any, tool: str, arguments: dict[str, Any], findings: Findings) -> Any:
    where = (tool, repr(arguments)[:300])
    if len(encode(arguments)) > MAX_BODY - 4096:
        return None  # over max_request_bytes: the server answers 413 (fuzz_raw checks it), the SDK client -32603
    try:
        result = await asyncio.wait_for(client.call_tool(tool, arguments), 30)
    except MCPError as exc:
        findings.check(exc.error.message, where, exc.error.code)
        return None
    if result.is_error:
        if not result.content or result.content[0].type != "text":
            findings.fail("an error result without text", where, result)
        else:
            findings.check(result.content[0].text, where)
    return result


def near_valid(schema: dict[str, Any], base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid call with one or two arguments changed (wrong, odd or dropped): reaches past the schema check."""
    properties = schema.get("properties", {})
    defs = schema.get("$defs", {})
    if not properties:
        return st.just(dict(base))

    @st.composite
    def build(draw: Callable[..., Any]) -> dict[str, Any]:
        arguments = dict(base)
        for name in sorted(draw(st.sets(st.sampled_from(sorted(properties)), max_size=2))):  # set order: hash seed
            if draw(st.integers(0, 5)) == 0:
                arguments.pop(name, None)
            else:
                arguments[name] = draw(plausible(name, properties[name], defs) | ODD_VALUES)
        return arguments

    return build()


TASK_ID, EVALUATION_ID = "<task>", "<evaluation>"  # placeholders: the examples never depend on a run's ids
EVALUATION = {
    "type": "accuracy",
    "dataset": "example:sentiment",
    "prediction_column": "prediction",
    "label_column": "label",
}
BASES = {  # a valid argument set of each tool
    "run_demo_task": {"items": 2, "item_delay_ms": 0},
    "list_tasks": {},
    "get_task": {"task_id": TASK_ID},
    "cancel_tasks": {"task_ids": [TASK_ID]},
    "create_evaluation": EVALUATION,
    "get_evaluation": {"evaluation_id": EVALUATION_ID},
    "get_evaluation_results": {"evaluation_id": EVALUATION_ID},
    "list_evaluations": {},
    "list_datasets": {"include_files": False},
    "list_scorers": {},
    "dispatch_batch": {"tasks": [{"type": "demo", "params": {"items": 1, "item_delay_ms": 0}}]},
    "retry_tasks": {"task_ids": [TASK_ID]},
    "set_task_priority": {"task_ids": [TASK_ID], "priority": 1},
}


async def real_ids(client: Any, runtime: Any) -> dict[str, str]:
    """A task and an evaluation of the notebook user's, for the placeholders."""
    task = runtime.manager.dispatch("demo", {"items": 1, "item_delay_ms": 0}, owner="jupyter")
    created = await client.call_tool("create_evaluation", EVALUATION)
    return {TASK_ID: task.id, EVALUATION_ID: created.structured_content["evaluation_id"]}


def fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return ids.get(value, value)
    if isinstance(value, list):
        return [fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, ids) for k, v in value.items()}
    return value


async def tool_cases(client: Any, ids: dict[str, str], per_tool: int) -> list[tuple[str, Any]]:
    """Fuzzed calls of every tool the client is shown: half from the schema alone, half near a valid call."""
    tools = (await client.list_tools()).tools
    assert tools
    cases = []
    for tool in tools:
        strategy = arguments_for(tool.input_schema)
        if tool.name in BASES:
            near = near_valid(tool.input_schema, BASES[tool.name])
            strategy = st.booleans().flatmap(lambda is_near, near=near, schema=strategy: near if is_near else schema)
        cases += [(tool.name, cap(tool.name, fill(arguments, ids))) for arguments in generate(strategy, per_tool)]
    return cases


# -- raw JSON-RPC bodies ----------------------------------------------------------------------------------

TOOL_NAMES = [
    "run_demo_task",
    "list_tasks",
    "get_task",
    "cancel_tasks",
    "create_evaluation",
    "get_evaluation",
    "get_evaluation_results",
    "list_evaluations",
    "list_datasets",
    "list_scorers",
    "dispatch_batch",
    "retry_tasks",
    "set_task_priority",
]
URIS = st.one_of(
    st.sampled_from(
        [
            "plexus://tasks",
            "plexus://tasks/",
            "plexus://tasks/..",
            "plexus://tasks/../../etc/passwd",
            "plexus://tasks/%00",
            "plexus://tasks/a%00b",
            "plexus://tasks/..%2F..%2Fetc%2Fpasswd",
            "plexus://tasks?limit=-1",
            "plexus://tasks?limit=99999999999999999999999",
            "plexus://tasks?status=NOPE&type=",
            "plexus://tasks?cursor=!!",
            "plexus://evaluations",
            "plexus://evaluations/../tasks",
            "plexus://evaluations/x/results?limit=0",
            "plexus://evaluations/x/results?only_mismatches=maybe",
            "plexus://datasets",
            "plexus://datasets/../../",
            "plexus://audit",
            "plexus://audit?limit=0",
            "plexus://audit?limit=1e9&outcome=x&cursor=%00",
            "plexus://",
            "plexus:",
            "plexus:///",
            "file:///etc/passwd",
            "http://localhost/",
            "",
            "plexus://tasks/\u202e",
            "plexus://tasks/😀",
        ]
    ),
    large(lambda: "x" * 10_000),
    large(lambda: "plexus://tasks/" + "a" * 10_000),
    st.builds(lambda path: "plexus://" + path, TEXT),
    st.builds(lambda a, b: f"plexus://{a}/{b}", st.sampled_from(["tasks", "evaluations", "datasets", "audit"]), TEXT),
    TEXT,
    JSON,
)
METHODS = [
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "tasks/get",
    "tasks/result",
    "tasks/cancel",
    "tasks/list",
    "subscriptions/listen",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "server/discover",
    "sampling/createMessage",
]
PARAMS = {
    "tools/call": st.fixed_dictionaries(
        {"name": st.sampled_from(TOOL_NAMES) | TEXT | JSON},
        optional={"arguments": st.dictionaries(TEXT, JSON, max_size=4) | JSON},
    ),
    "resources/read": st.fixed_dictionaries({"uri": URIS}),
    "resources/subscribe": st.fixed_dictionaries({"uri": URIS}),
    "resources/unsubscribe": st.fixed_dictionaries({"uri": URIS}),
    "tasks/get": st.fixed_dictionaries({"taskId": TEXT | JSON}),
    "tasks/result": st.fixed_dictionaries({"taskId": TEXT | JSON}),
    "tasks/cancel": st.fixed_dictionaries({"taskId": TEXT | JSON}),
    "subscriptions/listen": st.fixed_dictionaries(
        {
            "notifications": st.fixed_dictionaries(
                {},
                optional={
                    "resourceSubscriptions": st.lists(URIS, max_size=3) | JSON,
                    "taskIds": st.lists(TEXT, max_size=3) | JSON,
                    "toolsListChanged": JSON,
                    "resourcesListChanged": JSON,
                },
            )
            | JSON
        }
    ),
    "initialize": st.fixed_dictionaries(
        {},
        optional={
            "protocolVersion": st.sampled_from([LEGACY_VERSION, MODERN]) | TEXT,
            "capabilities": JSON,
            "clientInfo": JSON,
        },
    ),
    "logging/setLevel": st.fixed_dictionaries({"level": st.sampled_from(["debug", "error"]) | TEXT | JSON}),
    "completion/complete": st.fixed_dictionaries({"ref": JSON, "argument": JSON}),
}


@st.composite
def jsonrpc_message(draw: Callable[..., Any]) -> dict[str, Any]:
    method = draw(st.sampled_from(METHODS) | TEXT | JSON)
    message: dict[str, Any] = {"jsonrpc": draw(st.just("2.0") | st.just("2.0") | JSON)}
    ident = draw(st.sampled_from(["absent", "int", "other"]))
    if ident == "int":
        message["id"] = draw(st.integers(min_value=1, max_value=2**31))
    elif ident == "other":
        message["id"] = draw(JSON)
    message["method"] = method
    kind = draw(st.sampled_from(["specific", "specific", "random", "absent"]))
    if kind == "specific" and isinstance(method, str) and method in PARAMS:
        message["params"] = draw(PARAMS[method])
    elif kind != "absent":
        message["params"] = draw(JSON)
    if isinstance(message.get("params"), dict) and draw(st.booleans()):
        message["params"]["_meta"] = draw(st.just(MODERN_META) | st.dictionaries(TEXT, JSON, max_size=2) | JSON)
    if method == "tools/call" and isinstance(message.get("params"), dict):
        params = message["params"]
        params["arguments"] = cap(params.get("name"), params.get("arguments", {}))
        if isinstance(params.get("_meta"), dict):
            params["_meta"].pop("progressToken", None)  # a progress token keeps the call open until the task ends
    return message


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


RAW_BODIES = st.one_of(
    jsonrpc_message().map(encode),
    jsonrpc_message().map(encode),
    jsonrpc_message().map(encode),
    JSON.map(encode),
    st.lists(jsonrpc_message(), max_size=4).map(encode),  # batches (not part of MCP since 2025-06-18)
    st.binary(max_size=64),
    jsonrpc_message().map(encode).flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n])),
    st.sampled_from(
        [
            b"",
            b"{",
            b"[",
            b"null",
            b"{}",
            b"[]",
            b'{"jsonrpc":"2.0"',
            b"\xff\xfe{}",
            b"\x00" * 16,
            b'{"jsonrpc":"2.0","id":1,"method":"ping"}' + b" " * 10,
            '{"a": "\ud800"}'.encode("utf-8", "surrogatepass"),
            b'{"id": 1e999, "method": "ping", "jsonrpc": "2.0"}',
            b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/list"}',
        ]
    ),
    large(lambda: b"[" * 5000 + b"]" * 5000),  # deep nesting
    large(lambda: b'{"a":' * 3000 + b"1" + b"}" * 3000),
)


class Era:
    """Headers of one request: the 2025-11-25 session (after initialize) or the 2026-07-28 per-request era."""

    def __init__(self, http: httpx2.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.session_id: str | None = None

    async def open_session(self) -> None:
        body = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "fuzz", "version": "1"},
            },
        }
        status, headers, text, _ = await exchange(self.http, self.url, encode(body), MCP_HEADERS)
        assert status == 200, text
        self.session_id = headers["mcp-session-id"]
        status, _, text, _ = await exchange(
            self.http,
            self.url,
            encode({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            self.legacy_headers(),
        )
        assert status == 202, text

    def legacy_headers(self) -> dict[str, str]:
        assert self.session_id
        return {**MCP_HEADERS, "MCP-Protocol-Version": LEGACY_VERSION, "Mcp-Session-Id": self.session_id}

    @staticmethod
    def modern_headers(body: bytes) -> dict[str, str]:
        headers = {**MCP_HEADERS, "MCP-Protocol-Version": MODERN}
        try:
            method = json.loads(body).get("method")
        except Exception:
            method = None
        if isinstance(method, str) and re.fullmatch(r"[\x21-\x7e]+", method):
            headers["Mcp-Method"] = method
        return headers


async def exchange(
    http: httpx2.AsyncClient, url: str, body: bytes, headers: dict[str, str], wait: float = 8.0
) -> tuple[int, dict[str, str], str, bool]:
    """POST `body`; the status, headers, what came back within `wait` seconds and whether the answer ended."""
    async with http.stream("POST", url, content=body, headers=headers) as response:
        chunks: list[bytes] = []

        async def read() -> None:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)

        ended = True
        try:
            await asyncio.wait_for(read(), wait)
        except asyncio.TimeoutError:
            ended = False
        return response.status_code, dict(response.headers), b"".join(chunks).decode("utf-8", "replace"), ended


def messages_of(text: str, content_type: str) -> list[Any]:
    if content_type.startswith("text/event-stream"):
        found = []
        for line in text.splitlines():
            if line.startswith("data:") and line[5:].strip():
                found.append(json.loads(line[5:]))
        return found
    if content_type.startswith("application/json") and text.strip():
        return [json.loads(text)]
    return []


def check_raw(findings: Findings, status: int, headers: dict[str, str], text: str, ended: bool, body: bytes) -> None:
    where = body[:300]
    if len(body) > MAX_BODY:
        if status != 413:
            findings.fail(f"HTTP {status} for a body over max_request_bytes", where, text[:MAX_MESSAGE])
        return
    if status >= 500:
        findings.fail(f"HTTP {status}", where, text[:MAX_MESSAGE])
    if "Traceback" in text or 'File "' in text:
        findings.fail("a traceback", where, text[:2000])
    if not ended and b"subscriptions/listen" not in body:  # a listen stream stays open: the others end
        findings.fail("the answer never ended", where, status, text[:MAX_MESSAGE])
    try:
        messages = messages_of(text, headers.get("content-type", ""))
    except ValueError:
        findings.fail("an answer that is not JSON", where, status, text[:MAX_MESSAGE])
        return
    for message in messages:
        for item in message if isinstance(message, list) else [message]:
            if not isinstance(item, dict):
                continue
            error = item.get("error")
            if isinstance(error, dict):
                findings.check(error.get("message"), where, error.get("code"))
            result = item.get("result")
            if isinstance(result, dict) and result.get("isError"):
                findings.check(result["content"][0]["text"], where)


async def fuzz_raw(url: str, credential: str, n: int, findings: Findings) -> None:
    bodies = generate(st.tuples(RAW_BODIES, st.booleans()), n)
    async with httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {credential}"}, timeout=httpx2.Timeout(30.0)
    ) as http:
        era = Era(http, url)
        await era.open_session()
        for body, legacy in bodies:
            headers = era.legacy_headers() if legacy else era.modern_headers(body)
            check_raw(findings, *await exchange(http, url, body, headers), body)
        # over twice max_request_bytes: refused before it is read (once its headers are in), the session untouched
        big = encode({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * MAX_BODY}})
        headers = {"Authorization": f"Bearer {credential}", **era.legacy_headers()}
        early = await answer_before_body(url, headers, 2 * MAX_BODY + 1, big[:1000])
        assert early.status == 413 and b"Traceback" not in early.body, early
        status, _, text, _ = await exchange(
            http, url, encode({"jsonrpc": "2.0", "id": 2, "method": "ping"}), era.legacy_headers()
        )
        assert status == 200 and '"result"' in text, text[:MAX_MESSAGE]


async def still_alive(mcp_url: str, server_url: str, credential: str) -> None:
    async with open_client(mcp_url, credential) as client:
        result = await client.call_tool("list_tasks", {})
        assert not result.is_error, result
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {credential}"}) as http:
        response = await http.get(f"{server_url}plexus/api/health")
        assert response.status_code == 200, response.text


async def cancel_everything(mcp_url: str, token: str) -> None:
    async with open_client(mcp_url, token) as client:
        result = await client.call_tool("cancel_tasks", {"status": ["QUEUED", "RUNNING"]})
        assert not result.is_error, result


def tasks_owned_by(runtime: Any, owner: str) -> list[Any]:
    found, cursor = [], None
    while True:
        page, cursor = runtime.manager.list_tasks(TaskFilter(owner=owner), limit=100, cursor=cursor)
        found += page
        if not cursor:
            return found


# -- the tests --------------------------------------------------------------------------------------------


async def test_every_tool_answers_fuzzed_arguments_with_clear_errors(mcp_url, server_url, token, runtime, caplog):
    async with open_client(mcp_url, token) as client:
        cases = await tool_cases(client, await real_ids(client, runtime), TOOL_EXAMPLES)
        assert {name for name, _ in cases} >= set(TOOL_NAMES)
        findings = Findings()
        answered = 0
        for tool, arguments in cases:
            answered += (await call_and_check(client, tool, arguments, findings)) is not None
        assert answered > len(cases) // 2  # most calls are answered as tool results (errors or not)
    await cancel_everything(mcp_url, token)
    await still_alive(mcp_url, server_url, token)
    print(f"{len(cases)} calls")
    findings.check_log(caplog)
    findings.assert_clean()


async def test_raw_jsonrpc_bodies_get_clear_errors_and_the_server_survives(mcp_url, server_url, token, runtime, caplog):
    findings = Findings()
    await fuzz_raw(mcp_url, token, RAW_EXAMPLES, findings)
    await cancel_everything(mcp_url, token)
    await still_alive(mcp_url, server_url, token)
    print(f"{RAW_EXAMPLES} bodies")
    findings.check_log(caplog)
    findings.assert_clean()


async def test_a_viewer_key_fuzzing_tools_and_bodies_creates_nothing(mcp_url, server_url, token, keys, runtime, caplog):
    viewer = keys["viewer"]
    viewer_id = next(k.id for k in runtime.keys.list() if k.name == "viewer key")
    async with open_client(mcp_url, token) as admin:
        ids = await real_ids(admin, runtime)  # the notebook user's work: a viewer may read it
    async with open_client(mcp_url, viewer) as client:
        cases = await tool_cases(client, ids, VIEWER_TOOL_EXAMPLES)
        # the tools it may not see are fuzzed as well: they must be refused, whatever the arguments
        cases += [
            (tool, cap(tool, arguments))
            for tool in (
                "run_demo_task",
                "create_evaluation",
                "cancel_tasks",
                "dispatch_batch",
                "retry_tasks",
                "set_task_priority",
            )
            for arguments in generate(st.dictionaries(TEXT, JSON, max_size=3) | st.just({}), 5)
        ]
        findings = Findings()
        for tool, arguments in cases:
            await call_and_check(client, tool, arguments, findings)
    await fuzz_raw(mcp_url, viewer, VIEWER_RAW_EXAMPLES, findings)
    owned = tasks_owned_by(runtime, f"{KEY_OWNER_PREFIX}{viewer_id}")
    assert owned == [], [(t.id, t.type, t.status) for t in owned]
    await still_alive(mcp_url, server_url, viewer)
    findings.check_log(caplog)
    findings.assert_clean()


# -- the bugs fuzzing found, one test each (fixed: their messages are one bounded line) ------------------


async def test_unknown_argument_names_are_bounded_in_the_error(mcp_client, runtime):
    async with mcp_client() as client:
        result = await client.call_tool("list_scorers", {"first line\nsecond line": 1, "x" * 20_000: 2})
    text = result.content[0].text
    assert result.is_error and text.startswith("invalid arguments for list_scorers: unknown argument(s)")
    assert problems_of(text) == [], (problems_of(text), len(text))


async def test_validation_messages_stay_bounded_with_many_bad_elements(mcp_client, runtime):
    async with mcp_client() as client:
        result = await client.call_tool("list_tasks", {"status": ["nope"] * 100})
    text = result.content[0].text
    assert result.is_error and text.startswith("invalid arguments for list_tasks: status[0]:")
    assert problems_of(text) == [], (problems_of(text), len(text))


async def test_core_errors_quote_a_rejected_value_bounded(mcp_client, runtime):
    async with mcp_client() as client:
        result = await client.call_tool("list_tasks", {"since": "x" * 64})  # the longest the model takes
        too_long = await client.call_tool("list_tasks", {"since": "x" * 5000})
    text = result.content[0].text
    assert result.is_error and "'since' must be an ISO 8601 date" in text
    assert problems_of(text) == [], (problems_of(text), len(text))
    text = too_long.content[0].text
    assert too_long.is_error and "since: String should have at most 64 characters" in text
    assert problems_of(text) == [], (problems_of(text), len(text))


async def test_a_bad_jsonrpc_envelope_is_answered_in_one_line(mcp_url, token, runtime):
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        era = Era(http, mcp_url)
        await era.open_session()
        body = encode({"jsonrpc": "2.0", "id": [], "method": "ping", "params": [None]})
        status, _, text, _ = await exchange(http, mcp_url, body, era.legacy_headers())
    assert status == 400
    message = json.loads(text)["error"]["message"]
    assert problems_of(message) == [], (problems_of(message), message[:MAX_MESSAGE])
