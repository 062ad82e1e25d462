"""Origin and Host rules and error bodies, shared by the Jupyter handlers and the standalone server."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any
from urllib.parse import urlsplit

from tornado import httputil, web

from .identity import Principal
from .keys import KeyRejected
from .ratelimit import RateLimited

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


# Bodies up to this size are parsed on the event loop; larger ones in a thread (they take milliseconds).
JSON_ON_LOOP_BYTES = 64 * 1024


class BadJSON(ValueError):
    """A body or message that is not the JSON the server accepts; the message is one line for the client."""


# A string, or from an unterminated one's quote to the end: every match from a quote succeeds, so the engine never
# starts again at each later quote and scans to the end (quadratic: a 4 MB body of escaped quotes took hours, the
# GIL held). DOTALL: an escaped newline is one character too.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_EMPTY_CONTAINER = re.compile(rb"\[\s*\]|\{\s*\}")


def json_values(text: str | bytes, limit: int) -> int | None:
    """How many values (arrays, objects, their elements and members, and the top one) a JSON text holds, when that
    may be more than `limit`; None when it cannot be (the common case: a length check, or three byte counts).

    A text of n bytes holds at most about n/2 values, so a short one is not looked at. Otherwise commas and opening
    brackets bound the count from above; only when that bound passes `limit` are strings set aside (their commas
    and brackets are text) for the exact count. Malformed JSON is counted as if it were well-formed: the parser
    refuses it after."""
    if len(text) <= 2 * limit:
        return None
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if 1 + data.count(b",") + data.count(b"[") + data.count(b"{") <= limit:
        return None
    bare = _JSON_STRING.sub(b"0", data)
    opens = bare.count(b"[") + bare.count(b"{")
    values = 1 + bare.count(b",") + opens - len(_EMPTY_CONTAINER.findall(bare))
    return values if values > limit else None


def parse_json(text: str | bytes, max_values: int | None = None) -> Any:
    """JSON from a client, every failure a BadJSON with a one-line reason (never a RecursionError or a
    multi-line message): the one parse behind every REST body and WebSocket message. `max_values`: a text holding
    more values (`json_values`: a few bytes each, and each a Python object of 50 to 200) is refused unparsed."""
    if max_values is not None:
        refused = json_values(text, max_values)
        if refused is not None:
            raise BadJSON(too_many_values(refused, max_values))
    try:
        return json.loads(text)
    except RecursionError:
        raise BadJSON("not accepted: JSON nested too deeply (at most a few hundred levels)") from None
    except UnicodeDecodeError:
        raise BadJSON("not valid JSON: the text is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadJSON(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        if "digits" in str(exc):
            limit = sys.get_int_max_str_digits()
            raise BadJSON(f"not accepted: a number in it has more than {limit} digits") from None
        raise BadJSON(f"not valid JSON: {str(exc).splitlines()[0]}") from None


def too_many_values(values: int, limit: int) -> str:
    return (
        f"not accepted: it holds {values:,} JSON values (arrays, objects and their elements), more than the "
        f"{limit:,} one request may have (max_json_values)"
    )


async def parse_json_off_loop(text: str | bytes, max_values: int | None = None) -> Any:
    """parse_json, in a thread for large input: nothing that grows with client input runs on the loop."""
    if len(text) <= JSON_ON_LOOP_BYTES:
        return parse_json(text, max_values)
    return await asyncio.to_thread(parse_json, text, max_values)


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
