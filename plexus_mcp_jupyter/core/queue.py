"""The queue model: in which order queued tasks start, which start now, and why the others wait.

One pure function decides it (`plan`), used by the TaskManager's scheduling pass and by `get_task`'s
queue position, so the position a client is shown is the order the scheduler follows:

1. Higher priority first.
2. Inside a priority, owners share (start-time fair queueing, `FairClock`): each next place goes to the
   owner that has started the least lately, counted in starts / weight (`round_robin`: every owner weighs
   1, so owners alternate; `weighted`: by the role that dispatched the task), ties to the oldest task;
   one owner's tasks stay FIFO. `fifo` turns sharing off (plain FIFO inside a priority).
3. Walking that order, a task starts when its owner and its type are under their caps and its resource
   needs fit in what is free. A task whose needs do not fit *reserves* them: what it needs is taken from
   what later tasks may use, so a stream of small tasks never starves a big one ahead of them.

Estimated starts replay the same order against the expected ends of the running tasks (the later of
their type's recent mean run time and their own ETA), each queued task then running its type's mean;
they are None from the first task that waits for something whose end is unknown.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import resources as res
from .models import Task, iso

FAIRNESS_MODES = ("round_robin", "weighted", "fifo")
REASONS = ("no_slot", "owner_cap", "type_cap", "resources", "starting")


@dataclass(frozen=True)
class QueuePolicy:
    """Everything the plan needs besides the tasks: capacity, caps and the sharing rule."""

    capacity: Mapping[str, int]
    needs: Callable[[str], Mapping[str, int]]  # task type -> what one task needs
    slot_cap: Callable[[str | None], int]  # owner -> most running at once (0: no cap)
    type_caps: Mapping[str, int] = field(default_factory=dict)
    fairness: str = "round_robin"
    weights: Mapping[str, float] = field(default_factory=dict)  # role -> weight (weighted fairness)


@dataclass(frozen=True)
class QueuedInfo:
    """Where a queued task stands: what `get_task` shows under `queue`."""

    position: int  # 1 = the next to start
    reason: str  # one of REASONS
    message: str
    estimated_start_at: float | None
    exact: bool = True  # False: past the look-ahead (TaskManager.queue_info), a lower bound or by age only

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "reason": self.reason,
            "message": self.message,
            "estimated_start_at": iso(self.estimated_start_at),
            "exact": self.exact,
        }


@dataclass
class Plan:
    """One scheduling decision: the start order, what starts now, and where the others stand."""

    order: list[Task]
    starts: list[Task]
    waiting: dict[str, QueuedInfo]


class FairClock:
    """Start-time fair queueing between owners (rule 2): each start of an owner's task costs it 1 / weight
    of virtual time; the next place goes to the owner whose next start tag is smallest.

    An owner's tag is max(V, its last finish tag), V being the tag of the latest start, so an owner that
    was idle (or is new) comes back level with the others rather than with credit for the time it was
    away, and ownership of the slots alternates even when each task ends before the next is queued.
    """

    MAX_OWNERS = 10_000  # owners remembered; those level with V carry no information and go first

    def __init__(self) -> None:
        self.virtual = 0.0
        self.finish: dict[str | None, float] = {}

    def copy(self) -> FairClock:
        other = FairClock()
        other.virtual, other.finish = self.virtual, dict(self.finish)
        return other

    def tag(self, owner: str | None) -> float:
        return max(self.virtual, self.finish.get(owner, self.virtual))

    def commit(self, owner: str | None, weight: float) -> None:
        """Record a start of `owner`'s task."""
        start = self.tag(owner)
        self.virtual = start
        self.finish[owner] = start + 1.0 / weight
        if len(self.finish) > self.MAX_OWNERS:
            self.finish = {o: f for o, f in self.finish.items() if f > self.virtual}


def start_order(queued: Sequence[Task], policy: QueuePolicy, clock: FairClock | None = None) -> list[Task]:
    """`queued` (sorted by priority, then age) in the order they are to start (rules 1 and 2 above)."""
    if policy.fairness == "fifo" or not queued:
        return list(queued)
    clock = clock.copy() if clock is not None else FairClock()
    order: list[Task] = []
    start = 0
    while start < len(queued):
        end = start
        while end < len(queued) and queued[end].priority == queued[start].priority:
            end += 1
        order.extend(_share(queued[start:end], clock, policy))
        start = end
    return order


def _share(level: Sequence[Task], clock: FairClock, policy: QueuePolicy) -> list[Task]:
    """One priority's tasks interleaved between owners by their start tags (ties: the oldest task)."""
    by_owner: dict[str | None, list[Task]] = {}
    for task in level:
        by_owner.setdefault(task.owner, []).append(task)
    heads = {owner: 0 for owner in by_owner}
    heap = [(clock.tag(owner), tasks[0].created_at, tasks[0].id, owner) for owner, tasks in by_owner.items()]
    heapq.heapify(heap)
    out: list[Task] = []
    while heap:
        _, _, _, owner = heapq.heappop(heap)
        tasks = by_owner[owner]
        task = tasks[heads[owner]]
        out.append(task)
        heads[owner] += 1
        clock.commit(owner, weight(task, policy))
        if heads[owner] < len(tasks):
            head = tasks[heads[owner]]
            heapq.heappush(heap, (clock.tag(owner), head.created_at, head.id, owner))
    return out


