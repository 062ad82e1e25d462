"""EventRelay: the events of every server sharing one store, on each server's EventBus.

The EventBus is in-process: a task that another server runs (several Jupyter servers, or standalone ones,
on one PostgreSQL or one SQLite file) would never reach this server's MCP subscriptions, WebSocket streams
or notebook mirrors. The relay closes that gap with the store itself, nothing else to deploy:

* Out: it listens to this server's bus and writes the events to a small outbox table
  (`plexus_event_outbox`), one transaction per `interval` at most (on PostgreSQL one statement, its NOTIFY
  with it), coalesced per entity like a
  subscription is: a final state always goes out, the progress of a running task at most once per
  `progress_interval` (the rate its progress is written to the store anyway). Events from other servers
  (those with an `origin`) are never sent on again. A send is one packed row (up to PACK_MAX events): the
  events' heads (time, kind, entity, status) in one column, their data in another, each JSON text the database
  stores as text without parsing it, so the store's cost is a row and its index entries per send, not per
  event (a task's events were about two rows). On PostgreSQL with LISTEN/NOTIFY, rows only while another server
  follows other servers' events (it says so on INTEREST_CHANNEL, with a lease; a server of the release before
  LISTENing counts as one, and so does one that hears no NOTIFY: `poll` on PostgreSQL, or `auto` whose LISTEN is
  down, which says it always): else a send is its NOTIFY alone, which says all such a server uses; what was sent so
  in the last RECENT_SECONDS is sent again, with rows, to a server heard to follow anew (docs/architecture.md). A
  stopping server's last send (with what went without rows in the last RECENT_SECONDS), and every send while
  pg_stat_activity cannot be read, write rows.
* In: it reads the rows other servers wrote since the last it read, unpacks them in order, and publishes the
  events on this bus with their `origin`, dropping any that is older than what this bus already said about the
  entity (a remote "created" arriving after this server ran the task to its end). On PostgreSQL a dedicated
  connection LISTENs for the writers' NOTIFY (whose payload is the writer's server id and a few words on its send:
  payloads are bounded) and reads at once, polling only as a fallback; elsewhere (SQLite) it polls every
  `interval`.
* Lazily: while nothing on this server needs other servers' events (no WebSocket stream, MCP subscription,
  progress relay or waiting call: `EventBus.wants_remote`), they are not published: the bus's sequence number
  moves (`EventBus.skip_remote`: listings are read again, a resuming client is told of the gap) and `on_remote` is
  told their kinds and statuses (a task another server queued is planned here at once). On PostgreSQL the NOTIFY
  says all of that (its payload: the sender, how many events, their distinct (kind, status), the queue groups of
  the tasks they created, each with its tasks' oldest creation time), so nothing is read:
  the rows are skipped by moving the cursor to the horizon (`pg_snapshot_xmin`) of a statement the relay makes
  anyway (its send, else a horizon query every few intervals), taken only when nothing needed the events after
  that statement ended: every row below it was committed before any subscriber here came, and every row above it
  is read once one has, but those of the sends whose NOTIFY was taken (their transaction ids are kept until the
  cursor passes them).
  A NOTIFY that arrives while something needs them wakes a read, as before. Polling (SQLite), a read takes only
  the rows' heads (each event's kind, entity and status), not their data (the entities' whole state, most of a
  read's cost). Whether anything needs them is asked after the read (or the horizon's statement), so an event
  committed after a subscriber arrived is always published to it.
* The outbox is pruned by age (`keep_seconds`): a server stalled for longer misses what was pruned, and
  resumes with what is left.

The relay works on a thread of its own, so that its store traffic never waits on the event loop, nor the
event loop on it; events are handed to the loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .errors import InvalidArgument
from .events import Event, EventBus
from .models import FINAL_STATUSES, TaskStatus, now, parse_iso
from .store import KEEPALIVES, Store, outbox_table
from .store_calls import store_unavailable

log = logging.getLogger("plexus_mcp_jupyter")

RELAY_MODES = ("auto", "poll", "off")
CHANNEL = "plexus_events"  # the PostgreSQL NOTIFY channel
READ_BATCH = 100  # most outbox rows (sends) one read takes (it reads again at once when it got that many)
PACK_MAX = 1000  # most events one outbox row carries (a larger send writes several rows in its one statement)
FALLBACK_POLLS = 20  # with LISTEN/NOTIFY, read anyway every this many intervals (a notification lost)
HORIZON_EVERY = 5  # NOTIFYs taken without their rows: the horizon is asked after this many intervals without a send
PRUNE_EVERY = 10.0  # seconds between two prunings of the outbox
SEEN_MAX = 20_000  # entities whose latest state this bus published, remembered to drop stale remote events
NOTICE_MAX = 4000  # longest NOTIFY payload (PostgreSQL's limit is 8000 bytes); a longer one names no kinds: read
# Interest (PostgreSQL, LISTEN/NOTIFY): a server whose bus wants other servers' events says so on a channel of its
# own (a server of the release before neither listens to it nor is disturbed by it), every INTEREST_EVERY seconds
# while it wants them, each saying holds for INTEREST_LEASE; while no other server holds one, a send is its NOTIFY
# alone (no outbox row). A sender keeps what it sent so for RECENT_SECONDS (RECENT_MAX entities at most) and sends
# it again with rows when it hears a new interest: what a follower's subscriber came for just before it was heard.
INTEREST_CHANNEL = "plexus_interest"
INTEREST_LEASE = 10.0
INTEREST_EVERY = 2.0
RECENT_SECONDS = 5.0
RECENT_MAX = 10_000
# The relay thread's most wait for the saying lock (held by the LISTEN thread's saying, whose connection may be
# gone: found dead after LISTEN_TCP_TIMEOUT_MS at most): it sends and reads meanwhile, its saying asked for its next
# turn.
SAY_LOCK_WAIT = 2.0
# The LISTEN connection (it also says this server follows): the pool's TCP keepalives (store.KEEPALIVES), data not
# acknowledged for this long ends it (milliseconds, libpq's tcp_user_timeout: a statement sent on a connection
# dropped silently waited for TCP's retransmissions, about 15 minutes), and a statement timeout of its own.
LISTEN_TCP_TIMEOUT_MS = 25_000
LISTEN_STATEMENT_TIMEOUT_MS = 5_000
LISTEN_CONNECT_TIMEOUT = 5
# psycopg before 3.2.4 drops the NOTIFYs that arrive while a statement runs on the LISTEN connection: with one, the
# LISTEN thread says who follows on a pooled connection, as the relay thread does.
PSYCOPG_KEEPS_NOTIFIES = (3, 2, 4)
OLDER_EVERY = 3.0  # seconds between two looks for a LISTEN of the release before (pg_stat_activity): within
# RECENT_SECONDS, so that what was sent without rows since one appeared is still kept to send it again
_FINAL = frozenset(s.value for s in FINAL_STATUSES)
_XMIN = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_NEWEST_ID = f"SELECT max(id) FROM {outbox_table.name}"
# A send without rows: its NOTIFY alone (and the horizon, as a send's).
_PG_NOTICE = f"SELECT pg_notify(%(channel)s, %(notice)s || pg_current_xact_id()::text || ']'), ({_XMIN})"
_PG_INTEREST = "SELECT pg_notify(%(channel)s, %(payload)s)"
# A LISTEN of a server of the release before: its LISTEN connection's last statement is its LISTEN on CHANNEL alone
# (this release's LISTENs on both channels in one). Visible to the same database role (or pg_read_all_stats).
_PG_OLDER = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
    f"AND query = 'LISTEN {CHANNEL}'"
)
# PostgreSQL: a send is one statement, a VALUES row per pack (the packs as text parameters: nothing for the server
# to parse), with the NOTIFY (a data-modifying WITH runs to completion whatever the outer query reads).
_PG_SEND = """WITH sent AS (
  INSERT INTO {table} (txid, origin, at, heads, data) VALUES {values}
  RETURNING 1)
