"""Scorers that live in notebook kernels: the server side of `plexus.register_scorer(name, fn)`.

A kernel registers a scorer over its event-stream WebSocket (`{"type": "register_scorer", "name",
"batch"}`); the scorer belongs to that connection and is gone when it closes. An evaluation naming
`kernel:<name>` runs in a worker like any other; for each chunk the worker asks the server
(`TaskContext.request("kernel_score", ...)`), the server sends the kernel `{"type": "score_request",
"request_id", "scorer", "inputs"}` and the kernel answers on the same socket with `{"type":
"score_result", "request_id", "predictions", "explanations", "errors"}` (or `score_error`). If the
kernel goes away, its pending requests fail with a message saying so, and so does the evaluation.

Names are per owner: each API key has its own, and the notebook user (every identity that is not a key)
has one, so a key can never take a name from the notebook user or from another key. `kernel:<name>` in
an evaluation is resolved for the evaluation's owner, at each request: its own scorer of that name,
else (for a key) the notebook user's. A key's scorer scores only that key's evaluations: it would see
the data and choose the answers.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, get_args

from pydantic import AfterValidator, Field, Strict

from ..core.errors import InvalidArgument, NotFound, PlexusError, one_line
from ..core.ownership import namespace
from ..core.requests import RequestModel

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_TIMEOUT = 600.0
MAX_PER_OWNER = 100  # kernel scorers one owner may have registered (setting max_kernel_scorers_per_owner)
MAX_ERROR_TEXT = 2000  # of a kernel's score_error message, in the evaluation's error


# -- the messages a kernel sends on its event-stream socket: one model per type, discriminated on `type` ----------


def _scorer_name(value: str) -> str:
    if not NAME.match(value):
        raise ValueError("a scorer name is 1 to 64 letters, digits, '_', '.' or '-'")
    return value


ScorerName = Annotated[str, Field(max_length=64), AfterValidator(_scorer_name)]
RequestId = Annotated[str, Field(min_length=1, max_length=64, description="The score_request's request_id")]


class RegisterScorer(RequestModel):
    """Serve a scorer from this kernel: `kernel:<name>` in an evaluation of its owner."""

    type: Literal["register_scorer"]
    name: ScorerName = Field(description="The scorer's name, 1 to 64 letters, digits, '_', '.' or '-'")
    batch: Annotated[bool, Strict()] = Field(True, description="Whether it takes a list of inputs at once")


class UnregisterScorer(RequestModel):
    """Stop serving a scorer (its waiting requests fail, saying so)."""

    type: Literal["unregister_scorer"]
    name: Annotated[str, Field(max_length=64)] = Field(description="The scorer's name")


class ScoreResult(RequestModel):
    """The kernel's answer to a score_request: lists as long as its inputs (checked against the request)."""

    type: Literal["score_result"]
    request_id: RequestId
    predictions: list[Any] = Field(description="One prediction (a label, or null) per input")
    explanations: list[Any] | None = Field(None, description="One explanation per input, or null")
    errors: list[Any] | None = Field(None, description="One error text (or null) per input, or null")


class ScoreError(RequestModel):
    """The kernel could not score a request at all."""

    type: Literal["score_error"]
    request_id: RequestId
    message: str | None = Field(None, description="What went wrong (cut to 2,000 characters)")


ScorerMessage = Annotated[RegisterScorer | UnregisterScorer | ScoreResult | ScoreError, Field(discriminator="type")]
# by type, read from the union: the one list of what a kernel may send (the event stream names it in errors)
SCORER_MESSAGES: dict[str, type[RequestModel]] = {
    get_args(m.model_fields["type"].annotation)[0]: m for m in get_args(get_args(ScorerMessage)[0])
}


def parse_message(data: dict[str, Any]) -> RegisterScorer | UnregisterScorer | ScoreResult | ScoreError:
    """A kernel's message as its model (`ScorerMessage`, chosen by its type); InvalidArgument in the words of a
    refused REST body (`request_error`): which field, what was wrong, what is allowed."""
    kind = data.get("type")
    model = SCORER_MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise InvalidArgument(
            f"unknown message type {one_line(repr(kind), 60)}; expected one of {', '.join(SCORER_MESSAGES)}"
        )
    return model.parse(data)  # type: ignore[return-value]


class ScorerChannel(Protocol):
    """Where a kernel's scorers are reached: its event-stream WebSocket."""

    def send_json(self, message: dict[str, Any]) -> None: ...


@dataclass
class KernelScorer:
    name: str
    batch: bool
    channel: ScorerChannel
    owner: str | None = None  # who registered it (the notebook user, or an API key)
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str | None, str]:
        return namespace(self.owner), self.name


