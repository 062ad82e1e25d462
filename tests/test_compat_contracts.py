"""The adapters' hold on the `mcp` SDK and on Jupyter Server: one contract per private access, and none elsewhere.

endpoint/sdk_compat.py and handlers/jupyter_compat.py are the only modules that touch private names of `mcp`,
`jupyter_server` or the tornado under it. Each test here checks one assumption an adapter makes against the
installed release and, when a release broke it, says which release, what changed and which adapter to update.
CI runs this file against the newest `mcp` and `jupyter_server` as well as the pinned ones (.ci/run).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import json
import textwrap
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import pytest
from jupyter_server.auth.identity import IdentityProvider
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from mcp import Client
from mcp.server.connection import Connection
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.session import ServerSession
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared._context_streams import ContextReceiveStream
from pydantic import Field
from starlette.requests import Request
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.routing import Router, RuleRouter
from tornado.web import Application, RequestHandler

from plexus_mcp_jupyter.endpoint import sdk_compat
from plexus_mcp_jupyter.endpoint.server import build_mcp_server
from plexus_mcp_jupyter.handlers import jupyter_compat
from tests import private_access

PACKAGE = Path(__file__).resolve().parent.parent / "plexus_mcp_jupyter"
MCP = f"mcp {version('mcp')}"
JUPYTER = f"jupyter_server {version('jupyter_server')}"
TORNADO = f"tornado {version('tornado')}"


def holds(condition: object, release: str, change: str, adapter: str) -> None:
    """Assert one contract: on failure, name the release, what it changed and the adapter to update."""
    assert condition, f"{release} {change}; update {adapter}"


def source(obj: Any) -> str:
    return textwrap.dedent(inspect.getsource(obj))


def readers(cls: type, attribute: str) -> set[str]:
    """The methods (and nested functions, by their own name) of `cls` that read `self.<attribute>`."""
    found: set[str] = set()

    def walk(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Attribute) and child.attr == attribute and isinstance(child.ctx, ast.Load):
                found.add(function)
            walk(child, name)

    walk(ast.parse(source(cls)), "")
    return found


# -- mcp: endpoint/sdk_compat.py ------------------------------------------------------------------------------


def test_lowlevel_server_is_the_mcpserver_s_lowlevel_server_with_its_public_registration():
    server = MCPServer("probe")

    @server.tool()
    def probe(count: int) -> int:
        return count

    holds(hasattr(server, "_lowlevel_server"), MCP, "renamed MCPServer._lowlevel_server", "sdk_compat.lowlevel_server")
    lowlevel = sdk_compat.lowlevel_server(server)
    holds(
        isinstance(lowlevel, Server),
        MCP,
        "made MCPServer._lowlevel_server something other than a lowlevel Server",
        "sdk_compat.lowlevel_server",
    )
    holds(
        all(callable(getattr(lowlevel, name, None)) for name in ("add_request_handler", "get_request_handler")),
        MCP,
        "removed Server.add_request_handler/get_request_handler",
        "sdk_compat.lowlevel_server's callers",
    )
    schema_of = lowlevel.get_tool_input_schema
    holds(
        schema_of is not None and "count" in schema_of("probe")["properties"] and schema_of("nothing") is None,
        MCP,
        "changed Server.get_tool_input_schema (MCPServer's tool input schema by name, None when unknown)",
        "PlexusMCPServer._call_tool",
    )


def test_connection_of_is_the_connection_behind_the_per_request_session():
    connection = Connection(SimpleNamespace(), protocol_version="2025-11-25")
    holds(
        "connection" in inspect.signature(ServerSession).parameters,
        MCP,
        "no longer builds ServerSession from a Connection",
        "sdk_compat.connection_of",
    )
    session = ServerSession(SimpleNamespace(), connection)
    holds(
        getattr(session, "_connection", None) is connection,
        MCP,
        "renamed ServerSession._connection",
        "sdk_compat.connection_of",
    )
    holds(
        sdk_compat.connection_of(session) is connection,
        MCP,
        "changed ServerSession._connection",
        "sdk_compat.connection_of",
    )
    shape = (
        isinstance(connection.state, dict)
        and hasattr(connection.exit_stack, "callback")
        and callable(connection.notify)
        and connection.protocol_version == "2025-11-25"
    )
    holds(
        shape,
        MCP,
        "changed Connection (state dict, exit_stack, notify, protocol_version), which subscriptions "
        "and task logs keep per MCP session",
        "sdk_compat.connection_of's callers",
    )


def test_the_session_manager_still_has_the_admission_points_the_adapter_hooks():
    """If this fails: the per-key session cap, the admins' reserve, ending a revoked key's sessions and the
    session count of health no longer work (sessions stay bound to their opener: that is the public scope user)."""
    adapter = "sdk_compat.AdmittingSessionManager"
    admit = getattr(StreamableHTTPSessionManager, "_admit_session", None)
    discard = getattr(StreamableHTTPSessionManager, "_discard_session", None)
    holds(
        admit is not None
        and list(inspect.signature(admit).parameters) == ["self", "requestor"]
        and not inspect.iscoroutinefunction(admit),
        MCP,
        "renamed or changed StreamableHTTPSessionManager._admit_session(requestor) (synchronous)",
        adapter,
    )
    holds(
        discard is not None
        and list(inspect.signature(discard).parameters) == ["self", "session_id", "transport"]
        and inspect.iscoroutinefunction(discard),
        MCP,
        "renamed or changed StreamableHTTPSessionManager._discard_session(session_id, transport) (async)",
        adapter,
    )
    holds(
        "self._admit_session(" in source(StreamableHTTPSessionManager),
        MCP,
        "no longer admits new sessions through _admit_session",
        adapter,
    )

    events: list[tuple[str, str | None]] = []

    class Probe(sdk_compat.AdmittingSessionManager):
        def check_admission(self, requestor: Any) -> None:
            events.append(("check", None))

        def session_opened(self, session_id: str, requestor: Any) -> None:
            events.append(("opened", session_id))

        def session_closed(self, session_id: str) -> None:
            events.append(("closed", session_id))

    manager = Probe(app=Server("probe"), max_sessions=1)
    holds(
        getattr(manager, "_server_instances", None) == {},
        MCP,
        "renamed StreamableHTTPSessionManager._server_instances (the open sessions by id)",
        adapter,
    )
    transport = manager._admit_session(None)
    holds(
        isinstance(transport, sdk_compat.PerRequestTransport) and manager.session_count == 1,
        MCP,
        "changed what _admit_session returns or where it registers the session",
        adapter,
    )
    holds(
        manager._admit_session(None) is None, MCP, "no longer answers None from _admit_session at max_sessions", adapter
    )
    session_id = transport.mcp_session_id
    ending = manager.end_session(session_id)
    assert ending is not None
    asyncio.run(ending)
    holds(
        manager.session_count == 0 and transport.is_terminated,
        MCP,
        "changed _discard_session (forget the session, terminate its transport)",
        adapter,
    )
    assert events == [("check", None), ("opened", session_id), ("check", None), ("closed", session_id)]


def test_the_sdk_parses_a_posted_body_through_the_module_names_preparsed_stands_in_for():
    """sdk_compat.preparsed: each SDK entry parses the body with one call through a module name, and, inside the
    block, that call returns the value parsed off the loop for that body (and parses anything else)."""
    adapter = "sdk_compat.preparsed"
    import mcp.server._streamable_http_modern as modern_entry
    import mcp.server.streamable_http as transport

    for entry, module_name, call in (
        (transport.StreamableHTTPServerTransport._handle_post_request, "pydantic_core", "from_json(body)"),
        (modern_entry.handle_modern_request, "json", "loads(body)"),
    ):
        holds(
            f"{module_name}.{call}" in source(entry),
            MCP,
            f"no longer parses the body with {module_name}.{call} in {entry.__qualname__}",
            adapter,
        )
    body, other = b'{"a": 1}', b'{"b": 2}'
    with sdk_compat.preparsed(body, {"parsed": "off the loop"}):
        assert modern_entry.json.loads(other) == {"b": 2}
        assert transport.pydantic_core.from_json(bytes(body)) == {"parsed": "off the loop"}
        assert modern_entry.json.loads(body) == {"a": 1}  # (given once: the block holds it no longer)
        assert modern_entry.json.dumps({"c": 3}) == '{"c": 3}'  # (every other name is the module's)
    with sdk_compat.preparsed(body, {"parsed": "off the loop"}):
        assert modern_entry.json.loads(body) == {"parsed": "off the loop"}
    assert transport.pydantic_core.from_json(body) == {"a": 1}
    assert modern_entry.json.loads(body) == {"a": 1}


def test_the_transport_reads_its_response_mode_where_the_per_request_mode_expects():
    """PerRequestTransport answers `is_json_response_enabled` from the request's context, except in the session's
    message router (named by its frame), where it reads the routed message's sender context."""
    adapter = "sdk_compat.PerRequestTransport"
    holds(
        "is_json_response_enabled" in inspect.signature(StreamableHTTPServerTransport).parameters,
        MCP,
        "removed the transport's is_json_response_enabled",
        adapter,
    )
    reviewed = {"_message_metadata", "_validate_accept_header", "_handle_post_request", "message_router"}
    found = readers(StreamableHTTPServerTransport, "is_json_response_enabled")
    holds(
        found <= reviewed and "message_router" in found,
        MCP,
        f"reads is_json_response_enabled in {sorted(found - reviewed) or 'no message_router'} (reviewed: "
        f"{sorted(reviewed)}): check which context each new reader runs in",
        adapter,
    )
    holds(
        "self._write_stream_reader = " in source(StreamableHTTPServerTransport),
        MCP,
        "renamed StreamableHTTPServerTransport._write_stream_reader (the routed messages' stream)",
        adapter,
    )
    holds(
        "last_context" in ContextReceiveStream.__slots__,
        MCP,
        "removed ContextReceiveStream.last_context (the sender's context of the last message)",
        adapter,
    )


