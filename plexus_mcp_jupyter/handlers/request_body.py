"""A request body read only once its sender is admitted, and refused before it is read when it would be refused after.

Tornado reads a whole body before a handler runs (up to Jupyter's `max_body_size`, 512 MiB): a body refused for its
size (`max_request_bytes`, 413) or its sender's byte budget (`request_bytes_rate`, 429) had cost the event loop its
read all the same (4 MiB: its bytes received, buffered and joined). `StreamedBody` handlers are tornado's
`stream_request_body`: `prepare()` (authentication, Host, Origin, XSRF) runs once the headers are in, before any of
the body is read, and then the body's declared size (Content-Length) is checked against the bound and charged to
the sender's byte budget (`admit_body`). A large body (over JSON_ON_LOOP_BYTES, 64 KiB) refused there for its size
(413), or by `prepare()` itself (401, 403), is answered at once and never read: tornado ends the connection after an
answer given before the body is read (`Connection: close` says so).

A small body's refusal waits for the body (at most 64 KiB, read and not kept), so the connection stays open for the
next request and a client that writes its whole body before it reads sees the answer; so does a 429 (the byte
budget's or the request rate's) of a body within the bound: a client over its rate learns its Retry-After rather
than seeing a reset, and its body costs the loop its read only (not kept, joined or parsed; the rates bound how
often). The refusal is raised when the handler's method would run (`__init_subclass__` wraps each one). A body
without a Content-Length (chunked) is bounded as it arrives (`data_received`): refused once past the bound, charged
once past 64 KiB (what it has so far, then each later chunk), refused once over the budget, and a refused sender's is
answered once past 64 KiB. The body is kept as tornado keeps it (a list of chunks, joined once: `body`).

What changes for a client: a client that writes a whole large body before it reads the answer may see the connection
reset instead of a refusal (401, 403, 413) when the body is larger than the sockets' buffers (one that sends
`Expect: 100-continue` waits for the go-ahead, which a refused request never gets). Form-encoded bodies are not
parsed into arguments (these handlers take JSON): an XSRF token goes in the `X-XSRFToken` header, as Jupyter's own
frontend sends it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from tornado import web

from ..security.bodies import JSON_ON_LOOP_BYTES
from ..security.http import charge_large_body
from ..security.identity import Principal
from ..security.ratelimit import RateLimiter
from .jupyter_compat import response_finished

BODYLESS_METHODS = ("GET", "HEAD", "OPTIONS")
HTTP_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")


def declared_length(headers: Any) -> int | None:
    """The body's size its Content-Length says, or None (chunked, or not a number: tornado refuses that itself)."""
    if "Transfer-Encoding" in headers:
        return None
    value = headers.get("Content-Length")
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return int(value)


def too_large(size: int, limit: int) -> web.HTTPError:
    """413 for a body over `limit` (max_request_bytes)."""
    return web.HTTPError(
        413, f"the request body is {size:,} bytes, more than the {limit:,} a JSON request may have (max_request_bytes)"
    )


