"""Origin and Host rules and error bodies, shared by the Jupyter handlers and the standalone server."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from tornado import httputil, web

from .bodies import JSON_ON_LOOP_BYTES, charge_body, cooperative_loads, parse_large
from .identity import Principal
from .keys import KeyRejected
from .ratelimit import BytesLimited, RateLimited, RateLimiter

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def bearer_credential(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <x>` (or Jupyter's `token <x>`) header, else None."""
    if not header:
        return None
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() in ("bearer", "token") and credential else None


def origin_allowed(
    origin: str | None,
    host: str | None,
    scheme: str,
    allow_origin: str = "",
    allow_origin_pat: re.Pattern[str] | str | None = None,
) -> bool:
    """No Origin (scripts, MCP clients), the server's own origin, or one the configuration allows.

    The server's own origin is the request's scheme, host and port (a page on https://host cannot call
    http://host, nor the reverse: they are different origins). An MCP endpoint must refuse foreign
    Origins whatever the credential (DNS rebinding), so this is checked for token-authenticated requests
    too, unlike Jupyter's own API.
    """
    if origin is None or allow_origin == "*":
        return True
    if same_origin(origin, scheme, host):
        return True
    if allow_origin:
        return allow_origin == origin
    if allow_origin_pat:
        return bool(re.match(allow_origin_pat, origin))
    return False


DEFAULT_PORTS = {"http": 80, "https": 443}


def same_origin(origin: str, scheme: str, host: str | None) -> bool:
    """Whether `origin` is (scheme, host, port) of a request with this scheme and Host header, default
    ports normalised ("http://h" is "http://h:80")."""
    try:
        theirs = urlsplit(origin.strip().lower())
        ours = urlsplit(f"{scheme.lower()}://{(host or '').strip().lower()}")
        if theirs.scheme not in DEFAULT_PORTS or theirs.scheme != ours.scheme or not ours.hostname:
            return False
        default = DEFAULT_PORTS[theirs.scheme]
        return (theirs.hostname, theirs.port or default) == (ours.hostname, ours.port or default)
    except ValueError:  # a malformed port
        return False


