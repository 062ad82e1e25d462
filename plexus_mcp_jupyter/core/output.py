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
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        return {
            "truncated": True,
            "error": f"the task's output is not JSON-serialisable: {exc}",
            "preview": _safe_repr(value)[: min(PREVIEW_CHARS, limit)],
        }
    if len(text) <= limit:
        return json.loads(text)
    return {"truncated": True, "size_bytes": len(text), "preview": text[: min(PREVIEW_CHARS, limit)]}


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a broken __repr__ must not break the task's end
        return f"<unrepresentable {type(value).__name__}: {exc}>"
