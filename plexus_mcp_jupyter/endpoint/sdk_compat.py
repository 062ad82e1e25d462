"""Where Plexus leans on the `mcp` SDK's internals: the only module that may, one named adapter per need.

Everything else in the package uses the SDK's public surface (tests/test_compat_contracts.py checks it, and
checks each adapter's assumption against the installed SDK, so a release that changes one fails there with
the adapter's name rather than somewhere in auth or tool listing). docs/architecture.md lists the adapters
with the upstream change that would retire each.

- `lowlevel_server(server)`: `MCPServer._lowlevel_server`, the low-level `Server` behind MCPServer, for the
  request handlers MCPServer has no decorator for (`logging/setLevel`, `resources/subscribe`,
  `subscriptions/listen` of our own) and for the session manager we build ourselves.
- `connection_of(session)`: `ServerSession._connection`, the connection-scoped object behind the per-request
  session (what resource subscriptions and log levels belong to).
- `AdmittingSessionManager`: the session manager's admission and discard points and its session table.
- `PerRequestTransport`: the transport's response mode chosen per request (below); `routing_a_json_answer()`: the
  event store leaves out the answers of requests served as JSON bodies (nothing can replay them).
- `ModernJSONEntry`: a plain 2026-07-28 call answered by the SDK's own per-request kernel (`serve_one`) without
  its HTTP entry around it (below).
- `preparsed(body, value)`: a large body the bridge parsed off the event loop is not parsed again, on it, by the
  SDK (below).
- `rehearse_call(manager, method, params, scope)`: one request served in-process by the SDK's `serve_one` (the
  endpoint's start-up rehearsals), on `_SingleExchangeDispatchContext` and `_lifespan_state` as `ModernJSONEntry`.

**A large body is parsed once, off the loop.** The SDK parses a POSTed body on the event loop: the handshake-era
transport with `pydantic_core.from_json(body)` (`mcp.server.streamable_http`), the 2026-07-28 entry with
`json.loads(body)` (`mcp.server._streamable_http_modern`); 4 MiB of small objects is 50-200 ms of the loop. The
bridge parses a body above `security.bodies.JSON_ON_LOOP_BYTES` in a thread (`parse_large`) and serves the request
inside `preparsed(body, value)`: each of those two module names is given a stand-in (the module itself for every
other name) whose parse returns `value` for that very body in that request's context, and parses anything else as
before. The bridge refuses what the era's own parse would refuse of a smaller body (from_json: a text that is
not UTF-8, a lone surrogate escape; `security.bodies.utf8_json_refusal`), so the value handed over is one it would
have read. Relies on: those two modules calling their parse through those module names (tests/test_compat_contracts.py
checks it). The upstream change that would retire it: a transport hook to parse a body (or an async one).

**A plain 2026-07-28 call, without the SDK's HTTP entry.** The SDK serves a 2026-07-28 POST through
`handle_modern_request` behind its session manager's ASGI wrappers: a body-size middleware that replays the body,
a Starlette `Request` whose body is read through `receive`, the body parsed a second time, a transport-security
object built per request, and a Starlette `Response` sent as two ASGI messages the tornado bridge turns back into
headers and a body. For a call answered as one JSON body (`json_message`: the bridge has already parsed it), those
wrappers cost about a fifth of the server's time per call. `ModernJSONEntry.answer` runs the same checks in the
same order with the SDK's own functions (Content-Type, Accept, the JSON-RPC envelope, duplicated routing headers,
the envelope ladder `classify_inbound_request`, the tool's `Mcp-Param-*` headers), builds the same `Connection`
and dispatch context, and calls the same `serve_one`; its answer is the SDK's JSON body byte for byte (a
JSON-RPC response or error, with the error's table-mapped HTTP status). Whatever it would have to refuse (a bad
header, envelope or version) it leaves to the SDK's entry, which answers it as before (None).
Relies on: `mcp.server._streamable_http_modern._SingleExchangeDispatchContext` (the per-request dispatch context,
sink-less in JSON mode) and `_mcp_param_rejection(app, request, req, verdict, lifespan_state)`, and the session
manager's `_lifespan_state` (what its `run()` entered, passed to every request). The upstream change that would
retire it: a public `serve_modern_json(app, request, body)` in the SDK.

**A response shape per request.** Streamable HTTP lets a server answer each POST either as an SSE stream
or as one JSON body. The SDK chooses once per server (`json_response`), and its JSON mode drops every
notification tied to a request (progress above all). Yet most calls stream nothing: for them the SSE
machinery (a priming event, a task group, two memory streams, chunked writes) costs about a millisecond
of the server's CPU per call, a quarter of a plain tools/call. So the transport's mode is decided per
request: `response_mode()` is entered by the tornado bridge around each POST, and
`PerRequestTransport.is_json_response_enabled` answers from it, on both paths that read it:
- the POST handler, running in the request's own context, reads the request's mode;
- the session's message router, running in the session's context, reads the mode of the request that
  sent the message it routes (the SDK's context streams hand over the sender's context with each message),
  so a notification tied to a JSON-answered request is dropped (as in the SDK's JSON mode) instead of
  being taken for that request's response.
- the 2026-07-28 entry (`handle_modern_request`) is given the session manager's `json_response` for each
  request: `PerRequestSessionManager` answers it from the request's mode too, so a plain call is served
  directly, without the task group, memory stream and disconnect watcher the SDK's SSE mode runs to defer its
  choice (the deferral ends in the same JSON body for a call that emits nothing).
A request gets JSON only when nothing can stream for it (`wants_json`): a plain call of a method that
answers at once, with no progress token, no log level asked for (the 2026 per-request opt-in), no task
and no wait. Everything else (initialize,
subscriptions/listen, calls with a progress token, a task or a `wait_seconds`) keeps SSE, and with it
resumption with Last-Event-ID; a one-shot call whose connection drops is simply sent again.

The smallest upstream change that would retire this: a per-request hook in
`StreamableHTTPServerTransport` (e.g. `choose_response_mode(message) -> "json" | "sse"`), with the
router consulting the mode recorded for the related request id.
"""

