"""Slow and idle clients: timeouts and a per-address cap on a tornado HTTPServer's connections.

20,000 connections that each sent half a request body held 20,000 file descriptors until the process
could accept nothing (health timed out) and tornado logged a traceback per refused accept. Here:

- `header_timeout` (tornado's idle-connection timeout: the wait for a request's headers, also between
  requests on a keep-alive connection) and `body_timeout` (the wait for the whole body) close
  connections that send too slowly or not at all. A response being streamed (an MCP SSE stream) is not
  reading, so neither applies to it. They are kept by a sweep over the open connections (`ReadSweep`), not
  by tornado's own `header_timeout`/`body_timeout`: tornado wraps every request's header read and body read in
  `gen.with_timeout` (a timer, a future chained to another, for the body a task), about 9% of the server's main
  thread per MCP call; the sweep looks at each connection every quarter of the shorter timeout (at most every
  5 s), and sets a timer only for a read about to expire.
- at most `max_per_address` connections being read per client address, and in all at most three
  quarters of the process's open-files limit (the rest stays for the store, workers, kernels and
  files); one more is closed at once, so accepting never runs out of descriptors because of clients.
- the refusals and accept errors (EMFILE: no file descriptor left) are logged once per interval with a
  count, not once per attempt.

Jupyter creates its HTTPServer itself and exposes no setting for these: `ConnectionGuard.install` adjusts
that server after it exists (its connection parameters, and a wrapper around the three methods that see a
connection arrive and leave and a request begin: `handle_stream`, `on_close` and `start_request`, tornado's
HTTPServer API since 4.0).

Relies on: `jupyter_compat.pending_read` (which read a stream waits on), and tornado calling `start_request(
server_conn, request_conn)` once per request, with a new request connection, before its headers are read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

try:
    import resource
except ImportError:  # Windows: no open-files limit to read, no total cap
    resource = None  # type: ignore[assignment]
from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from ..handlers.jupyter_compat import PENDING_HEADERS, pending_read

log = logging.getLogger("plexus_mcp_jupyter")

LOG_INTERVAL = 60.0  # seconds between two log lines about the same condition
# Accept errors that mean "the process is out of something", which repeat for every waiting client.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class OncePerInterval:
    """Counts occurrences of a condition and says whether to log it now (the first, then one per interval)."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last = -float("inf")
        self.suppressed = 0

    def due(self) -> bool:
        """True when a line should be written now; otherwise the occurrence is counted in `suppressed`."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        return True

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class AcceptErrorLog(logging.Filter):
    """On the event loop's and tornado's loggers: an accept that failed for lack of resources is one line per
    interval (what, how often, what to do), not a traceback per attempt."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        super().__init__()
        self.limit = OncePerInterval(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, OSError) or error.errno not in RESOURCE_ERRNOS:
            return True
        if not self.limit.due():
            return False
        more = self.limit.take_suppressed()
        record.msg = (
            "Plexus: the server could not accept a connection: %s (errno %s)%s; raise the open-files "
            "limit (ulimit -n) or lower max_connections_per_address"
        )
        record.args = (
            error.strerror,
            errno.errorcode.get(error.errno or 0, error.errno),
            f"; {more} more since the last such line" if more else "",
        )
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def limit_accept_error_logs(loggers: tuple[str, ...] = ("asyncio", "tornado.application", "tornado.general")) -> None:
    """Install one AcceptErrorLog on each of `loggers` (idempotent)."""
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, AcceptErrorLog) for f in logger.filters):
            logger.addFilter(AcceptErrorLog())


