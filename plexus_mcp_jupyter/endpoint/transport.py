"""The tornado <-> ASGI bridge that serves the SDK's StreamableHTTPSessionManager on tornado.

`MCPEndpoint` owns the session manager and keeps its `run()` context entered for the server's
lifetime (a background task). `MCPBridge.serve()` turns one tornado request into an ASGI call:
the request body is fed through `receive`, and `send` events become status, headers and
flushed body chunks, so SSE streams go out as they are produced. Authentication happens before
the bridge is entered; the SDK never sees an unauthenticated request. Who may open and use a session
is decided in sessions.py (the per-key cap, the admins' reserve, the binding to its opener).

A POSTed body over `JSON_ON_LOOP_BYTES` (64 KiB), charged to its sender's byte budget as the handler read it
(`request_bytes_rate`: 429 with Retry-After beyond, before it is read: handlers/request_body.py), is parsed off the
event loop (security/bodies.py) before the SDK sees it; the SDK's own parse of it returns that value
(`sdk_compat.preparsed`). Smaller bodies take their path unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from tornado.httputil import HTTPServerRequest
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler

from ..handlers.jupyter_compat import response_finished
from ..security.bodies import JSON_ON_LOOP_BYTES, parse_large
from ..security.http import BadJSON, bad_json, json_refusal_off_loop, jsonrpc_error
from ..security.identity import Principal
from .event_store import MemoryEventStore
from .principal import REHEARSAL
from .sdk_compat import (
    ModernJSONEntry,
    json_message,
    lowlevel_server,
    modern_request,
    preparsed,
    rehearse_call,
    response_mode,
)
from .sessions import PlexusSessionManager, SessionLimits, SessionRefused, session_user

log = logging.getLogger("plexus_mcp_jupyter")

FLUSH_NOW_BYTES = 256 * 1024
# Calls the endpoint rehearses after start (`MCPEndpoint.rehearse`): CPython (3.11+) specializes a function's
# bytecode once it has run a few times (about 8), so the first calls of a path run slower.
REHEARSALS = 8
REHEARSAL_SECONDS = 1.0  # each rehearsal's most: a slower one (a store that hangs) ends them
# What each rehearsal calls: a read of the rehearsal's own tasks (none), through the whole tool path.
REHEARSED_CALL = {"name": "list_tasks", "arguments": {"limit": 1}}
_NO_DNS_CHECKS = TransportSecuritySettings(enable_dns_rebinding_protection=False)


class MCPEndpoint:
    """The SDK session manager plus the background task that keeps it running."""

    def __init__(
        self,
        server: MCPServer,
        *,
        limits: SessionLimits | None = None,
        max_request_body_size: int = 4 * 1024 * 1024,
        max_json_values: int = 100_000,
        event_store_size: int = 10_000,
        event_store_bytes: int = 32 * 1024 * 1024,
        on_first_request: Callable[[], None] | None = None,
    ) -> None:
        self.server = server
        self.max_json_values = max_json_values  # most JSON values a request body may hold (max_json_values)
        self.max_request_body_size = max_request_body_size
        # Told once, at the first request (`arrived`): the evaluation service stops its start-up rehearsals.
        self._on_first_request = on_first_request
        self.event_store = MemoryEventStore(event_store_size, event_store_bytes)
        self.session_manager = PlexusSessionManager(
            lowlevel_server(server),
            limits=limits or SessionLimits(),
            event_store=self.event_store,
            json_response=False,
            stateless=False,
            # Host and Origin are checked by the tornado handler (Jupyter's own rules).
            security_settings=_NO_DNS_CHECKS,
            max_request_body_size=max_request_body_size,
        )
        # A plain 2026-07-28 call: answered by the SDK's kernel without its HTTP entry (sdk_compat).
        self.modern_json = ModernJSONEntry(self.session_manager, _NO_DNS_CHECKS)
        self._runner: asyncio.Task[None] | None = None
        self._rehearsal: asyncio.Task[int] | None = None
        self._arrived = False
        self._failure: Exception | None = None
        self._started = asyncio.Event()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Enter the session manager's run() context in a background task (idempotent)."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="plexus-mcp-sessions")
        await self._started.wait()
        if self._failure is not None:
            raise RuntimeError(f"the MCP session manager could not start: {self._failure}") from self._failure
        if self._rehearsal is None:
            self._rehearsal = asyncio.get_running_loop().create_task(self.rehearse(), name="plexus-mcp-rehearsal")

    async def rehearsed(self) -> None:
        """Until the rehearsals `start` began have ended (at once when there are none); never cancels them."""
        if self._rehearsal is not None:
            await asyncio.wait({self._rehearsal})

    def arrived(self) -> None:
        """A request has come (called for each, after `start`): the rehearsals stop, and the first one tells
        `on_first_request`."""
        self._arrived = True
        if self._on_first_request is not None:
            tell, self._on_first_request = self._on_first_request, None
            tell()

    async def rehearse(self, times: int = REHEARSALS) -> int:
        """After start, on the loop: up to `times` calls of REHEARSED_CALL through the SDK's own request kernel
        (`sdk_compat.rehearse_call`: its validation, the middleware, our tool path, the result's serialization), so
        that a client's first call runs code the interpreter has specialized already (its dispatch ~0.5 ms slower
        the first time). The caller is REHEARSAL: no credential maps to it, it is never audited, and no session,
        transport or store write is made. Stops at a client's first request (`arrived`; each rehearsal yields the
        loop first), at stop, or at the first failure, tool error or rehearsal slower than REHEARSAL_SECONDS (a
        store down or hanging at start: logged at debug, nothing depends on it). Returns how many
        ran."""
        done = 0
        scope = {"plexus.principal": REHEARSAL, "client": None}
        while done < times:
            await asyncio.sleep(0)  # a request waiting on the loop goes first, and stops the rest
            if self._arrived or self._stop.is_set():
                break
            try:
                result = await asyncio.wait_for(
                    rehearse_call(self.session_manager, "tools/call", REHEARSED_CALL, scope), REHEARSAL_SECONDS
                )
            except Exception:
                log.debug("Plexus: an MCP start-up rehearsal failed", exc_info=True)
                break
            if result.get("isError"):  # a tool error (a store that is down, say): the rest would fail alike
                log.debug("Plexus: an MCP start-up rehearsal was answered with an error: %.200s", result)
                break
            done += 1
        return done

    async def _run(self) -> None:
        try:
            async with self.session_manager.run():
                self._started.set()
                await self._stop.wait()
        except Exception as exc:
            self._failure = exc
            log.exception("Plexus: the MCP session manager stopped unexpectedly")
        finally:
            self._started.set()  # never leave a request waiting for a start that will not come

    async def stop(self) -> None:
        if self._rehearsal is not None:
            self._rehearsal.cancel()
        if self._runner is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(self._runner, 10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._runner.cancel()
        except Exception:  # _run logged its own failure; a stop must not raise, so this is only noted
            log.debug("Plexus: the MCP session manager's task ended with an error at stop", exc_info=True)
        self._runner = None

    @property
    def session_count(self) -> int:
        return self.session_manager.session_count


class MCPBridge:
    """Serves one tornado request through the ASGI session manager."""

    def __init__(self, handler: RequestHandler, endpoint: MCPEndpoint) -> None:
        self.handler = handler
        self.endpoint = endpoint
        self.disconnected = asyncio.Event()
        self._started = False
        self._unflushed = 0
        self._flush_handle: asyncio.Handle | None = None

    def scope(self, extra: dict[str, Any]) -> dict[str, Any]:
        return asgi_scope(self.handler.request, extra)

    async def serve(self, principal: Principal) -> None:
        """Serve the request as `principal` (authenticated by the handler): tools and resources act as it,
        and a session answers only the principal that opened it."""
        await self.endpoint.start()
        self.endpoint.arrived()
        extra_scope = {"plexus.principal": principal, "user": session_user(principal)}
        body = self.handler.request.body or b""
        within = len(body) <= self.endpoint.max_request_body_size  # (a larger one: the handler's 413, unread)
        large = self.handler.request.method == "POST" and len(body) > JSON_ON_LOOP_BYTES and within
        if within:
            refusal = await json_refusal_off_loop(body, self.endpoint.max_json_values)  # too deep, too many values
            if refusal is not None:
                raise HTTPError(400, f"the request body is {refusal}")
        body_sent = False

        async def receive() -> MutableMapping[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self.disconnected.wait()
            return {"type": "http.disconnect"}

        parsed: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if large:
            try:
                parsed = preparsed(body, await self._parse_large(body))
            except BadJSON as exc:
                self._parse_error(str(exc))
                return
        scope = self.scope(extra_scope)
        message = json_message(body) if self.handler.request.method == "POST" else None
        if message is not None:
            request = Request(scope, receive)
            if modern_request(request.headers):
                answer = await self.endpoint.modern_json.answer(request, message)
                if answer is not None:
                    if self.disconnected.is_set():
                        return
                    self.handler.set_status(answer[0])
                    self.handler.set_header("Content-Type", "application/json")
                    self.handler.finish(answer[1])
                    return

        status = 0

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            handler = self.handler
            if message["type"] == "http.response.start":
                self._started = True
                # Tornado leaves Nagle's algorithm on until a response finishes; an SSE stream
                # sends small events that must leave at once (as uvicorn does, with TCP_NODELAY).
                stream = getattr(handler.request.connection, "stream", None)
                if stream is not None:
                    stream.set_nodelay(True)
                handler.set_status(message["status"])
                status = message["status"]
                handler.clear_header("Content-Type")
                event_stream = False
                for name, value in message.get("headers", []):
                    handler.add_header(name.decode("latin-1"), value.decode("latin-1"))
                    event_stream = event_stream or (
                        name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                    )
                if event_stream and self._flush_handle is None:
                    # An SSE stream (the standalone GET stream above all) may stay silent for a long
                    # time: its headers must go now, as uvicorn sends them, not with the first event.
                    self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_later)
            elif message["type"] == "http.response.body":
                if self.disconnected.is_set():
                    return
                chunk = message.get("body", b"")
                if status == 400 and b"Validation error: " in chunk and not message.get("more_body", False):
                    chunk = _short_envelope_error(chunk)
                    handler.set_header("Content-Length", str(len(chunk)))
                if chunk:
                    handler.write(chunk)
                    self._unflushed += len(chunk)
                if message.get("more_body", False):
                    if self._unflushed > FLUSH_NOW_BYTES:
                        # A large backlog: wait for the socket, so a slow reader slows the writer.
                        await self._flush()
                    elif self._flush_handle is None:
                        # Flush at the end of this loop iteration, so chunks sent together (an SSE
                        # event and the end of the stream) leave in one write.
                        self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_later)

        try:
            with response_mode(message is not None), parsed:
                await self.endpoint.session_manager.handle_request(scope, receive, send)
        except SessionRefused as refused:  # raised before anything was sent
            self.handler.set_status(refused.status)
            self.handler.set_header("Content-Type", "application/json")
            self.handler.write(json.dumps(jsonrpc_error(refused.status, str(refused))))
        finally:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
        if not response_finished(self.handler) and not self.disconnected.is_set():
            self.handler.finish()

    async def _parse_large(self, body: bytes) -> Any:
        """A large body parsed off the loop (BadJSON): refused where the SDK's own parse (of a smaller body) refuses
        it, which is pydantic_core.from_json in the handshake era (json.loads in the 2026-07-28 era, as here)."""
        try:
            return await parse_large(body, utf8_only=not modern_request(self.handler.request.headers))
        except (ValueError, RecursionError) as exc:
            raise bad_json(exc) from None

    def _parse_error(self, reason: str) -> None:
        """A body that is not JSON: 400 and the JSON-RPC parse error, as the SDK answers one (with the reason)."""
        self.handler.set_status(400)
        self.handler.set_header("Content-Type", "application/json")
        error = {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32700, "message": f"Parse error: the body is {reason}"},
        }
        self.handler.finish(json.dumps(error))

    def end(self) -> None:
        """End the response now (its API key was revoked): the SDK sees a disconnect, the client a closed stream."""
        self.disconnected.set()
        connection = self.handler.request.connection
        if connection is not None and hasattr(connection, "close"):
            connection.close()

    async def _flush(self) -> None:
        self._unflushed = 0
        try:
            await self.handler.flush()
        except StreamClosedError:
            self.disconnected.set()

    def _flush_later(self) -> None:
        self._flush_handle = None
        if response_finished(self.handler) or self.disconnected.is_set():
            return
        self._unflushed = 0
        future = self.handler.flush()
        future.add_done_callback(self._flushed)

    def _flushed(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.disconnected.set()


def asgi_scope(request: HTTPServerRequest, extra: dict[str, Any]) -> dict[str, Any]:
    """The ASGI scope of a tornado request, with `extra` added."""
    host, _, port = (request.host or "localhost").partition(":")
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.get_all()]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.version.partition("/")[2] or "1.1",
        "method": request.method,
        "scheme": request.protocol,
        "path": request.path,
        "raw_path": request.path.encode("latin-1"),
        "query_string": request.query.encode("latin-1"),
        "root_path": "",
        "headers": headers,
        "client": (request.remote_ip or "", 0),
        "server": (host, int(port) if port.isdigit() else (443 if request.protocol == "https" else 80)),
        "state": {},
    }
    scope.update(extra)
    return scope


ENVELOPE = (
    'expected a JSON-RPC 2.0 message: {"jsonrpc": "2.0", "method": <string>, "id": <string or integer>, '
    '"params": <object, optional>} (or a response or notification of that form)'
)


def _short_envelope_error(body: bytes) -> bytes:
    """The SDK answers a malformed JSON-RPC envelope with pydantic's multi-line dump: say it in one line."""
    try:
        data = json.loads(body)
        data["error"]["message"] = f"invalid JSON-RPC message: {ENVELOPE}"
        data["error"].pop("data", None)
    except (ValueError, KeyError, TypeError):
        return body
    return json.dumps(data).encode()