# What the SDK's 2026-07-28 entry calls, reviewed: ModernJSONEntry.answer runs the same steps for a call answered as
# one JSON body (the SSE branch's task group, memory stream and disconnect watcher are not needed there).
REVIEWED_MODERN_ENTRY_CALLS = frozenset(
    {
        "Request",
        "TransportSecurityMiddleware",
        "validate_request",
        "err",
        "Response",
        "check_accept_headers",
        "body",
        "loads",
        "JSONRPCError",
        "ErrorData",
        "_write",
        "_is_notification_shaped",
        "_acknowledge_notification",
        "model_validate",
        "find_duplicated_routing_header",
        "items",
        "InboundLadderRejection",
        "_write_rejection",
        "classify_inbound_request",
        "dict",
        "isinstance",
        "_mcp_param_rejection",
        "from_envelope",
        "_SingleExchangeDispatchContext",
        "TransportContext",
        "ServerMessageMetadata",
        "progress_token_from_params",
        "_to_jsonrpc_response",
        "serve_one",
        "create_memory_object_stream",
        "append",
        "receive",
        "get",
        "cancel",
        "create_task_group",
        "start_soon",
        "move_on_after",
        "send",
        "_sse_event",
    }
)
NO_DNS_CHECKS = TransportSecuritySettings(enable_dns_rebinding_protection=False)
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "probe", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def modern_scope(method: str, params: dict[str, Any], **overrides: str | None) -> dict[str, Any]:
    """An ASGI scope of a 2026-07-28 POST as the SDK client sends it (`overrides`: a header's value, None drops
    it)."""
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": method,
    }
    name_key = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(method)
    if name_key:
        headers["mcp-name"] = str(params.get(name_key))
    for name, value in overrides.items():
        headers.pop(name.replace("_", "-"), None)
        if value is not None:
            headers[name.replace("_", "-")] = value
    return {
        "type": "http",
        "method": "POST",
        "path": "/mcp",
        "query_string": b"",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
    }


