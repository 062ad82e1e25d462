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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anyio
from mcp.server.mcpserver import MCPServer, require_client_extension
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY, event_to_notification
from mcp.types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    EmptyResult,
    SubscribeRequestParams,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsAcknowledgedNotificationParams,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel

from ..core.batches import BatchOperations
from ..core.errors import InvalidArgument, NotFound
from ..core.events import Event
from ..core.manager import TaskManager
from ..core.models import TaskStatus, now
from ..core.ownership import owner_visible
from ..core.requests import ListTasks, paged
from ..core.store import TaskFilter
from ..evaluations.requests import GetEvaluationResults, ListEvaluations
from ..evaluations.service import EvaluationService
from ..evaluations.store import EvaluationStatus
from .input_limits import MAX_SUBSCRIPTIONS
from .principal import principal_of
from .sdk_compat import connection_of, lowlevel_server
from .tasks_ext import TASKS_EXTENSION, Outcome, detailed_task, legacy_status_notification

log = logging.getLogger("plexus_mcp_jupyter")

SUBSCRIBABLE = (
    "plexus://tasks, plexus://tasks?status=...&type=...&batch=..., plexus://tasks/{task_id}, "
    "plexus://batches/{batch_id}, plexus://evaluations, plexus://evaluations?status=...&type=..., "
    "plexus://evaluations/{id}, plexus://evaluations/{id}/results"
)

# matcher(event, previous status of the task or None) -> does the resource change?
Matcher = Callable[[Event, "str | None"], bool]


@dataclass(frozen=True)
class Followed:
    """What a subscribed URI follows: one task (`task_id`), or a list (`matcher`)."""

    task_id: str | None
    matcher: Matcher | None = None


async def parse_subscription(
    uri: str, manager: TaskManager, evaluations: EvaluationService | None = None, viewer: str | None = None
) -> Followed:
    """What a subscribable URI follows, for a caller with owner `viewer` (None: an admin); MCPError
    (invalid params) with the allowed forms otherwise. Lists follow only what that caller may see."""
    followed = await _parse(uri, manager, evaluations, viewer)
    if followed.matcher is not None and viewer is not None:
        matcher = followed.matcher
        return Followed(None, lambda event, old: owner_visible(event.data.get("owner"), viewer) and matcher(event, old))
    return followed


async def _parse(uri: str, manager: TaskManager, evaluations: EvaluationService | None, viewer: str | None) -> Followed:
    parts = urlsplit(uri)
    if parts.scheme == "plexus" and parts.netloc == "evaluations" and evaluations is not None:
        return await _parse_evaluation_uri(uri, parts, evaluations, viewer)
    if parts.scheme == "plexus" and parts.netloc == "batches":
        return await _parse_batch_uri(uri, parts, manager, viewer)
    if parts.scheme != "plexus" or parts.netloc != "tasks" or parts.fragment:
        raise MCPError(INVALID_PARAMS, f"cannot subscribe to {uri!r}; subscribable resources: {SUBSCRIBABLE}")
    path = parts.path.strip("/")
    if path:
        if "/" in path or parts.query:
            raise MCPError(INVALID_PARAMS, f"cannot subscribe to {uri!r}; subscribable resources: {SUBSCRIBABLE}")
        try:
            await manager.aget(path, viewer)
        except NotFound as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return Followed(path)
    try:  # the query of plexus://tasks{?...}, read as list_tasks reads its arguments
        request = paged(ListTasks, manager.max_page_size).from_query(_query(parts.query))
        flt = manager.task_filter(request, None)
    except InvalidArgument as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from None
    return Followed(None, _list_matcher(flt))


def _query(query: str) -> dict[str, list[str]]:
    return parse_qs(query, keep_blank_values=True)


# The task statuses an evaluation of each status can have (SETUP spans queued and the Setup stage).
_TASK_STATUSES_OF = {
    EvaluationStatus.SETUP: (TaskStatus.QUEUED, TaskStatus.RUNNING),
    EvaluationStatus.RUNNING: (TaskStatus.RUNNING,),
}


