"""`plexus mcp serve`: the same core and MCP endpoint without Jupyter, over stdio or HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

import anyio
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp.types import JSONRPCRequest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .endpoint.sdk_compat import lowlevel_server
from .endpoint.transport import MCPBridge
from .handlers.request_body import StreamedBody
from .runtime import PlexusRuntime
from .security.bodies import JSON_ON_LOOP_BYTES
from .security.connections import ConnectionGuard
from .security.http import (
    LOOPBACK_HOSTS,
    admit_key,
    bearer_credential,
    error_message,
    host_name,
    jsonrpc_error,
    origin_allowed,
    reason_phrase,
    record_request,
    set_retry_after,
)
from .security.identity import Principal, Role
from .security.keys import looks_like_key
from .security.ratelimit import RateLimiter

STANDALONE_ADMIN = Principal(owner="token", role=Role.ADMIN)  # whoever holds the server's token
# Most seconds a stdio server waits for its start-up rehearsals before it reads its first message (serve_stdio):
# 44-144 ms measured at a load of 6.5-7.3. A store locked or hanging ends the wait sooner: once one rehearsal has run
# longer than its REHEARSAL_SECONDS (the endpoint's, transport.py; the evaluation service's, service.py: that one
# then ends on its own, in its thread, and no more run).
STDIO_REHEARSAL_SECONDS = 5.0


class _StandaloneHandler(web.RequestHandler):
    """Bearer-token authentication and Origin checks for the standalone HTTP server."""

    require_auth = True

    @property
    def runtime(self) -> PlexusRuntime:
        return self.settings["plexus"]  # type: ignore[no-any-return]

    principal: Principal | None = None

    def authenticated(self) -> bool:
        """The server's token (an admin) or an API key; sets `principal`. A rejected key is a 401 that says why."""
        credential = bearer_credential(self.request.headers.get("Authorization"))
        if credential is None:
            return False
        if looks_like_key(credential):
            self.principal = admit_key(self.runtime, credential, "the server's token")
            return True
        if hmac.compare_digest(credential.encode(), self.settings["plexus_token"].encode()):
            self.principal = STANDALONE_ADMIN
            return True
        return False

    def prepare(self) -> None:
        headers = self.request.headers
        if self.settings["plexus_loopback"] and host_name(headers.get("Host")) not in LOOPBACK_HOSTS:
            # Bound to loopback: any other Host is a DNS-rebinding attempt.
            raise web.HTTPError(403, "this Host is not allowed: the server listens on loopback only")
        allowed = self.settings.get("plexus_allowed_origins", ())
        origin = headers.get("Origin")
        if not (origin_allowed(origin, headers.get("Host"), self.request.protocol) or origin in allowed):
            raise web.HTTPError(403, "requests from this Origin are not allowed (see --allow-origin)")
        if self.require_auth and not self.authenticated():
            raise web.HTTPError(401, "authentication required: send 'Authorization: Bearer <token>'")

    def on_finish(self) -> None:
        status = self.get_status()
        if status in (401, 403, 429):
            record_request(self.runtime, self.principal, self.request, status, "denied")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = error_message(kwargs.get("exc_info", (None, None, None))[1], reason_phrase(status_code, kwargs))
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="plexus"')
        set_retry_after(self, kwargs.get("exc_info", (None, None, None))[1])
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(jsonrpc_error(status_code, message)))


class StandaloneMCPHandler(StreamedBody, _StandaloneHandler):  # type: ignore[misc]  # (prepare: async here)
    """The MCP endpoint: its body read once the caller is admitted, within max_request_bytes and the caller's byte
    budget (handlers/request_body.py)."""

    _bridge: MCPBridge | None = None

    def body_limit(self) -> int:
        return int(self.runtime.settings.max_request_bytes)

    def body_budget(self) -> RateLimiter | None:
        return self.runtime.body_budget

    def body_sender(self) -> Principal | None:
        return self.principal or STANDALONE_ADMIN

    async def _serve(self) -> None:
        self.request.body = self.body
        self._bridge = MCPBridge(self, self.runtime.endpoint)
        principal = self.principal or STANDALONE_ADMIN
        forget = self.runtime.track_stream(principal, self._end_stream)  # ends when its API key is revoked
        try:
            await self._bridge.serve(principal)
        finally:
            forget()

    def _end_stream(self) -> None:
        if self._bridge is not None:
            self._bridge.end()

    post = get = delete = _serve

    def on_connection_close(self) -> None:
        if self._bridge is not None:
            self._bridge.disconnected.set()


