"""A bounded in-memory EventStore, so a dropped SSE stream resumes with Last-Event-ID."""

from __future__ import annotations

import itertools
from collections import OrderedDict

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.types import JSONRPCMessage

from .sdk_compat import routing_a_json_answer


class MemoryEventStore(EventStore):
    """Keeps the newest SSE events of all streams, at most `max_events` of them and `max_bytes` of JSON;
    older ones can no longer be replayed (the client then starts a new request). The answers of requests served as
    one JSON body are not kept: no client can resume from them."""

    def __init__(self, max_events: int = 10_000, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.bytes = 0
        self._ids = itertools.count(1)
        self._events: OrderedDict[int, tuple[StreamId, JSONRPCMessage | None, int]] = OrderedDict()

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = next(self._ids)
        if message is not None and routing_a_json_answer():
            return str(event_id)  # the answer of a request served as one JSON body: nothing can replay it
        size = len(message.model_dump_json(by_alias=True, exclude_unset=True)) if message is not None else 0
        self._events[event_id] = (stream_id, message, size)
        self.bytes += size
        while self._events and (len(self._events) > self.max_events or self.bytes > self.max_bytes):
            _id, (_sid, _msg, dropped) = self._events.popitem(last=False)
            self.bytes -= dropped
        return str(event_id)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        try:
            last = int(last_event_id)
        except ValueError:
            return None
        entry = self._events.get(last)
        if entry is None:
            return None
        stream_id = entry[0]
        for event_id, (sid, message, _size) in list(self._events.items()):
            if event_id > last and sid == stream_id and message is not None:
                await send_callback(EventMessage(message, str(event_id)))
        return stream_id

    @property
    def size(self) -> int:
        # Not __len__: the SDK tests `if not event_store`, and an empty store must still count.
        return len(self._events)