async def _parse_evaluation_uri(uri: str, parts: Any, evaluations: EvaluationService, viewer: str | None) -> Followed:
    """`plexus://evaluations/{id}` and its results follow the evaluation's task; the list follows its type."""
    segments = [s for s in parts.path.split("/") if s]
    try:
        if segments:
            if (
                len(segments) > 2
                or (len(segments) == 2 and segments[1] != "results")
                or (parts.query and len(segments) == 1)
            ):
                raise MCPError(INVALID_PARAMS, f"cannot subscribe to {uri!r}; subscribable resources: {SUBSCRIBABLE}")
            page_size = evaluations.manager.max_page_size
            paged(GetEvaluationResults, page_size).from_query(_query(parts.query), evaluation_id=segments[0])
            return Followed(await evaluations.task_of(segments[0], viewer))
        statuses = paged(ListEvaluations, evaluations.manager.max_page_size).from_query(_query(parts.query)).status
    except (InvalidArgument, NotFound) as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from None
    task_statuses = tuple(dict.fromkeys(t for s in statuses for t in _TASK_STATUSES_OF.get(s, (TaskStatus(s),))))
    return Followed(None, _list_matcher(TaskFilter(statuses=task_statuses, types=("evaluation",))))


async def _parse_batch_uri(uri: str, parts: Any, manager: TaskManager, viewer: str | None) -> Followed:
    """`plexus://batches/{id}` changes with any event of one of its tasks (their summaries carry batch_id)."""
    batch_id = parts.path.strip("/")
    if not batch_id or "/" in batch_id or parts.query or parts.fragment:
        raise MCPError(INVALID_PARAMS, f"cannot subscribe to {uri!r}; subscribable resources: {SUBSCRIBABLE}")
    try:
        await BatchOperations(manager).status(batch_id, viewer)
    except NotFound as exc:
        raise MCPError(INVALID_PARAMS, str(exc)) from None
    return Followed(None, _list_matcher(TaskFilter(batch_id=batch_id)))


def _list_matcher(flt: TaskFilter) -> Matcher:
    statuses = {s.value for s in flt.statuses}
    types = set(flt.types)
    batch_id = flt.batch_id

    def matches(event: Event, old_status: str | None) -> bool:
        if event.entity_type != "task":
            return False
        if types and event.data.get("type") not in types:
            return False
        if batch_id is not None and event.data.get("batch_id") != batch_id:
            return False
        # A task entering or leaving a status-filtered list changes it, and so does a change to one in it.
        # An unknown previous status (None) may have been in the list: tell, to be safe.
        return not statuses or old_status is None or event.data.get("status") in statuses or old_status in statuses

    return matches


@dataclass(eq=False)  # identity: followers live in sets
class _Follower:
    """The URIs one receiver (a session, or one listen stream) follows, and the notifications owed to it."""

    send: Callable[[str], Awaitable[None]]  # sends one notifications/resources/updated
    # Sends one MCP task status notification (given the task id), for followers of task statuses.
    send_status: Callable[[str], Awaitable[None]] | None = None
    # What it follows, indexed so that an event costs a lookup per follower, not a test per URI.
    by_task: dict[str, dict[str, None]] = field(default_factory=dict)  # task id -> URIs that follow it
    task_of: dict[str, str] = field(default_factory=dict)  # URI -> the task it follows
    lists: dict[str, Matcher] = field(default_factory=dict)  # list URI -> matcher
    statuses: set[str] = field(default_factory=set)  # task ids whose status changes are owed (MCP tasks)
    pending: dict[str, float] = field(default_factory=dict)  # an ordered set, with when each was first owed
    sender: asyncio.Task[None] | None = None
    ready: bool = True  # a listen stream is ready once its acknowledgement went out
    closed: bool = False
    sent: int = 0

    @property
    def uris(self) -> list[str]:
        return [*self.task_of, *self.lists]

    @property
    def idle(self) -> bool:
        return not (self.by_task or self.lists or self.statuses)

    def follow(self, uri: str, followed: Followed) -> None:
        if followed.task_id is not None:
            self.by_task.setdefault(followed.task_id, {})[uri] = None
            self.task_of[uri] = followed.task_id
        elif followed.matcher is not None:
            self.lists[uri] = followed.matcher

    def unfollow(self, uri: str) -> None:
        self.lists.pop(uri, None)
        self.pending.pop(uri, None)
        task_id = self.task_of.pop(uri, None)
        if task_id is not None:
            uris = self.by_task.get(task_id, {})
            uris.pop(uri, None)
            if not uris:
                self.by_task.pop(task_id, None)

    def owed(self, event: Event, old_status: str | None) -> None:
        for uri in self.by_task.get(event.entity_id, ()):
            self.pending.setdefault(uri, event.at)
        if event.entity_id in self.statuses and event.data.get("status") != old_status:
            self.pending.setdefault(_STATUS_KEY + event.entity_id, event.at)
            if event.data.get("status") in _FINAL:
                self.statuses.discard(event.entity_id)  # nothing follows a final status
        for uri, matcher in self.lists.items():
            if matcher(event, old_status):
                self.pending.setdefault(uri, event.at)


