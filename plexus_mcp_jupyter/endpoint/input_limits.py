"""Bounds on what an MCP request may carry before the SDK parses it, and on what an error may echo back.

The server middleware (server.py, `as_the_caller`) calls `check_params` on every request: for the few methods
that carry a client-sized URI or text (resources/read, resources/subscribe and unsubscribe, subscriptions/listen,
completion/complete) it checks lengths and counts on the raw params, so a megabyte URI is refused in one line
before the SDK's URI parsing or our own subscription parsing sees it. Every other method costs one set lookup.

`bounded_error` bounds the message and the data of an error on its way out, whatever raised it: messages quote
what was sent (an unknown URI, a bad cursor), and the SDK's own ones (`Unknown resource: ...`, with the URI again in
its data) are not bounded by it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, ErrorData
from pydantic_core import to_jsonable_python

from ..core.errors import bounded

MAX_URI_CHARS = 4096  # a resource URI (resources/read, resources/subscribe, a completion's ref, a listen stream's)
MAX_COMPLETION_VALUE_CHARS = 4096  # completion/complete: the argument's value and each context argument
MAX_COMPLETION_CONTEXT_ARGUMENTS = 64
MAX_SUBSCRIPTIONS = 1000  # resources one MCP session (or one subscriptions/listen stream) may follow
MAX_LISTED_URIS = 10 * MAX_SUBSCRIPTIONS  # a listen stream's URIs as sent, repeats included (each once is a follow)
MAX_ERROR_CHARS = 2000  # an error message sent to a client (longer ones are cut, quoted values first)

_URI_METHODS = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})
_CHECKED_METHODS = _URI_METHODS | {"subscriptions/listen", "completion/complete"}


def _too_long(what: str, value: Any, limit: int) -> None:
    if isinstance(value, str) and len(value) > limit:
        raise MCPError(INVALID_PARAMS, f"{what} is {len(value)} characters long; at most {limit} are allowed")


def _too_many(what: str, count: int, allowed: str, limit: int) -> None:
    if count > limit:
        raise MCPError(INVALID_PARAMS, f"{what} has {count} entries; {allowed} {limit}")


def check_params(method: str, params: Mapping[str, Any] | None) -> None:
    """Refuse (MCPError, invalid params) a request whose URI or completion text is longer than allowed, or a
    listen stream that names more than MAX_LISTED_URIS (repeats included); anything else is left to the SDK."""
    if method not in _CHECKED_METHODS or not isinstance(params, Mapping):
        return
    if method in _URI_METHODS:
        _too_long("uri", params.get("uri"), MAX_URI_CHARS)
    elif method == "subscriptions/listen":
        notifications = params.get("notifications")
        uris = notifications.get("resourceSubscriptions") if isinstance(notifications, Mapping) else None
        if isinstance(uris, list):  # the distinct ones are counted against the watch's bound (subscriptions.py)
            _too_many("notifications.resourceSubscriptions", len(uris), "at most", MAX_LISTED_URIS)
            for uri in uris:
                _too_long("a resourceSubscriptions uri", uri, MAX_URI_CHARS)
    else:  # completion/complete
        ref, argument, context = params.get("ref"), params.get("argument"), params.get("context")
        if isinstance(ref, Mapping):
            _too_long("ref.uri", ref.get("uri"), MAX_URI_CHARS)
            _too_long("ref.name", ref.get("name"), MAX_URI_CHARS)
        if isinstance(argument, Mapping):
            _too_long("argument.value", argument.get("value"), MAX_COMPLETION_VALUE_CHARS)
            _too_long("argument.name", argument.get("name"), MAX_COMPLETION_VALUE_CHARS)
        arguments = context.get("arguments") if isinstance(context, Mapping) else None
        if isinstance(arguments, Mapping):
            _too_many("context.arguments", len(arguments), "at most", MAX_COMPLETION_CONTEXT_ARGUMENTS)
            for name, value in arguments.items():
                _too_long("a context argument's name", name, MAX_COMPLETION_VALUE_CHARS)
                _too_long(f"context.arguments.{str(name)[:40]}", value, MAX_COMPLETION_VALUE_CHARS)


def bounded_error(exc: Exception) -> None:
    """Cut `exc`'s message (and an MCPError's data, whatever its type) to MAX_ERROR_CHARS in place, keeping its type
    and code: the dispatcher sends it as it would have, only shorter. Messages and data within the bound are left
    alone."""
    if isinstance(exc, MCPError):
        error = exc.error
        data = bounded_data(error.data)
        if len(error.message) > MAX_ERROR_CHARS or data is not error.data:
            exc.error = ErrorData(code=error.code, message=bounded(error.message, MAX_ERROR_CHARS), data=data)
            exc.args = (error.code, exc.error.message, data)
        return
    if len(exc.args) == 1 and isinstance(exc.args[0], str) and len(exc.args[0]) > MAX_ERROR_CHARS:
        exc.args = (bounded(exc.args[0], MAX_ERROR_CHARS),)


def bounded_data(data: Any) -> Any:
    """An error's `data` as sent, within MAX_ERROR_CHARS of JSON: `data` itself if it is (the same object), else its
    strings cut (the SDK's `{"uri": ...}` of an unknown resource quotes the URI whole), else its JSON text cut."""
    if data is None or isinstance(data, (bool, int, float)):
        return data
    if isinstance(data, str):
        return data if len(data) <= MAX_ERROR_CHARS else bounded(data, MAX_ERROR_CHARS)
    try:
        plain = to_jsonable_python(data, fallback=str)
        text = json.dumps(plain, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return bounded(str(data), MAX_ERROR_CHARS)
    if len(text) <= MAX_ERROR_CHARS:
        return data
    cut = _cut_strings(plain, MAX_ERROR_CHARS // 8)
    if len(json.dumps(cut, ensure_ascii=False)) <= MAX_ERROR_CHARS:
        return cut
    return bounded(text, MAX_ERROR_CHARS)


def _cut_strings(value: Any, limit: int, depth: int = 0) -> Any:
    """`value` (plain JSON) with every string longer than `limit` cut, and what nests deeper than 8 levels elided."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 3] + "..."
    if depth >= 8 and isinstance(value, (dict, list)):
        return "..."
    if isinstance(value, dict):
        return {_cut_strings(str(key), limit): _cut_strings(item, limit, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut_strings(item, limit, depth + 1) for item in value]
    return value


def bound_tool_error(result: dict[str, Any]) -> None:
    """Cut the text of a tool error result (`isError`) to MAX_ERROR_CHARS in place."""
    for block in result.get("content") or ():
        text = block.get("text") if isinstance(block, dict) else None
        if isinstance(text, str) and len(text) > MAX_ERROR_CHARS:
            block["text"] = bounded(text, MAX_ERROR_CHARS)