class StandaloneHealthHandler(StreamedBody, _StandaloneHandler):  # type: ignore[misc]  # (prepare: async here)
    """Liveness for anyone: it reads no body, and one past 64 KiB is refused unread (tornado would read it first)."""

    require_auth = False
    body_methods = ()

    def body_limit(self) -> int:
        return JSON_ON_LOOP_BYTES

    def body_budget(self) -> RateLimiter | None:
        return None

    def body_sender(self) -> Principal | None:
        return None

    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(await self.runtime.health() if self.authenticated() else {"status": "ok"}))


def make_app(
    runtime: PlexusRuntime, token: str, allowed_origins: tuple[str, ...] = (), *, loopback: bool = True
) -> web.Application:
    return web.Application(
        [(r"/mcp/?", StandaloneMCPHandler), (r"/health/?", StandaloneHealthHandler)],
        plexus=runtime,
        plexus_token=token,
        plexus_allowed_origins=allowed_origins,
        plexus_loopback=loopback,
    )


def _on_stop_signals(callback: Callable[[], object]) -> None:
    """Call `callback` on SIGINT and SIGTERM (how clients and service managers end this process), so the
    shutdown path runs: the audit log's last records are written, running tasks are recorded."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows' loop
            loop.add_signal_handler(sig, callback)


class _ArrivalTelling:
    """The stdio transport's read stream (the SDK's `ReadStream`), telling `arrived` once, at the first JSON-RPC
    request it receives: as the HTTP routes do after authentication (handlers/mcp.py, handlers/mcp_plain.py), so
    the evaluation service stops its start-up rehearsals when a client comes (MCPEndpoint.arrived). The SDK's
    loop reads it with `async for` and closes it; the sender's context (`last_context`) is the inner stream's."""

    def __init__(self, inner: Any, arrived: Callable[[], None]) -> None:
        self._inner = inner
        self._arrived: Callable[[], None] | None = arrived

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        item = await self._inner.receive()
        if self._arrived is not None and isinstance(item, SessionMessage) and isinstance(item.message, JSONRPCRequest):
            tell, self._arrived = self._arrived, None
            tell()
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _ArrivalTelling:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _ArrivalTelling:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _run_stdio(
    runtime: PlexusRuntime, stop_runtime: Callable[[], Awaitable[None]], wire: BinaryIO | None = None
) -> None:
    """MCPServer.run_stdio_async, its read stream telling the endpoint when a client has arrived, after the
    start-up rehearsals (STDIO_REHEARSAL_SECONDS at most). It waits for them inside `stdio_server()`, which points
    fd 1 at stderr: what runs meanwhile (a task or scorer module imported, that prints) misses the protocol. Its
    reader reading the client's first message ahead stops nothing: `_ArrivalTelling` tells at `receive`. When the
    client closes stdin it stops the runtime (`stop_runtime`) still inside `stdio_server()`: what prints while
    it stops goes to stderr, not to the wire `stdio_server()` gives back to fd 1 as it exits. With `wire` (stdout
    taken by cli.take_stdout before the runtime was built: fd 1 is stderr already), the protocol is written there,
    and fd 1 stays stderr to the end."""
    server = lowlevel_server(runtime.mcp)
    stdout = None if wire is None else anyio.wrap_file(io.TextIOWrapper(wire, encoding="utf-8"))
    async with stdio_server(stdout=stdout) as (read_stream, write_stream):
        rehearsing = asyncio.ensure_future(_rehearsals_done(runtime))
        try:
            await asyncio.wait({rehearsing}, timeout=STDIO_REHEARSAL_SECONDS)
        finally:
            rehearsing.cancel()  # (not the rehearsals themselves: past the limit, a client's first message stops them)
        arrivals = _ArrivalTelling(read_stream, runtime.endpoint.arrived)
        try:
            await server.run(arrivals, write_stream, server.create_initialization_options())
            await stop_runtime()
        finally:
            sys.stdout.flush()  # what was printed and is still buffered: to stderr, not to the wire restored at exit


async def _rehearsals_done(runtime: PlexusRuntime) -> None:
    """Until the start-up rehearsals have ended: the endpoint's (on the loop) and the evaluation service's
    (`warm_up`, then `warm_up_again`, in its thread), or one of these has run longer than REHEARSAL_SECONDS."""
    await runtime.endpoint.rehearsed()
    await runtime.evaluations.rehearsals_ended()


async def serve_stdio(runtime: PlexusRuntime, wire: BinaryIO | None = None) -> None:
    """MCP over this process's stdin/stdout; stdout carries nothing but the protocol: `wire`, the stdout that
    `plexus mcp serve` took before it built the runtime (cli.take_stdout), else fd 1 as `stdio_server()` takes it.

    The start-up rehearsals run before the first message is read (STDIO_REHEARSAL_SECONDS at most): a client
    that launches the server sends its initialize at once, so it is already waiting when the server could
    read it, and a client's first message stops the rehearsals (MCPEndpoint.arrived, told by the read stream:
    `_ArrivalTelling`). Read first, it would stop them at once, and the first create_evaluation would pay for
    the first runs of its path (the interpreter specializes a function's code once it has run a few times).

    It starts and stops the runtime as the HTTP servers do (`PlexusRuntime.start` / `stop`): on a store shared
    with other servers (docs/scale-out.md) its lease heartbeat holds the tasks it runs (another server would
    take them over once their lease ran out: run them twice) and its event relay sends its tasks' events to the
    other servers' subscribers and brings theirs here. Their logs go to stderr, as every log does (cli.py).

    Ends when the client closes stdin or on SIGTERM/SIGINT; either way running tasks are recorded, their final
    states relayed, and the audit log writes its last records. After a signal the process exits at once: the SDK
    reads stdin in a thread that nothing can interrupt, and waiting for it (as asyncio.run would) would hang until
    the client writes or closes stdin."""
    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    stopped: asyncio.Future[None] | None = None

    def stop_runtime() -> asyncio.Future[None]:  # once, whoever asks first (stdin's end, a signal, a failure)
        nonlocal stopped
        if stopped is None:
            stopped = asyncio.ensure_future(runtime.stop())
        return stopped

    serving: asyncio.Future[None] | None = None
    try:
        # Its endpoint's session manager runs the SDK's request kernel, which the rehearsals call through; stdio
        # serves without it if it cannot start (then without the rehearsals).
        await runtime.start(sessions_required=False)
        if not stop.is_set():  # a signal during start-up: stopped before it served (no message read, none answered)
            serving = asyncio.ensure_future(_run_stdio(runtime, stop_runtime, wire))  # (the rehearsals' wait first)
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await asyncio.shield(stop_runtime())
    if serving is None:
        return
    if not serving.done():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    serving.result()  # the transport's own error, if it failed


async def serve_http(
    runtime: PlexusRuntime,
    *,
    host: str,
    port: int,
    token: str,
    token_generated: bool,
    certfile: str | None = None,
    keyfile: str | None = None,
    allowed_origins: tuple[str, ...] = (),
) -> None:
    """Serve until SIGINT/SIGTERM, with the connection timeouts and per-address cap of the settings."""
    runtime.protect_secret(token)
    await runtime.start()
    ssl_ctx = None
    if certfile:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(certfile, keyfile)
    app = make_app(runtime, token, allowed_origins, loopback=host in LOOPBACK_HOSTS)
    server = HTTPServer(app, ssl_options=ssl_ctx, xheaders=False)
    ConnectionGuard.from_settings(runtime.settings).install(server)
    sockets = bind_sockets(port, host)
    server.add_sockets(sockets)
    scheme = "https" if ssl_ctx else "http"
    actual_port = sockets[0].getsockname()[1]
    url = f"{scheme}://{'localhost' if host in ('127.0.0.1', 'localhost') else host}:{actual_port}/mcp"
    print(f"Plexus MCP endpoint: {url}", file=sys.stderr)
    if token_generated:
        print(f"    Authorization: Bearer {token}", file=sys.stderr)
        print(f"    or connect with: {url}  (token printed above; set PLEXUS_MCP_TOKEN to choose one)", file=sys.stderr)
    sys.stderr.flush()
    stop = asyncio.Event()
    _on_stop_signals(stop.set)
    try:
        await stop.wait()
    finally:
        server.stop()
        await runtime.stop()
