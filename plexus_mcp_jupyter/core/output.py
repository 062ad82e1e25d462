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
        # A scalar of JSON's own types is given back as it is (immutable); a dict or a list is its checked text
        # loaded again: a copy of what was sized, which a thread the task left behind can no longer change before it
        # is pickled (it could grow past the limit, or take a value JSON cannot hold).
        return value if type(value) in _SCALARS else json.loads(text)
    return {"truncated": True, "size_bytes": len(text), "preview": text[: min(PREVIEW_CHARS, limit)]}


# As json.dumps(value, default=str), without building an encoder per call (it keeps no state between calls).
_ENCODER = json.JSONEncoder(default=str)
_SCALARS = (str, int, float, bool, type(None))


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a broken __repr__ must not break the task's end
        return f"<unrepresentable {type(value).__name__}: {exc}>"