SELECT pg_notify(%(channel)s, %(notice)s || pg_current_xact_id()::text || ']'), ({xmin})"""
_PG_PACK = "(pg_current_xact_id()::text::bigint, %(origin)s, %(at)s, %(heads{i})s, %(data{i})s)"


@functools.cache
def _pg_send(packs: int) -> str:
    """_PG_SEND for a send of `packs` rows."""
    values = ", ".join(_PG_PACK.format(i=i) for i in range(packs))
    return _PG_SEND.format(table=outbox_table.name, values=values, xmin=_XMIN)


# PostgreSQL: a read is one statement: the rows after the cursor, of transactions older than every one still running
# when the statement's snapshot was taken (all of them visible to it: one that commits late cannot be skipped).
_PG_READ = (
    f"SELECT id, txid, origin, heads{{data}} FROM {outbox_table.name} WHERE (txid, id) > (%(txid)s, %(id)s) "
    f"AND txid < ({_XMIN}) AND origin <> %(origin)s ORDER BY txid, id LIMIT %(limit)s"
)
_PG_READ_LEAN, _PG_READ_FULL = _PG_READ.format(data=""), _PG_READ.format(data=", data")
_PG_DATA = f"SELECT id, data FROM {outbox_table.name} WHERE id = ANY(%(ids)s)"


def pack(events: Sequence[Event], at: float) -> list[dict[str, Any]]:
    """Events as outbox rows but their origin: up to PACK_MAX events a row, their heads and data in order (JSON
    texts)."""
    return [
        {
            "at": at,
            "heads": json.dumps([[e.at, e.kind, e.entity_type, e.entity_id, e.data.get("status")] for e in part]),
            "data": json.dumps([e.data for e in part]),
        }
        for part in (events[i : i + PACK_MAX] for i in range(0, len(events), PACK_MAX))
    ]


def created_groups(events: Iterable[Event]) -> dict[tuple[int, str | None], float] | None:
    """The (priority, owner) queue groups of the tasks `events` created (their task.created events), each with the
    oldest creation time of its tasks there (epoch seconds, a lower bound: the summary's ISO time, milliseconds,
    less a microsecond for its rounding); None when one does not say (its data has no priority, owner or creation
    time): what a server needs to keep the queue's head it read (`QueueWindow.holds`: a task that committed late,
    older than a task the head shows of its group, has the head read again)."""
    oldest: dict[tuple[int, str | None], str] = {}
    for event in events:
        if event.kind == "task.created":
            data = event.data
            created = data.get("created_at")
            if "priority" not in data or "owner" not in data or not isinstance(created, str):
                return None
            group = (data["priority"], data["owner"])
            if group not in oldest or created < oldest[group]:  # one ISO format: its text sorts as its time
                oldest[group] = created
    try:  # models.iso cuts to milliseconds; less 1 us: at most the time it was made from (its datetime rounds)
        return {group: parse_iso(created) - 1e-6 for group, created in oldest.items()}
    except InvalidArgument:  # not an ISO time
        return None


def notice(origin: str, events: Sequence[Event], *, rows: bool = True) -> str:
    """A send's NOTIFY payload but its end: its sender, how many events it carries, their distinct (kind, status)
    and the queue groups of the tasks they created (`created_groups`), all that a server with nobody following
    other servers' events needs of them, and whether the send wrote rows ("r") or is the NOTIFY alone ("n") (a JSON
    list, without the pairs and groups when too long; _PG_SEND ends it with the send's transaction id). A server of
    the release before reads the mark as a second item of the groups, which it ignores."""
    return _notice(origin, events, rows)[0]


def _notice(origin: str, events: Sequence[Event], rows: bool) -> tuple[str, bool]:
    """`notice`, and whether it says the events' kinds (it was not too long)."""
    pairs = list({(event.kind, event.data.get("status")) for event in events})
    groups = created_groups(events)
    said = None if groups is None else sorted(([*group, at] for group, at in groups.items()), key=repr)
    mark = "r" if rows else "n"
    text = json.dumps([origin, len(events), pairs, said, mark])
    if len(text) <= NOTICE_MAX:
        return text[:-1] + ",", True
    return json.dumps([origin, len(events), None, None, mark])[:-1] + ",", False


