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
from typing import Any, Protocol

from ..core.errors import InvalidArgument, NotFound, PlexusError
from ..core.ownership import namespace

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_TIMEOUT = 600.0


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

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
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

    def register(self, channel: ScorerChannel, name: Any, batch: Any = True, owner: str | None = None) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidArgument(f"a scorer name is 1 to 64 letters, digits, '_', '.' or '-', not {name!r}")
        current = self._scorers.get((namespace(owner), name))
        if current is not None and current.channel is not channel:
            raise InvalidArgument(
                f"a scorer named {name!r} is already registered by another kernel of yours: "
                "choose another name, or unregister it there"
            )
        if current is not None:  # the same kernel again (a re-run cell): requests waiting for it keep waiting
            current.batch = bool(batch)
            return
        scorer = KernelScorer(name, bool(batch), channel, owner)
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

    def resolve(self, channel: ScorerChannel, message: dict[str, Any]) -> None:
        """A `score_result` or `score_error` from a kernel."""
        request_id = str(message.get("request_id"))
        for scorer in self._scorers.values():
            future = scorer.pending.get(request_id) if scorer.channel is channel else None
            if future is not None and not future.done():
                if message.get("type") == "score_error":
                    future.set_exception(
                        PlexusError(f"kernel scorer {scorer.name!r} failed: {message.get('message') or 'no message'}")
                    )
                else:
                    future.set_result(message)
                return

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
