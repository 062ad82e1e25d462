"""Resource subscriptions: `resources/subscribe` (2025-11-25) and `subscriptions/listen` (2026-07-28).

Both map onto the core's EventBus. A subscribed URI is parsed once into a matcher; each task event is
checked against the URIs someone follows, and the affected ones are owed a
`notifications/resources/updated`. What is owed is a set per session (and one for listen streams),
drained by one sender task: a burst of progress on one task becomes one notification per URI, and a
change after a send is always followed by another send, so the final state is always announced.
Nothing grows without bound: the pending sets are bounded by the URIs followed, and a session's
entry goes with the session (weakly held) or with its last unsubscribe.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import ListenHandler, ResourceUpdated, SubscriptionBus
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    EmptyResult,
    SubscribeRequestParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
    UnsubscribeRequestParams,
)

from ..core.errors import InvalidArgument, NotFound
from ..core.events import Event
from ..core.manager import TaskManager
from ..core.store import TaskFilter

log = logging.getLogger("plexus_mcp_jupyter")

SUBSCRIBABLE = "plexus://tasks, plexus://tasks?status=...&type=..., plexus://tasks/{task_id}"

# matcher(event, previous status of the task or None) -> does the resource change?
Matcher = Callable[[Event, "str | None"], bool]


def parse_subscription(uri: str, manager: TaskManager) -> Matcher:
    """The matcher of a subscribable URI; MCPError (invalid params) with the allowed forms otherwise."""
    parts = urlsplit(uri)
    if parts.scheme != "plexus" or parts.netloc != "tasks" or parts.fragment:
        raise MCPError(INVALID_PARAMS, f"cannot subscribe to {uri!r}; subscribable resources: {SUBSCRIBABLE}")
    path = parts.path.strip("/")
    if path:
        if "/" in path or parts.query:
            raise MCPError(INVALID_PARAMS, f"cannot subscribe to {uri!r}; subscribable resources: {SUBSCRIBABLE}")
        try:
            manager.get(path)
        except NotFound as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return lambda event, _old: event.entity_type == "task" and event.entity_id == path
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"status", "type", "limit", "cursor"})
    if unknown:
        raise MCPError(
            INVALID_PARAMS, f"unknown parameter(s) {unknown} in {uri!r}; allowed: status, type, limit, cursor"
        )
    try:
        flt = manager.build_filter(
            status=",".join(query.get("status", [])) or None, type=",".join(query.get("type", [])) or None
        )
        manager.parse_limit(",".join(query.get("limit", [])) or None)
    except InvalidArgument as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from None
    return _list_matcher(flt)


def _list_matcher(flt: TaskFilter) -> Matcher:
    statuses = {s.value for s in flt.statuses}
    types = set(flt.types)

    def matches(event: Event, old_status: str | None) -> bool:
        if event.entity_type != "task":
            return False
        if types and event.data.get("type") not in types:
            return False
        # A task entering or leaving a status-filtered list changes it, and so does a change to one in it.
        return not statuses or event.data.get("status") in statuses or old_status in statuses

    return matches


@dataclass
class _Follower:
    """The URIs one receiver follows and the notifications owed to it."""

    send: Callable[[str], Any]  # async: sends notifications/resources/updated (or publishes it)
    uris: dict[str, Matcher] = field(default_factory=dict)
    pending: dict[str, None] = field(default_factory=dict)  # ordered set
    sender: asyncio.Task[None] | None = None
    closed: bool = False


class ResourceWatch:
    """Who follows which resource, fed by the core's EventBus."""

    def __init__(self, manager: TaskManager, listen_bus: SubscriptionBus) -> None:
        self.manager = manager
        self._sessions: weakref.WeakKeyDictionary[Any, _Follower] = weakref.WeakKeyDictionary()
        self._listen_counts: Counter[str] = Counter()
        self._listen = _Follower(send=lambda uri: listen_bus.publish(ResourceUpdated(uri=uri)))
        self._last_status: dict[str, str] = {}
        self._remove_listener = manager.bus.add_listener(self._on_event)

    # -- registration --------------------------------------------------------------------------

    def subscribe(self, connection: Any, uri: str) -> None:
        """`connection` is the SDK's connection-scoped object (one per MCP session)."""
        matcher = parse_subscription(uri, self.manager)
        follower = self._sessions.get(connection)
        if follower is None:
            connection_ref = weakref.ref(connection)
            follower = _Follower(send=lambda u: _send_updated(connection_ref, u))
            self._sessions[connection] = follower
            # The session's end releases its subscriptions at once (the weak key is the backstop).
            connection.exit_stack.callback(self._drop, connection)
        follower.uris[uri] = matcher

    def unsubscribe(self, session: Any, uri: str) -> None:
        follower = self._sessions.get(session)
        if follower is None:
            return
        follower.uris.pop(uri, None)
        follower.pending.pop(uri, None)
        if not follower.uris:
            self._drop(session)

    def listen(self, uris: list[str]) -> None:
        """A listen stream started following these URIs (validated beforehand)."""
        for uri in uris:
            if self._listen_counts[uri] == 0:
                self._listen.uris[uri] = parse_subscription(uri, self.manager)
            self._listen_counts[uri] += 1

    def unlisten(self, uris: list[str]) -> None:
        for uri in uris:
            self._listen_counts[uri] -= 1
            if self._listen_counts[uri] <= 0:
                del self._listen_counts[uri]
                self._listen.uris.pop(uri, None)
                self._listen.pending.pop(uri, None)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def followed(self) -> int:
        return sum(len(f.uris) for f in self._sessions.values()) + len(self._listen.uris)

    def close(self) -> None:
        self._remove_listener()
        for follower in [*self._sessions.values(), self._listen]:
            if follower.sender is not None:
                follower.sender.cancel()

    def _drop(self, session: Any) -> None:
        follower = self._sessions.pop(session, None)
        if follower is not None:
            follower.closed = True
            if follower.sender is not None and follower.sender is not asyncio.current_task():
                follower.sender.cancel()

    # -- delivery ------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.entity_type != "task":
            return
        old = self._last_status.get(event.entity_id)
        status = event.data.get("status")
        if status in ("COMPLETED", "FAILED", "CANCELLED"):
            self._last_status.pop(event.entity_id, None)
        elif isinstance(status, str):
            self._last_status[event.entity_id] = status
        for follower in [*self._sessions.values(), self._listen]:
            for uri, matcher in follower.uris.items():
                if matcher(event, old):
                    follower.pending[uri] = None
            if follower.pending and follower.sender is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    continue  # published outside the loop (a script): sent with the next event
                follower.sender = loop.create_task(self._drain(follower))

    async def _drain(self, follower: _Follower) -> None:
        try:
            while follower.pending and not follower.closed:
                uri = next(iter(follower.pending))
                del follower.pending[uri]
                await follower.send(uri)
        except Exception:  # the session went away mid-send: forget it
            log.debug("Plexus: a resource subscriber went away", exc_info=True)
            follower.closed = True
            for session, f in list(self._sessions.items()):
                if f is follower:
                    self._sessions.pop(session, None)
        finally:
            follower.sender = None
            if follower.pending and not follower.closed:
                follower.sender = asyncio.get_running_loop().create_task(self._drain(follower))


