"""EventBus: in-process publish/subscribe of state changes (docs/architecture.md).

Every change is persisted first, then published once here. Each event has a monotonically
increasing sequence number. A subscriber never holds an unbounded queue: pending events are
coalesced to the latest state per entity, so a slow reader skips intermediate progress but always
receives the final state of every entity it follows.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .models import iso, now

log = logging.getLogger("plexus_mcp_jupyter")


@dataclass(frozen=True)
class Event:
    """One state change: `kind` is e.g. "task.updated"; `data` is the entity's new state."""

    seq: int
    at: float
    kind: str
    entity_type: str
    entity_id: str
    data: dict[str, Any]
    # The server id of the server whose task this is, when another server sharing the store published it
    # (core/relay.py); None for this server's own events. A relay never sends such an event on again.
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": iso(self.at),
            "kind": self.kind,
            "entity_type": self.entity_type,
            "entity_id": self.entity_id,
            "data": self.data,
        }


EventPredicate = Callable[[Event], bool]


class SubscriptionClosed(Exception):
    """Raised by `Subscription.next_batch()` once the subscription is closed and drained."""


@dataclass
class Subscription:
    """A subscriber's view of the bus: `next_batch()` (or `drain()`) hands out coalesced events."""

    predicate: EventPredicate | None
    _bus: EventBus
    _pending: OrderedDict[tuple[str, str], Event] = field(default_factory=OrderedDict)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def offer(self, event: Event) -> None:
        if self.closed or (self.predicate is not None and not self.predicate(event)):
            return
        key = (event.entity_type, event.entity_id)
        # Replace the pending state of this entity and move it to the back, so order of
        # arrival is kept between entities while each entity holds only its latest state.
        self._pending.pop(key, None)
        self._pending[key] = event
        self._wakeup.set()

    def drain(self) -> list[Event]:
        """Take every pending event without waiting."""
        events = list(self._pending.values())
        self._pending.clear()
        self._wakeup.clear()
        return events

    async def next_batch(self) -> list[Event]:
        """Wait for at least one event, then take all pending ones."""
        while not self._pending:
            if self.closed:
                raise SubscriptionClosed
            self._wakeup.clear()
            await self._wakeup.wait()
        return self.drain()

    def close(self) -> None:
        self.closed = True
        self._bus._subscriptions.discard(self)
        self._wakeup.set()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class EventBus:
    """Fan-out of events to subscribers, with a bounded history for resuming by sequence number."""

    def __init__(self, history_size: int = 10_000) -> None:
        # Sequence numbers start again with each bus; the epoch tells a resuming client which bus its
        # number belongs to.
        self.epoch = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._subscriptions: set[Subscription] = set()
        self._history: deque[Event] = deque(maxlen=history_size)
        self._listeners: list[Callable[[Event], None]] = []
        self._remote_interest: dict[Callable[[Event], None], Callable[[], bool]] = {}
        self._last_seq = 0
        # The last number taken for other servers' events that were not published (`skip_remote`): a client
        # resuming from before it has missed them (a gap), though the history has no hole.
        self.skipped_seq = 0

    @property
    def last_seq(self) -> int:
        """The newest sequence number given out (an event's, or `skip_remote`'s): it moves with every change this
        server heard of."""
        return self._last_seq

    def publish(
        self, kind: str, entity_type: str, entity_id: str, data: dict[str, Any], *, origin: str | None = None
    ) -> Event:
        """Record and fan out one event. A failing subscriber is logged and skipped: it must never
        break the core that publishes (a task left half-started) or keep the event from the others.
        `origin`: the id of the server the event comes from, when it is not this one (core/relay.py)."""
        event = Event(next(self._seq), now(), kind, entity_type, entity_id, data, origin)
        self._last_seq = event.seq
        self._history.append(event)
        # Copies of both: a receiver may subscribe or unsubscribe, add or remove a listener, while this runs.
        subscriptions = self._subscriptions
        receivers = (*(s.offer for s in subscriptions), *self._listeners) if subscriptions else self._listeners[:]
        for receiver in receivers:
            try:
                receiver(event)
            except Exception:
                log.exception("Plexus: an event subscriber failed on %s %s", kind, entity_id)
        return event

    def subscribe(self, predicate: EventPredicate | None = None) -> Subscription:
        sub = Subscription(predicate=predicate, _bus=self)
        self._subscriptions.add(sub)
        return sub

    def add_listener(
        self, listener: Callable[[Event], None], *, remote: bool | Callable[[], bool] = True
    ) -> Callable[[], None]:
        """Call `listener` synchronously for every event; returns a function that removes it.

        `remote`: whether the listener needs the events of tasks other servers run (core/relay.py) — False for
        one that ignores them, or a function saying whether it needs them now (a watcher with nobody to tell).
        While neither a listener nor a subscription needs them, the relay does not decode and publish them
        (`wants_remote`, `skip_remote`)."""
        self._listeners.append(listener)
        self._remote_interest[listener] = remote if callable(remote) else (lambda: remote)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
            self._remote_interest.pop(listener, None)

        return remove

    def wants_remote(self) -> bool:
        """Whether anything here needs other servers' events now: a subscription (WebSocket streams, progress
        relays), or a listener that says so. Any thread may ask (the relay's does)."""
        if self._subscriptions:
            return True
        return any(wanted() for wanted in list(self._remote_interest.values()))

    def skip_remote(self) -> None:
        """Other servers' events arrived that nobody here needed, and were not published: take a sequence
        number for them, so that what watches `last_seq` (the listing cache) sees a change, and a client
        resuming from an earlier number is told it missed events (`skipped_seq`)."""
        self._last_seq = self.skipped_seq = next(self._seq)

    def since(self, seq: int) -> Iterator[Event]:
        """Events after `seq` still held in the history (oldest first)."""
        return (e for e in self._history if e.seq > seq)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions) + len(self._listeners)
