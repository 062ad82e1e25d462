"""The store's schema migrations (Alembic), shipped inside the package so a wheel carries them.

The SQLAlchemy tables (core/store.py, evaluations/store.py, security/keys.py, security/audit.py) are the one
source of truth for the schema; each revision under versions/ is the step that brings a database from the
previous revision to them, and tests/test_store_migrations.py checks that migrating up from empty gives
exactly those tables on SQLite and PostgreSQL (Alembic's autogenerate comparison finds no difference).

At start (`Store(url)`) and on `plexus db upgrade`, `upgrade_store` brings any store to the newest revision:
- an empty database is created by migrating up from nothing;
- a store from a release before migrations (tables made by `create_all`, no `alembic_version`) is first
  completed the way that release did (missing tables, columns and indexes added), stamped with the baseline
  revision (its schema is exactly the baseline's), then migrated on;
- a store at a revision this code does not know (migrated by a newer release) is refused, naming both.
Several processes may start on one store at once: a lock (an advisory lock on PostgreSQL, a lock file beside a
SQLite file) lets one migrate while the others wait, then find the store at the newest revision.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no file lock; start one server at a time there on a new store
    fcntl = None  # type: ignore[assignment]

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..core.errors import PlexusError

log = logging.getLogger(__name__)

BASELINE = "0001"  # the revision whose schema is that of the last release without migrations
LEGACY_SCHEMA_VERSION = 1  # plexus_meta.schema_version written by those releases
_LOCK_KEY = 0x706C6578  # "plex": the PostgreSQL advisory lock that serialises migrations of one database
_DIRECTORY = Path(__file__).resolve().parent
_IN_PROCESS = threading.Lock()
# How long a process waits for another's migration of the same store (PostgreSQL) before it gives up, saying so.
MIGRATION_LOCK_WAIT = 600.0
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE when lock_timeout ran out


class StoreRefused(PlexusError):
    """The store cannot be used as it is; the message says why and what to do."""


class StoreTooNew(StoreRefused):
    """The store was migrated by a newer release than this code: refuse it rather than misread it."""


class StoreBusy(StoreRefused):
    """Another process held the store's migration lock for longer than MIGRATION_LOCK_WAIT."""


def schema_metadata() -> sa.MetaData:
    """The metadata holding every table of the store (the modules that define them register there)."""
    from ..core import store
    from ..evaluations import store as _evaluations  # noqa: F401  (registers its tables)
    from ..security import audit as _audit  # noqa: F401
    from ..security import keys as _keys  # noqa: F401

    return store.metadata


def _config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_DIRECTORY))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _scripts() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _scripts().get_current_head()
    assert head is not None
    return str(head)


def current_revision(engine: Engine) -> str | None:
    """The revision the store is at; None for an empty database or a store from before migrations."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_store(engine: Engine, safe_url: str, *, lock_wait: float = MIGRATION_LOCK_WAIT) -> tuple[str | None, str]:
    """Bring the store to the newest revision (see the module's doc); returns (revision before, after).

    Raises StoreTooNew when the store is at a revision this code does not know, StoreBusy when another
    process held the migration lock for more than `lock_wait` seconds (PostgreSQL)."""
    with engine.connect() as conn, _one_at_a_time(conn, safe_url, lock_wait):
        return _upgrade(conn, safe_url)


@contextlib.contextmanager
def _one_at_a_time(conn: Connection, safe_url: str, lock_wait: float) -> Iterator[None]:
    """Hold the store's migration lock: one process (and one thread: Alembic's `context` is process-global)
    migrates a store at a time, and the others then find it at the newest revision.

    PostgreSQL: a session advisory lock. The store's statement_timeout (db_statement_timeout_seconds) bounds
    the server's own calls, not this session: waiting for another process's migration, and a migration's DDL
    on a large table, may take longer. The wait for the lock is bounded by lock_timeout instead (StoreBusy),
    and the connection gets the store's settings back before it returns to the pool.
    A SQLite file: an exclusive lock on `<file>.migration-lock` beside it (SQLite's own locks cannot span a
    migration: its DDL commits statement by statement)."""
    with _IN_PROCESS:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET statement_timeout = 0")
            conn.exec_driver_sql(f"SET lock_timeout = {max(1, round(lock_wait * 1000))}")
            try:
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({_LOCK_KEY})")
            except sa.exc.OperationalError as exc:
                conn.rollback()  # the SETs go with it
                if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                    raise
                raise StoreBusy(
                    f"the store at {safe_url} is being migrated by another process, which has held its migration "
                    f"lock for more than {lock_wait:g} s: start again once it is done, or look for a stuck "
                    "`plexus db upgrade` or server start (pg_locks, locktype advisory)"
                ) from None
            conn.exec_driver_sql("RESET lock_timeout")
            conn.commit()
            try:
                yield
            finally:
                conn.rollback()
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
                conn.exec_driver_sql("RESET statement_timeout")
                conn.commit()
            return
        database = conn.engine.url.database
        if conn.dialect.name != "sqlite" or not database or database == ":memory:" or fcntl is None:
            yield
            return
        with open(f"{database}.migration-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _revision_of(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _upgrade(conn: Connection, safe_url: str) -> tuple[str | None, str]:
    from alembic import command

    head = head_revision()
    before = _revision_of(conn)
    conn.commit()  # reading the revision began a transaction; alembic begins its own
    if before is not None and not _known(before):
        raise StoreTooNew(
            f"the store at {safe_url} is at schema revision {before!r}, which this plexus-mcp-jupyter does not "
            f"know (its newest is {head!r}): it was migrated by a newer release. Upgrade plexus-mcp-jupyter, "
            "or use another db_url"
        )
    if before is None and sa.inspect(conn).has_table("tasks"):
        _adopt_legacy_store(conn, safe_url)
        before = BASELINE
    if before != head:
        command.upgrade(_config(conn), "head")
        conn.commit()
        log.info("plexus store %s migrated from revision %s to %s", safe_url, before or "(empty)", head)
    return before, head


def _known(revision: str) -> bool:
    from alembic.util import CommandError

    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def _adopt_legacy_store(conn: Connection, safe_url: str) -> None:
    """A store made by a release before migrations: complete it as that release did, then stamp the baseline."""
    from alembic import command

    from ..core.store import add_missing_columns, add_missing_indexes, meta_table

    metadata = schema_metadata()
    if sa.inspect(conn).has_table(meta_table.name):
        row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
        if row is not None and int(row[0]) > LEGACY_SCHEMA_VERSION:
            raise StoreTooNew(
                f"the store at {safe_url} has schema version {row[0]}, newer than this plexus-mcp-jupyter "
                f"supports ({LEGACY_SCHEMA_VERSION}): upgrade the package or use another db_url"
            )
    conn.commit()
    metadata.create_all(conn)
    conn.commit()
    add_missing_columns(conn, metadata.sorted_tables)
    add_missing_indexes(conn, metadata.sorted_tables)
    conn.commit()
    command.stamp(_config(conn), BASELINE)
    conn.commit()
    log.info("plexus store %s (made before migrations) stamped with the baseline revision %s", safe_url, BASELINE)
