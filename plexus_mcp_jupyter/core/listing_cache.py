"""Pages of task listings kept between identical reads, and dropped by any change.

An assistant polls list_tasks (or the tasks resource, tasks/list, the REST list) with the same arguments, and most
polls find nothing changed; each still cost a store read on a pool thread: two queries and their rows turned into
tasks, about a millisecond of CPU, more than the rest of the call. So `TaskManager.alist_tasks` keeps the pages it
read, keyed by the whole request (filter with its viewer, page size, position), and serves one again while nothing
could have changed it. A page is current while neither of these moved since it was read:

* the store's write generation (`WriteGeneration`): it moves when a connection of the store's engine that ran a
  write naming a table a listing reads (tasks, stages), in any thread of this process, goes back to the pool, that
  is after its commit. A read that began before that moment may have seen the rows from before the commit, and is
  not kept; one that begins after it sees them;
  Any failed call on the engine (the database unreachable) moves it too, so an outage is reported by the next
  listing, not hidden behind a page read before it;
* the EventBus's last sequence number: a change another server makes to a shared store reaches this server as an
  event (core/relay.py), which moves it; with `event_relay=off` a server is alone on its store.

A page is kept only when neither moved while it was read, so a change announced before a call is always in its
answer. Running tasks are still merged in from memory on every call (fresher than the store). Writes are rare next
to polls; on any change the whole cache is dropped, so it never holds more than `size` pages of one generation.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

V = TypeVar("V")
# What a statement that only reads starts with; anything else counts as a write (DDL, text SQL, an upsert).
_READ_PREFIXES = ("SELECT", "PRAGMA", "SHOW", "EXPLAIN")
_WROTE = "plexus_wrote"  # set on a pooled connection's info when it ran a write, cleared when it is checked in


@functools.lru_cache(maxsize=512)
def _writes_to(statement: str, tables: tuple[str, ...]) -> bool:
    """Whether `statement` writes and names one of `tables`: decided once per statement text (the store runs a
    few hundred distinct statements, each again on every call; a task's own writes several times per task)."""
    if statement[:32].lstrip()[:7].upper().startswith(_READ_PREFIXES):
        return False
    return any(table in statement for table in tables)


class WriteGeneration:
    """A number that moves whenever a write to the listed tables may have become visible (module docstring).

    Every store write in the package runs in `engine.begin()` (or a connection closed after its commit), so its
    connection is checked in once its transaction ended."""

    def __init__(self, engine: Engine, tables: tuple[str, ...]) -> None:
        self.tables = tables  # writes to other tables (audit, keys, the relay's outbox) leave listings as they are
        self._lock = threading.Lock()
        self._value = 0
        sa.event.listen(engine, "before_cursor_execute", self._before_execute)
        sa.event.listen(engine.pool, "checkin", self._checked_in)
        # A failed call (above all: the database is unreachable) drops the pages too: while the store is out, a
        # listing reads it, and answers that it is unavailable, instead of a page nobody can vouch for.
        sa.event.listen(engine, "handle_error", self._failed)

    @property
    def value(self) -> int:
        return self._value

    def bump(self) -> None:
        with self._lock:
            self._value += 1

    def saw(self, conn: Any, statement: str) -> None:
        """`conn` runs `statement`: if it writes to a listed table, the generation moves once `conn` is checked in.
        Called by SQLAlchemy's event for what it executes, and by the store for what it runs on the driver
        itself (store._OnDriver)."""
        if _writes_to(statement, self.tables):
            conn.info[_WROTE] = True

    def _before_execute(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.saw(conn, statement)

    def _failed(self, _context: Any) -> None:
        self.bump()

    def _checked_in(self, _dbapi_connection: Any, record: Any) -> None:
        # After the commit (or rollback) of whatever the connection wrote: what it wrote is visible now.
        if record is None or record.info.pop(_WROTE, False):
            self.bump()


class PageCache(Generic[V]):
    """Values read at the current generation, at most `size` of them, the least recently used dropped first.

    `generation()` says what the current one is; a value is kept only if it was read at it (`put`), and all are
    dropped when it moves. Used on the event loop only.
    """

    def __init__(self, generation: Callable[[], Hashable], size: int = 16) -> None:
        self.generation = generation
        self.size = size
        self._generation: Hashable = None
        self._values: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        current = self.generation()
        if current != self._generation:
            self._values.clear()
            self._generation = current
            return None
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: Hashable, read_at: Hashable, value: V) -> None:
        """Keep `value`, read at generation `read_at` (taken before the read began), if nothing moved since."""
        if read_at != self.generation() or read_at != self._generation:
            return
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > self.size:
            self._values.popitem(last=False)

    def __len__(self) -> int:
        return len(self._values)
