"""`{base_url}plexus/api/events`: a WebSocket of state changes for the notebook and the lab.

Query: `entity_type`, `ids`, `status`, `type` (comma-separated; empty matches all), `since` (a
sequence number: events after it that are still in the bus's history are replayed first) and `epoch`
(the `epoch` of the hello that `since` came from). Messages are JSON: `{"type": "hello", "seq": N,
"epoch": E}` once, then `{"type": "event", "seq", "at", "kind",
"entity_type", "entity_id", "data"}`; `{"type": "gap", ...}` when events after `since` are not available
(dropped from the history, numbered by an earlier server start: a different epoch, or a `since`
beyond the last event; or other servers' events on a shared store that were not kept while no client
of this server followed them). A client that reads slowly gets the latest state per entity (never an
unbounded backlog) and always the final state. Bad filters close the socket with code 4400 and the
reason; the full message is sent first as `{"type": "error", "message": ...}`. An API key has at most
max_event_streams_per_key streams open: one more is refused with HTTP 429 (or, if it raced past that check,
closed with code 4429), saying so.

What a client sends is metered per connection: a message larger than max_request_bytes closes the socket (1009,
unread); past ws_message_rate messages per second (twice that at once), and past its sender's byte budget for one
over 64 KiB (request_bytes_rate, shared with its MCP requests), the next message waits (and tornado reads nothing
more meanwhile, so the client's sends wait too): slowed, never dropped (a kernel scorer's answer must arrive).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

from jupyter_server.base.websocket import WebSocketMixin
from tornado import web
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from ..core.errors import InvalidArgument, bounded
from ..core.events import Event, Subscription, SubscriptionClosed
from ..core.filters import FollowEvents
from ..evaluations.kernel_scorers import (
    SCORER_MESSAGES,
    RegisterScorer,
    ScoreError,
    ScoreResult,
    UnregisterScorer,
    parse_message,
)
from ..security.bodies import JSON_ON_LOOP_BYTES, charge_identity
from ..security.http import BadJSON, parse_json_off_loop
from ..security.identity import Principal
from ..security.ratelimit import RateLimiter
from .base import BodylessHandler

BAD_FILTER = 4400
TOO_MANY_STREAMS = 4429


class EventsHandler(WebSocketMixin, WebSocketHandler, BodylessHandler):  # type: ignore[misc]
    """The event WebSocket; a BodylessHandler like the other routes that read no body, so that tornado does not read
    an anonymous one (up to max_body_size) before `prepare` (past 64 KiB, refused unread: handlers/request_body.py)."""

    _subscription: Subscription | None = None
    _pump: asyncio.Task[None] | None = None
    _counted_key: str | None = None  # the API key this stream counts against (max_event_streams_per_key)
    _forget_stream: Callable[[], None] = staticmethod(lambda: None)  # type: ignore[assignment]
    _meter: RateLimiter | None = None  # the connection's messages (ws_message_rate)

    async def prepare(self) -> None:  # type: ignore[override]
        # Our 401/403 rules, not WebSocketMixin's (which answers a missing credential with 403); then the body's bound.
        await BodylessHandler.prepare(self)

    def check_origin(self, origin: str | None = None) -> bool:
        return self.origin_allowed()

    def _streams_over_cap(self) -> str | None:
        """Why one more event stream of this API key is refused (it has max_event_streams_per_key open), or None."""
        key_id, limit = self.principal.key_id, self.runtime.max_event_streams_per_key
        if key_id is None or self.runtime.event_streams[key_id] < limit:
            return None
        return (
            f"this API key already has {limit} event streams open, the most one key may "
            "(setting max_event_streams_per_key): close one first"
        )

    async def get(self, *args: Any, **kwargs: Any) -> None:
        refusal = self._streams_over_cap()  # before the upgrade: a plain HTTP 429 with the reason
        if refusal is not None:
            raise web.HTTPError(429, refusal)
        await super().get(*args, **kwargs)

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        """A larger message closes the socket (1009) before it is read (tornado's default is 10 MiB)."""
        return int(self.runtime.settings.max_request_bytes)

    async def open(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().open(*args, **kwargs)  # Jupyter's keep-alive pings
        rate = self.runtime.settings.ws_message_rate
        self._meter = RateLimiter(rate, math.ceil(2 * rate))
        refusal = self._streams_over_cap()  # streams upgraded at once, past the check in get
        if refusal is not None:
            self._refuse(refusal, TOO_MANY_STREAMS)
            return
        if self.principal.key_id is not None:
            self._counted_key = self.principal.key_id
            self.runtime.event_streams[self._counted_key] += 1
        bus = self.runtime.bus
        try:
            request = self.query_request(FollowEvents)
        except InvalidArgument as exc:
            self._refuse(bounded(str(exc)))
            return
        flt, since, epoch = request.event_filter(), request.since, request.epoch
        # Subscribe, then take the history in the same step: every event is then either in the
        # snapshot (seq <= snapshot) or in the subscription (seq > snapshot), none in both or neither.
        accepts: Callable[[Event], bool] = flt
        if not self.principal.is_admin:  # a key sees its own work and the notebook user's, as everywhere else
            accepts = _visible_only(flt, self.principal)
        self._subscription = bus.subscribe(accepts)
        self._forget_stream = self.runtime.track_stream(self.principal, lambda: self.close(4401, "API key revoked"))
        snapshot = bus.last_seq
        history = list(bus.since(since)) if since is not None else []
        await self._send({"type": "hello", "seq": snapshot, "epoch": bus.epoch})
        if since is not None:
            oldest = history[0].seq if history else snapshot + 1
            other_bus = (epoch is not None and epoch != bus.epoch) or since > snapshot
            if other_bus or oldest > since + 1 or bus.skipped_seq > since:
                # Numbers from another server start (or dropped from the history, or other servers' events
                # not kept while nobody here followed them: EventBus.skip_remote): say so, and
                # continue from now rather than filtering everything out against a foreign number.
                await self._send(
                    {
                        "type": "gap",
                        "since": since,
                        "oldest": oldest,
                        "epoch": bus.epoch,
                        "message": "events after 'since' are not available; re-read the current state",
                    }
                )
            if not other_bus:
                for event in history:
                    if accepts(event):
                        await self._send(_event_message(event))
        replayed_up_to = snapshot
        self._pump = asyncio.get_running_loop().create_task(self._forward(replayed_up_to))

    def _refuse(self, message: str, code: int = BAD_FILTER) -> None:
        self.write_message(json.dumps({"type": "error", "message": message}))
        reason = message if len(message.encode()) <= 120 else message.encode()[:117].decode(errors="ignore") + "..."
        self.close(code, reason)

    async def _forward(self, after: int) -> None:
        subscription = self._subscription
        assert subscription is not None
        try:
            while True:
                for event in await subscription.next_batch():
                    if event.seq > after:
                        await self._send(_event_message(event))
        except (SubscriptionClosed, WebSocketClosedError, StreamClosedError):
            pass
        except Exception:
            self.log.exception("Plexus: the event stream failed")
            self.close(1011, "internal error in the event stream; reconnect with since=<last seq>")

    async def _send(self, message: dict[str, Any]) -> None:
        # Awaiting the write is the backpressure: while a client does not read, events wait in the
        # subscription, where they coalesce to the latest state per entity.
        await self.write_message(json.dumps(message, default=str))

    async def on_message(self, message: str | bytes) -> None:
        """Kernel scorers (evaluations/kernel_scorers.py): registration, and answers to score requests.

        A message that is not a JSON object gets an error message saying why; the socket stays open."""
        await self._metered(len(message.encode()) if isinstance(message, str) else len(message))  # bytes, not chars
        registry = self.runtime.kernel_scorers
        expected = f"messages to the event stream are JSON objects with a type: one of {', '.join(SCORER_MESSAGES)}"
        try:
            data = await parse_json_off_loop(message, self.runtime.settings.max_json_values)
        except BadJSON as exc:
            self.send_json({"type": "error", "message": f"the message is {exc}; {expected}"})
            return
        if not isinstance(data, dict):
            self.send_json({"type": "error", "message": expected})
            return
        kind = data.get("type")
        # echoed in an error only when it is a short name: a client's value is never sent back unbounded
        reply_to = kind if isinstance(kind, str) and len(kind) <= 64 else None
        try:
            answering = kind in ("register_scorer", "score_result", "score_error")  # (a tuple: kind may be a list)
            if answering and not self.principal.may("register"):
                raise InvalidArgument(self.principal.denial("register"))
            request = parse_message(data)  # the message's model, by its type: a bad one is told which field
        except InvalidArgument as exc:
            reason = bounded(str(exc))
            if kind in ("score_result", "score_error"):
                registry.refuse(self, data.get("request_id"), reason)  # the request it answers fails now
            self.send_json({"type": "error", "message": reason, "in_reply_to": reply_to})
            return
        try:
            match request:
                case RegisterScorer():
                    registry.register(self, request, owner=self.principal.owner)
                    self.runtime.audit.record(
                        self.principal, "scorer.register", target=request.name, client=self.request.remote_ip
                    )
                    self.send_json({"type": "scorer_registered", "name": request.name})
                case UnregisterScorer():
                    registry.unregister(self, request.name)
                case ScoreResult() | ScoreError():
                    registry.resolve(self, request)
        except InvalidArgument as exc:
            self.send_json({"type": "error", "message": bounded(str(exc)), "in_reply_to": reply_to})

    async def _metered(self, size: int) -> None:
        """Wait until the connection may send another message (ws_message_rate) and, for a large one, until its
        sender's byte budget has room for it (request_bytes_rate): tornado reads nothing more meanwhile."""
        if self._meter is not None:
            while wait := self._meter.take(""):
                await asyncio.sleep(wait)
        if size > JSON_ON_LOOP_BYTES:
            identity, _ = charge_identity(self.principal)
            while wait := self.runtime.body_budget.take(identity, cost=size):
                await asyncio.sleep(wait)

    def send_json(self, message: dict[str, Any]) -> None:
        """Send a message now (score requests); a closed socket is the registry's to notice (on_close)."""
        with contextlib.suppress(WebSocketClosedError):
            self.write_message(json.dumps(message, default=str))

    def on_close(self) -> None:
        self._forget_stream()
        if self._counted_key is not None:
            streams = self.runtime.event_streams
            streams[self._counted_key] -= 1
            if streams[self._counted_key] <= 0:
                del streams[self._counted_key]
            self._counted_key = None
        self.runtime.kernel_scorers.channel_closed(self)
        if self._subscription is not None:
            self._subscription.close()
        if self._pump is not None:
            self._pump.cancel()


def _visible_only(flt: Callable[[Event], bool], principal: Principal) -> Callable[[Event], bool]:
    def accepts(event: Event) -> bool:
        return flt(event) and principal.sees_owner(event.data.get("owner"))

    return accepts


def _event_message(event: Event) -> dict[str, Any]:
    return {"type": "event", **event.to_dict()}