from __future__ import annotations

import contextvars
import json
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import mcp.server._streamable_http_modern as sdk_modern_entry
import mcp.server.streamable_http as sdk_transport
from mcp.server._streamable_http_modern import _mcp_param_rejection, _SingleExchangeDispatchContext
from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.connection import Connection
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.runner import modern_error_data, serve_one
from mcp.server.session import ServerSession
from mcp.server.streamable_http import StreamableHTTPServerTransport, check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PROTOCOL_VERSION_HEADER,
    X_MCP_HEADER_KEY,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp_types import LOG_LEVEL_META_KEY, JSONRPCRequest
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request

_JSON_RESPONSE: contextvars.ContextVar[bool] = contextvars.ContextVar("plexus_json_response", default=False)
# [body, value] while a request is served (see `preparsed`): emptied when the SDK has it, and at the block's end.
_PREPARSED: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("plexus_preparsed", default=None)

# Methods answered by one response and nothing else tied to the request (without a progress token or task).
ONE_SHOT_METHODS = frozenset(
    {
        "tools/call",
        "tools/list",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "ping",
    }
)
# A 2026-07-28 call asks for its log lines on its own stream with this `_meta` key (SEP-2577).
LOG_LEVEL_BYTES = LOG_LEVEL_META_KEY.encode()
# A body larger than this is left to the SDK's own parse (SSE): it is never parsed twice on the loop.
MAX_INSPECTED_BYTES = 64 * 1024


def json_message(body: bytes) -> dict[str, Any] | None:
    """The POSTed JSON-RPC request, parsed, when it can be answered as one JSON body (a one-shot method, and no
    progress token or task that would stream notifications on the request's response); None otherwise."""
    if len(body) > MAX_INSPECTED_BYTES or b"progressToken" in body or LOG_LEVEL_BYTES in body:
        return None
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read here: the SDK refuses it
        return None
    if not isinstance(message, dict) or "id" not in message:
        return None
    method = message.get("method")
    if not isinstance(method, str) or method not in ONE_SHOT_METHODS:  # a bad one is the SDK's to refuse
        return None
    params = message.get("params")
    if not isinstance(params, dict):
        return message
    meta = params.get("_meta")
    if isinstance(meta, dict) and ("progressToken" in meta or LOG_LEVEL_META_KEY in meta):  # spelt with JSON escapes
        return None
    arguments = params.get("arguments")
    # A call that waits (cancel_tasks' wait_seconds) keeps a stream a dropped connection can resume.
    waits = isinstance(arguments, dict) and bool(arguments.get("wait_seconds"))
    return message if params.get("task") is None and not waits else None


def wants_json(body: bytes) -> bool:
    """True when the POSTed JSON-RPC request can be answered as one JSON body (see `json_message`)."""
    return json_message(body) is not None


@contextmanager
def response_mode(json_body: bool) -> Iterator[None]:
    """Serve the POST handled inside this block as one JSON body (True) or as an SSE stream (False)."""
    token = _JSON_RESPONSE.set(json_body)
    try:
        yield
    finally:
        _JSON_RESPONSE.reset(token)