class ResourceWatch:
    """Who follows which resource, fed by the core's EventBus."""

    def __init__(
        self,
        manager: TaskManager,
        evaluations: EvaluationService | None = None,
        on_sent: Callable[[float], None] | None = None,
    ) -> None:
        self.manager = manager
        self.evaluations = evaluations
        self._sessions: weakref.WeakKeyDictionary[Any, _Follower] = weakref.WeakKeyDictionary()
        self._streams: set[_Follower] = set()
        self._last_status: dict[str, str] = {}
        # Other servers' events only while someone follows something here (core/relay.py decodes them lazily).
        self._remove_listener = manager.bus.add_listener(
            self._on_event, remote=lambda: bool(self._sessions or self._streams)
        )
        self.on_sent = on_sent  # seconds from a change to its notification (the service metrics)
        self.max_subscriptions = MAX_SUBSCRIPTIONS  # resources one session (or one listen stream) may follow

    # -- registration --------------------------------------------------------------------------

    def check_count(self, follower: str, count: int, what: str, fix: str) -> None:
        """MCPError (invalid params) when one `follower` (a session, or a listen stream) would follow `count` `what`,
        more than max_subscriptions: the one wording of every bound on what is followed, with the way out."""
        if count > self.max_subscriptions:
            raise MCPError(
                INVALID_PARAMS,
                f"this {follower} would follow {count:,} {what}; one {follower} may follow at most "
                f"{self.max_subscriptions:,} ({fix})",
            )

    async def subscribe(self, connection: Any, uri: str, viewer: str | None = None) -> None:
        """`connection` is the SDK's connection-scoped object (one per MCP session)."""
        follower = self._sessions.get(connection)
        if follower is not None and uri not in follower.task_of and uri not in follower.lists:
            self.check_count(
                "session",
                len(follower.task_of) + len(follower.lists) + 1,
                "resources",
                "resources/unsubscribe one it no longer needs first, or open another session",
            )
        matcher = await parse_subscription(uri, self.manager, self.evaluations, viewer)
        self._session_follower(connection).follow(uri, matcher)

    def follow_status(self, connection: Any, task_id: str) -> None:
        """Send a session `notifications/tasks/status` when the task's status changes (2025-11-25 tasks)."""
        follower = self._session_follower(connection)
        if follower.send_status is None:
            connection_ref = weakref.ref(connection)
            follower.send_status = lambda t: _send_task_status(connection_ref, self.manager, t)
        follower.statuses.add(task_id)

    def _session_follower(self, connection: Any) -> _Follower:
        follower = self._sessions.get(connection)
        if follower is None:
            connection_ref = weakref.ref(connection)
            follower = _Follower(send=lambda u: _send_updated(connection_ref, u))
            self._sessions[connection] = follower
            if not connection.state.get(_CLEANUP_KEY):
                # Once per session: its end releases its subscriptions (the weak key is the backstop).
                connection.state[_CLEANUP_KEY] = True
                connection.exit_stack.callback(self._drop, connection)
        return follower

    def unsubscribe(self, connection: Any, uri: str) -> None:
        follower = self._sessions.get(connection)
        if follower is None:
            return
        follower.unfollow(uri)
        if follower.idle:
            self._drop(connection)

    async def add_stream(
        self,
        uris: list[str],
        send: Callable[[str], Awaitable[None]],
        task_ids: Sequence[str] = (),
        send_status: Callable[[str], Awaitable[None]] | None = None,
        viewer: str | None = None,
    ) -> _Follower:
        """A listen stream (2026 era): its own follower, so it is coalesced and paced by its own writes."""
        uris = list(dict.fromkeys(uris))
        self.check_count("stream", len(uris), "resources", "list fewer, or open another stream")
        follower = _Follower(send=send, send_status=send_status, ready=False)
        for uri in uris:
            follower.follow(uri, await parse_subscription(uri, self.manager, self.evaluations, viewer))
        follower.statuses.update(task_ids)
        self._streams.add(follower)
        return follower

    def stream_ready(self, follower: _Follower) -> None:
        # Each followed task's current status first: one that ended before the stream opened is told too.
        for task_id in follower.statuses:
            follower.pending.setdefault(_STATUS_KEY + task_id, now())
        follower.ready = True
        self._kick(follower)

    def remove_stream(self, follower: _Follower) -> None:
        self._streams.discard(follower)
        self._close(follower)

    def sessions_following(self, task_id: str) -> list[Any]:
        """The sessions (connections) subscribed to this task's own resource."""
        return [connection for connection, follower in self._sessions.items() if task_id in follower.by_task]

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def followed(self) -> int:
        return sum(len(f.uris) for f in self._followers())

    def close(self) -> None:
        self._remove_listener()
        for follower in self._followers():
            self._close(follower)

    def _followers(self) -> list[_Follower]:
        if not self._sessions:  # the common case, and iterating a WeakKeyDictionary is not free (every event)
            return list(self._streams)
        return [*self._sessions.values(), *self._streams]

    def _drop(self, connection: Any) -> None:
        follower = self._sessions.pop(connection, None)
        if follower is not None:
            self._close(follower)

    @staticmethod
    def _close(follower: _Follower) -> None:
        follower.closed = True
        follower.pending.clear()
        if follower.sender is not None and follower.sender is not asyncio.current_task():
            follower.sender.cancel()

    # -- delivery ------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if event.entity_type != "task":
            return
        # The status a task had before this event: "" for a new task, None when this server has not
        # seen it yet (a task from before its start), in which case a status-filtered list is told.
        old = "" if event.kind == "task.created" else self._last_status.get(event.entity_id, _UNKNOWN)
        status = event.data.get("status")
        if status in ("COMPLETED", "FAILED", "CANCELLED"):
            self._last_status.pop(event.entity_id, None)
        elif isinstance(status, str):
            self._last_status[event.entity_id] = status
        for follower in self._followers():
            follower.owed(event, old)
            self._kick(follower)

    def _kick(self, follower: _Follower) -> None:
        if not follower.pending or follower.sender is not None or not follower.ready or follower.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # published outside the loop (a script): sent with the next event
        follower.sender = loop.create_task(self._drain(follower))

    async def _drain(self, follower: _Follower) -> None:
        try:
            while follower.pending and not follower.closed:
                key, owed_at = next(iter(follower.pending.items()))
                del follower.pending[key]
                # Awaited: a slow reader slows this loop, and updates coalesce meanwhile.
                if key.startswith(_STATUS_KEY) and follower.send_status is not None:
                    await follower.send_status(key[len(_STATUS_KEY) :])
                else:
                    await follower.send(key)
                follower.sent += 1
                if self.on_sent is not None:
                    self.on_sent(now() - owed_at)
        except asyncio.CancelledError:
            raise
        except Exception:
            # This receiver could not be written to (its session or stream is ending; their own
            # cleanup unregisters them). Others are unaffected.
            log.debug("Plexus: a resource update could not be sent", exc_info=True)
        finally:
            follower.sender = None
        self._kick(follower)