# The queue groups of the tasks a batch of remote events created, each with the oldest creation time of its tasks
# there (`created_groups`); None: not known (the queue's head is read again).
Groups = dict[tuple[int, str | None], float] | None


def heard(payload: str) -> tuple[str, int, list[tuple[str, str | None]] | None, Groups, int]:
    """A NOTIFY payload read back: (origin, events, their (kind, status) or None when not said, the groups of the
    tasks they created with their oldest creation time or None when not said, the send's transaction id). An older
    server's payload says no groups, or groups without their times (both: None), or is its id alone (nothing)."""
    return hear(payload)[:5]  # type: ignore[return-value]


def hear(payload: str) -> tuple[str, int, list[tuple[str, str | None]] | None, Groups, int, bool]:
    """`heard`, and whether the send wrote no row (its NOTIFY alone: a payload that says its kinds and marks "n")."""
    try:
        origin, count, pairs, *groups, txid = json.loads(payload)
        said = None if pairs is None else [(str(kind), status) for kind, status in pairs]
        known = None if not groups or groups[0] is None else _timed_groups(groups[0])
        rowless = said is not None and len(groups) >= 2 and groups[1] == "n"
        return str(origin), int(count), said, known, int(txid), rowless
    except (ValueError, TypeError):
        return payload, 0, None, None, 0, False


def _timed_groups(items: list[list[Any]]) -> Groups:
    """A payload's groups, [priority, owner, oldest creation time] each; None if one has no time (a server of the
    release before said [priority, owner]: whether its tasks are older than the head's is not known)."""
    out: dict[tuple[int, str | None], float] = {}
    for item in items:
        if len(item) != 3:
            return None
        priority, owner, oldest = item
        out[(int(priority), owner)] = float(oldest)
    return out


