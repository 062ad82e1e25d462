"""Bounding what a task returns, so one result can never flood the store or a client's context."""

from __future__ import annotations

import json
from typing import Any

PREVIEW_CHARS = 2000


def bounded_output(value: Any, limit: int) -> Any:
    """`value` as plain JSON data if it fits in `limit` bytes of JSON; otherwise a truncation record.

    Values JSON cannot express are converted with str(); a value that cannot be serialised at all
    (a circular structure) becomes a record saying why, with a preview of its repr.
    """
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        return {
            "truncated": True,
            "error": f"the task's output is not JSON-serialisable: {exc}",
            "preview": _safe_repr(value)[: min(PREVIEW_CHARS, limit)],
        }
    if len(text) <= limit:
        # A small value of JSON's own types comes back from json.loads as it went in: given back as it is (a
        # trivial task's result, every task: ~1 us of the worker's CPU). Anything else is taken through the text.
        return value if len(text) <= PLAIN_CHECK_CHARS and _plain(value) else json.loads(text)
    return {"truncated": True, "size_bytes": len(text), "preview": text[: min(PREVIEW_CHARS, limit)]}


# As json.dumps(value, default=str), without building an encoder per call (it keeps no state between calls).
_ENCODER = json.JSONEncoder(default=str)
PLAIN_CHECK_CHARS = 512  # longer texts are loaded back: a walk in Python would cost more than json.loads
_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> bool:
    """Whether `value` is made of dicts with str keys, lists, str, int, float, bool and None alone (their exact
    types, no subclass): json.loads(json.dumps(value)) equals it, of the same types."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is dict:
            if not all(type(key) is str for key in item):
                return False
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        else:
            return False
    return True


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a broken __repr__ must not break the task's end
        return f"<unrepresentable {type(value).__name__}: {exc}>"
