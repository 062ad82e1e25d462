"""The audit log: who did what to what, with which outcome, from where, and when.

Every tool call, mutation, key operation and denial is recorded. Appending never blocks a request: a
record goes to a bounded queue that a writer thread drains in batches (when the queue is full, the record
is counted as dropped and a warning is logged, rather than stalling the server). The queue is a
`collections.deque` the writer looks at once per batch wait (its appends and pops are atomic, no lock): a
`queue.Queue` took a lock and woke the writer for every record, on the request's thread. Secrets are never
recorded: credentials never reach it, and argument fields with sensitive names are redacted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import AfterValidator, Field
from sqlalchemy.engine import Engine

from ..core.errors import InvalidArgument
from ..core.models import iso, parse_iso
from ..core.requests import Cursor, Number, OptionalText, RequestModel
from ..core.store import decode_position, encode_position, metadata
from .identity import Principal
from .keys import without_secrets
from .redaction import REDACTED, SecretScrubber

log = logging.getLogger("plexus_mcp_jupyter")

DEFAULT_SENSITIVE = ("token", "password", "secret", "authorization", "api_key", "apikey", "credential", "cookie")
MAX_DETAIL_CHARS = 2000
QUEUE_SIZE = 10_000
# Seconds the writer lets records gather before it writes them in one transaction: each transaction cost ~1.8 ms of
# CPU on SQLite (SQLAlchemy's begin, executemany, commit), 9 ms a second at 0.2 s under a steady stream of calls,
# 1.8 at 1 s. `flush` (tests, export, shutdown) and a full batch cut the wait short.
BATCH_WAIT = 1.0
MAX_BATCH = 1000  # records per transaction
OUTCOMES = ("ok", "error", "denied")
DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE = 100, 1000

audit_table = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("owner", sa.String(128)),
    sa.Column("key_id", sa.String(12)),
    sa.Column("role", sa.String(16)),
    sa.Column("action", sa.String(128), nullable=False),
    sa.Column("target", sa.Text),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("client", sa.String(128)),
    sa.Column("details", sa.JSON),
    sa.Index("ix_audit_at", "at"),
    sa.Index("ix_audit_action", "action", "id"),
)


_note: ContextVar[dict[str, Any] | None] = ContextVar("plexus_audit_note", default=None)


@contextmanager
def audit_notes() -> Iterator[dict[str, Any]]:
    """Collect, around one operation, what it asks to be recorded instead of its raw arguments (note_for_audit)."""
    note: dict[str, Any] = {}
    token = _note.set(note)
    try:
        yield note
    finally:
        _note.reset(token)


def note_for_audit(**details: Any) -> None:
    """Record these details for the operation being served, instead of its arguments: a batch operation
    notes its filter and counts, never its thousand ids. Outside audit_notes() it does nothing."""
    note = _note.get()
    if note is not None:
        note.update(details)


MAX_DETAIL_ENTRIES = 100  # entries of one list or mapping in a record's details
MAX_DETAIL_DEPTH = 8


def _json_details(details: Any) -> Any:
    """A record's redacted details as stored: their JSON form (anything else as its string), or a note when that
    is longer than MAX_DETAIL_CHARS. It runs on the writer thread: a value that cannot be written at all (its
    `str` raises) costs its details, never the thread or the rest of the batch."""
    try:
        text = json.dumps(details, default=str)
    except Exception:
        return {"unwritable": True}
    return json.loads(text) if len(text) <= MAX_DETAIL_CHARS else {"truncated": True}


def redact(
    value: Any,
    sensitive: Iterable[str] = DEFAULT_SENSITIVE,
    scrub: Callable[[str], str] = without_secrets,
    depth: int = 0,
) -> Any:
    """A copy of `value` with the values of sensitive-looking keys replaced, at any depth, and every string
    passed through `scrub` (API keys by default; an AuditLog's scrubber also knows the server's token).

    Bounded by construction, since it runs on the event loop over what a client sent: a string longer than a
    record's details may be, a list or mapping of more than MAX_DETAIL_ENTRIES, or anything nested deeper than
    MAX_DETAIL_DEPTH is replaced by a note of its size, never scanned (a 1 MiB argument once cost ~20 ms of the
    loop per tool call here).
    """
    names = tuple(s.lower() for s in sensitive)
    if isinstance(value, Mapping | list | tuple) and (depth >= MAX_DETAIL_DEPTH or len(value) > MAX_DETAIL_ENTRIES):
        return f"[{len(value):,} entries]" if depth < MAX_DETAIL_DEPTH else "[nested deeper]"
    if isinstance(value, Mapping):
        copy = {}
        for key, item in value.items():
            name = scrub(str(key)[:128])
            copy[name] = REDACTED if any(n in name.lower() for n in names) else redact(item, names, scrub, depth + 1)
        return copy
    if isinstance(value, list | tuple):
        return [redact(v, names, scrub, depth + 1) for v in value]
    if isinstance(value, str):
        return scrub(value) if len(value) <= MAX_DETAIL_CHARS else f"[{len(value):,} characters]"
    return value


def _outcome(value: str) -> str:
    if value not in OUTCOMES:
        raise ValueError(f"unknown outcome; expected one of {', '.join(OUTCOMES)}")
    return value


class QueryAudit(RequestModel):
    """Read the audit log: GET plexus/api/audit, plexus://audit{?...}, `plexus audit export` (admins)."""

    action: OptionalText = Field(None, max_length=128, description="Only these actions; * is a wildcard (tool.*)")
    outcome: Annotated[OptionalText, AfterValidator(lambda v: v if v is None else _outcome(v))] = Field(
        None, description=f"Only this outcome: {', '.join(OUTCOMES)}"
    )
    owner: OptionalText = Field(None, max_length=128, description="Only this caller's records (key:<id>, jupyter)")
    since: OptionalText = Field(None, max_length=64, description="Only records at or after this ISO 8601 time")
    limit: Annotated[int, Number] = Field(
        DEFAULT_AUDIT_PAGE, ge=1, le=MAX_AUDIT_PAGE, description=f"Records per page, 1 to {MAX_AUDIT_PAGE}"
    )
    cursor: Cursor = None


