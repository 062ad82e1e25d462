"""A request whose body is sent only in part: what the server answers before it has the rest.

An HTTP client library writes a whole body before it reads the answer; a server that answers before reading a body
(handlers/request_body.py) then closes the connection, and a body larger than the sockets' buffers makes the client
see a reset instead of the answer. These helpers send the headers and a part of the body over an asyncio connection
(the test's server runs on the same loop) and read what comes back."""

from __future__ import annotations

import asyncio
from typing import NamedTuple
from urllib.parse import urlsplit


class EarlyAnswer(NamedTuple):
    status: int | None  # None: no answer within the wait (the server waits for the rest of the body)
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after the answer


async def read_answer(reader: asyncio.StreamReader, wait: float) -> EarlyAnswer:
    try:
        status_line = await asyncio.wait_for(reader.readline(), wait)
    except asyncio.TimeoutError:
        return EarlyAnswer(None, {}, b"", False)
    if not status_line:
        return EarlyAnswer(None, {}, b"", True)
    headers: dict[str, str] = {}
    while True:
        line = await asyncio.wait_for(reader.readline(), wait)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), wait)
    try:
        closed = await asyncio.wait_for(reader.read(1), 2) == b""
    except (asyncio.TimeoutError, ConnectionError):
        closed = False
    return EarlyAnswer(int(status_line.split()[1]), headers, body, closed)


def request_head(url: str, method: str, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def answer_before_body(
    url: str, headers: dict[str, str], declared: int, sent: bytes = b"", method: str = "POST", wait: float = 5.0
) -> EarlyAnswer:
    """Send the headers of a request declaring a body of `declared` bytes (Content-Length) and its first bytes
    `sent`, then read the answer without sending the rest."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request_head(url, method, {**headers, "Content-Length": str(declared)}) + sent)
        await writer.drain()
        return await read_answer(reader, wait)
    finally:
        writer.close()


async def chunked_answer(
    url: str, headers: dict[str, str], chunk: bytes, most_chunks: int, method: str = "POST", wait: float = 0.5
) -> tuple[EarlyAnswer, int]:
    """Send a chunked body (no Content-Length), `chunk` after `chunk`, waiting `wait` seconds for an answer after
    each, at most `most_chunks` of them (never the body's end): the answer and the chunks sent before it came."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request_head(url, method, {**headers, "Transfer-Encoding": "chunked"}))
        for sent in range(1, most_chunks + 1):
            try:
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
            except ConnectionError:
                break
            answer = await read_answer(reader, wait)
            if answer.status is not None or answer.closed:
                return answer, sent
        return EarlyAnswer(None, {}, b"", False), most_chunks
    finally:
        writer.close()
