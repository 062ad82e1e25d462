"""Task log lines as MCP log messages (`notifications/message`), and `logging/setLevel`.

A task's `ctx.log(...)` lines (level info) and the Python warnings its code raises (level warning) reach:

- on a 2025-11-25 (or earlier) session: the session that started the task and the sessions subscribed to
  `plexus://tasks/{task_id}`, on their standalone stream, at or above the level the session set with
  `logging/setLevel` (WARNING until it sets one);
- on the 2026-07-28 wire, where logging is a per-request opt-in (SEP-2577: no `logging/setLevel`, nothing on a
  standalone stream): only a call that streams its task to the end (a progress token) and carries the
  `io.modelcontextprotocol/logLevel` `_meta` key, on that call's own stream, at or above that level.

Bounded and coalesced: what is owed to one receiver is at most MAX_PENDING_LINES lines per task (older ones
are dropped and counted), sent by one sender task as one notification per task with the lines in order
(`data`: task_id, lines, dropped); a slow receiver gets fewer, larger notifications, never a backlog. Each
line is cut to MAX_LINE_CHARS and scrubbed of the server's secrets (the audit log's scrubber) first.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from mcp.server.connection import allowed_log_levels
from mcp.types import (
    EmptyResult,
    LoggingLevel,
    LoggingMessageNotification,
    LoggingMessageNotificationParams,
    SetLevelRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .sdk_compat import connection_of, lowlevel_server

log = logging.getLogger("plexus_mcp_jupyter")

LEVELS: tuple[str, ...] = get_args(LoggingLevel)  # least severe first (RFC 5424 order, as the SDK declares it)
DEFAULT_LEVEL = "warning"  # what a session gets before it sets a level
MAX_PENDING_LINES = 50  # lines owed per task per receiver; older ones are dropped (and counted)
MAX_LINE_CHARS = 1000
MAX_TASKS_FOLLOWED = 1000  # tasks whose starting session is remembered (oldest forgotten first)
LOGGER = "plexus.task"
DRAIN_SECONDS = 1.0  # how long a streaming call's answer waits for its owed log lines to be sent
_LEVEL_KEY = "plexus.log_level"


@dataclass(eq=False)
class _Receiver:
    """One place log messages go: a session (legacy) or one streaming call (2026). Lines pend per task."""

    send: Callable[[str, dict[str, Any]], Awaitable[None]]  # (level, data) -> one notifications/message
    minimum: Callable[[], int]  # the lowest level index it wants now
    pending: dict[str, tuple[list[tuple[int, str]], int]] = field(default_factory=dict)  # task -> lines, dropped
    sender: asyncio.Task[None] | None = None
    closed: bool = False

    def owe(self, task_id: str, level: int, line: str) -> None:
        if level < self.minimum():
            return
        lines, dropped = self.pending.get(task_id, ([], 0))
        lines.append((level, line))
        if len(lines) > MAX_PENDING_LINES:
            dropped += len(lines) - MAX_PENDING_LINES
            del lines[:-MAX_PENDING_LINES]
        self.pending[task_id] = (lines, dropped)
        if self.sender is None:
            self.sender = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.pending and not self.closed:
                task_id = next(iter(self.pending))
                lines, dropped = self.pending.pop(task_id)
                level = LEVELS[max(lv for lv, _ in lines)]
                data = {"task_id": task_id, "lines": [text for _, text in lines], "dropped": dropped}
                await self.send(level, data)
        except Exception:  # the session or stream is going away; its own cleanup forgets it
            log.debug("Plexus: a task log message could not be sent", exc_info=True)
            self.closed = True
        finally:
            self.sender = None


@dataclass
class CallLog:
    """The log lines owed to one streaming call (2026): drained before the call answers, stopped after."""

    receiver: _Receiver
    stop: Callable[[], None]

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Send what is owed now (the call's stream closes with its answer), within `timeout`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (self.receiver.pending or self.receiver.sender is not None) and not self.receiver.closed:
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.005)


class TaskLogs:
    """Routes task log lines (TaskManager.log_listeners) to the MCP sessions and calls that want them."""

    def __init__(
        self, scrub: Callable[[str], str] | None = None, subscribers: Callable[[str], list[Any]] | None = None
    ) -> None:
        self._scrub = scrub or (lambda text: text)
        self._sessions: weakref.WeakKeyDictionary[Any, _Receiver] = weakref.WeakKeyDictionary()
        self._started: dict[str, weakref.ref[Any]] = {}  # task id -> the connection that started it
        self._calls: dict[str, set[_Receiver]] = {}  # task id -> streaming calls (2026) that opted in
        # The connections following a task's resource (ResourceWatch.sessions_following)
        self.subscribers: Callable[[str], list[Any]] = subscribers or (lambda task_id: [])
        self.sent = 0

    # -- who wants what ------------------------------------------------------------------------------

    def started(self, ctx: Any, task_ids: list[str]) -> None:
        """A tool call of this (legacy) session started these tasks: their lines go to it."""
        connection = _connection_of(ctx)
        if connection is None or connection.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return
        ref = weakref.ref(connection)
        for task_id in task_ids:
            self._started[task_id] = ref
        while len(self._started) > MAX_TASKS_FOLLOWED:
            del self._started[next(iter(self._started))]

    def follow_call(self, ctx: Any, task_id: str) -> CallLog | None:
        """A 2026 call streaming `task_id` to its end: its lines ride that call's stream if it opted in (its
        `_meta` log level). Returns what to drain before the call answers and stop after, or None when nothing
        will be sent."""
        try:
            request = ctx.request_context
        except ValueError:
            return None
        session = request.session
        protocol = session.protocol_version
        if protocol not in MODERN_PROTOCOL_VERSIONS:
            return None
        allowed = allowed_log_levels(protocol, request.meta)
        if not allowed:
            return None
        minimum = min(LEVELS.index(level) for level in allowed)

        async def send(level: str, data: dict[str, Any]) -> None:
            await session.send_notification(_message(level, data), related_request_id=request.request_id)
            self.sent += 1

        receiver = _Receiver(send, lambda: minimum)
        self._calls.setdefault(task_id, set()).add(receiver)

        def stop() -> None:
            receiver.closed = True
            calls = self._calls.get(task_id)
            if calls is not None:
                calls.discard(receiver)
                if not calls:
                    del self._calls[task_id]

        return CallLog(receiver, stop)

    async def set_level(self, ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        """`logging/setLevel` (2025-11-25 and earlier): this session's minimum level from now on."""
        connection = connection_of(ctx.session)
        connection.state[_LEVEL_KEY] = LEVELS.index(params.level)
        return EmptyResult()

    # -- delivery -------------------------------------------------------------------------------------

    def on_line(self, task_id: str, level: str, line: str) -> None:
        """TaskManager's log listener (on the event loop): one line of a task."""
        receivers = list(self._calls.get(task_id, ()))
        connections = [c for c in self.subscribers(task_id) if c.protocol_version not in MODERN_PROTOCOL_VERSIONS]
        ref = self._started.get(task_id)
        starter = ref() if ref is not None else None
        if starter is not None and starter not in connections:
            connections.append(starter)
        if not receivers and not connections:
            return
        index = LEVELS.index(level) if level in LEVELS else LEVELS.index("info")
        text = self._scrub(line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 3] + "...")
        receivers += [self._session_receiver(c) for c in connections]
        for receiver in receivers:
            if not receiver.closed:
                receiver.owe(task_id, index, text)

    def _session_receiver(self, connection: Any) -> _Receiver:
        receiver = self._sessions.get(connection)
        if receiver is None or receiver.closed:
            ref = weakref.ref(connection)

            async def send(level: str, data: dict[str, Any]) -> None:
                target = ref()
                if target is None:
                    raise ConnectionError("the session is gone")
                await target.notify("notifications/message", {"level": level, "logger": LOGGER, "data": data})
                self.sent += 1

            def minimum() -> int:
                target = ref()
                return (
                    LEVELS.index(DEFAULT_LEVEL)
                    if target is None
                    else target.state.get(_LEVEL_KEY, LEVELS.index(DEFAULT_LEVEL))
                )

            receiver = self._sessions[connection] = _Receiver(send, minimum)
        return receiver


def _message(level: str, data: dict[str, Any]) -> LoggingMessageNotification:
    params = LoggingMessageNotificationParams(level=level, logger=LOGGER, data=data)  # type: ignore[arg-type]
    return LoggingMessageNotification(params=params)


def _connection_of(ctx: Any) -> Any:
    try:
        return connection_of(ctx.request_context.session)
    except (ValueError, AttributeError):
        return None


def install_logging(server: Any, logs: TaskLogs) -> None:
    """Serve `logging/setLevel` (so the logging capability is advertised) with this TaskLogs."""
    lowlevel_server(server).add_request_handler("logging/setLevel", SetLevelRequestParams, logs.set_level)