class _PerRequestMode:
    """`is_json_response_enabled`, per request (see the module's docstring). Assignments (the SDK's
    constructor sets the server-wide mode) are ignored: the mode is the request's."""

    def __get__(self, transport: Any, owner: type | None = None) -> Any:
        if transport is None:
            return self
        if sys._getframe(1).f_code.co_name == "message_router":
            # Routing a message: the mode of the request whose handler sent it.
            sender = getattr(getattr(transport, "_write_stream_reader", None), "last_context", None)
            return bool(sender is not None and sender.get(_JSON_RESPONSE, False))
        return _JSON_RESPONSE.get()

    def __set__(self, transport: Any, value: Any) -> None:
        pass


def routing_a_json_answer() -> bool:
    """Whether the caller (an `EventStore.store_event`) was called by a session's message router for the answer of a
    request served as one JSON body. Nothing can replay such an event (a JSON body carries no event id to resume
    from), so storing it only costs a serialisation and pushes resumable SSE events out of the bounded store.

    Relies on: the router (`message_router`, a closure over its transport `self`) awaiting `store_event` itself, and
    the routed message's sender context (`_write_stream_reader.last_context`), as `_PerRequestMode` does.
    """
    router = sys._getframe(2)
    if router.f_code.co_name != "message_router":
        return False
    transport = router.f_locals.get("self")
    sender = getattr(getattr(transport, "_write_stream_reader", None), "last_context", None)
    return bool(sender is not None and sender.get(_JSON_RESPONSE, False))


class PerRequestTransport(StreamableHTTPServerTransport):
    """The SDK's transport with the response mode chosen per request."""

    is_json_response_enabled = _PerRequestMode()  # type: ignore[assignment]


def per_request_transport(transport: StreamableHTTPServerTransport) -> StreamableHTTPServerTransport:
    """Give a transport the SDK's session manager just made the per-request mode (same object, same state)."""
    transport.__class__ = PerRequestTransport
    return transport


class _PerRequestManagerMode:
    """`StreamableHTTPSessionManager.json_response`, per request: the request's mode (the 2026-07-28 entry reads
    it for each request). Assignments (the SDK's constructor) are ignored."""

    def __get__(self, manager: Any, owner: type | None = None) -> Any:
        if manager is None:
            return self
        return _JSON_RESPONSE.get()

    def __set__(self, manager: Any, value: Any) -> None:
        pass


class PerRequestSessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager with the response mode of a 2026-07-28 request chosen per request (a session's
    transport gets its per-request mode from `per_request_transport`)."""

    json_response = _PerRequestManagerMode()  # type: ignore[assignment]


def lowlevel_server(server: MCPServer) -> Server[Any]:
    """The low-level `Server` an MCPServer serves through (`MCPServer._lowlevel_server`, set in its constructor).

    Relies on: the attribute, holding the `mcp.server.lowlevel.Server` whose `add_request_handler`,
    `get_request_handler` and `get_tool_input_schema` are public.
    """
    return server._lowlevel_server  # type: ignore[no-any-return]


def connection_of(session: ServerSession) -> Any:
    """The connection behind a per-request `ServerSession` (`ServerSession._connection`): one per MCP session,
    living as long as it, with `state` (a dict), `exit_stack`, `notify()` and `protocol_version`.

    The per-request session does not outlive its request, so what belongs to the MCP session (resource
    subscriptions, the logging level, task status notifications) is keyed on this object.
    """
    return session._connection


class AdmittingSessionManager(PerRequestSessionManager):
    """The SDK's session manager with public-named admission hooks over its private admission points.

    Relies on: `_admit_session(requestor)` registering a new session synchronously (under the manager's
    creation lock) and returning its transport, or None at `max_sessions`; `_discard_session(session_id,
    transport)` called whichever way a session ends (DELETE, idle timeout, crash, a refused opening
    request), possibly twice; and `_server_instances`, the table of open sessions by id.
    Subclasses override `check_admission`, `session_opened` and `session_closed`.
    """

    def check_admission(self, requestor: AuthorizationContext | None) -> None:
        """Raise to refuse a new session to `requestor` (nothing has been sent yet)."""

    def session_opened(self, session_id: str, requestor: AuthorizationContext | None) -> None:
        """A session was admitted (called under the creation lock, right after `check_admission`)."""

    def session_closed(self, session_id: str) -> None:
        """A session ended (called once or twice per session: make it idempotent)."""

    @property
    def session_count(self) -> int:
        """Sessions open now."""
        return len(self._server_instances)

    def end_session(self, session_id: str) -> Coroutine[Any, Any, None] | None:
        """End a session now: the coroutine to run (None when it is already gone). Its id answers 404 at once
        when the coroutine starts; its streams close."""
        transport = self._server_instances.get(session_id)
        return None if transport is None else self._discard_session(session_id, transport)

    def _admit_session(self, requestor: AuthorizationContext | None) -> StreamableHTTPServerTransport | None:
        self.check_admission(requestor)
        transport = super()._admit_session(requestor)
        if transport is not None:
            per_request_transport(transport)
            if transport.mcp_session_id is not None:
                self.session_opened(transport.mcp_session_id, requestor)
        return transport

    async def _discard_session(self, session_id: str, transport: StreamableHTTPServerTransport) -> None:
        self.session_closed(session_id)
        await super()._discard_session(session_id, transport)


_PROTOCOL_VERSION_HEADER = MCP_PROTOCOL_VERSION_HEADER.lower()


def modern_request(headers: Any) -> bool:
    """Whether the SDK's session manager routes a request with these headers (a Starlette `Headers`) to its
    2026-07-28 entry: an `MCP-Protocol-Version` header that names no handshake-era version."""
    version = headers.get(_PROTOCOL_VERSION_HEADER)
    return version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS


class ModernCall(NamedTuple):
    """A 2026-07-28 call `ModernJSONEntry.check` let through: its Starlette request, JSON-RPC request and envelope."""

    request: Request
    req: JSONRPCRequest
    verdict: Any


class ModernJSONEntry:
    """A plain 2026-07-28 call answered as one JSON body by the SDK's `serve_one`, without its HTTP entry (see
    the module's docstring)."""

    def __init__(self, manager: StreamableHTTPSessionManager, security_settings: TransportSecuritySettings) -> None:
        self.manager = manager
        self.security = TransportSecurityMiddleware(security_settings)
        self._header_params: dict[int, tuple[Any, bool]] = {}  # id(input schema) -> (schema, declares a header)
        self._accepts_json: dict[str, bool] = {}  # Accept header -> whether check_accept_headers finds JSON in it

    def _declares_header_params(self, name: Any) -> bool:
        """Whether the tool's input schema may declare `x-mcp-header` parameters (True when unsure): without
        one, `Mcp-Param-*` headers are never checked, so the SDK's walk of the schema is skipped."""
        lookup = self.manager.app.get_tool_input_schema
        if lookup is None or not isinstance(name, str):
            return True
        try:
            schema = lookup(name)
        except Exception:
            return True
        if schema is None:
            return False
        kept = self._header_params.get(id(schema))
        if kept is None or kept[0] is not schema:
            kept = (schema, X_MCP_HEADER_KEY in json.dumps(schema))
            if len(self._header_params) > 1024:
                self._header_params.clear()
            self._header_params[id(schema)] = kept
        return kept[1]

    async def answer(self, request: Request, message: dict[str, Any]) -> tuple[int, bytes] | None:
        """The HTTP status and JSON body answering `message` (a parsed `json_message` POSTed to the 2026-07-28
        entry, see `modern_request`), or None when the SDK's entry must answer it (it would refuse it)."""
        checked = await self.check(request, message)
        return None if checked is None else await self.serve(checked)

    async def check(self, request: Request, message: dict[str, Any]) -> ModernCall | None:
        """`message`'s checks, in the SDK entry's order, with no effect on anything: the call ready to `serve`,
        or None when the SDK's entry must answer it (it would refuse it)."""
        if await self.security.validate_request(request, is_post=True) is not None:
            return None
        # The SDK's check depends on the Accept header alone: its answer is kept per header value (clients send one).
        accept = request.headers.get("accept", "")
        has_json = self._accepts_json.get(accept)
        if has_json is None:
            has_json = check_accept_headers(request)[0]
            if len(self._accepts_json) < 64:
                self._accepts_json[accept] = has_json
        if not has_json:
            return None
        try:
            req = JSONRPCRequest.model_validate(message)
        except ValidationError:
            return None
        headers = request.headers
        if find_duplicated_routing_header(headers.items()) is not None:
            return None
        verdict = classify_inbound_request(message, headers=dict(headers))
        if isinstance(verdict, InboundLadderRejection):
            return None
        app = self.manager.app
        lifespan_state = self.manager._lifespan_state
        params = req.params or {}
        if (
            req.method == "tools/call"
            and self._declares_header_params(params.get("name"))
            and await _mcp_param_rejection(app, request, req, verdict, lifespan_state) is not None
        ):
            return None
        return ModernCall(request, req, verdict)

    async def serve(self, call: ModernCall) -> tuple[int, bytes]:
        """The HTTP status and JSON body answering a call `check` let through (the tool runs here)."""
        req, verdict = call.req, call.verdict
        connection = Connection.from_envelope(
            verdict.protocol_version, verdict.client_info, verdict.client_capabilities
        )
        dctx = _SingleExchangeDispatchContext(
            transport=TransportContext(kind="streamable-http", can_send_request=False, headers=call.request.headers),
            request_id=req.id,
            message_metadata=ServerMessageMetadata(request_context=call.request),
            progress_token=progress_token_from_params(req.params),
        )
        try:
            result = await serve_one(
                self.manager.app,
                dctx,
                req.method,
                req.params,
                connection=connection,
                lifespan_state=self.manager._lifespan_state,
            )
        except Exception as exc:
            error = modern_error_data(exc)
            status = ERROR_CODE_HTTP_STATUS.get(error.code, 200)
            data = error.model_dump(mode="json", by_alias=True, exclude_none=True)
            reply = {"jsonrpc": "2.0", "id": req.id, "error": data}
            return status, json.dumps(reply, separators=(",", ":")).encode()
        return 200, json.dumps({"jsonrpc": "2.0", "id": req.id, "result": result}, separators=(",", ":")).encode()