async def _send_updated(connection_ref: weakref.ref[Any], uri: str) -> None:
    connection = connection_ref()
    if connection is None:
        raise ConnectionError("the session is gone")
    # The connection's own channel: on the 2025 HTTP wire, the session's standalone GET stream.
    await connection.outbound.notify("notifications/resources/updated", {"uri": uri})


class PlexusListenHandler(ListenHandler):
    """The SDK's `subscriptions/listen` handler, telling the ResourceWatch which URIs streams follow."""

    def __init__(self, bus: SubscriptionBus, watch: ResourceWatch) -> None:
        super().__init__(bus)
        self._watch = watch

    async def __call__(self, ctx: Any, params: SubscriptionsListenRequestParams) -> SubscriptionsListenResult:
        uris = [str(u) for u in (params.notifications.resource_subscriptions or [])]
        for uri in uris:
            parse_subscription(uri, self._watch.manager)  # refuse a bad URI before the stream starts
        self._watch.listen(uris)
        try:
            return await super().__call__(ctx, params)
        finally:
            self._watch.unlisten(uris)


def install_subscriptions(server: MCPServer, manager: TaskManager) -> ResourceWatch:
    """Serve resources/subscribe, resources/unsubscribe and subscriptions/listen from the EventBus."""
    lowlevel = server._lowlevel_server
    listen_bus = server._subscriptions
    watch = ResourceWatch(manager, listen_bus)

    # The per-request ServerSession does not outlive its request; subscriptions belong to the
    # connection behind it (the SDK has no public accessor for it on the low-level context yet).
    async def on_subscribe(ctx: Any, params: SubscribeRequestParams) -> EmptyResult:
        watch.subscribe(ctx.session._connection, str(params.uri))
        return EmptyResult()

    async def on_unsubscribe(ctx: Any, params: UnsubscribeRequestParams) -> EmptyResult:
        watch.unsubscribe(ctx.session._connection, str(params.uri))
        return EmptyResult()

    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, on_subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, on_unsubscribe)
    lowlevel.add_request_handler(
        "subscriptions/listen", SubscriptionsListenRequestParams, PlexusListenHandler(listen_bus, watch)
    )
    return watch