@web.stream_request_body
class StreamedBody(web.RequestHandler):
    """A handler whose body is read after `prepare()`, within `body_limit()` and its sender's byte budget (above).

    A subclass names the bound (`body_limit`), the budget (`body_budget`, None: not charged) and who is charged
    (`body_sender`, called after its own `prepare()`: None for a request that is not charged). Its methods read the
    body as `self.body`."""

    _body_chunks: list[bytes] | None = None  # the body's chunks (None: refused, not kept)
    _received = 0
    _charged = False  # the body (so far) is charged: each later chunk is too
    _unread = False  # answered before the whole body was read: the connection ends after the answer
    _refusal: Exception | None = None  # prepare's, answered once a small body has been read
    # The methods that read a body (None: all but GET, HEAD, OPTIONS); another's past 64 KiB is refused unread.
    body_methods: tuple[str, ...] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in HTTP_METHODS:  # (inherited ones too: a method the handler lacks answers 405 after the refusal)
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "_refusal_first", False):
                setattr(cls, name, _refusal_first(method))
        closing = cls.on_connection_close
        if closing is not web.RequestHandler.on_connection_close and not getattr(closing, "_ends_body_wait", False):
            # One of the handler's own or inherited (WebSocketHandler's does not call tornado's): tornado's must run
            # too, it ends the wait for the rest of the body.
            cls.on_connection_close = _ending_the_body_wait(closing)  # type: ignore[method-assign,assignment]

    def body_limit(self) -> int:
        raise NotImplementedError

    def body_budget(self) -> RateLimiter | None:
        raise NotImplementedError

    def body_sender(self) -> Principal | None:
        raise NotImplementedError

    async def admit_request(self) -> None:
        """What a subclass checks of a request that takes a body, once `prepare()` has admitted its sender and before
        the body's size is (a role, a quota, what an upload has left: `body_limit()` may then say less): raised, it is
        refused as `prepare()`'s own refusals are, a large body unread."""

    async def prepare(self) -> None:
        self._body_chunks = []
        try:
            prepared = super().prepare()
            if prepared is not None:
                await prepared
            if not self._bodyless():
                await self.admit_request()
            self.admit_body()
        except Exception as exc:
            declared = declared_length(self.request.headers)
            if declared is not None and declared > JSON_ON_LOOP_BYTES and not self._throttled(exc, declared):
                self._unread = True  # answered now, the body never read
                raise
            self._refusal, self._body_chunks = exc, None  # answered once the body has come (not kept meanwhile)

    def _throttled(self, refusal: Exception, declared: int) -> bool:
        """A 429 of an admitted sender for a body within the bound, or a 413 of one at most twice the bound: its body
        is read (and not kept) before the answer, so that a client that writes its whole body before it reads (httpx,
        the MCP SDK's) sees the answer (a 429's Retry-After, a 413's limit), not a connection reset."""
        status = refusal.status_code if isinstance(refusal, web.HTTPError) else None
        return (status == 429 and declared <= self._bound()) or (status == 413 and declared <= 2 * self._bound())

    def _too_large(self, size: int) -> web.HTTPError:
        method = self.request.method
        if self._bodyless():
            return web.HTTPError(
                413, f"a {method} request's body is {size:,} bytes; one may have {JSON_ON_LOOP_BYTES:,}"
            )
        return too_large(size, self.body_limit())

    def _bound(self) -> int:
        """`body_limit()`, or 64 KiB for a method that takes no body (GET, HEAD, OPTIONS, or one not in
        `body_methods`: a larger one is refused)."""
        limit = self.body_limit()
        return min(limit, JSON_ON_LOOP_BYTES) if self._bodyless() else limit

    def _bodyless(self) -> bool:
        method = self.request.method
        return method in BODYLESS_METHODS or (self.body_methods is not None and method not in self.body_methods)

    def admit_body(self) -> None:
        """The declared size checked and charged, before any of the body is read: 413 over the bound, 429 over the
        sender's byte budget (with Retry-After). A chunked body is checked as it arrives (`data_received`)."""
        declared = declared_length(self.request.headers)
        if declared is None:
            return
        if declared > self._bound():
            raise self._too_large(declared)
        if declared > JSON_ON_LOOP_BYTES:
            self._charge(declared)

    def _charge(self, size: int) -> None:
        sender = self.body_sender()
        if sender is not None:
            charge_large_body(self.body_budget(), sender, size)
        self._charged = True

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if response_finished(self):  # refused while it was arriving: the rest is not read
            return None
        self._received += len(chunk)
        try:
            if self._refusal is not None:
                chunked = declared_length(self.request.headers) is None
                if chunked and self._received > JSON_ON_LOOP_BYTES:  # a refused sender's chunked body: not read further
                    raise self._refusal
                return None
            if self._received > self._bound():  # (only a chunked body can: a declared size was checked)
                raise self._too_large(self._received)
            if declared_length(self.request.headers) is None:  # chunked: charged as it arrives
                if self._charged:
                    self._charge(len(chunk))
                elif self._received > JSON_ON_LOOP_BYTES:
                    self._charge(self._received)
        except Exception as refused:
            self._body_chunks, self._unread = None, True
            self.log_exception(type(refused), refused, refused.__traceback__)
            status = refused.status_code if isinstance(refused, web.HTTPError) else 500
            self.send_error(status, exc_info=(type(refused), refused, refused.__traceback__))
            return None
        if self._body_chunks is not None:
            self._body_chunks.append(chunk)
        return None

    @property
    def body(self) -> bytes:
        """The whole body (read by then: a handler's method runs once it has arrived), joined once."""
        chunks = self._body_chunks
        if chunks is not None and (len(chunks) != 1 or self.request.body is not chunks[0]):
            self.request.body = b"".join(chunks)
            self._body_chunks = [self.request.body]
        return self.request.body

    def finish(self, chunk: Any = None) -> Any:
        if self._unread:  # (set here: send_error clears the headers set before it)
            self.set_header("Connection", "close")
        return super().finish(chunk)


def _ending_the_body_wait(closing: Callable[[Any], None]) -> Callable[[Any], None]:
    """A handler's `on_connection_close`, then tornado's: a stream_request_body handler waits for the rest of its body
    after `prepare()`, and only tornado's ends that wait when the connection closes mid-body (without it the handler,
    its request task and the body so far were kept for good)."""

    @functools.wraps(closing)
    def closed(self: Any) -> None:
        try:
            closing(self)
        finally:
            web.RequestHandler.on_connection_close(self)

    closed._ends_body_wait = True  # type: ignore[attr-defined]
    return closed


def _refusal_first(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, raising the refusal `prepare` kept for when the body had come, if any (see the module)."""

    @functools.wraps(method)
    def checked(self: StreamedBody, *args: Any, **kwargs: Any) -> Any:
        if self._refusal is not None:
            raise self._refusal
        return method(self, *args, **kwargs)

    checked._refusal_first = True  # type: ignore[attr-defined]
    return checked