class KernelScorerRegistry:
    """Kernel scorers by name, and the score requests waiting for their kernels."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, max_per_owner: int = MAX_PER_OWNER) -> None:
        self.timeout = timeout
        self.max_per_owner = max_per_owner  # scorers one owner may have registered at once
        self._scorers: dict[tuple[str | None, str], KernelScorer] = {}  # by (namespace, name)
        self._ids = itertools.count(1)

    def names(self) -> list[str]:
        """Every registered name, of every owner (a name registered by two owners appears twice)."""
        return sorted(name for _, name in self._scorers)

    def find(self, name: str, owner: str | None) -> KernelScorer | None:
        """The scorer `kernel:<name>` means in an evaluation of `owner`: its own, else the notebook user's."""
        return self._scorers.get((namespace(owner), name)) or self._scorers.get((None, name))

    def usable(self, owner: str | None) -> list[KernelScorer]:
        """The scorers `owner`'s evaluations can name, one per name (its own shadow the notebook user's)."""
        names = sorted({name for space, name in self._scorers if space in (None, namespace(owner))})
        return [scorer for scorer in (self.find(name, owner) for name in names) if scorer is not None]

    def describe(self, owner: str | None = None) -> list[dict[str, Any]]:
        """The scorers `owner` may use, as list_scorers shows them (an admin too: another key's scorer
        would not serve it)."""
        return [{"spec": f"kernel:{s.name}", "batch": s.batch} for s in self.usable(owner)]

    def register(self, channel: ScorerChannel, request: RegisterScorer, owner: str | None = None) -> None:
        name, batch = request.name, request.batch
        current = self._scorers.get((namespace(owner), name))
        if current is not None and current.channel is not channel:
            raise InvalidArgument(
                f"a scorer named {name!r} is already registered by another kernel of yours: "
                "choose another name, or unregister it there"
            )
        if current is not None:  # the same kernel again (a re-run cell): requests waiting for it keep waiting
            current.batch = batch
            return
        space = namespace(owner)
        held = sum(1 for s, _ in self._scorers if s == space)
        if held >= self.max_per_owner:
            raise InvalidArgument(
                f"you already have {held} kernel scorers registered, the most one owner may "
                "(setting max_kernel_scorers_per_owner): unregister one you no longer use first"
            )
        scorer = KernelScorer(name, batch, channel, owner)
        self._scorers[scorer.key] = scorer

    def unregister(self, channel: ScorerChannel, name: str) -> None:
        for scorer in [s for s in self._scorers.values() if s.channel is channel and s.name == name]:
            self._drop(scorer, f"scorer {name!r} was unregistered by its kernel")

    def channel_closed(self, channel: ScorerChannel) -> None:
        """The kernel's socket closed: its scorers go, and whatever waits for them fails."""
        for scorer in [s for s in self._scorers.values() if s.channel is channel]:
            self._drop(
                scorer,
                f"the kernel that registered scorer {scorer.name!r} disconnected (restarted, shut "
                "down or lost its connection): register the scorer again and restart the evaluation",
            )

    def check(self, name: str, owner: str | None = None) -> None:
        """InvalidArgument unless a kernel serves `name` now for `owner`'s evaluation (checked before dispatch)."""
        if self.find(name, owner) is None:
            known = ", ".join(s.name for s in self.usable(owner)) or "none"
            raise InvalidArgument(
                f"no kernel scorer {name!r} is registered (registered: {known}); register one in a "
                "notebook with plexus.register_scorer(name, fn)"
            )

    async def score(self, name: str, inputs: list[Any], owner: str | None = None) -> dict[str, Any]:
        """Predictions for `inputs` from the kernel's scorer, for `owner`'s evaluation."""
        scorer = self.find(name, owner)
        if scorer is None:
            raise NotFound(
                f"kernel scorer {name!r} is not registered any more: its kernel went away or unregistered it"
            )
        request_id = f"s{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        scorer.pending[request_id] = future
        try:
            scorer.channel.send_json(
                {"type": "score_request", "request_id": request_id, "scorer": name, "inputs": inputs}
            )
            answer = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise PlexusError(f"kernel scorer {name!r} did not answer within {self.timeout:.0f} s") from None
        finally:
            scorer.pending.pop(request_id, None)
        return _checked(answer, name, len(inputs))

    def resolve(self, channel: ScorerChannel, message: ScoreResult | ScoreError) -> None:
        """A `score_result` or `score_error` from a kernel."""
        waiting = self._waiting(channel, message.request_id)
        if waiting is None:
            return
        scorer, future = waiting
        if isinstance(message, ScoreError):
            text = one_line(message.message or "no message", MAX_ERROR_TEXT)
            future.set_exception(PlexusError(f"kernel scorer {scorer.name!r} failed: {text}"))
        else:
            future.set_result(message.model_dump())

    def refuse(self, channel: ScorerChannel, request_id: Any, reason: str) -> None:
        """A kernel's answer that its model refused (`reason`, the words the kernel is sent): the request it
        answers fails with them at once, rather than waiting out the timeout."""
        waiting = self._waiting(channel, request_id) if isinstance(request_id, str) else None
        if waiting is not None:
            scorer, future = waiting
            future.set_exception(PlexusError(f"kernel scorer {scorer.name!r} answered a malformed message: {reason}"))

    def _waiting(
        self, channel: ScorerChannel, request_id: str
    ) -> tuple[KernelScorer, asyncio.Future[dict[str, Any]]] | None:
        """The scorer of `channel` and its future waiting for `request_id`, if one still waits."""
        for scorer in self._scorers.values():
            future = scorer.pending.get(request_id) if scorer.channel is channel else None
            if future is not None and not future.done():
                return scorer, future
        return None

    def _drop(self, scorer: KernelScorer, reason: str) -> None:
        if self._scorers.get(scorer.key) is scorer:
            del self._scorers[scorer.key]
        for future in scorer.pending.values():
            if not future.done():
                future.set_exception(PlexusError(reason))


def _checked(answer: dict[str, Any], name: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("predictions", "explanations", "errors"):
        values = answer.get(key)
        if values is None and key != "predictions":
            out[key] = None
            continue
        if not isinstance(values, list) or len(values) != n:
            raise PlexusError(f"kernel scorer {name!r} answered {key} that are not a list of {n} values")
        out[key] = [None if v is None else str(v) for v in values]
    return out
