"""The object task code receives: `def run(ctx, **params)`.

It runs inside the worker (a process of the local executor, or a Dask worker) and talks to the
server through a message channel. Progress reports are coalesced here (at most one message per
`flush_interval`), so a task may call `advance()` per item without flooding the server; stage
changes and the end of the task are always sent at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .errors import PlexusError
from .messages import FromTask, Log, Progress, Reply, Request, Stage

LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")  # MCP's (RFC 5424)


class TaskCancelled(Exception):
    """Raised inside task code at its next check once cancellation was requested."""


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


Send = Callable[[FromTask], None]
Receive = Callable[[float], "Reply | None"]  # the server's answer to a request within the timeout, or None


class TaskContext:
    """Progress, cancellation and logging for one running task."""

    def __init__(
        self,
        task_id: str,
        send: Send,
        cancel_flag: CancelFlag,
        *,
        flush_interval: float = 0.02,
        environment: Mapping[str, Any] | None = None,
        receive: Receive | None = None,
    ) -> None:
        self.task_id = task_id
        # What the server tells every task (store URL, Jupyter root, data directory): never stored or shown.
        self.environment: Mapping[str, Any] = dict(environment or {})
        self._receive = receive
        self._requests = 0
        self._send = send
        self._cancel = cancel_flag
        self._flush_interval = flush_interval
        self._stage: str | None = None
        self._total: int | None = None
        self._processed = 0
        self._message: str | None = None
        self._last_flush = 0.0
        self._dirty = False
        self._message_changed = False  # a status message not sent yet

    @property
    def processed(self) -> int:
        return self._processed

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def stage(self, name: str, total: int | None = None, message: str | None = None) -> None:
        """Start a new stage (the previous one is complete) with `total` items to process."""
        if self._total is not None and not self._message_changed:
            # The server completes a stage with a total at its full count on the next stage: a pending count
            # would say nothing more, and a message fewer per stage is a good part of a small task's cost.
            self._dirty = False
        self.flush()
        self.check_cancelled()
        self._stage, self._total, self._processed, self._message = name, total, 0, message
        self._send(Stage(name, total, message))
        self._last_flush = time.monotonic()

    def advance(self, n: int = 1, message: str | None = None) -> None:
        """Count `n` more items of the current stage as processed; also a cancellation point."""
        self._processed += n
        if message is not None:
            self._message = message
            self._message_changed = True
        self._dirty = True
        if time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()
        self.check_cancelled()

    def flush(self) -> None:
        """Send pending progress now."""
        if self._dirty:
            self._send(Progress(self._processed, self._message))
            self._dirty = False
            self._message_changed = False
            self._last_flush = time.monotonic()

    def check_cancelled(self) -> None:
        """Raise TaskCancelled if cancellation was requested."""
        if self._cancel.is_set():
            raise TaskCancelled()

    def log(self, message: str, level: str = "info") -> None:
        """A line for the task's stderr tail, also sent live to the MCP clients following the task (as a log
        message of `level`: debug, info, notice, warning, error, critical, alert or emergency)."""
        self._send(Log(str(message), level if level in LOG_LEVELS else "info"))

    def request(self, kind: str, payload: Any, timeout: float = 660.0) -> Any:
        """Ask the server for something only it can do (e.g. score a chunk in a notebook kernel) and wait.

        Raises PlexusError with the server's message when it refuses, TaskCancelled when the task is
        cancelled meanwhile, TimeoutError after `timeout` seconds, RuntimeError if this executor cannot.
        """
        if self._receive is None:
            raise RuntimeError(f"this task's executor cannot relay {kind!r} requests to the server")
        self.flush()
        self._requests += 1
        request_id = self._requests
        self._send(Request(request_id, kind, payload))
        deadline = time.monotonic() + timeout
        while True:
            self.check_cancelled()
            reply = self._receive(0.05)
            if isinstance(reply, Reply) and reply.request_id == request_id:
                if not reply.ok:
                    raise PlexusError(str(reply.result))
                return reply.result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {kind!r} within {timeout:.0f} s")
