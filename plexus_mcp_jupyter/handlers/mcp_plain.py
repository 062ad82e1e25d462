"""A plain 2026-07-28 MCP call answered without a tornado `RequestHandler` (issue 16, speed).

A call the SDK answers as one JSON body (`sdk_compat.json_message`, `ModernJSONEntry`) spent about a third of the
server's main thread in tornado's and Jupyter's request flow around it: the handler's construction, its `_execute`
coroutine and task, Jupyter's prepare and finish, the access log, the ASGI scope. Here the route of `MCPHandler` is
served by `PlainMCPRouter` (a tornado `Router`, `jupyter_compat.route_through`): for a request whose headers make it
a candidate (`PlainMCPRouter.candidate`: a POST in the 2026-07-28 era, no query, no Origin, no Cookie, a bearer
credential, an allowed Host already seen, the application as Jupyter sets it up), `PlainMCPDelegate` reads the body
and answers it itself; for any other request, and for a candidate it does not answer, it hands the request to the
handler's own delegate, unchanged (`fall_back`: the headers and body replayed, so the handler sees the request as
tornado would have given it).

The answer is made as the body's last bytes arrive (`data_received`, which tornado awaits in the connection's own
task: no task of its own) and written by `finish()`, which tornado calls next, once it has marked the request read
(written earlier, tornado would close the connection after the response); the response then ends before tornado
would register a close callback on the stream. A chunked body, whose end only `finish()` tells, is answered from
a task.

What the handler does is done here the same way, or the request falls back before anything happened:
- Host (Jupyter's check, only Hosts it allowed before, `PlexusHandler.check_host`), Origin (none), credential: an
  API key through `admit_key` (verification, revocation, rate limit; a refusal is handed to the handler, which
  answers it as before without admitting the key twice), or Jupyter's token (`jupyter_compat.token_user`), with
  Jupyter's `AllowAllAuthorizer` (any other authorizer: the handler);
- the call's checks are `ModernJSONEntry.check`'s (none has an effect), run before the credential: whatever the SDK
  would refuse goes to the handler, which authenticates it first as before;
- the answer is `ModernJSONEntry.serve`'s status and bytes, with the headers the handler sends
  (`jupyter_compat.json_response_headers`); Jupyter's API activity, its request histogram (in `MCPHandler`'s
  series) and its access log line (when it would print, or for a status >= 300) as the handler records them; an
  API key's call is ended with its connection when the key is revoked (`track_stream`). Tool calls are audited by
  the MCP server, as before; the handler audits only refusals, which all fall back.
tests/test_mcp_plain_route.py sends the same requests through both routes and compares status, headers and bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from functools import partial
from typing import Any

from jupyter_server.auth.authorizer import AllowAllAuthorizer
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import log as jupyter_log
from jupyter_server.log import log_request
from starlette.requests import Request
from tornado import httputil, web
from tornado.iostream import StreamClosedError
from tornado.routing import Router

from ..endpoint.sdk_compat import MAX_INSPECTED_BYTES, json_message, modern_request
from ..endpoint.sessions import session_user
from ..endpoint.transport import asgi_scope
from ..security.http import admit_key, bearer_credential, jsonrpc_error
from ..security.identity import Principal, Role
from ..security.keys import looks_like_key
from .base import KEY_REFUSAL
from .jupyter_compat import (
    NOTEBOOK_USER,
    SINGLE_USER_PROVIDERS,
    json_response_headers,
    mark_api_activity,
    record_request_duration,
    token_user,
)
from .mcp import debug_emitted
from .request_body import declared_length

log = logging.getLogger("plexus_mcp_jupyter")
READING, ANSWERING, ANSWERED, HANDLER = "reading", "answering", "answered", "handler"  # PlainMCPDelegate._state
STREAMING = "streaming"  # (_state) the handler's, its body given to it as it arrives

# The principal of Jupyter's token (or of no auth): the notebook user, an admin (PlexusHandler.principal).
NOTEBOOK_ADMIN = Principal(owner=NOTEBOOK_USER, role=Role.ADMIN)


class PlainMCPRouter(Router):
    """The target of the MCP handler's route: a plain call's own delegate, or the handler's."""

    def __init__(self, application: web.Application, handler_class: type[web.RequestHandler]) -> None:
        self.application = application
        self.handler_class = handler_class
        self.enabled = True
        self.tasks: set[asyncio.Task[None]] = set()

    def find_handler(self, request: httputil.HTTPServerRequest, **target_params: Any) -> httputil.HTTPMessageDelegate:
        fall_back = partial(
            self.application.get_handler_delegate,
            request,
            self.handler_class,
            target_params.get("target_kwargs"),
            target_params.get("path_args"),
            target_params.get("path_kwargs"),
        )
        if not self.candidate(request):
            return fall_back()
        return PlainMCPDelegate(self, request, fall_back)

    def candidate(self, request: httputil.HTTPServerRequest) -> bool:
        """Whether the request may be a plain call this route answers (its headers, and the application's set-up,
        as the handler would meet them); its body and credential are looked at when it has been read."""
        headers = request.headers
        settings = self.application.settings
        return (
            self.enabled
            and request.method == "POST"
            and not request.query
            and "Origin" not in headers
            and "Cookie" not in headers
            and bearer_credential(headers.get("Authorization")) is not None
            and modern_request(headers)
            and request.host in settings.get("plexus_allowed_hosts", ())
            and "plexus_default_headers" in settings
            and settings.get("plexus") is not None
            and not self.application.transforms
            and _logs_as_the_handler(settings.get("log_function"))
        )