def weight(task: Task, policy: QueuePolicy) -> float:
    """A task's owner's weight in sharing: 1, or its dispatching role's under weighted fairness."""
    if policy.fairness != "weighted":
        return 1.0
    return max(policy.weights.get(task.owner_role or "admin", 1.0), 1e-6)


def plan(
    queued: Sequence[Task],
    running: Sequence[Task],
    policy: QueuePolicy,
    *,
    clock: FairClock | None = None,
    durations: Mapping[str, float] | None = None,
    at: float | None = None,
    reasons: bool = True,
) -> Plan:
    """Which of `queued` start now, and for the others their position, reason and estimated start.

    `clock` is the owners' fair-share state (not changed here: commit the starts you make). With
    `durations` (task type -> mean seconds) and `at` (now), estimated starts are filled in. Without `reasons`
    (a scheduling pass, which needs only the starts and the order), the others are left out of `waiting`: their
    reasons are texts, most of a small plan's cost.
    """
    order = start_order(queued, policy, clock)
    policy = dataclasses.replace(policy, needs=functools.cache(policy.needs))  # one registry read per type
    capacity = dict(policy.capacity)
    free: res.Resources = dict(capacity)
    for task in running:
        res.take(free, policy.needs(task.type))
    actual = dict(free)  # what is really free (reservations aside), for messages
    by_owner: dict[str | None, int] = {}
    by_type: dict[str, int] = {}
    for task in running:
        by_owner[task.owner] = by_owner.get(task.owner, 0) + 1
        by_type[task.type] = by_type.get(task.type, 0) + 1
    starts: list[Task] = []
    waiting: dict[str, tuple[int, str, str]] = {}
    holder: Task | None = None  # the first task that reserved capacity
    for position, task in enumerate(order, 1):
        needs = policy.needs(task.type)
        owner_cap = policy.slot_cap(task.owner)
        type_cap = policy.type_caps.get(task.type, 0)
        if owner_cap and by_owner.get(task.owner, 0) >= owner_cap:
            if reasons:
                waiting[task.id] = (
                    position,
                    "owner_cap",
                    f"its owner already runs {owner_cap} tasks, the most it may "
                    "run at once; it starts when one of them ends",
                )
        elif type_cap and by_type.get(task.type, 0) >= type_cap:
            if reasons:
                waiting[task.id] = (
                    position,
                    "type_cap",
                    f"{type_cap} {task.type} tasks are running, the most allowed "
                    f"at once (max_concurrency_by_type); it starts when one of them ends",
                )
        elif not res.fits(needs, free):
            if reasons:
                waiting[task.id] = (position, *_shortage(needs, free, actual, capacity, holder))
            res.take(free, needs)  # reserve: later tasks may not use what this one waits for
            holder = holder or task
        else:
            res.take(free, needs)
            res.take(actual, needs)
            by_owner[task.owner] = by_owner.get(task.owner, 0) + 1
            by_type[task.type] = by_type.get(task.type, 0) + 1
            starts.append(task)
    estimates = _estimated_starts(order, starts, running, policy, durations, at) if at is not None else {}
    infos = {
        task_id: QueuedInfo(position, reason, message, estimates.get(task_id))
        for task_id, (position, reason, message) in waiting.items()
    }
    return Plan(order=order, starts=starts, waiting=infos)


def _shortage(
    needs: Mapping[str, int],
    free: Mapping[str, int],
    actual: Mapping[str, int],
    capacity: Mapping[str, int],
    holder: Task | None,
) -> tuple[str, str]:
    short = {name for name, amount in needs.items() if amount > free.get(name, 0)}
    held = holder is not None and res.fits(needs, actual)
    reason = "no_slot" if short == {"slots"} else "resources"
    if held:
        assert holder is not None
        text = (
            f"what it needs ({res.describe(needs)}) is held for task {holder.id}, ahead of it in the queue, "
            "which waits for more to be free"
        )
    elif reason == "no_slot":
        used = capacity.get("slots", 0) - max(actual.get("slots", 0), 0)
        text = (
            f"waiting for a free worker slot ({used} of {capacity.get('slots', 0)} in use, it needs "
            f"{needs.get('slots', 0)})"
        )
    else:
        lacking = ", ".join(
            f"{name}: needs {needs[name]}, {max(actual.get(name, 0), 0)} free of {capacity.get(name, 0)}"
            for name in sorted(short)
        )
        text = f"waiting for resources ({lacking})"
    return reason, text


