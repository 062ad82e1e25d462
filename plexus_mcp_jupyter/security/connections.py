"""Slow and idle clients: timeouts and a per-address cap on a tornado HTTPServer's connections.

20,000 connections that each sent half a request body held 20,000 file descriptors until the process
could accept nothing (health timed out) and tornado logged a traceback per refused accept. Here:

- `header_timeout` (tornado's idle-connection timeout: the wait for a request's headers, also between
  requests on a keep-alive connection) and `body_timeout` (the wait for the whole body) close
  connections that send too slowly or not at all. A response being streamed (an MCP SSE stream) is not
  reading, so neither applies to it.
- at most `max_per_address` connections being read per client address, and in all at most three
  quarters of the process's open-files limit (the rest stays for the store, workers, kernels and
  files); one more is closed at once, so accepting never runs out of descriptors because of clients.
- the refusals and accept errors (EMFILE: no file descriptor left) are logged once per interval with a
  count, not once per attempt.

Jupyter creates its HTTPServer itself and exposes no setting for these: `ConnectionGuard.install` adjusts
that server after it exists (its connection parameters, and a wrapper around the two methods that see a
connection arrive and leave: `handle_stream` and `on_close`, tornado's HTTPServer API since 4.0).
"""

from __future__ import annotations

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
        """Apply the timeouts to `server` and start counting its connections (call before it serves)."""
        server.conn_params.header_timeout = self.header_timeout
        server.conn_params.body_timeout = self.body_timeout
        handle_stream: Callable[[IOStream, Any], None] = server.handle_stream
        on_close: Callable[[Any], None] = server.on_close

        def guarded_handle_stream(stream: IOStream, address: Any) -> None:
            if not self.admit(_address_key(address)):
                stream.close()
                return
            self._counted.add(stream)
            handle_stream(stream, address)

        def counted_on_close(server_conn: Any) -> None:
            if server_conn.stream in self._counted:
                self._counted.discard(server_conn.stream)
                self.release(_address_key(server_conn.context.address))
            on_close(server_conn)

        server.handle_stream = guarded_handle_stream  # type: ignore[method-assign]
        server.on_close = counted_on_close  # type: ignore[method-assign]
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