def host_name(host_header: str | None) -> str:
    """The host part of a Host header, without the port ("[::1]:8888" -> "[::1]")."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BadJSON(ValueError):
    """A body or message that is not the JSON the server accepts; the message is one line for the client."""


# Deepest nesting of arrays and objects a client's JSON may have (the top value is level 1). Python's parser would
# otherwise recurse to about a thousand levels (a RecursionError); no request of this API needs more than a few.
MAX_JSON_DEPTH = 64

_EMPTY_CONTAINER = re.compile(rb"\[\s*\]|\{\s*\}")
_QUOTED = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_PARENTHESES = bytes.maketrans(b"[]{}", b"()()")


def json_refusal(text: str | bytes, max_values: int | None = None, setting: str = "max_json_values") -> str | None:
    """Why a client's JSON text is refused unparsed, or None: (`max_values` given) holding more values than that,
    or nested deeper than MAX_JSON_DEPTH. The one check behind every REST body, MCP body and WebSocket message.

    Cheap for the common case: a text shorter than 2 * MAX_JSON_DEPTH bytes cannot be deeper (each level takes an
    opening and a closing bracket), one with at most MAX_JSON_DEPTH opening brackets cannot either, and a text of n
    bytes holds at most about n/2 values, fewer than its commas and opening brackets: only past those bounds are the
    values counted (`json_values`) or the nesting measured (`json_depth`). A large text is looked at in pieces of
    about `_PIECE_BYTES`, each a few C calls: a thread checking it gives the GIL back between them. Malformed JSON
    is measured as if it were well-formed: the parser refuses it after."""
    if len(text) <= 2 * MAX_JSON_DEPTH:
        return None
    data = _as_bytes(text)
    commas, opens = _structure_counts(data)
    if max_values is not None and len(data) > 2 * max_values and 1 + commas + opens > max_values:
        values = json_values(data)  # commas and brackets in strings are text
        if values > max_values:
            return too_many_values(values, max_values, setting)
    if opens > MAX_JSON_DEPTH and json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return f"not accepted: JSON nested more than the {MAX_JSON_DEPTH} levels allowed"
    return None


# A piece of a text looked at in one go: a thread checking a large body gives the GIL back between pieces (one regex
# over a whole 4 MiB body held it 50-130 ms, the event loop standing still meanwhile).
_PIECE_BYTES = 64 * 1024


def _structure_counts(data: bytes) -> tuple[int, int]:
    """The commas and the opening brackets of `data`, strings included (bounds from above), a piece at a time."""
    if len(data) <= _PIECE_BYTES:  # (most bodies: no loop)
        return data.count(b","), data.count(b"[") + data.count(b"{")
    commas = opens = 0
    for start in range(0, len(data), _PIECE_BYTES):
        end = start + _PIECE_BYTES
        commas += data.count(b",", start, end)
        opens += data.count(b"[", start, end) + data.count(b"{", start, end)
    return commas, opens


def _unescaped_pieces(data: bytes) -> Iterator[bytes]:
    """`data` in pieces of about `_PIECE_BYTES` (none cutting a run of backslashes from the byte after it), each
    without its escaped backslashes and quotes (pairs from the left, as a JSON string's escapes are read): every
    quote left opens or closes a string."""
    start, size = 0, len(data)
    while start < size:
        end = min(start + _PIECE_BYTES, size)
        while end < size and data[end - 1] == 0x5C:  # a backslash at the cut: the piece takes the byte it escapes
            end += 1
        piece = data[start:end]
        yield piece.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in piece else piece
        start = end


def json_values(text: str | bytes) -> int:
    """How many values (arrays, objects, their elements and members, and the top one) a JSON text holds: the commas
    and opening brackets outside strings, less the empty containers, plus one (`_bare_pieces`). An empty container
    cut by a piece's end counts as one value more (a bound, at most one a piece)."""
    values = 1
    for bare in _bare_pieces(_as_bytes(text)):
        values += bare.count(b",") + bare.count(b"[") + bare.count(b"{") - len(_EMPTY_CONTAINER.findall(bare))
    return values


def _bare_pieces(data: bytes, dropped: bytes | None = None) -> Iterator[bytes]:
    """`data` a piece at a time (`_unescaped_pieces`: every quote left opens or closes a string), each string in it
    replaced by 0 (`_QUOTED`, linear: no match can fail and start again); a string open at a piece's end is cut
    there and its rest from the next piece, a string never closed runs to the end (malformed: the parser refuses it).
    `dropped`: bytes other than quotes taken out of each piece first (less for the regex to read)."""
    open_string = False
    for piece in _unescaped_pieces(data):
        if dropped is not None:  # (adjacent quotes too: an empty string, or one's end and the next one's start)
            piece = piece.translate(None, dropped).replace(b'""', b"")
        if open_string:
            close = piece.find(b'"')
            if close < 0:
                continue
            piece, open_string = piece[close + 1 :], False
        if piece.count(b'"') % 2:
            piece, open_string = piece[: piece.rindex(b'"')] + b"0", True
        yield _QUOTED.sub(b"0", piece)


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text


def json_depth(text: str | bytes, limit: int) -> int:
    """The deepest nesting of arrays and objects in a JSON text when it is at most `limit`; `limit` + 1 when deeper.

    Byte operations, no per-character Python: its brackets outside strings (`_bare_pieces`, a piece at a time);
    then innermost pairs are dropped, a level a pass (each pass a C call: a thread gives the GIL back between them),
    `limit` passes at most; pairs left after them: deeper than `limit` (not measured further: an exact measure held
    the GIL throughout)."""
    pieces = _bare_pieces(_as_bytes(text), _NOT_STRUCTURE)
    structure = b"".join(bare.translate(None, _NOT_BRACKETS) for bare in pieces)
    inner = structure.translate(_AS_PARENTHESES)
    for level in range(limit):
        shorter = inner.replace(b"()", b"")
        if len(shorter) == len(inner):  # no pair left: every level dropped (or malformed: the parser refuses it)
            return level
        inner = shorter
    return limit + 1 if b"()" in inner else limit


def parse_json(text: str | bytes, max_values: int | None = None, setting: str = "max_json_values") -> Any:
    """JSON from a client, every failure a BadJSON with a one-line reason (never a RecursionError or a
    multi-line message): the one parse behind every REST body and WebSocket message. Refused unparsed
    (`json_refusal`): nesting deeper than MAX_JSON_DEPTH, and with `max_values`, a text holding more values (a few
    bytes each, and each a Python object of 50 to 200), `setting` the bound's name for the message."""
    refused = json_refusal(text, max_values, setting)
    if refused is not None:
        raise BadJSON(refused)
    try:
        return json.loads(text)
    except ValueError as exc:  # (JSONDecodeError, UnicodeDecodeError and a huge integer's are ValueErrors)
        raise bad_json(exc) from None
    except RecursionError as exc:  # not reached past json_refusal; kept so no parse can raise one to a handler
        raise bad_json(exc) from None


def bad_json(exc: BaseException) -> BadJSON:
    """The one-line BadJSON of json.loads's exception."""
    if isinstance(exc, RecursionError):
        return BadJSON(f"not accepted: JSON nested more than the {MAX_JSON_DEPTH} levels allowed")
    if isinstance(exc, UnicodeDecodeError):
        return BadJSON("not valid JSON: the text is not UTF-8")
    if isinstance(exc, json.JSONDecodeError):
        return BadJSON(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    if "digits" in str(exc):  # an integer of more than sys.get_int_max_str_digits() digits
        limit = sys.get_int_max_str_digits()
        return BadJSON(f"not accepted: a number in it has more than {limit} digits")
    return BadJSON(f"not valid JSON: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def too_many_values(values: int, limit: int, setting: str = "max_json_values") -> str:
    return (
        f"not accepted: it holds {values:,} JSON values (arrays, objects and their elements), more than the "
        f"{limit:,} allowed ({setting})"
    )


def parse_json_in_pieces(text: str | bytes, max_values: int | None = None, setting: str = "max_json_values") -> Any:
    """parse_json for a thread other than the loop's, on a text of any size: its checks and its parse each a piece
    at a time (`json_refusal`, security/bodies.py `cooperative_loads`), so the loop gets the GIL between pieces
    (json.loads on a large text holds it throughout)."""
    refused = json_refusal(text, max_values, setting)
    if refused is not None:
        raise BadJSON(refused)
    try:
        return cooperative_loads(text)
    except (ValueError, RecursionError) as exc:
        raise bad_json(exc) from None


async def parse_json_off_loop(text: str | bytes, max_values: int | None = None) -> Any:
    """parse_json, off the event loop for large input (the refusal's checks in a thread, the parse in pieces:
    security/bodies.py): nothing that grows with client input runs on the loop."""
    if len(text) <= JSON_ON_LOOP_BYTES:
        return parse_json(text, max_values)
    refused = await asyncio.to_thread(json_refusal, text, max_values)
    if refused is not None:
        raise BadJSON(refused)
    try:
        return await parse_large(text)
    except (ValueError, RecursionError) as exc:
        raise bad_json(exc) from None


async def json_refusal_off_loop(text: str | bytes, max_values: int | None = None) -> str | None:
    """json_refusal, in a thread for large input (for a body another parser reads: the MCP SDK's)."""
    if len(text) <= JSON_ON_LOOP_BYTES:
        return json_refusal(text, max_values)
    return await asyncio.to_thread(json_refusal, text, max_values)


def reason_phrase(status_code: int, error: dict[str, Any]) -> str:
    """The reason phrase tornado's `send_error` gave a response, from the keyword arguments it passes to
    `write_error`: an HTTPError's own reason, else a `reason` given to send_error, else the standard phrase."""
    exc = error.get("exc_info", (None, None, None))[1]
    if isinstance(exc, web.HTTPError) and exc.reason:
        return str(exc.reason)
    return str(error.get("reason") or httputil.responses.get(status_code, "Unknown"))


def error_message(exc: BaseException | None, reason: str) -> str:
    """The message of an HTTPError as written (tornado doubles '%' in a message given without args)."""
    if isinstance(exc, web.HTTPError) and exc.log_message:
        try:
            return exc.log_message % exc.args
        except (TypeError, ValueError):
            return exc.log_message
    if exc is not None and not isinstance(exc, web.HTTPError):
        return "internal server error; the server log has the details"
    return reason


def jsonrpc_error(status_code: int, message: str) -> dict[str, Any]:
    """A JSON-RPC error object, as the SDK itself answers transport-level failures."""
    code = -32600 if status_code < 500 else -32603
    return {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}


class TooManyRequests(web.HTTPError):
    """HTTP 429, carrying the seconds the client should wait (written as Retry-After)."""

    def __init__(self, limited: RateLimited) -> None:
        super().__init__(429, str(limited))
        self.retry_after = limited.retry_after


def charge_large_body(budget: RateLimiter | None, principal: Principal, size: int) -> None:
    """A large body's bytes charged to its sender's byte budget (`request_bytes_rate`; None: not charged):
    TooManyRequests (429 with Retry-After) when over it. The REST handlers and the MCP bridge both charge here."""
    if budget is None:
        return
    try:
        charge_body(budget, principal, size)
    except BytesLimited as exc:
        raise TooManyRequests(exc) from None


def admit_key(runtime: Any, credential: str, alternative: str) -> Principal:
    """The principal of an API key for either server: 401 for a rejected key (saying what else to send), 429
    over its rate limit."""
    try:
        return runtime.admit_key(credential)  # type: ignore[no-any-return]
    except KeyRejected as exc:
        raise web.HTTPError(401, f"{exc}: send a valid Plexus API key or {alternative}") from None
    except RateLimited as exc:
        raise TooManyRequests(exc) from None


def set_retry_after(handler: web.RequestHandler, error: BaseException | None) -> None:
    """In write_error (send_error cleared the headers set before): Retry-After of a 429."""
    seconds = getattr(error, "retry_after", None)
    if seconds:
        handler.set_header("Retry-After", str(seconds))


def record_request(
    runtime: Any,
    principal: Principal | None,
    request: Any,
    status: int,
    outcome: str,
    details: dict[str, Any] | None = None,
) -> None:
    """An audit record of an HTTP request. Anonymous ones are recorded at most at the key rate per address:
    a flood of bad requests must not grow the audit log without bound."""
    if principal is None and runtime.limiter.take(f"ip:{request.remote_ip}"):
        return
    runtime.audit.record(
        principal,
        f"http.{request.method}",
        target=request.path,
        outcome=outcome,
        client=request.remote_ip,
        details={"status": status, **(details or {})},
    )