class AuditLog:
    """Appends audit records in the background; reads them for admins."""

    def __init__(
        self, engine: Engine, sensitive: Iterable[str] = DEFAULT_SENSITIVE, *, retention_seconds: float = 0.0
    ) -> None:
        self.engine = engine
        self.sensitive = tuple(sensitive)
        self.scrubber = SecretScrubber()  # the server adds its token (see PlexusRuntime.protect_secret)
        self._pending: deque[dict[str, Any]] = deque()  # records not taken by the writer yet (at most QUEUE_SIZE)
        self._in_flight = 0  # records the writer took and has not written yet
        self._stopping = False
        self.dropped = 0
        self.retention_seconds = float(retention_seconds)  # 0: kept forever; see configure_retention
        self._prune_interval, self._prune_batch, self._next_prune = 3600.0, 500, 0.0
        # Called with each batch of records in the writer thread, before they are written (service metrics).
        self.observers: list[Callable[[list[dict[str, Any]]], None]] = []
        self._hurry = threading.Event()  # set: write what is queued now (flush, close, a full batch)
        self._writer = threading.Thread(target=self._write_loop, name="plexus-audit", daemon=True)
        self._writer.start()

    def configure_retention(self, seconds: float, *, interval: float = 3600.0, batch: int = 500) -> None:
        """Keep records `seconds` (0: forever). Older ones are deleted by the writer thread, after a write, at
        most every `interval` seconds, `batch` per transaction: the log stays bounded under any steady load."""
        self.retention_seconds, self._prune_interval, self._prune_batch = float(seconds), interval, batch

    def prune(self, at: float | None = None, max_batches: int = 20) -> tuple[int, bool]:
        """Delete records older than the retention, a batch per transaction, at most `max_batches` batches (the
        writer thread prunes between writes: a year's backlog after an upgrade must not hold records back);
        the number deleted, and whether older ones are left."""
        if not self.retention_seconds:
            return 0, False
        cutoff = (time.time() if at is None else at) - self.retention_seconds
        a = audit_table
        oldest = sa.select(a.c.id).where(a.c.at < cutoff).order_by(a.c.id).limit(self._prune_batch)
        total = 0
        for _ in range(max_batches):
            with self.engine.begin() as conn:
                deleted = conn.execute(sa.delete(a).where(a.c.id.in_(oldest.scalar_subquery()))).rowcount
            total += deleted
            if deleted < self._prune_batch:
                return total, False
        return total, True

    def record(
        self,
        principal: Principal | None,
        action: str,
        *,
        target: str | None = None,
        outcome: str = "ok",
        client: str | None = None,
        details: Mapping[str, Any] | None = None,
        seconds: float | None = None,
    ) -> None:
        """Queue one record; never blocks. `seconds`, how long the action took, goes to the observers only.

        The details are redacted here (a bounded copy of their mappings and lists, see `redact`); their JSON
        form, and the size check on it, are made by the writer thread (`_json_details`), off the event loop."""
        scrub = self.scrubber.scrub
        row = {
            "at": time.time(),
            "owner": principal.owner if principal else None,
            "key_id": principal.key_id if principal else None,
            "role": principal.role.value if principal else None,
            "action": action[:128],
            "target": scrub(str(target))[:500] if target else None,
            "outcome": outcome,
            "client": client,
            "details": redact(dict(details or {}), self.sensitive, scrub),
        }
        if seconds is not None:
            row["seconds"] = seconds
        pending = self._pending
        if len(pending) >= QUEUE_SIZE:
            self.dropped += 1
            log.warning("Plexus: the audit queue is full; %d record(s) dropped", self.dropped)
            return
        pending.append(row)
        if len(pending) >= MAX_BATCH:
            self._hurry.set()

    @property
    def unwritten(self) -> int:
        """Records queued or being written, not yet in the store."""
        return len(self._pending) + self._in_flight

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was queued so far is written (tests, export, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.unwritten and time.monotonic() < deadline:
            self._hurry.set()
            time.sleep(0.01)

    def close(self) -> None:
        self.flush(timeout=2.0)
        if self.unwritten:  # the writer is stuck: it is a daemon thread, and what is queued is lost
            log.warning("Plexus: the audit log could not be closed cleanly; %d record(s) unwritten", self.unwritten)
        self._stopping = True
        self._hurry.set()

    def _write_loop(self) -> None:
        pending = self._pending
        while True:
            # Let records gather: a transaction per record cost ~0.5 ms of CPU per tool call. The writer looks
            # once per BATCH_WAIT (or when hurried): the request that queues a record wakes nobody.
            self._hurry.wait(BATCH_WAIT)
            self._hurry.clear()
            if not pending:
                if self._stopping:
                    return
                continue
            self._in_flight = count = min(len(pending), MAX_BATCH)  # counted before they leave the deque
            batch = [pending.popleft() for _ in range(count)]
            if len(pending) >= MAX_BATCH:
                self._hurry.set()  # a backlog: the next batch goes at once
            for observe in self.observers:
                try:
                    observe(batch)
                except Exception:
                    log.exception("Plexus: an audit observer failed")
            for row in batch:
                row.pop("seconds", None)
                row["details"] = _json_details(row["details"])
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.insert(audit_table), batch)
                if self.retention_seconds and time.monotonic() >= self._next_prune:
                    _, more = self.prune()
                    # A backlog is worked off after the next writes; otherwise the next look is an interval away.
                    self._next_prune = time.monotonic() + (0.0 if more else self._prune_interval)
            except Exception:
                log.exception("Plexus: %d audit record(s) could not be written or old ones pruned", len(batch))
            finally:
                self._in_flight = 0

    def query(self, request: QueryAudit | None = None, **fields: Any) -> tuple[list[dict[str, Any]], str | None]:
        """Records, newest first, filtered; with a cursor for the next page. `request`, or a QueryAudit of
        `fields` (InvalidArgument names a bad one). Records still queued here are written first (up to 0.5 s):
        the writer batches a second of them. A thread's call, never the loop's."""
        request = request or QueryAudit.parse(fields)
        if self.unwritten:  # read your writes: what this server queued is written first
            self.flush(timeout=0.5)
        action, outcome, owner, since = request.action, request.outcome, request.owner, request.since
        limit, cursor = request.limit, request.cursor
        a = audit_table
        query = sa.select(a).order_by(a.c.id.desc()).limit(limit + 1)
        if outcome is not None:
            query = query.where(a.c.outcome == outcome)
        if action:
            # Lower-cased: SQLite's LIKE ignores ASCII case, PostgreSQL's does not; action names are lower-case.
            query = query.where(a.c.action.like(action.lower().replace("*", "%")))
        if owner:
            query = query.where(a.c.owner == owner)
        if since:
            query = query.where(a.c.at >= parse_iso(since))
        fingerprint = json.dumps(["audit", action, outcome, owner, since])
        if cursor:
            (after,) = decode_position(cursor, fingerprint, 1)
            if not isinstance(after, int):
                raise InvalidArgument("invalid cursor: pass back the next_cursor of a previous page unchanged")
            query = query.where(a.c.id < after)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        next_cursor = encode_position([rows[limit - 1]["id"]], fingerprint) if len(rows) > limit else None
        return [_public(r) for r in rows[:limit]], next_cursor


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "at": iso(row["at"])}