_CLEANUP_KEY = "plexus.resource_watch.cleanup"
_FINAL = frozenset(s.value for s in TaskStatus if s.is_final)
_STATUS_KEY = "status:"  # pending key of a task status notification (resource URIs start with plexus://)
_UNKNOWN = None


async def _send_updated(connection_ref: weakref.ref[Any], uri: str) -> None:
    connection = connection_ref()
    if connection is None:
        raise ConnectionError("the session is gone")
    # The connection's own channel: on the 2025 HTTP wire, the session's standalone GET stream.
    await connection.outbound.notify("notifications/resources/updated", {"uri": uri})


async def _send_task_status(connection_ref: weakref.ref[Any], manager: TaskManager, task_id: str) -> None:
    connection = connection_ref()
    if connection is None:
        raise ConnectionError("the session is gone")
    params = await legacy_status_notification(manager, task_id)
    if params is not None:
        await connection.outbound.notify("notifications/tasks/status", params)


class PlexusListenHandler(ListenHandler):
    """`subscriptions/listen` (2026-07-28) for resource updates, one ResourceWatch follower per stream.

    Same protocol as the SDK's handler (acknowledgement first, every frame stamped with the
    subscription id, only what was asked for), but resource updates come from the stream's own
    follower rather than the shared in-memory bus: they are coalesced per stream and each write is
    awaited, so a client that reads slowly gets fewer, later notifications (the last one after the final
    state) instead of a backlog that ends its stream.
    """

    def __init__(self, watch: ResourceWatch, outcome: Outcome) -> None:
        super().__init__(InMemorySubscriptionBus())
        self._watch = watch
        self._outcome = outcome

    async def _task_ids(self, ctx: Any, requested: SubscriptionFilter) -> list[str]:
        """The `taskIds` of the tasks extension: the ones that exist are honoured."""
        task_ids = (requested.model_extra or {}).get("taskIds")
        if task_ids is None:
            return []
        require_client_extension(ctx, TASKS_EXTENSION)
        if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
            raise MCPError(INVALID_PARAMS, "notifications.taskIds must be a list of task id strings")
        task_ids = list(dict.fromkeys(task_ids))
        self._watch.check_count("stream", len(task_ids), "tasks (taskIds)", "list fewer, or open another stream")
        honoured = []
        viewer = principal_of(ctx).viewer
        for task_id in task_ids:
            try:
                await self._watch.manager.aget(task_id, viewer)
            except NotFound:
                continue
            honoured.append(task_id)
        return honoured

    async def __call__(self, ctx: Any, params: SubscriptionsListenRequestParams) -> SubscriptionsListenResult:
        subscription_id = ctx.request_id
        if subscription_id is None:
            raise MCPError(INVALID_REQUEST, "subscriptions/listen requires a request id")
        requested = params.notifications
        uris = [str(u) for u in (requested.resource_subscriptions or [])]
        task_ids = await self._task_ids(ctx, requested)
        meta: dict[str, Any] = {SUBSCRIPTION_ID_META_KEY: subscription_id}
        # List-changed events never happen here, so only these are honoured.
        honored = SubscriptionFilter(resource_subscriptions=uris or None)
        if task_ids:
            honored.taskIds = task_ids  # type: ignore[attr-defined]  # an extension's key (extra="allow")

        async def send(uri: str) -> None:
            await ctx.session.send_notification(
                event_to_notification(ResourceUpdated(uri=uri), meta), related_request_id=subscription_id
            )

        async def send_status(task_id: str) -> None:
            try:
                params = {
                    **detailed_task(
                        self._outcome, await self._watch.manager.aget(task_id), self._watch.manager.retention
                    ),
                    "_meta": meta,
                }
            except NotFound:
                return
            await ctx.session.send_notification(TaskStatusPush(params=params), related_request_id=subscription_id)

        # add_stream parses (and refuses) the URIs first.
        follower = await self._watch.add_stream(uris, send, task_ids, send_status, principal_of(ctx).viewer)
        try:
            await ctx.session.send_notification(
                SubscriptionsAcknowledgedNotification(
                    params=SubscriptionsAcknowledgedNotificationParams(notifications=honored, _meta=meta)
                ),
                related_request_id=subscription_id,
            )
            self._watch.stream_ready(follower)
            await anyio.sleep_forever()  # until the client closes the stream (the request is cancelled)
        finally:
            self._watch.remove_stream(follower)
        return SubscriptionsListenResult(_meta=meta)  # pragma: no cover - the wait above only ends by cancel