# -- a large body parsed once, off the loop -----------------------------------------------------------------------


@contextmanager
def preparsed(body: bytes, value: Any) -> Iterator[None]:
    """Serve the request handled inside this block with `body` already parsed into `value`: the SDK's parse of
    that body returns it (see the module's docstring).

    The context holds them in a list emptied as soon as the SDK has the value, and at the block's end: a context is
    copied into every task and callback made in it (a timer the loop keeps until its deadline, even cancelled), and
    such a copy kept the whole parsed body alive for seconds after its request (2.4 GB measured under a flood)."""
    _install_preparsed_parses()
    held: list[Any] = [body, value]
    del body, value
    token = _PREPARSED.set(held)
    try:
        yield
    finally:
        held.clear()
        _PREPARSED.reset(token)


def _preparsed_value(data: Any) -> tuple[bool, Any]:
    """(True, the parsed value) when `data` is the body `preparsed` was given in this context (once); (False, None)
    else."""
    held = _PREPARSED.get()
    if not held:
        return False, None
    body = held[0]
    if data is body or (isinstance(data, (bytes, bytearray)) and len(data) == len(body) and data == body):
        value = held[1]
        held.clear()
        return True, value
    return False, None


class _ModuleStandIn:
    """A module as the SDK's module sees it, with one parse function answering from `preparsed`."""

    def __init__(self, module: Any, name: str) -> None:
        self._module = module
        parse = getattr(module, name)

        def parse_once(data: Any, *args: Any, **kwargs: Any) -> Any:
            found, value = _preparsed_value(data)
            return value if found else parse(data, *args, **kwargs)

        setattr(self, name, parse_once)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


_PREPARSED_PARSES = ((sdk_transport, "pydantic_core", "from_json"), (sdk_modern_entry, "json", "loads"))


def _install_preparsed_parses() -> None:
    """Give the SDK's modules their stand-ins (once)."""
    for sdk_module, module_name, parse in _PREPARSED_PARSES:
        module = getattr(sdk_module, module_name)
        if not isinstance(module, _ModuleStandIn):
            setattr(sdk_module, module_name, _ModuleStandIn(module, parse))


# -- a call rehearsed through the SDK's own kernel --------------------------------------------------------------


async def rehearse_call(
    manager: StreamableHTTPSessionManager, method: str, params: dict[str, Any], scope: dict[str, Any]
) -> dict[str, Any]:
    """Serve one request in-process through the SDK's per-request kernel (`serve_one`: its request validation, the
    server's middleware, the handler, the result's serialization), as a handshake-era (2025-11-25) connection that
    has already initialized, with `scope` as its HTTP request's ASGI scope (where the middleware finds the caller).
    No transport, no session and nothing sent: the result dict is returned, an error raised (as `serve_one` does).
    What it is for: MCPEndpoint.rehearse. Relies on: `_SingleExchangeDispatchContext` (as `ModernJSONEntry`) and
    the session manager's `_lifespan_state`."""
    connection = Connection.from_envelope(HANDSHAKE_PROTOCOL_VERSIONS[-1], None, None)
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], **scope})
    dctx = _SingleExchangeDispatchContext(
        transport=TransportContext(kind="streamable-http", can_send_request=False, headers=request.headers),
        request_id=0,
        message_metadata=ServerMessageMetadata(request_context=request),
    )
    return await serve_one(
        manager.app, dctx, method, params, connection=connection, lifespan_state=manager._lifespan_state
    )
