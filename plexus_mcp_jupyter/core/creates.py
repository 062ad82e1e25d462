"""A group commit of concurrent dispatches (TaskManager.adispatch and acreate_batch; docs/architecture.md, "A group
commit").

Each `run_demo_task` call, REST dispatch or evaluation inserts one task; a `dispatch_batch` or `retry_tasks` call
its batch's, all or none. Calls that reach the manager in the same turns of the loop (on SQLite, while each turn
brings more, up to MAX_HOPS), or while the group before them is being written (on a networked store, on the writer
thread; on SQLite, a group of more than MAX_ON_LOOP tasks, on a thread), are stored in one transaction: one commit
and one driver executemany instead of one each. Each caller awaits its own outcome: its task, or its own refusal
(its API key over `max_tasks_per_key`, counted in the group's order with a batch counted whole, so the cap stays
exact however many calls arrive together). When the group's transaction fails (an `also` record that cannot be
written, the store gone), nothing of it is stored and each create is tried again alone, so a failure is only the
calls' whose own insert fails. A spec is checked (`TaskManager.new_task`) before it joins a group: a bad one is
refused at once and never reaches the store.

This module gathers and answers; the manager says how a group is stored (`store`: each create's outcome, None
when stored) and what follows on the loop for each create (`landed`: announce and start its task).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Task


@dataclass(slots=True)
class Create:
    """One dispatch waiting for its group's commit: one task, or a batch's tasks (stored all or none)."""

    tasks: list[Task]
    also: Callable[[Any], None] | None  # writes what must exist with the tasks (their records), in their transaction
    created: Task | None  # one task as created (QUEUED), when it is stored claimed to start at once; else None
    done: asyncio.Future[Task] | None  # its caller's answer; None for TaskManager.dispatch's (answered in its call)

    @property
    def task(self) -> Task:
        """The task of a single dispatch; a batch's first."""
        return self.tasks[0]

    def answer(self, outcome: Task | BaseException) -> None:
        """Hand the caller its task or its refusal, unless it went away (its future cancelled)."""
        if self.done is None or self.done.cancelled():
            return
        if isinstance(outcome, BaseException):
            self.done.set_exception(outcome)
        else:
            self.done.set_result(outcome)


Outcomes = list[BaseException | None]
# On SQLite the group is written on the loop, at the first turn that brings no more creates, or after this many
# (8 sessions calling at once: groups of 1-2 creates written at the next turn, 3-4 waiting while they come).
MAX_HOPS = 4
# ... unless it holds more tasks than this (a batch's): then on a thread, as a networked store's groups are, creates
# arriving meanwhile waiting for it (a SQLite insert costs ~20 us a task: 1,000 would hold the loop ~20 ms).
MAX_ON_LOOP = 64


class CreateGroups:
    """The creates waiting for a commit, and the group being written (one at a time)."""

    def __init__(
        self,
        store: Callable[[list[Create]], Outcomes],
        landed: Callable[[Create, BaseException | None], Task],
        writer: Callable[..., Awaitable[Any]] | None,
    ) -> None:
        self.store = store  # on the loop, or on `writer` (a networked store's writer thread) when given
        self.landed = landed
        self.writer = writer
        # Without `writer` (SQLite): where a group too big for the loop is written.
        self.threads: Callable[..., Awaitable[Any]] = asyncio.to_thread
        self.waiting: list[Create] = []
        self.scheduled = False  # a write of the waiting creates is asked for (call_soon)
        self.writing = False  # a group is being written off the loop
        self.groups = 0  # groups written, and creates in them (benchmarks and tests read them)
        self.creates = 0
        self.seen = 0  # on the loop (SQLite): the creates waiting at the last turn, and the turns waited so far
        self.hops = 0
        self._writes: set[asyncio.Task[None]] = set()  # the group being written off the loop

    async def add(self, tasks: list[Task], also: Callable[[Any], None] | None, created: Task | None) -> Task:
        """Store `tasks` (one, or a batch's) with the next group; returns what `landed` made of them once their
        rows exist, or raises their own refusal or store error."""
        loop = asyncio.get_running_loop()
        entry = Create(tasks, also, created, done := loop.create_future())
        self.waiting.append(entry)
        if not (self.scheduled or self.writing):  # a group being written takes the next one when it lands
            self.scheduled = True
            loop.call_soon(self._write)
        # A caller that goes away (its future cancelled) does not take its create out of its group: the group's
        # landing stores, announces and starts its task all the same.
        return await done

    def _write(self) -> None:
        if self.writer is None and len(self.waiting) > self.seen and self.hops < MAX_HOPS:
            # Creates joined during the last turn: more calls are arriving, let the next turn's join too.
            self.seen, self.hops = len(self.waiting), self.hops + 1
            asyncio.get_running_loop().call_soon(self._write)
            return
        self.seen = self.hops = 0
        self.scheduled = False
        group, self.waiting = self.waiting, []
        if not group:
            return
        self.groups += 1
        self.creates += len(group)
        writer = self.writer
        if writer is None and sum(len(entry.tasks) for entry in group) > MAX_ON_LOOP:
            writer = self.threads
        if writer is None:
            self._land(group, self._stored(group))
            return
        self.writing = True
        # Kept while it runs: the loop holds only a weak reference to a task.
        self._writes.add(
            task := asyncio.get_running_loop().create_task(self._write_off_loop(group, writer), name="plexus-creates")
        )
        task.add_done_callback(self._writes.discard)

    def _stored(self, group: list[Create]) -> Outcomes:
        try:
            return self.store(group)
        except Exception as exc:  # the store function itself failed: every create of the group
            return [exc] * len(group)

    async def _write_off_loop(self, group: list[Create], writer: Callable[..., Awaitable[Any]]) -> None:
        try:
            try:
                outcomes = await writer(self._stored, group)
            except Exception as exc:  # the writer thread is gone (shut down)
                outcomes = [exc] * len(group)
            self._land(group, outcomes)
        finally:
            self.writing = False
            if self.waiting and not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self._write)

    def _land(self, group: list[Create], outcomes: Outcomes) -> None:
        for entry, outcome in zip(group, outcomes, strict=True):
            try:
                entry.answer(self.landed(entry, outcome))
            except Exception as exc:  # its refusal, or what failed after it was stored
                entry.answer(exc)