class TaskStatusPush(BaseModel):
    """`notifications/tasks` of the tasks extension: a whole DetailedTask, as `tasks/get` would answer."""

    method: Literal["notifications/tasks"] = "notifications/tasks"
    params: dict[str, Any]


def install_subscriptions(server: MCPServer, watch: ResourceWatch, outcome: Outcome) -> None:
    """Serve resources/subscribe, resources/unsubscribe and subscriptions/listen from the EventBus."""
    lowlevel = lowlevel_server(server)

    # The per-request ServerSession does not outlive its request; subscriptions belong to the
    # connection behind it (the SDK has no public accessor for it on the low-level context yet).
    async def on_subscribe(ctx: Any, params: SubscribeRequestParams) -> EmptyResult:
        await watch.subscribe(connection_of(ctx.session), str(params.uri), principal_of(ctx).viewer)
        return EmptyResult()

    async def on_unsubscribe(ctx: Any, params: UnsubscribeRequestParams) -> EmptyResult:
        watch.unsubscribe(connection_of(ctx.session), str(params.uri))
        return EmptyResult()

    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, on_subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, on_unsubscribe)
    listen = PlexusListenHandler(watch, outcome)
    lowlevel.add_request_handler("subscriptions/listen", SubscriptionsListenRequestParams, listen)