def _estimated_starts(
    order: Sequence[Task],
    starts: Sequence[Task],
    running: Sequence[Task],
    policy: QueuePolicy,
    durations: Mapping[str, float] | None,
    at: float,
) -> dict[str, float | None]:
    """Replay the start order against expected ends: each task starts once enough has been released."""
    durations = durations or {}
    releases: list[tuple[float, int, Mapping[str, int]]] = []  # (time, tie-breaker, resources freed)
    free: res.Resources = dict(policy.capacity)
    counter = 0
    for task in [*running, *starts]:
        needs = policy.needs(task.type)
        res.take(free, needs)
        duration = durations.get(task.type)
        begun = task.started_at if task.started_at is not None else at
        # Its type's mean run time, and its own ETA (the end of its current stage, so a lower bound).
        known = [
            end
            for end in (begun + duration if duration is not None else None, task.estimated_completion_at)
            if end is not None
        ]
        if known:
            end = max(known)
            counter += 1
            releases.append((max(end, at), counter, needs))
    heapq.heapify(releases)
    started = {task.id for task in starts}
    out: dict[str, float | None] = {}
    clock = at
    unknown = False
    for task in order:
        if task.id in started:
            continue
        needs = policy.needs(task.type)
        while not res.fits(needs, free) and releases and not unknown:
            when, _, freed = heapq.heappop(releases)
            clock = max(clock, when)
            for name, amount in freed.items():
                free[name] = free.get(name, 0) + amount
        if unknown or not res.fits(needs, free):
            unknown = True  # what it waits for has no known end: neither has anything after it
            out[task.id] = None
            continue
        out[task.id] = clock
        res.take(free, needs)
        duration = durations.get(task.type)
        if duration is not None:
            counter += 1
            heapq.heappush(releases, (clock + duration, counter, needs))
    return out


Group = tuple[int, str | None]  # (priority, owner): the unit the queue's read takes heads of


class QueueWindow:
    """The head of the queue as one read of the store saw it, kept between scheduling passes.

    A pass needs the first `head` tasks of each (priority, owner) group (see `TaskManager._read_plan_claim`).
    Reading them costs a query per group plus one, and a busy server passes once per task that ends, so the
    manager reads deeper than a pass needs and serves later passes from what is left (`view`), until the
    queue may have changed (`version`: the manager counts what can queue a task, and its maintenance tick
    counts tasks other servers may have queued) or a group whose tail was not read shows fewer than `head`
    tasks. What a view holds is exactly what a fresh read would return then; a task in it that was taken
    meanwhile (cancelled, claimed by another server) fails its conditional claim, which counts as a change.
    """

    __slots__ = ("_cut", "_tasks", "version")

    def __init__(self, version: int, tasks: list[Task], cut: Mapping[Group, int]) -> None:
        self.version = version
        self._tasks = tasks  # by priority, then age (Store.queue_window's order)
        self._cut = dict(cut)  # group -> queued tasks the read did not return

    def view(self, head: int) -> tuple[list[Task], dict[Group, int]] | None:
        """The first `head` tasks of each group and, per group, how many more are queued; None when a group
        with unread tasks shows fewer than `head` (read again)."""
        shown: dict[Group, int] = {}
        left: dict[Group, int] = {}
        tasks: list[Task] = []
        for task in self._tasks:
            group = (task.priority, task.owner)
            if shown.get(group, 0) < head:
                shown[group] = shown.get(group, 0) + 1
                tasks.append(task)
            else:
                left[group] = left.get(group, 0) + 1
        if any(shown.get(group, 0) < head for group, unread in self._cut.items() if unread):
            return None
        cut = {group: left.get(group, 0) + self._cut.get(group, 0) for group in left.keys() | self._cut.keys()}
        return tasks, {group: n for group, n in cut.items() if n}

    def holds(self, oldest: Mapping[Group, float]) -> bool:
        """Whether the window stays the queue's head when tasks were queued since in the groups of `oldest`, the
        oldest creation time of those tasks each: it shows tasks of each group, all created before that time, so
        the new tasks come after them in their group (once the window knows the group has more: `more`). A task
        older than one the window shows (its create committed late, on another server) belongs among them: the
        queue is read again, or the newer task would start first (FIFO within (priority, owner) holds)."""
        newest: dict[Group, float] = {}
        for task in self._tasks:
            group = (task.priority, task.owner)
            if task.created_at > newest.get(group, float("-inf")):
                newest[group] = task.created_at
        return all(group in newest and at > newest[group] for group, at in oldest.items())

    def more(self, groups: Iterable[Group]) -> None:
        """Tasks were queued in `groups` after the read (at least one each)."""
        for group in groups:
            self._cut[group] = self._cut.get(group, 0) + 1

    def taken(self, ids: set[str]) -> None:
        """Drop the tasks a pass started."""
        if ids:
            self._tasks = [task for task in self._tasks if task.id not in ids]
