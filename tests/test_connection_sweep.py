"""The connection timeouts' sweep (security/connections.py ReadSweep) on a real tornado HTTPServer over TCP.

The sweep is driven with explicit times (`sweep(now)`, relative to when tornado began reading a request's headers),
so the tests assert which connection is closed at which moment without waiting for the timeouts; the end-to-end
scenario with real waits is in test_hardening_http.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler
from tornado.websocket import WebSocketHandler, websocket_connect

from plexus_mcp_jupyter.handlers.jupyter_compat import PENDING_BODY, PENDING_HEADERS, pending_read
from plexus_mcp_jupyter.security.connections import ConnectionGuard
from tests.test_hardening_http import closed_by_server, still_open

HEADER, BODY = 5.0, 7.0


class Echo(WebSocketHandler):
    def on_message(self, message: str | bytes) -> None:
        self.write_message(message)


class Hello(RequestHandler):
    def get(self) -> None:
        self.finish("hello")

    def post(self) -> None:
        self.finish(str(len(self.request.body)))


async def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


def header_start(guard: ConnectionGuard) -> float:
    """When tornado began reading the headers of the (only) connection's current request."""
    ((_request, started),) = guard.reads.requests.values()
    return started


def reads(guard: ConnectionGuard) -> list[str]:
    """What each tracked connection's stream is waiting on now."""
    return sorted(p[1] for p in (pending_read(s) for s in guard.reads.requests) if p is not None)


async def closed(sock: socket.socket) -> bool:
    """Whether the server closes `sock` within 15 seconds (read off the loop: the server runs on it)."""
    return await asyncio.to_thread(closed_by_server, sock, 15)


def answer(sock: socket.socket) -> bytes:
    """One response to a GET (read off the loop: the server runs on it)."""
    sock.settimeout(5)
    data = b""
    while not data.endswith(b"hello"):
        data += sock.recv(4096)
    return data


@asynccontextmanager
async def guarded_server(
    connections: int = 1,
) -> AsyncIterator[tuple[HTTPServer, ConnectionGuard, list[socket.socket], int]]:
    """A tornado HTTPServer with the guard installed, `connections` client sockets to it (each waiting for its first
    request's headers once the block starts), and its port."""
    server = HTTPServer(Application([("/", Hello), ("/ws", Echo)]))
    guard = ConnectionGuard(50, header_timeout=HEADER, body_timeout=BODY)
    guard.install(server)
    listening = bind_sockets(0, "127.0.0.1")
    server.add_sockets(listening)
    port = listening[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    try:
        await wait_until(lambda: reads(guard) == [PENDING_HEADERS] * connections, "the connections wait for headers")
        yield server, guard, clients, port
    finally:
        for client in clients:
            client.close()
        guard.reads.stop()
        server.stop()


async def test_a_read_about_to_expire_is_closed_at_its_deadline_by_a_timer_not_at_the_next_sweep():
    async with guarded_server() as (_server, guard, (idle,), _port):
        deadline = header_start(guard) + HEADER
        guard.reads.sweep(deadline - 0.5)  # before the deadline, less than an interval before: a timer is set
        assert still_open(idle)
        assert await closed(idle)  # at the deadline (a sweep's timer)
        assert time.monotonic() >= deadline


async def test_tornado_s_own_timeouts_are_off_and_the_sweep_runs_often_enough():
    async with guarded_server(0) as (server, guard, _clients, _port):
        assert server.conn_params.header_timeout is None and server.conn_params.body_timeout is None
        assert guard.reads.interval == HEADER / 4


async def test_an_idle_connection_is_closed_once_its_header_wait_outlived_the_timeout():
    async with guarded_server() as (_server, guard, (idle,), _port):
        t0 = header_start(guard)
        assert guard.reads.sweep(t0 + 0.1) == 0
        assert guard.reads.sweep(t0 + HEADER - 0.1) == 0
        assert still_open(idle)
        assert guard.reads.sweep(t0 + HEADER) == 1
        assert await closed(idle)
        await wait_until(lambda: not guard.reads.requests, "the closed connection is forgotten")


async def test_a_slow_body_has_the_body_timeout_counted_from_its_first_sight_not_from_the_header_wait():
    async with guarded_server() as (_server, guard, (slow,), _port):
        t0 = header_start(guard)
        guard.reads.sweep(t0 + 0.1)
        slow.sendall(b'POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n{"a":')
        await wait_until(lambda: reads(guard) == [PENDING_BODY], "the connection waits for its body")
        assert guard.reads.sweep(t0 + 4) == 0  # the body read is new: its clock starts here
        assert guard.reads.sweep(t0 + 4 + BODY - 0.1) == 0  # past the header timeout, not past the body's
        assert still_open(slow)
        assert guard.reads.sweep(t0 + 4 + BODY) == 1
        assert await closed(slow)


async def test_a_keep_alive_connection_that_keeps_asking_is_never_closed():
    """Each request's header wait is a new read of a new request: a client that asks again and again within the
    timeout keeps its connection however long it lives."""
    async with guarded_server() as (_server, guard, (client,), _port):
        starts = []
        for _ in range(4):
            await wait_until(lambda: reads(guard) == [PENDING_HEADERS], "the connection waits for headers")
            starts.append(header_start(guard))
            assert guard.reads.sweep(starts[-1] + HEADER - 0.1) == 0
            client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await asyncio.to_thread(answer, client)).endswith(b"hello")
        assert starts == sorted(set(starts))  # each request's header wait is timed from its own start
        assert still_open(client)


async def test_a_websocket_is_never_timed_out_by_the_sweep():
    """A WebSocket takes the connection over from HTTP (tornado detaches it): waiting for its next message is no
    request's header or body."""
    async with guarded_server(0) as (_server, guard, _clients, port):
        ws = await websocket_connect(f"ws://127.0.0.1:{port}/ws")
        try:
            await ws.write_message("one")
            assert await ws.read_message() == "one"
            far = time.monotonic() + 100 * (HEADER + BODY)
            assert guard.reads.sweep(far) == 0
            await ws.write_message("two")
            assert await ws.read_message() == "two"
        finally:
            ws.close()