def max_total_connections() -> int | None:
    """Three quarters of the open-files limit as it is now (Jupyter raises it at start; so may an operator)."""
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(16, soft - max(64, soft // 4))


class ReadSweep:
    """The header and body timeouts of a server's connections, kept by one periodic sweep (see the module's
    docstring) instead of a timer per request.

    A request's header wait is timed from the moment tornado starts reading it (`started`, called from
    `start_request`); its body from the first sweep that sees the body being read (up to one interval late).
    Each sweep closes the connections whose read outlived its timeout and sets a timer for each one that will
    do so before the next sweep, so a connection is closed at its deadline, as with tornado's own timeouts
    (a timer per connection about to expire, not per request)."""

    SWEEPS_PER_TIMEOUT = 4
    MAX_INTERVAL = 5.0  # seconds

    def __init__(self, header_timeout: float, body_timeout: float) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.interval = min(self.MAX_INTERVAL, min(header_timeout, body_timeout) / self.SWEEPS_PER_TIMEOUT)
        # Each connection's stream -> (its current request's connection, when tornado began reading its headers).
        self.requests: dict[IOStream, tuple[Any, float]] = {}
        self._body_seen: dict[IOStream, tuple[Any, float]] = {}  # stream -> (request, when its body read was seen)
        self._timers: dict[IOStream, tuple[Any, bool, asyncio.TimerHandle]] = {}  # stream -> (request, headers?, timer)
        self._tick_handle: asyncio.TimerHandle | None = None

    def started(self, stream: IOStream, request: Any) -> None:
        """A new request on `stream`: tornado reads its headers from now on."""
        self.requests[stream] = (request, time.monotonic())

    def start(self) -> None:
        """Sweep every `interval` seconds from now on (call on the server's event loop; idempotent)."""
        if self._tick_handle is None:
            self._tick_handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for _request, _headers, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _tick(self) -> None:
        self._tick_handle = asyncio.get_running_loop().call_later(self.interval, self._tick)
        try:
            self.sweep(time.monotonic())
        except Exception:  # a sweep that failed once must not stop the next ones
            log.exception("Plexus: the connection timeout sweep failed")

    def forget(self, stream: IOStream) -> None:
        self.requests.pop(stream, None)
        self._body_seen.pop(stream, None)
        kept = self._timers.pop(stream, None)
        if kept is not None:
            kept[2].cancel()

    def _deadline(self, stream: IOStream, now: float) -> tuple[Any, bool, float] | None:
        """(request, reading its headers?, when that read times out) for a connection that is reading."""
        current = self.requests.get(stream)
        # A detached request (a WebSocket took the stream over: HTTP1Connection.detach) is no longer HTTP's to time.
        detached = current is None or getattr(current[0], "stream", stream) is None
        pending = None if detached or stream.closed() else pending_read(stream)
        if current is None or pending is None:
            self._body_seen.pop(stream, None)
            return None
        request, headers_started = current
        if pending[1] == PENDING_HEADERS:
            return request, True, headers_started + self.header_timeout
        seen = self._body_seen.get(stream)
        if seen is None or seen[0] is not request:
            seen = self._body_seen[stream] = (request, now)
        return request, False, seen[1] + self.body_timeout

    def sweep(self, now: float) -> int:
        """Close the connections whose read outlived its timeout at `now` (time.monotonic()), and set a timer for
        those whose read will before the next sweep; returns how many were closed."""
        closed = 0
        for stream in list(self.requests):
            reading = self._deadline(stream, now)
            if reading is None:
                continue
            request, headers, deadline = reading
            if now >= deadline:
                self._close(stream, request, headers)
                closed += 1
            elif deadline < now + self.interval:
                kept = self._timers.get(stream)
                if kept is None or kept[0] is not request or kept[1] is not headers:
                    if kept is not None:
                        kept[2].cancel()
                    timer = asyncio.get_running_loop().call_later(deadline - now, self._expire, stream)
                    self._timers[stream] = (request, headers, timer)
        return closed

    def _expire(self, stream: IOStream) -> None:
        """A timer set by a sweep: close the connection if the read it was set for is still pending, past its
        deadline."""
        kept = self._timers.pop(stream, None)
        if kept is None:
            return
        reading = self._deadline(stream, time.monotonic())
        if reading is not None and reading[0] is kept[0] and reading[1] is kept[1] and time.monotonic() >= reading[2]:
            self._close(stream, reading[0], reading[1])

    def _close(self, stream: IOStream, request: Any, headers: bool) -> None:
        """Close a connection whose read timed out; a body's timeout is logged at INFO, as tornado logs it."""
        self.forget(stream)
        if not headers:
            log.info("Timeout reading body from %s", getattr(request, "context", "a client"))
        stream.close()


def _address_key(address: Any) -> str:
    """The client address a connection counts against (a Unix socket's clients share one)."""
    return str(address[0]) if isinstance(address, tuple) and address else "local"


class ConnectionGuard:
    """Timeouts and a per-address connection cap for one HTTPServer (see the module docstring)."""

    def __init__(self, max_per_address: int, *, header_timeout: float, body_timeout: float) -> None:
        self.max_per_address = max_per_address
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.open: dict[str, int] = {}
        self._counted: set[IOStream] = set()  # connections accepted before install() are not ours to release
        self.reads = ReadSweep(header_timeout, body_timeout)
        self.refused = 0
        self._refusals = OncePerInterval()

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionGuard:
        """The guard that PlexusSettings describe (http_header_timeout, http_body_timeout,
        max_connections_per_address)."""
        return cls(
            settings.max_connections_per_address,
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
        )

    def install(self, server: HTTPServer) -> None:
        """Apply the timeouts to `server` and start counting its connections (call on its event loop, before it
        serves)."""
        server.conn_params.header_timeout = None  # the sweep enforces them (see the module's docstring)
        server.conn_params.body_timeout = None
        handle_stream: Callable[[IOStream, Any], None] = server.handle_stream
        on_close: Callable[[Any], None] = server.on_close
        start_request: Callable[[Any, Any], Any] = server.start_request
        reads = self.reads

        def guarded_handle_stream(stream: IOStream, address: Any) -> None:
            if not self.admit(_address_key(address)):
                stream.close()
                return
            self._counted.add(stream)
            handle_stream(stream, address)

        def timed_start_request(server_conn: Any, request_conn: Any) -> Any:
            reads.started(server_conn.stream, request_conn)
            return start_request(server_conn, request_conn)

        def counted_on_close(server_conn: Any) -> None:
            reads.forget(server_conn.stream)
            if server_conn.stream in self._counted:
                self._counted.discard(server_conn.stream)
                self.release(_address_key(server_conn.context.address))
            on_close(server_conn)

        server.handle_stream = guarded_handle_stream  # type: ignore[method-assign]
        server.start_request = timed_start_request  # type: ignore[method-assign]
        server.on_close = counted_on_close  # type: ignore[method-assign]
        reads.start()
        limit_accept_error_logs()
        log.info(
            "Plexus: HTTP connections time out after %gs without headers (or idle) and %gs for a body; at "
            "most %d per client address",
            self.header_timeout,
            self.body_timeout,
            self.max_per_address,
        )

    def admit(self, key: str) -> bool:
        """Count a new connection from `key`, or refuse it (and log that, once per interval) past a cap."""
        count = self.open.get(key, 0)
        total_cap = max_total_connections()
        if count >= self.max_per_address:
            reason = f"{key} has {count} open (max_connections_per_address)"
        elif total_cap is not None and len(self._counted) >= total_cap:
            reason = f"{len(self._counted)} connections are open, 3/4 of the open-files limit"
        else:
            self.open[key] = count + 1
            return True
        self.refused += 1
        if self._refusals.due():
            more = self._refusals.take_suppressed()
            log.warning(
                "Plexus: refused a connection from %s: %s%s",
                key,
                reason,
                f"; {more} more refused since the last such line" if more else "",
            )
        return False

    def release(self, key: str) -> None:
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)