def _logs_as_the_handler(log_function: Any) -> bool:
    """Jupyter's own `log_request` is the application's access log (what `MCPHandler.skip_request_log` knows)."""
    return isinstance(log_function, partial) and log_function.func is log_request


class PlainMCPDelegate(httputil.HTTPMessageDelegate):
    """One candidate request: its body read, then answered here or handed to the handler's delegate."""

    def __init__(
        self,
        router: PlainMCPRouter,
        request: httputil.HTTPServerRequest,
        fall_back: Callable[[], httputil.HTTPMessageDelegate],
    ) -> None:
        self.router = router
        self.request = request
        self._fall_back = fall_back
        self._handler_delegate: httputil.HTTPMessageDelegate | None = None
        self._start_line: Any = None
        self._chunks = bytearray()
        self._expected: int | None = None  # the body's length, when its headers say it
        self._state = READING
        self._read = False  # tornado called finish(): the whole request was read
        self._user: User | None = None
        self._answered: tuple[dict[str, Any], int, bytes] = ({}, 0, b"")
        self._closed = False  # the connection closed (on_connection_close)

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        self._start_line = start_line
        self._expected = declared_length(headers)
        if self._expected is not None and self._expected > MAX_INSPECTED_BYTES:  # never answered here: the handler
            self._state = STREAMING  # reads it, once it has admitted its sender (handlers/request_body.py)
            delegate = self._handler_delegate = self._fall_back()
            return delegate.headers_received(start_line, headers)
        return None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self._state == STREAMING:
            return self._handler_delegate.data_received(chunk)  # type: ignore[union-attr]
        self._chunks += chunk
        if self._expected is None and len(self._chunks) > MAX_INSPECTED_BYTES:  # a chunked body past what is answered
            return self._stream_to_handler()  # here: the handler reads the rest within its bounds
        if len(self._chunks) == self._expected:
            # The body's last bytes: the answer is made here, in the connection's own task (tornado awaits what
            # this returns), and written by finish(), which tornado calls next: no task of its own, and no close
            # callback on the stream while it waits for a response. (Written here, before tornado has marked the
            # request read, it would make tornado close the connection after the response.)
            return self._settle()
        return None

    def on_connection_close(self) -> None:
        self._closed = True
        if self._handler_delegate is not None:
            self._handler_delegate.on_connection_close()
        self._chunks = bytearray()

    def finish(self) -> None:
        self._read = True
        if self._state == STREAMING:
            self._handler_delegate.finish()  # type: ignore[union-attr]
            return
        if self._state == READING:  # a body of unknown length (chunked), or none
            answer = self._settle()
            if answer is not None:
                task = asyncio.get_running_loop().create_task(answer)
                self.router.tasks.add(task)
                task.add_done_callback(self.router.tasks.discard)
        if self._state == HANDLER:
            self.fall_back()
        elif self._state == ANSWERED:
            self._write(*self._answered)

    def _settle(self) -> Coroutine[Any, Any, None] | None:
        """The body is all here: the coroutine answering it, or None (and the request is the handler's)."""
        body = bytes(self._chunks)
        self.request.body = body
        message = json_message(body)
        if message is None:
            self._state = HANDLER
            return None
        self._state = ANSWERING
        return self._answer(message)

    def _hand_over(self) -> None:
        """The request is the handler's after all: given to it now, or when tornado has read all of it."""
        self._state = HANDLER
        if self._read:
            self.fall_back()

    def fall_back(self) -> None:
        """Hand the request to the handler's delegate, as tornado would have (headers, body, end): the handler reads
        its body once its `prepare` is done (tornado's `stream_request_body`), so the body and the end follow then."""
        delegate = self._handler_delegate = self._fall_back()
        prepared = delegate.headers_received(self._start_line, self.request.headers)
        if prepared is None:
            self._replay_body(delegate)
            return
        task = asyncio.get_running_loop().create_task(self._replay_after(prepared, delegate))
        self.router.tasks.add(task)
        task.add_done_callback(self.router.tasks.discard)

    async def _replay_after(self, prepared: Awaitable[None], delegate: httputil.HTTPMessageDelegate) -> None:
        await prepared
        if not self._closed:  # (a closed connection has told the handler already)
            self._replay_body(delegate)

    def _replay_body(self, delegate: httputil.HTTPMessageDelegate) -> None:
        if self.request.body:
            delegate.data_received(self.request.body)  # (a handler's data_received returns nothing to wait for)
        delegate.finish()

    async def _stream_to_handler(self) -> None:
        """A body of unknown length grown past what this route answers: the handler's from now on, given what has
        arrived once its `prepare` is done; the rest goes to it as it arrives (`data_received`)."""
        self._state = STREAMING
        delegate = self._handler_delegate = self._fall_back()
        prepared = delegate.headers_received(self._start_line, self.request.headers)
        if prepared is not None:
            await prepared
        received, self._chunks = bytes(self._chunks), bytearray()
        if not self._closed:
            waited = delegate.data_received(received)
            if waited is not None:
                await waited

    async def _answer(self, message: dict[str, Any]) -> None:
        request = self.request
        settings = self.router.application.settings
        runtime = settings["plexus"]
        admitted = False
        try:
            await runtime.start()
            endpoint = runtime.endpoint
            await endpoint.start()
            scope = asgi_scope(request, {})
            call = await endpoint.modern_json.check(Request(scope, _receive(request.body)), message)
            if call is None:
                self._hand_over()
                return
            principal = self._principal(settings)
            if principal is None:
                self._hand_over()
                return
            admitted = True
            endpoint.arrived()  # (authenticated: a refused request is handed over, the handler's path tells it)
            scope["plexus.principal"] = principal
            scope["user"] = session_user(principal)
            forget = runtime.track_stream(principal, self._close)
            try:
                status, body = await endpoint.modern_json.serve(call)
            finally:
                forget()
        except Exception:
            if not admitted:  # nothing happened yet: the handler serves it (and reports what fails there)
                log.debug("Plexus: the plain MCP route handed a request to the handler", exc_info=True)
                self._hand_over()
                return
            log.exception("Uncaught exception %s %s", request.method, request.uri)
            status = 500
            body = _json(jsonrpc_error(500, "internal server error; the server log has the details"))
        self._state = ANSWERED
        self._answered = (settings, status, body)
        if self._read:  # otherwise finish() writes it, once tornado has read the whole request
            self._write(settings, status, body)

    def _principal(self, settings: dict[str, Any]) -> Principal | None:
        """The caller, as `PlexusHandler.prepare` admits it; None to let the handler decide (a refused key is
        carried to it, so the key is not admitted twice)."""
        request = self.request
        credential = bearer_credential(request.headers.get("Authorization"))
        if credential is not None and looks_like_key(credential):
            try:
                principal = admit_key(settings["plexus"], credential, "the Jupyter token")
            except web.HTTPError as refused:
                setattr(request, KEY_REFUSAL, refused)
                return None
            self._user = User(username=principal.owner or "key")  # as PlexusHandler._authenticate_key names it
            return principal
        provider = settings.get("identity_provider")
        if type(provider) not in SINGLE_USER_PROVIDERS or type(settings.get("authorizer")) is not AllowAllAuthorizer:
            return None
        user = token_user(provider, request.headers)
        if user is None:
            return None
        self._user = user
        return NOTEBOOK_ADMIN

    def _write(self, settings: dict[str, Any], status: int, body: bytes) -> None:
        """The answer, with the headers and records of `MCPHandler` finishing it."""
        request = self.request
        mark_api_activity(settings)
        headers = json_response_headers(settings["plexus_default_headers"], body)
        start_line = httputil.ResponseStartLine("", status, httputil.responses.get(status, "Unknown"))
        connection = request.connection
        try:
            connection.write_headers(start_line, headers, body)  # type: ignore[union-attr]
            connection.finish()  # type: ignore[union-attr]
        except StreamClosedError:
            pass
        log_function = settings["log_function"]
        record = log_function.keywords.get("record_prometheus_metrics", True)
        logger = jupyter_log()
        if status >= 300 or debug_emitted(logger):
            log_request(_Finished(request, settings, status, logger, self._user), record_prometheus_metrics=False)
        if record:
            record_request_duration(request, self.router.handler_class, status)

    def _close(self) -> None:
        """The call's API key was revoked: end its connection (as `MCPBridge.end`)."""
        connection = self.request.connection
        if connection is not None and hasattr(connection, "close"):
            connection.close()


class _Finished:
    """What Jupyter's `log_request` reads of a handler, for a request answered without one."""

    def __init__(
        self, request: httputil.HTTPServerRequest, settings: dict[str, Any], status: int, logger: Any, user: User | None
    ) -> None:
        self.request = request
        self.settings = settings
        self.log = logger
        self.current_user = user
        self._status = status

    def get_status(self) -> int:
        return self._status


def _receive(body: bytes) -> Callable[[], Any]:
    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()
