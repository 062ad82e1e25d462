"""Kernel scorers, kernel side: a Python callable in this kernel scores items the server sends it.

The protocol (server side: evaluations/kernel_scorers.py), over the client's event-stream WebSocket:
the kernel sends `{"type": "register_scorer", "name", "batch"}` (answered `scorer_registered` or
`error` with `in_reply_to`) and `unregister_scorer`; the server sends `{"type": "score_request",
"request_id", "scorer", "inputs"}`; the kernel answers `{"type": "score_result", "request_id",
"predictions", "explanations", "errors"}` (lists as long as inputs) or `{"type": "score_error",
"request_id", "message"}` when the whole request failed. Scoring runs on a small thread pool, never on
the socket's reader thread, so events keep flowing while a model works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..evaluations.kernel_scorers import RegisterScorer
from .errors import PlexusInputError


@dataclass(frozen=True)
class KernelScorer:
    name: str
    fn: Callable[..., Any]
    batch: bool


def check_scorer(name: str, fn: Any, batch: bool) -> KernelScorer:
    """The scorer to serve; its registration is the server's model (`RegisterScorer`), so a bad name is refused
    here in the words the server would answer, before anything is sent."""
    from .client import request_of

    request_of(RegisterScorer, {"type": "register_scorer", "name": name, "batch": bool(batch)})
    if not callable(fn):
        takes = "a pandas Series of inputs" if batch else "one input"
        raise PlexusInputError(
            f"the scorer must be callable (a function taking {takes} and returning labels), "
            f"not {type(fn).__name__} {fn!r}"
        )
    return KernelScorer(name, fn, bool(batch))


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _split(value: Any) -> tuple[Any, Any]:
    """A label, or a (label, explanation) pair."""
    if isinstance(value, tuple) and len(value) == 2:
        return value[0], value[1]
    return value, None


def _label(value: Any) -> str | None:
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def score(scorer: KernelScorer, inputs: Sequence[str | None]) -> dict[str, Any]:
    """Score `inputs` with the scorer: the `score_result` fields. Raises only if the whole batch failed.

    With batch=True the function is called once with a pandas Series of the inputs and returns a Series
    or list of labels, or of (label, explanation) pairs, one per input. With batch=False it is called once
    per input; an exception then marks that item only, as `"<Type>: <message>"` in errors.
    """
    n = len(inputs)
    predictions: list[str | None] = [None] * n
    explanations: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    if scorer.batch:
        import pandas as pd

        out = scorer.fn(pd.Series(list(inputs), dtype=object))
        values = list(out.tolist() if hasattr(out, "tolist") else out)
        if len(values) != n:
            raise ValueError(
                f"scorer {scorer.name!r} returned {len(values)} values for {n} inputs: return one label "
                "(or (label, explanation) pair) per input"
            )
        for i, value in enumerate(values):
            label, why = _split(value)
            predictions[i], explanations[i] = _label(label), _label(why)
    else:
        for i, text in enumerate(inputs):
            try:
                label, why = _split(scorer.fn(text))
                predictions[i], explanations[i] = _label(label), _label(why)
            except Exception as exc:
                errors[i] = _error_text(exc)
    return {
        "predictions": predictions,
        "explanations": explanations if any(e is not None for e in explanations) else None,
        "errors": errors if any(e is not None for e in errors) else None,
    }


def answer(scorer: KernelScorer | None, request: dict[str, Any]) -> dict[str, Any]:
    """The message answering one `score_request`."""
    request_id = request.get("request_id")
    if scorer is None:
        return {
            "type": "score_error",
            "request_id": request_id,
            "message": f"no scorer {request.get('scorer')!r} is registered in this kernel any more",
        }
    try:
        return {"type": "score_result", "request_id": request_id, **score(scorer, request.get("inputs") or [])}
    except Exception as exc:
        return {"type": "score_error", "request_id": request_id, "message": _error_text(exc)}