def unpack(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Outbox rows as their events, in order: each with its row's id and origin, its place in the row (`pos`), and
    its data when the row's was read."""
    events: list[dict[str, Any]] = []
    for row in rows:
        data = None if row.get("data") is None else json.loads(row["data"])
        for pos, (at, kind, entity_type, entity_id, status) in enumerate(json.loads(row["heads"])):
            events.append(
                {
                    "id": row["id"],
                    "pos": pos,
                    "origin": row["origin"],
                    "at": at,
                    "kind": kind,
                    "entity_type": entity_type,
                    "entity_id": entity_id,
                    "status": status,
                    "data": None if data is None else data[pos],
                }
            )
    return events


def _keeps_notifies(version: str) -> bool:
    """Whether a psycopg of `version` keeps the NOTIFYs that arrive during a statement (PSYCOPG_KEEPS_NOTIFIES)."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    return numbers >= PSYCOPG_KEEPS_NOTIFIES


def is_final(event: Event) -> bool:
    return event.data.get("status") in _FINAL


def _latest_per_entity(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest event per entity, in order; a final one is never replaced (finals are terminal)."""
    latest: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
    for row in rows:
        key = (row["entity_type"], row["entity_id"])
        kept = latest.get(key)
        if kept is None or kept["status"] not in _FINAL:
            latest.pop(key, None)
            latest[key] = row
    return list(latest.values())


class EventRelay:
    """Relays the events of the servers sharing one store (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        bus: EventBus,
        *,
        mode: str = "auto",
        interval: float = 0.25,
        progress_interval: float = 1.0,
        keep_seconds: float = 60.0,
        on_remote: Callable[[list[tuple[str, str | None]], Groups], None] | None = None,
    ) -> None:
        if mode not in RELAY_MODES:
            raise ValueError(f"event_relay must be one of {', '.join(RELAY_MODES)}, not {mode!r}")
        self.store = store
        self.bus = bus
        self.postgres = store.engine.dialect.name == "postgresql"
        self.mode = "off" if mode == "off" else ("notify" if mode == "auto" and self.postgres else "poll")
        self.interval = interval
        self.progress_interval = progress_interval
        self.keep_seconds = keep_seconds
        # Called on the loop with (kind, status) of each batch of remote events, published or not, and the queue
        # groups of the tasks they created (None when not known: their rows were read without their data).
        self.on_remote = on_remote
        self.server_id = ""
        self.sent = 0  # events written to the outbox
        self.packs = 0  # outbox rows written (each carries up to PACK_MAX events)
        self.received = 0  # events of other servers published here
        self.noted = 0  # events of other servers read while nothing here needed them: counted, not published
        self.sends = 0  # outbox transactions written
        self.reads = 0  # outbox reads that found rows
        self.notified_only = 0  # events sent in a NOTIFY alone, no other server following (no outbox row)
        self.interest_said = 0  # times this server said (or renewed) that it follows other servers' events
        self._interest: dict[str, float] = {}  # PostgreSQL: servers following others' events -> until (monotonic)
        self._new_interest = False  # one was heard that did not hold before: send RECENT again, with rows
        self._older: bool | None = False  # a LISTEN of the release before is on CHANNEL (None: not known): rows
        self._older_failed = False  # the look for one failed (warned once)
        # (monotonic) When this server last said it follows; None: no saying of it holds anywhere (never said, or
        # its end said); -inf: a saying failed, which may have reached the others all the same (said again at once,
        # its end owed). Under _say_lock.
        self._said_at: float | None = None
        self._say_lock = threading.Lock()  # one saying at a time (the relay and the LISTEN thread both say)
        self._say_asked = False  # a sender has not heard this server follows: say it at once (`_say_again`)
        self._recent: OrderedDict[tuple[str, str], tuple[float, Event]] = OrderedDict()  # sent without rows
        self._full = True  # the next read takes the rows' data (the last read found them needed)
        self.listening = False  # PostgreSQL: the LISTEN connection is up
        self._listen_down = False  # PostgreSQL, `auto`: the LISTEN failed (polling until it is back)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: OrderedDict[tuple[str, str], Event] = OrderedDict()  # to send, latest per entity
        self._last_sent: dict[tuple[str, str], float] = {}  # when an entity's progress last went out
        self._seen: OrderedDict[tuple[str, str], tuple[float, bool]] = OrderedDict()  # (at, final) published
        self._wake = threading.Event()
        self._notified = False
        self._skipped = False  # PostgreSQL: NOTIFYs taken without reading their rows since the cursor last moved
        self._noted_tx: set[int] = set()  # ...their sends' transactions (above the cursor): never read after all
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._remove_listener: Callable[[], None] | None = None
        self._cursor: tuple[int, int] = (0, 0)  # the last outbox row read: (txid, id) on PostgreSQL, (0, id)
        self._read_to = -1  # SQLite: the outbox's newest id (0: empty) when the last complete read began

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, server_id: str) -> None:
        """Relay from now on, as `server_id` (events already in the outbox are not replayed)."""
        if self.mode == "off" or self._threads:
            return
        self._loop, self.server_id = loop, server_id
        self._stop.clear()
        with self.store.engine.connect() as conn:
            self._cursor = self._start_cursor(conn)
        self._remove_listener = self.bus.add_listener(self._on_event, remote=False)
        self._threads = [threading.Thread(target=self._run, name="plexus-event-relay", daemon=True)]
        if self.mode == "notify":
            self._threads.append(threading.Thread(target=self._listen, name="plexus-event-listen", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is pending (the final states of tasks this server just stopped), then end the threads."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def status(self) -> dict[str, Any]:
        """For health: how events reach the other servers on the store, and how many went each way."""
        return {
            "mode": self.mode,
            "interval_seconds": self.interval,
            "listening": self.listening,
            "sent": self.sent,
            "received": self.received,
            "noted": self.noted,
            "sends": self.sends,
            "packs": self.packs,
            "reads": self.reads,
            "notified_only": self.notified_only,
            "followers": self.followers(),
            "older_listeners": self._older,
            "following_said": self.interest_said,
        }

    def followers(self) -> int:
        """PostgreSQL: how many other servers said lately that they follow other servers' events."""
        at = time.monotonic()
        with self._lock:
            return sum(1 for until in self._interest.values() if until > at)

    def _rows_needed(self, at: float) -> bool:
        """Whether a send writes rows: always but on PostgreSQL with LISTEN/NOTIFY, where it does while another
        server follows, while who follows is not known (LISTEN down or just begun), or a server of the release
        before listens (it reads rows whenever it follows, and never says so). While the LISTEN is down nothing is
        heard of who follows: rows."""
        if self.mode != "notify" or not self.listening or self._older is not False:
            return True
        with self._lock:
            for server, until in list(self._interest.items()):
                if until <= at:
                    del self._interest[server]
            return bool(self._interest)

    # -- out: this server's events -------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """Bus listener (on the loop): remember the entity's latest state; queue this server's own events."""
        if event.origin is not None:
            return  # another server's: remembered by _publish with its own time, never sent on
        key = (event.entity_type, event.entity_id)
        with self._lock:
            self._remember(key, event.at, is_final(event))
            self._pending.pop(key, None)
            self._pending[key] = event

    def _remember(self, key: tuple[str, str], at: float, final: bool) -> None:
        known = self._seen.pop(key, None)
        self._seen[key] = (at, final or (known is not None and known[1]))
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)

    def _due(self, at: float) -> list[Event]:
        """The pending events to send now: every final state, and progress not sent in progress_interval."""
        due: list[Event] = []
        with self._lock:
            for key, event in list(self._pending.items()):
                if is_final(event):
                    self._last_sent.pop(key, None)
                elif at - self._last_sent.get(key, float("-inf")) >= self.progress_interval:
                    self._last_sent[key] = at
                else:
                    continue
                del self._pending[key]
                due.append(event)
            if len(self._last_sent) > SEEN_MAX:  # entities that stopped without a final event here
                self._last_sent = {k: t for k, t in self._last_sent.items() if at - t < self.progress_interval}
        return due

    def _with_recent(self, due: list[Event], at: float | None = None) -> list[Event]:
        """A new follower was heard (at `at`, monotonic; default now): `due` after what was sent without rows in
        the last RECENT_SECONDS before it (the latest state of each entity not in `due`), to be sent with rows. Older
        entries are left out: they stay in the buffer while nothing is sent without rows (an idle sender)."""
        since = (time.monotonic() if at is None else at) - RECENT_SECONDS
        with self._lock:
            recent, self._recent = self._recent, OrderedDict()
        keys = {(event.entity_type, event.entity_id) for event in due}
        return [event for key, (t, event) in recent.items() if t >= since and key not in keys] + due

    def _keep_recent(self, events: Sequence[Event], at: float) -> None:
        with self._lock:
            for event in events:
                key = (event.entity_type, event.entity_id)
                self._recent.pop(key, None)
                self._recent[key] = (at, event)
            while self._recent and (
                len(self._recent) > RECENT_MAX or next(iter(self._recent.values()))[0] < at - RECENT_SECONDS
            ):
                self._recent.popitem(last=False)

    def _send(self, events: Sequence[Event], *, rows: bool = True) -> int | None:
        """Send `events`: write them to the outbox, or without `rows` (PostgreSQL) their NOTIFY alone if it can say
        their kinds; on PostgreSQL, returns the horizon of the statement's snapshot."""
        try:
            if not rows and self.postgres:
                said, full = _notice(self.server_id, events, rows=False)
                if full:  # no other server follows: what the NOTIFY says is all they need
                    with self.store.reads.connect() as conn:
                        params = {"channel": CHANNEL, "notice": said}
                        horizon: int | None = int(conn.exec_driver_sql(_PG_NOTICE, params).one()[1])
                    self._keep_recent(events, time.monotonic())
                    self.notified_only += len(events)
                    self.sent += len(events)
                    self.sends += 1
                    return horizon
            packed = pack(events, now())
            horizon = None
            if self.postgres:  # one statement, in autocommit: NOTIFY delivered at its commit to every LISTENing server
                with self.store.reads.connect() as conn:  # (ours ignores its own)
                    params = {"origin": self.server_id, "channel": CHANNEL, "at": packed[0]["at"]}
                    params["notice"] = notice(self.server_id, events)
                    for i, row in enumerate(packed):
                        params[f"heads{i}"], params[f"data{i}"] = row["heads"], row["data"]
                    horizon = int(conn.exec_driver_sql(_pg_send(len(packed)), params).one()[1])
            else:
                with self.store.engine.begin() as conn:
                    conn.execute(sa.insert(outbox_table), [{"origin": self.server_id, **row} for row in packed])
        except Exception:
            with self._lock:  # keep them for the next round, unless a newer state of the entity came meanwhile
                for event in events:
                    self._pending.setdefault((event.entity_type, event.entity_id), event)
            raise
        if self._recent:  # their rows are newer than what was sent of them without rows: never sent again
            with self._lock:
                for event in events:
                    self._recent.pop((event.entity_type, event.entity_id), None)
        self.sent += len(events)
        self.packs += len(packed)
        self.sends += 1
        return horizon

    # -- in: the other servers' events ---------------------------------------------------------

    def _start_cursor(self, conn: Connection) -> tuple[int, int]:
        if self.postgres:
            return int(conn.execute(sa.text(_XMIN)).scalar_one()), -1
        last = conn.execute(sa.select(sa.func.max(outbox_table.c.id))).scalar_one()
        return 0, int(last or 0)

    def _newest_id(self) -> int:
        """SQLite: the outbox's newest row id, asked on the driver (~40 µs of CPU, against ~0.5 ms for a read
        through SQLAlchemy's statement and result machinery, four times a second even when nothing changed)."""
        conn = self.store.engine.raw_connection()
        try:
            row = conn.cursor().execute(_NEWEST_ID).fetchone()
        finally:
            conn.close()
        return int(row[0] or 0) if row is not None else 0

    def _receive(self) -> None:
        """Read what other servers wrote after the cursor, in order, and hand it to the loop. On SQLite, not at all
        when the outbox's newest row is the one it was when the last complete read began: every row up to it was
        committed before that read (one writer at a time, ids in commit order), so that read saw it."""
        if self.postgres:
            self._read()
            return
        newest = self._newest_id()
        if newest == self._read_to:
            return
        self._read()
        self._read_to = newest

    def _read(self) -> None:
        while not self._stop.is_set():
            full = self._full
            with self.store.reads.connect() as conn:  # PostgreSQL: autocommit, no BEGIN and ROLLBACK round trips
                rows = self._fetch(conn, full)
                if not rows:
                    return
                self.reads += 1
                latest = _latest_per_entity(unpack(self._unnoted(rows)))
                # Asked after the read: a subscriber that came before it is owed these rows' events, one that
                # comes after it is not (they were committed before it came).
                self._full = self.bus.wants_remote()
                if self._full and not full:  # needed after all: the data of the events kept
                    data = self._data(conn, sorted({event["id"] for event in latest}))
                    for event in latest:
                        event["data"] = data[event["id"]][event["pos"]]
            self._move_cursor((int(rows[-1]["txid"] or 0), int(rows[-1]["id"])))
            if latest:
                self._hand_over(latest, publish=self._full)
            if len(rows) < READ_BATCH:
                return

    def _fetch(self, conn: Connection, full: bool) -> list[dict[str, Any]]:
        """The next outbox rows of other servers after the cursor, in order (with `full`, their data too)."""
        txid, row_id = self._cursor
        if self.postgres:
            params = {"txid": txid, "id": row_id, "origin": self.server_id, "limit": READ_BATCH}
            result = conn.exec_driver_sql(_PG_READ_FULL if full else _PG_READ_LEAN, params)
            return [dict(row) for row in result.mappings()]
        o = outbox_table
        query = (  # one writer at a time: ids are in commit order
            sa.select(o.c.id, o.c.txid, o.c.origin, o.c.heads, *([o.c.data] if full else []))
            .where(o.c.id > row_id, o.c.origin != self.server_id)
            .order_by(o.c.id)
            .limit(READ_BATCH)
        )
        return [dict(row) for row in conn.execute(query).mappings()]

    def _data(self, conn: Connection, ids: list[int]) -> dict[int, list[Any]]:
        """The data of the outbox rows `ids`: each row's events' data, in order."""
        if self.postgres:
            texts = conn.exec_driver_sql(_PG_DATA, {"ids": ids}).all()
        else:
            o = outbox_table
            texts = conn.execute(sa.select(o.c.id, o.c.data).where(o.c.id.in_(ids))).all()
        return {row_id: json.loads(text) for row_id, text in texts}

    def _unnoted(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows whose NOTIFY was not taken without them (`_heard`)."""
        with self._lock:
            noted = self._noted_tx
            return [row for row in rows if row["txid"] not in noted] if noted else rows

    def _move_cursor(self, cursor: tuple[int, int]) -> None:
        with self._lock:
            self._cursor = max(self._cursor, cursor)
            if self._noted_tx:
                self._noted_tx = {txid for txid in self._noted_tx if txid >= self._cursor[0]}

    def _skip_to(self, horizon: int) -> None:
        """PostgreSQL, its NOTIFYs heard: skip the rows below `horizon` (that of a statement that just ended) unless
        something here needs other servers' events now: every such row was committed before it came."""
        if not self._notified and not self.bus.wants_remote():  # (a read asked for meanwhile reads from here)
            self._move_cursor((horizon, -1))

    def _horizon(self) -> int:
        with self.store.reads.connect() as conn:
            return int(conn.exec_driver_sql(_XMIN).scalar_one())

    def _hand_over(self, rows: list[dict[str, Any]], *, publish: bool) -> None:
        self._to_loop(self._publish if publish else self._note, rows)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the server is stopping
                loop.call_soon_threadsafe(fn, *args)

    def _fresh(self, row: dict[str, Any]) -> bool:
        """Whether a remote row is newer than what this bus said about its entity (remembered if it is)."""
        key = (row["entity_type"], row["entity_id"])
        final = row["status"] in _FINAL
        with self._lock:
            known = self._seen.get(key)
            if known is not None and (known[1] or (not final and row["at"] < known[0])):
                return False  # the entity already ended here, or this bus has a newer state of it
            self._remember(key, row["at"], final)
        return True

    def _publish(self, rows: Sequence[dict[str, Any]]) -> None:
        """On the loop: publish remote events that are newer than what this bus said about their entity."""
        published = [
            self.bus.publish(row["kind"], row["entity_type"], row["entity_id"], row["data"], origin=row["origin"])
            for row in rows
            if self._fresh(row)
        ]
        self.received += len(published)
        self._tell([(event.kind, event.data.get("status")) for event in published], created_groups(published))

    def _note(self, rows: Sequence[dict[str, Any]]) -> None:
        """On the loop: remote events nobody here needed: counted and told to `on_remote`, not published."""
        fresh = [(row["kind"], row["status"]) for row in rows if self._fresh(row)]
        if fresh:
            self.bus.skip_remote()
            self.noted += len(fresh)
        self._tell(fresh, None)

    def _noted(self, count: int, pairs: list[tuple[str, str | None]], groups: Groups) -> None:
        """On the loop: a NOTIFY of another server's send, its rows not read (nobody here needed them)."""
        self.bus.skip_remote()
        self.noted += count
        self._tell(pairs, groups)

    def _tell(self, events: list[tuple[str, str | None]], groups: Groups) -> None:
        if events and self.on_remote is not None:
            try:
                self.on_remote(events, groups)
            except Exception:
                log.exception("Plexus: handling events of other servers failed")

    # -- the threads ---------------------------------------------------------------------------

    def _run(self) -> None:
        polls = unmoved = 0
        next_prune = time.monotonic() + PRUNE_EVERY
        next_older = 0.0
        failing = False
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                at = time.monotonic()
                if self.postgres and not stopping:
                    self._say_interest(at, stopping)
                if self.mode == "notify" and at >= next_older and not stopping:
                    next_older = at + OLDER_EVERY
                    older = self._older_listening()
                    if older is not False and self._older is False:  # it missed the last sends: sent again
                        self._new_interest = True
                    self._older = older
                due = self._due(now())
                # A stopping server's last send writes rows, with what it sent without rows in the last
                # RECENT_SECONDS (its tasks' final states may have gone out a turn before): it cannot send them
                # again to a follower heard later.
                rows = stopping or self._rows_needed(at)
                if rows and (self._new_interest or stopping):
                    self._new_interest = False
                    due = self._with_recent(due, at)
                horizon = self._send(due, rows=rows) if due else None
                if self.postgres and stopping:  # after the last send: a failure to say it must not lose that send
                    self._say_interest(at, stopping)
                polls += 1
                if self.mode == "poll" or self._notified or polls >= FALLBACK_POLLS or not self.listening:
                    self._notified = False
                    polls = 0
                    if not stopping:
                        self._receive()
                elif horizon is not None or (self._skipped and unmoved >= HORIZON_EVERY):
                    # NOTIFYs heard: their rows are skipped, not read (meanwhile a read skips their sends by txid)
                    self._skipped, unmoved = False, 0
                    self._skip_to(self._horizon() if horizon is None else horizon)
                elif self._skipped:
                    unmoved += 1
                if time.monotonic() >= next_prune and not stopping:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    self._prune()
                if failing:
                    log.warning("Plexus: the event relay reaches the store again")
                failing = False
            except Exception:
                if not failing:  # once per outage, not once per interval
                    log.exception("Plexus: the event relay could not reach the store; retrying")
                failing = True
            if stopping:
                return

    def _lease(self) -> tuple[float, float]:
        """How long a saying that this server follows holds, and how often it is said again: INTEREST_LEASE and
        INTEREST_EVERY, or longer with a long `interval` (the relay thread says it at its turns: at least three
        turns a lease)."""
        lease = max(INTEREST_LEASE, 3 * self.interval)
        return lease, min(INTEREST_EVERY, lease / 3)

    def _say_interest(self, at: float, stopping: bool, *, renewal: bool = False, listen: Any = None) -> None:
        """PostgreSQL: while something here needs other servers' events, say so (again every INTEREST_EVERY
        seconds: each saying holds INTEREST_LEASE, see `_lease`); once nothing does (or the server stops), say that
        it is over. Called by the relay thread at its turns, on a pooled connection taken before `_say_lock` (a
        pool exhausted stalls that thread, never the lock), and by the LISTEN thread every second (`renewal`) on its
        own connection (`listen`; a pooled one with a psycopg before 3.2.4): a relay thread busy for long, or a pool
        exhausted, still renews. `_say_lock` keeps one saying at a time and `_said_at` with it (`_say_locked`).
        A stopping server says it is over after its last send."""
        if listen is not None:
            self._say_locked(at, stopping, lambda params: listen.execute(_PG_INTEREST, params), renewal=renewal)
            return
        # A first look without the lock (again under it); none on the last turn: a first saying the LISTEN thread
        # is making now does not show yet, and its end would not be said.
        if not stopping and not self._saying_due(at, stopping, self._say_asked)[0]:
            return
        with self.store.reads.connect() as conn:
            execute = lambda params: conn.exec_driver_sql(_PG_INTEREST, params).all()  # noqa: E731
            self._say_locked(at, stopping, execute, renewal=renewal)

    def _saying_due(self, at: float, stopping: bool, again: bool) -> tuple[bool, bool]:
        """Whether a saying is due: this server follows and has not said so within INTEREST_EVERY (or a sender asked
        again), or it no longer follows and a saying of it may hold somewhere; and whether it follows."""
        wants = not stopping and (self._reads_rows_only() or self.bus.wants_remote())
        if not wants:
            return self._said_at is not None, False
        return again or self._said_at is None or at - self._said_at >= self._lease()[1], True

    def _say_locked(
        self, at: float, stopping: bool, execute: Callable[[dict[str, str]], Any], *, renewal: bool
    ) -> None:
        """A saying that is due (`_saying_due`), under `_say_lock`. The LISTEN thread's renewal does not wait for
        the lock (the relay thread is saying it then), nor says anything once the server stops (the relay thread's
        last turn says it is over, after it). The relay thread waits SAY_LOCK_WAIT for it at most: a LISTEN
        connection dropped silently holds it until it is found dead (LISTEN_TCP_TIMEOUT_MS), and the relay thread
        sends and reads meanwhile, its saying asked for its next turn; on its last turn it says it is over without
        the lock (what the LISTEN thread is saying may have gone out)."""
        locked = self._say_lock.acquire(blocking=False) if renewal else self._say_lock.acquire(timeout=SAY_LOCK_WAIT)
        if not locked:
            if not renewal and stopping:
                execute({"channel": INTEREST_CHANNEL, "payload": json.dumps([self.server_id, 0.0])})
            elif not renewal:
                self._say_asked = True
            return
        try:
            if renewal and self._stop.is_set():
                return
            again, self._say_asked = self._say_asked, False
            due, wants = self._saying_due(at, stopping, again)
            if not due:
                return  # said lately, or nothing to say
            lease = self._lease()[0] if wants else 0.0
            try:
                execute({"channel": INTEREST_CHANNEL, "payload": json.dumps([self.server_id, lease])})
            except BaseException:
                self._say_asked = self._say_asked or again
                if wants and self._said_at is None:  # it may have gone out: its end is owed (and it is said again)
                    self._said_at = float("-inf")
                raise
            self._said_at = at if wants else None
            self.interest_said += wants
        finally:
            self._say_lock.release()

    def _say_again(self) -> None:
        """(LISTEN thread) Have the saying that this server follows made again at the relay thread's next turn."""
        self._say_asked = True  # (no lock: this thread must not wait behind a saying's statement)
        self._wake.set()

    def _reads_rows_only(self) -> bool:
        """PostgreSQL: this server hears no NOTIFY (`poll`, e.g. behind PgBouncer in transaction mode, or `auto`
        whose LISTEN failed): it learns of other servers' sends by their rows only, for its listings and queue
        (`skip_remote`, `on_remote`) as for its subscribers: it always says it follows."""
        return self.postgres and (self.mode == "poll" or (self.mode == "notify" and self._listen_down))

    def _ask_interest(self, listen: Any | None) -> None:
        """PostgreSQL: ask the servers that follow others' events to say so now (a lease of -1: a question), on
        the LISTEN connection (`listen`: the LISTEN thread never waits for the pool), or a pooled one (None: a
        psycopg before 3.2.4)."""
        params = {"channel": INTEREST_CHANNEL, "payload": json.dumps([self.server_id, -1])}
        if listen is not None:
            listen.execute(_PG_INTEREST, params)
            return
        with self.store.reads.connect() as conn:
            conn.exec_driver_sql(_PG_INTEREST, params).all()

    def _older_listening(self) -> bool | None:
        """Whether a server of the release before LISTENs on the store (it never says it follows: rows always);
        None when that cannot be known: rows. pg_stat_activity not readable by this role is warned once; the store
        unreachable (down, restarting, every connection busy) is not that, and not warned here: the turn's send
        fails alike and says so (`_run`)."""
        try:
            with self.store.reads.connect() as conn:
                older = bool(conn.exec_driver_sql(_PG_OLDER).scalar_one())
        except Exception as exc:
            if store_unavailable(exc) is not None:
                return None
            if not self._older_failed:
                log.warning(
                    "Plexus: the event relay cannot look for servers of the release before in pg_stat_activity "
                    "(%s): its sends write outbox rows always",
                    exc,
                )
            self._older_failed = True
            return None
        self._older_failed = False
        return older

    def _prune(self) -> None:
        o = outbox_table
        with self.store.engine.begin() as conn:
            conn.execute(sa.delete(o).where(o.c.at < now() - self.keep_seconds))

    def _listen(self) -> None:
        """PostgreSQL: LISTEN on a dedicated connection; a notification from another server wakes the reader."""
        try:
            import psycopg
        except ImportError:
            log.warning("Plexus: psycopg is not installed: the event relay polls the store every %gs", self.interval)
            self._listen_down = True
            self._wake.set()  # say at once that it follows (it reads rows only)
            return
        dsn = self._listen_dsn()
        says_here = _keeps_notifies(psycopg.__version__)
        if not says_here:
            log.warning(
                "Plexus: psycopg %s drops the NOTIFYs that arrive during a statement on the event relay's LISTEN "
                "connection: it says who follows on a pooled connection (pip install 'psycopg>=3.2.4')",
                psycopg.__version__,
            )
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, **self._listen_args(psycopg.pq.version())) as conn:
                    says = conn if says_here else None
                    # One statement: its text tells this release's LISTEN from one of the release before (_PG_OLDER).
                    conn.execute(f"LISTEN {CHANNEL}; LISTEN {INTEREST_CHANNEL}")
                    self.listening = True
                    self._listen_down = False
                    # Sends without rows made while it was down (or before it began) were not heard, and cannot be
                    # read: listings read again, the queue read again (tasks may have been queued elsewhere).
                    self._to_loop(self._noted, 0, [("task.created", TaskStatus.QUEUED.value)], None)
                    # Who follows is heard from now on: ask them to say it at once (those heard later than this
                    # server's first sends without rows are sent those again, with rows, as any new follower).
                    self._ask_interest(says)
                    self._wake_to_read()  # what was written while this connection was down
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.channel == INTEREST_CHANNEL:
                                self._heard_interest(note.payload)
                            else:
                                self._heard(note.payload)
                        self._renew_interest(says)
            except Exception as exc:
                if self.listening or not self._stop.is_set():
                    log.warning(
                        "Plexus: the event relay's LISTEN connection failed (%s); polling until it is back",
                        type(exc).__name__,
                    )
                self.listening = False
                if not self._listen_down:  # it reads rows only until the LISTEN is back: it says it follows
                    self._listen_down = True
                    self._wake.set()
                self._stop.wait(min(5.0, max(self.interval, 1.0)))
        self.listening = False

    def _renew_interest(self, listen: Any | None) -> None:
        """(LISTEN thread, every second) Renew the saying that this server follows when due, the relay thread
        busy or not (its lease would lapse while a long turn lasts), on the LISTEN connection (`listen`: never
        waiting for the pool, whose 30 s stalled the handling of the NOTIFYs; notifications that arrive during the
        statement are kept by psycopg for the next `notifies`)."""
        try:
            if not self._stop.is_set():  # (the relay thread's last turn says it is over; looked at again locked)
                self._say_interest(time.monotonic(), False, renewal=True, listen=listen)
        except Exception:  # the relay thread says it again at its turn (and logs what fails there)
            log.debug("Plexus: renewing the event relay's interest failed", exc_info=True)

    def _listen_dsn(self) -> str:
        return self.store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def _listen_args(self, libpq: int) -> dict[str, Any]:
        """The LISTEN connection's libpq parameters beside its DSN: the pool's keepalives, LISTEN_TCP_TIMEOUT_MS
        (libpq 12 and later: an older one refuses the parameter) and a statement timeout (its sayings and questions:
        one pg_notify each)."""
        args: dict[str, Any] = {
            **KEEPALIVES,
            "connect_timeout": LISTEN_CONNECT_TIMEOUT,
            "options": f"-c statement_timeout={LISTEN_STATEMENT_TIMEOUT_MS}",
        }
        if libpq >= 120000:
            args["tcp_user_timeout"] = LISTEN_TCP_TIMEOUT_MS
        return args

    def _heard(self, payload: str) -> None:
        """A NOTIFY (on the LISTEN thread): another server's send. While nothing here needs other servers' events,
        what it says is told to the loop and its rows are skipped; else (or when it says nothing) a read follows."""
        origin, count, pairs, groups, txid, rowless = hear(payload)
        if origin == self.server_id:
            return
        if rowless:  # no row to read: told what they were
            if self.bus.wants_remote():  # (the sender has not heard that this server follows: say it again now)
                self._say_again()
            self._to_loop(self._noted, count, pairs, groups)
            return
        if pairs is not None and (txid < self._cursor[0] or not self.bus.wants_remote()):
            # Not needed here (or below the cursor: committed before what needs them came, never read): the loop is
            # told what they were, and a read skips them.
            with self._lock:
                self._noted_tx.add(txid)
            self._skipped = True
            self._to_loop(self._noted, count, pairs, groups)
            return
        if pairs is not None:  # needed here: the read takes the rows' data at once
            self._full = True
        self._wake_to_read()

    def _heard_interest(self, payload: str) -> None:
        """A NOTIFY on INTEREST_CHANNEL (on the LISTEN thread): another server follows others' events for `lease`
        seconds from now (0: no longer; -1: it asks who follows, its LISTEN just began). One that did not before has
        what was sent without rows lately sent again."""
        try:
            server, lease = json.loads(payload)
            server, lease = str(server), float(lease)
        except (ValueError, TypeError):
            return
        if server == self.server_id:
            return
        if lease < 0:  # answered at the relay thread's next turn, if something here follows
            self._say_again()
            return
        at = time.monotonic()
        with self._lock:
            held = self._interest.pop(server, 0.0) > at
            if lease > 0:
                self._interest[server] = at + lease
        if lease > 0 and not held:
            self._new_interest = True
            self._wake.set()

    def _wake_to_read(self) -> None:
        self._notified = True
        self._wake.set()