def test_the_modern_json_entry_answers_a_plain_2026_call_as_the_sdk_s_entry_does():
    """ModernJSONEntry answers byte for byte what the SDK's `handle_modern_request` answers in JSON mode, and leaves
    to it every request it would refuse."""
    adapter = "sdk_compat.ModernJSONEntry"
    from mcp.server import _streamable_http_modern as modern

    called: set[str] = set()
    for node in ast.walk(ast.parse(source(modern.handle_modern_request))):
        if isinstance(node, ast.Call):
            func = node.func
            called.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    new = called - REVIEWED_MODERN_ENTRY_CALLS - {""}
    holds(not new, MCP, f"added steps to handle_modern_request (calls {sorted(new)})", adapter)
    holds(
        list(inspect.signature(modern._mcp_param_rejection).parameters)
        == ["app", "request", "req", "verdict", "lifespan_state"],
        MCP,
        "changed _mcp_param_rejection(app, request, req, verdict, lifespan_state)",
        adapter,
    )
    fields = set(getattr(modern._SingleExchangeDispatchContext, "__dataclass_fields__", {}))
    holds(
        {"transport", "request_id", "message_metadata", "progress_token", "sink"} <= fields,
        MCP,
        "changed _SingleExchangeDispatchContext's fields",
        adapter,
    )

    server = MCPServer("probe")

    @server.tool()
    def echo(text: str) -> str:
        return text

    @server.tool()
    def regional(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
        return region

    @server.tool()
    def broken() -> str:
        raise RuntimeError("inside")

    lowlevel = sdk_compat.lowlevel_server(server)
    manager = StreamableHTTPSessionManager(app=lowlevel, json_response=True, security_settings=NO_DNS_CHECKS)
    entry = sdk_compat.ModernJSONEntry(manager, NO_DNS_CHECKS)

    def call(name: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "tools/call", {"name": name, "arguments": arguments, "_meta": ENVELOPE}

    answered = [
        call("echo", {"text": "hi"}),
        call("regional", {"region": "eu"}),
        call("broken", {}),
        call("nope", {}),
        ("tools/list", {"_meta": ENVELOPE}),
        ("ping", {"_meta": ENVELOPE}),
        ("prompts/get", {"name": "nope", "_meta": ENVELOPE}),
    ]
    left = [  # (method, params, header overrides): refused by the SDK's entry, so not answered here
        (*call("echo", {"text": "hi"}), {"mcp_name": "other"}),
        (*call("regional", {"region": "eu"}), {"mcp_param_region": "us"}),
        (*call("echo", {"text": "hi"}), {"accept": "text/event-stream"}),
        (*call("echo", {"text": "hi"}), {"content_type": "text/plain"}),
        ("tools/call", {"name": "echo", "arguments": {"text": "hi"}}, {}),  # no envelope
        (*call("echo", {"text": "hi"}), {"mcp_protocol_version": "2099-01-01"}),
    ]

    async def through_sdk(scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await manager.handle_request(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    async def through_entry(scope: dict[str, Any], message: dict[str, Any]) -> tuple[int, bytes] | None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": json.dumps(message).encode(), "more_body": False}

        return await entry.answer(Request(scope, receive), message)

    async def compare() -> None:
        async with manager.run():
            holds(
                hasattr(manager, "_lifespan_state"),
                MCP,
                "renamed StreamableHTTPSessionManager._lifespan_state",
                adapter,
            )
            for number, (method, params) in enumerate(answered):
                message = {"jsonrpc": "2.0", "id": number, "method": method, "params": params}
                extra = {"mcp_param_region": "eu"} if params.get("name") == "regional" else {}
                scope = modern_scope(method, params, **extra)
                expected = await through_sdk(scope, json.dumps(message).encode())
                got = await through_entry(scope, message)
                holds(
                    got == expected,
                    MCP,
                    f"answers {method} {params.get('name', '')} otherwise: SDK {expected}, adapter {got}",
                    adapter,
                )
            for number, (method, params, overrides) in enumerate(left):
                message = {"jsonrpc": "2.0", "id": number, "method": method, "params": params}
                scope = modern_scope(method, params, **overrides)
                status, _ = await through_sdk(scope, json.dumps(message).encode())
                assert status >= 400, (overrides, status)
                assert await through_entry(scope, message) is None, overrides

    asyncio.run(compare())


def test_rehearse_call_serves_a_tool_call_through_the_sdk_s_kernel_with_the_scope_and_no_session():
    """sdk_compat.rehearse_call (MCPEndpoint.rehearse's start-up rehearsals): a tools/call served by `serve_one` on a
    handshake-era connection already initialized, the given scope on the request the middleware reads, no session
    opened and no answer sent anywhere."""
    adapter = "sdk_compat.rehearse_call"
    server = MCPServer("probe")
    scopes: list[Any] = []

    async def record(ctx: Any, call_next: Any) -> Any:
        scopes.append(getattr(ctx.request, "scope", None))
        return await call_next(ctx)

    @server.tool()
    def echo(text: str) -> str:
        return text

    lowlevel = sdk_compat.lowlevel_server(server)
    lowlevel.middleware.append(record)
    manager = StreamableHTTPSessionManager(app=lowlevel, json_response=True, security_settings=NO_DNS_CHECKS)

    async def rehearse() -> dict[str, Any]:
        async with manager.run():
            params = {"name": "echo", "arguments": {"text": "hi"}}
            return await sdk_compat.rehearse_call(manager, "tools/call", params, {"probe": 1})

    result = asyncio.run(rehearse())
    holds(
        result.get("content") == [{"type": "text", "text": "hi"}] and not result.get("isError"),
        MCP,
        f"serves a rehearsed tools/call otherwise: {result}",
        adapter,
    )
    holds(
        len(scopes) == 1 and isinstance(scopes[0], dict) and scopes[0].get("probe") == 1,
        MCP,
        "no longer hands middleware the request its message metadata carries (ctx.request.scope)",
        adapter,
    )
    holds(not manager._server_instances, MCP, "opens a session for a single exchange", adapter)


def test_server_middleware_sees_the_wire_form_of_initialize_and_listings():
    """Public but provisional in the SDK: the middleware (as_the_caller, PlexusTasks.legacy_middleware) edits the
    `initialize` and list results as dicts, after the SDK sieved them for the era."""
    seen: dict[str, Any] = {}
    server = build_mcp_server(None)  # type: ignore[arg-type]

    async def record(ctx: Any, call_next: Any) -> Any:
        result = await call_next(ctx)
        seen[ctx.method] = result
        return result

    server.middleware.append(record)

    async def talk() -> Any:
        async with Client(server, mode="legacy") as client:
            await client.list_tools()
            return client.server_capabilities

    capabilities = asyncio.run(talk())
    holds(
        isinstance(seen.get("initialize"), dict) and isinstance(seen.get("tools/list"), dict),
        MCP,
        "no longer hands middleware the wire form (a dict) of results",
        "server.as_the_caller and tasks_ext.PlexusTasks.legacy_middleware",
    )
    holds(
        capabilities.tasks is not None and capabilities.tasks.requests is not None,
        MCP,
        "drops what middleware adds to the initialize result",
        "tasks_ext.PlexusTasks.legacy_middleware",
    )


# -- Jupyter Server and tornado: handlers/jupyter_compat.py ---------------------------------------------------


def test_jupyter_still_reads_the_user_marker_set_request_user_sets():
    adapter = "jupyter_compat.set_request_user"
    holds(
        "_jupyter_current_user" in source(JupyterHandler.check_xsrf_cookie),
        JUPYTER,
        "no longer reads JupyterHandler._jupyter_current_user in check_xsrf_cookie",
        adapter,
    )
    holds(
        "handler._jupyter_current_user" in source(IdentityProvider),
        JUPYTER,
        "no longer reads handler._jupyter_current_user in IdentityProvider.get_user",
        adapter,
    )
    holds(
        "self._jupyter_current_user = user" in source(JupyterHandler.prepare),
        JUPYTER,
        "no longer sets _jupyter_current_user in JupyterHandler.prepare",
        adapter,
    )


def test_jupyter_still_reads_the_token_marker_mark_token_authenticated_sets():
    provider = IdentityProvider()
    handler = SimpleNamespace(current_user=None)
    holds(
        provider.is_token_authenticated(handler) is False,
        JUPYTER,
        "changed IdentityProvider.is_token_authenticated for an unmarked handler",
        "jupyter_compat.mark_token_authenticated",
    )
    jupyter_compat.mark_token_authenticated(handler)  # type: ignore[arg-type]
    holds(
        provider.is_token_authenticated(handler) is True,
        JUPYTER,
        "no longer reads handler._token_authenticated in IdentityProvider.is_token_authenticated",
        "jupyter_compat.mark_token_authenticated",
    )


def test_the_server_token_fast_path_checks_the_token_as_the_identity_provider_does():
    adapter = "jupyter_compat.server_token_user"
    provider = IdentityProvider(token="secret-token")
    holds(
        provider.auth_enabled and provider.token == "secret-token",
        JUPYTER,
        "changed IdentityProvider.token/auth_enabled",
        adapter,
    )
    for header in ("token secret-token", "Bearer secret-token"):
        match = provider.auth_header_pat.match(header)
        holds(
            match is not None and match.group(2) == "secret-token",
            JUPYTER,
            f"changed IdentityProvider.auth_header_pat (group 2 of {header.split()[0]!r} is the token)",
            adapter,
        )
    holds(
        "auth_header_pat" in source(IdentityProvider.get_token),
        JUPYTER,
        "no longer reads the header token with auth_header_pat",
        adapter,
    )


def test_tornado_still_marks_a_finished_response_and_logs_through_log():
    holds(
        "self._finished = True" in source(RequestHandler.finish),
        TORNADO,
        "no longer sets RequestHandler._finished in finish()",
        "jupyter_compat.response_finished",
    )
    holds(
        "self._log()" in source(RequestHandler.finish) and callable(getattr(RequestHandler, "_log", None)),
        TORNADO,
        "no longer writes the access log through RequestHandler._log() in finish()",
        "jupyter_compat.SkippableRequestLog",
    )


def test_jupyter_s_request_metrics_are_still_the_one_histogram_record_request_metrics_feeds():
    from jupyter_server.prometheus import log_functions

    body = ast.parse(textwrap.dedent(source(log_functions.prometheus_log_method))).body[0].body
    calls = [node for node in body if not isinstance(node, ast.Expr) or not isinstance(node.value, ast.Constant)]
    text = ast.unparse(calls[0]) if len(calls) == 1 else ""
    holds(
        text.startswith("HTTP_REQUEST_DURATION_SECONDS.labels(method=handler.request.method, handler=f'")
        and "status_code=handler.get_status()" in text
        and text.endswith(".observe(handler.request.request_time())"),
        JUPYTER,
        "prometheus_log_method records something else than the request's duration by method, handler, status",
        "jupyter_compat.record_request_metrics",
    )


def test_record_request_metrics_records_what_prometheus_log_method_records():
    from jupyter_server.prometheus.log_functions import prometheus_log_method
    from prometheus_client import REGISTRY

    class Probe:  # a handler, as both read it
        request = SimpleNamespace(method="POST", request_time=lambda: 0.25)

        def get_status(self) -> int:
            return 200

    labels = {"method": "POST", "handler": f"{Probe.__module__}.{Probe.__name__}", "status_code": "200"}

    def recorded() -> tuple[float, float]:
        count = REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0.0
        return count, REGISTRY.get_sample_value("http_request_duration_seconds_sum", labels) or 0.0

    before = recorded()
    prometheus_log_method(Probe())
    jupyter_s = recorded()
    jupyter_compat.record_request_metrics(Probe())
    jupyter_compat.record_request_metrics(Probe())  # the second from the kept series
    ours = recorded()
    assert (jupyter_s[0] - before[0], jupyter_s[1] - before[1]) == (1.0, 0.25)
    assert (ours[0] - jupyter_s[0], ours[1] - jupyter_s[1]) == (2.0, 0.5)


# What Jupyter's own prepare does, reviewed: PlexusHandler.prepare replaces it and mirrors these steps (host and
# origin checks, the user from the identity provider, CORS headers, the XSRF check, authentication).
REVIEWED_PREPARE_CALLS = frozenset(
    {
        "set",
        "check_host",
        "getmodule",
        "warn",
        "get_current_user",
        "get_user",
        "set_cors_headers",
        "check_xsrf_cookie",
        "get",
        "getattr",
        "lower",
        "authenticated",
        "prepare",
        "super",
        "warning",
        "HTTPError",
        "User",
        "isinstance",
        "check_origin",
        "cast",
        "type",
    }
)


def test_jupyter_s_prepare_does_only_what_plexus_handler_prepare_mirrors():
    called: set[str] = set()
    for method in (JupyterHandler.prepare, APIHandler.prepare):
        for node in ast.walk(ast.parse(source(method))):
            if isinstance(node, ast.Call):
                func = node.func
                called.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    new = called - REVIEWED_PREPARE_CALLS - {""}  # "": the call of a call's result (web.authenticated(...)(self))
    holds(
        not new,
        JUPYTER,
        f"added steps to JupyterHandler/APIHandler.prepare (calls {sorted(new)})",
        "PlexusHandler.prepare (handlers/base.py), which replaces it, and REVIEWED_PREPARE_CALLS here",
    )


class Other(RequestHandler):
    pass


class Mine(RequestHandler):
    pass


def extensions_app() -> Application:
    """Jupyter's handlers, then two extensions' (Mine's last), each added as Jupyter adds an extension's."""
    app = Application([(r"/jupyter", RequestHandler)])
    app.add_handlers(".*$", [(r"/other/.*", Other), (r"/other", Other)])
    app.add_handlers(".*$", [(r"/plexus/mcp/?", Mine), (r"/plexus/api/x", Other)])
    return app


def routed(app: Application, path: str) -> Any:
    """The delegate the application's router gives a POST to `path`."""
    request = HTTPServerRequest(
        start_line=RequestStartLine("POST", path, "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "localhost"}),
        connection=SimpleNamespace(context=None),
    )
    return app.find_handler(request)


def test_route_first_finds_an_extension_s_rule_where_add_handlers_puts_it():
    adapter = "jupyter_compat.route_first"
    app = extensions_app()
    holds(
        isinstance(getattr(app, "default_router", None), RuleRouter) and len(app.default_router.rules) == 3,
        TORNADO,
        "no longer adds each add_handlers call as one rule of Application.default_router.rules",
        adapter,
    )
    assert jupyter_compat.route_first(app, Mine) and not jupyter_compat.route_first(app, type("Absent", (), {}))
    first = app.default_router.rules[0].target
    holds(
        any(rule.target is Mine for rule in first.rules),
        TORNADO,
        "changed the rule's target (a router whose rules target handler classes)",
        adapter,
    )
    for path, handler in (("/plexus/mcp", Mine), ("/other/a", Other), ("/jupyter", RequestHandler)):
        assert routed(app, path).handler_class is handler, path


def test_route_through_hands_the_handler_s_requests_to_a_router():
    adapter = "jupyter_compat.route_through"
    app = extensions_app()
    seen: list[tuple[str, dict[str, Any]]] = []

    class Picker(Router):
        handler_class = Mine

        def find_handler(self, request: HTTPServerRequest, **params: Any) -> Any:
            seen.append((request.path, params))
            return app.get_handler_delegate(request, Mine, None, params.get("path_args"), params.get("path_kwargs"))

    assert jupyter_compat.route_through(app, Mine, Picker()) and not jupyter_compat.route_through(app, Mine, Picker())
    assert jupyter_compat.route_first(app, Mine)  # still found by its handler class
    for path, handler in (("/plexus/mcp", Mine), ("/plexus/api/x", Other), ("/other", Other)):
        assert routed(app, path).handler_class is handler, path
    holds(
        [path for path, _params in seen] == ["/plexus/mcp"],
        TORNADO,
        "no longer calls find_handler(request, **target_params) on a Router a rule targets",
        adapter,
    )


def test_json_response_headers_are_those_an_api_handler_finishing_json_sends():
    from tornado.concurrent import Future

    from plexus_mcp_jupyter.handlers.base import PlexusHandler

    class Handler(jupyter_compat.CachedDateHeader, PlexusHandler):
        pass

    written: list[HTTPHeaders] = []

    class Connection:
        context = None

        def set_close_callback(self, callback: Any) -> None:
            pass

        def write_headers(self, start_line: Any, headers: HTTPHeaders, chunk: bytes) -> Future[None]:
            written.append(HTTPHeaders(headers))
            done: Future[None] = Future()
            done.set_result(None)
            return done

        def finish(self) -> None:
            pass

    defaults = {
        "X-Content-Type-Options": "nosniff",
        "X-Extra": "1",
        "Content-Security-Policy": "frame-ancestors 'self'",
    }
    app = Application([], plexus_default_headers=defaults)
    request = HTTPServerRequest(method="POST", uri="/plexus/mcp", headers=HTTPHeaders(), connection=Connection())
    handler = Handler(app, request)
    handler._transforms = []  # what _execute sets before a method runs
    body = b'{"jsonrpc": "2.0"}'
    handler.set_header("Content-Type", "application/json")
    handler.finish(body)
    ours = jupyter_compat.json_response_headers(defaults, body)
    holds(
        [(k, v) for k, v in written[0].get_all() if k != "Date"] == [(k, v) for k, v in ours.get_all() if k != "Date"]
        and "Date" in ours,
        f"{TORNADO} / {JUPYTER}",
        "changed the headers (or their order) of an API handler's JSON response",
        "jupyter_compat.json_response_headers",
    )


def test_api_activity_is_still_the_setting_api_handler_finish_sets():
    from jupyter_server import _tz

    holds(
        'self.settings["api_last_activity"] = utcnow()' in source(APIHandler.update_api_activity)
        and "self.update_api_activity()" in source(APIHandler.finish)
        and _tz.utcnow().utcoffset() is not None
        and _tz.utcnow().utcoffset().total_seconds() == 0,
        JUPYTER,
        "changed how APIHandler.finish records API activity (settings['api_last_activity'], an aware UTC time)",
        "jupyter_compat.mark_api_activity",
    )


# -- nowhere else ---------------------------------------------------------------------------------------------


def package_violations() -> list[private_access.Violation]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in private_access.ADAPTERS or relative.startswith("migrations/"):
            continue
        module = "plexus_mcp_jupyter." + relative.removesuffix(".py").replace("/", ".")
        namespace = vars(importlib.import_module(module.removesuffix(".__init__")))
        found += private_access.check_source(path.read_text(encoding="utf-8"), relative, namespace)
    return found


def test_no_module_but_the_adapters_touches_a_private_name_of_mcp_or_jupyter():
    found = package_violations()
    assert not found, (
        "private names of mcp/jupyter_server/tornado used outside endpoint/sdk_compat.py and "
        "handlers/jupyter_compat.py (move each behind a named adapter there, with a contract test "
        "here):\n" + "\n".join(map(str, found))
    )


PLANTED = """
from mcp.server.mcpserver import MCPServer
from mcp.server._otel import OpenTelemetryMiddleware
from jupyter_server.base.handlers import APIHandler
import os


class Server(MCPServer):
    async def _handle_list_tools(self, ctx, params):
        return await super()._handle_list_tools(ctx, params)

    def tools(self):
        return self._tool_manager.list_tools()


class Handler(APIHandler):
    def prepare(self):
        self._token_authenticated = True
        self._own = 1


def connection(ctx, handler):
    os._exit(0)  # not mcp's: fine
    getattr(handler, "_finished")
    return ctx.session._connection
"""


@pytest.mark.parametrize(
    "needle",
    [
        "redefines _handle_list_tools",
        "super()._handle_list_tools",
        "self._tool_manager",
        "private module mcp.server._otel",
        "self._token_authenticated",
        "'_finished'",
        "ctx.session._connection",
    ],
)
def test_the_check_finds_planted_violations(needle):
    namespace: dict[str, Any] = {}
    exec(compile(PLANTED, "planted.py", "exec"), namespace)
    found = "\n".join(map(str, private_access.check_source(PLANTED, "planted.py", namespace)))
    assert needle in found, found
    assert "_own" not in found and "_exit" not in found
