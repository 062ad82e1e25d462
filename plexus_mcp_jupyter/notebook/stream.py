"""One WebSocket to `{base_url}plexus/api/events` per client, read by a daemon thread.

The thread connects, reads `hello` (the last sequence number and the server's epoch), then hands every
message to the client. When the socket drops it reconnects with backoff and resumes with
`since=<last seq>&epoch=<epoch>`, so nothing is missed; the server answers `{"type": "gap"}` when it can
not replay (it restarted, or the events were dropped), and the client then re-reads state by REST.
Nothing here runs on the kernel's main thread; `send()` may be called from any thread (websocket-client
serialises frames with a lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import websocket

from ..core.filters import FollowEvents

log = logging.getLogger("plexus_mcp_jupyter.notebook")

BACKOFF_START = 0.25
BACKOFF_MAX = 10.0
FINAL_CLOSE_CODES = (4400, 4401)  # a bad filter; an API key revoked
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0  # after this long without a frame, ping; after twice this, reconnect


def ws_url(http_url: str) -> str:
    """`http(s)://host/base/` -> `ws(s)://host/base/plexus/api/events`."""
    scheme, rest = http_url.split("://", 1)
    return ("wss" if scheme == "https" else "ws") + "://" + rest + "plexus/api/events"


class EventStream:
    """The reader thread. `on_message(message)` gets every message, `on_open(hello, reconnected)` each connection."""

    def __init__(
        self,
        url: str,
        token: str | None,
        on_message: Callable[[dict[str, Any]], None],
        on_open: Callable[[dict[str, Any], bool], None],
    ) -> None:
        self.url = ws_url(url)
        self._header = [f"Authorization: token {token}"] if token else []
        self._on_message = on_message
        self._on_open = on_open
        self.last_seq: int | None = None
        self.epoch: str | None = None
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connections = 0
        self._ws: websocket.WebSocket | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plexus-events", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stopped.is_set():
            self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def send(self, message: dict[str, Any]) -> bool:
        """Send a JSON message; False when not connected (the caller re-sends what matters on reconnect)."""
        ws = self._ws
        if ws is None or not self.connected.is_set():
            return False
        try:
            ws.send(json.dumps(message, default=str))
            return True
        except (websocket.WebSocketException, OSError) as exc:
            log.debug("Plexus: send failed: %s", exc)
            return False

    def close(self) -> None:
        self._stopped.set()
        self.connected.clear()
        self.drop()

    def drop(self) -> None:
        """Break the current connection as a network failure would (the thread reconnects unless closed)."""
        ws = self._ws
        if ws is not None and ws.sock is not None:
            with contextlib.suppress(OSError):
                ws.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv() at once, unlike close()

    def _query(self) -> str:
        if self.last_seq is None:
            return ""
        return "?" + urlencode(FollowEvents(since=self.last_seq, epoch=self.epoch).query())

    def _run(self) -> None:
        backoff = BACKOFF_START
        while not self._stopped.is_set():
            reconnected = self.last_seq is not None
            try:
                ws = websocket.create_connection(
                    self.url + self._query(), header=self._header, timeout=CONNECT_TIMEOUT, enable_multithread=True
                )
            except Exception as exc:
                self.last_error = f"cannot open the event stream at {self.url}: {exc}"
                log.debug("Plexus: %s; retrying in %.2fs", self.last_error, backoff)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._ws = ws
            try:
                ws.settimeout(IDLE_TIMEOUT)
                hello = json.loads(ws.recv())
                if hello.get("type") != "hello":
                    raise websocket.WebSocketException(f"expected hello, got {hello!r}")
                self.connections += 1
                self.epoch = hello.get("epoch")
                if self.last_seq is None:
                    self.last_seq = int(hello["seq"])
                self.connected.set()
                backoff = BACKOFF_START
                self.last_error = None
                self._on_open(hello, reconnected)
                quiet = False
                while not self._stopped.is_set():
                    try:
                        opcode, frame = ws.recv_data_frame(True)  # answers Jupyter's pings by itself
                    except websocket.WebSocketTimeoutException:
                        if quiet:
                            raise  # no frame, not even a pong, for two periods: the peer is gone
                        quiet = True
                        ws.ping()
                        continue
                    quiet = False
                    if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
                        continue
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
                        if code in FINAL_CLOSE_CODES:
                            # The key was revoked, or the request is wrong: reconnecting cannot help.
                            self.last_error = (
                                f"the server ended the event stream ({code}: "
                                f"{frame.data[2:].decode(errors='replace')}); reconnect with "
                                "plexus.connect(url, token) and a valid credential"
                            )
                            log.warning("Plexus: %s", self.last_error)
                            self._stopped.set()
                        break
                    raw = frame.data
                    message = json.loads(raw)
                    if message.get("type") == "event":
                        self.last_seq = int(message["seq"])
                    elif message.get("type") == "gap":
                        # Continue from now: the server's numbering is the hello's.
                        self.last_seq = int(hello["seq"])
                    try:
                        self._on_message(message)
                    except Exception:
                        log.exception("Plexus: an event listener failed")
            except Exception as exc:
                if not self._stopped.is_set():
                    self.last_error = f"the event stream dropped: {exc}"
                    log.debug("Plexus: %s", self.last_error)
            finally:
                self.connected.clear()
                self._ws = None
                with contextlib.suppress(Exception):
                    ws.close(timeout=0.5)
            if not self._stopped.is_set():
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
