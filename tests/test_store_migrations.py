"""Migrations (Alembic) of the store, on a real SQLite file and a real PostgreSQL database (tests/postgres.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from plexus_mcp_jupyter.core.models import Task, TaskStatus
from plexus_mcp_jupyter.core.store import Store, make_engine, meta_table, tasks_table
from plexus_mcp_jupyter.migrations import (
    BASELINE,
    StoreTooNew,
    _config,
    current_revision,
    head_revision,
    schema_metadata,
)


def schema_diff(url: str) -> list[object]:
    """What Alembic's autogenerate would change to bring the database to the SQLAlchemy tables."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, schema_metadata()))
    finally:
        engine.dispose()


def test_a_new_store_is_migrated_up_from_empty_to_exactly_the_tables_schema(store_url):
    store = Store(store_url)
    try:
        assert current_revision(store.engine) == head_revision()
        assert set(sa.inspect(store.engine).get_table_names()) == {*schema_metadata().tables, "alembic_version"}
    finally:
        store.close()
    assert schema_diff(store_url) == []


def _legacy_store(url: str) -> None:
    """A store as the last release without migrations left it: create_all, a schema version, no revision."""
    engine = make_engine(url)
    try:
        schema_metadata().create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(meta_table).values(key="schema_version", value="1"))
            conn.execute(
                sa.insert(tasks_table).values(
                    id="old",
                    type="demo",
                    status="COMPLETED",
                    priority=0,
                    created_at=time.time(),
                    cancel_requested=False,
                )
            )
    finally:
        engine.dispose()


def test_a_store_from_the_release_before_migrations_is_stamped_and_upgraded_in_place(store_url):
    _legacy_store(store_url)
    store = Store(store_url)
    try:
        assert current_revision(store.engine) == head_revision()
        old = store.get_task("old")
        assert old is not None and old.status is TaskStatus.COMPLETED  # its data kept
        store.create_task(Task(id="new", type="demo", status=TaskStatus.QUEUED))
    finally:
        store.close()
    assert schema_diff(store_url) == []


def test_an_older_store_lacking_later_columns_gets_them(tmp_path):
    # A store of an earlier release still: tasks without batch_id and retry_of (added by add_missing_columns then).
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _legacy_store(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_tasks_batch")
        conn.exec_driver_sql("DROP INDEX ix_tasks_retry_of")
        conn.exec_driver_sql("ALTER TABLE tasks DROP COLUMN batch_id")
        conn.exec_driver_sql("ALTER TABLE tasks DROP COLUMN retry_of")
    engine.dispose()
    Store(url).close()
    assert schema_diff(url) == []


def test_a_store_newer_than_the_code_is_refused_naming_both_revisions(store_url):
    Store(store_url).close()
    engine = make_engine(store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeed'")
    engine.dispose()
    with pytest.raises(StoreTooNew) as refused:
        Store(store_url)
    message = str(refused.value)
    assert "'f00dfeed'" in message and repr(head_revision()) in message and "newer release" in message


def test_a_pre_migration_store_with_a_newer_schema_version_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    _legacy_store(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.update(meta_table).values(value="7"))
    engine.dispose()
    with pytest.raises(StoreTooNew, match="schema version 7, newer than this plexus-mcp-jupyter supports"):
        Store(url)


def test_the_baseline_is_the_first_revision_and_the_store_records_a_schema_version_old_releases_refuse(store_url):
    store = Store(store_url)
    with store.engine.connect() as conn:
        # Old releases read it, and refuse a store newer than 1: migration 0002 (leases) made it 2.
        assert conn.execute(sa.select(meta_table.c.value)).scalar_one() == "2"
    store.close()
    from plexus_mcp_jupyter.migrations import _scripts

    assert [r.revision for r in _scripts().walk_revisions()][-1] == BASELINE


def plexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plexus_mcp_jupyter.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plexus_db_upgrade_and_current_on_the_command_line(store_url):
    before = plexus("db", "current", "--db-url", store_url)
    assert before.returncode == 0, before.stderr
    assert "(none)" in before.stdout
    _legacy_store(store_url)
    upgraded = plexus("db", "upgrade", "--db-url", store_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert head_revision() in upgraded.stdout
    now = plexus("db", "current", "--db-url", store_url)
    assert now.returncode == 0 and f"{head_revision()} (head)" in now.stdout, now.stdout + now.stderr
    engine = make_engine(store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeed'")
    engine.dispose()
    refused = plexus("db", "upgrade", "--db-url", store_url)
    assert refused.returncode != 0 and "'f00dfeed'" in refused.stderr and "Traceback" not in refused.stderr


class TestAServerOnAStoreNewerThanItsCode:
    """A real Jupyter server started on a store migrated by a newer release: every Plexus route answers 503
    naming both revisions (the extension neither vanishes nor misreads the store)."""

    @pytest.fixture
    def plexus_config(self, tmp_path):
        url = f"sqlite:///{tmp_path / 'newer.db'}"
        Store(url).close()
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeed'")
        engine.dispose()
        return {"db_url": url}

    async def test_every_plexus_route_says_why(self, server_url, token):
        import httpx2

        async with httpx2.AsyncClient(timeout=30) as http:
            for path in ("plexus/api/health", "plexus/api/tasks", "plexus/mcp"):
                answer = await http.get(server_url + path, headers={"Authorization": f"token {token}"})
                assert answer.status_code == 503, answer.text
                message = answer.json()["error"]["message"]
                assert "'f00dfeed'" in message and repr(head_revision()) in message
            # Without credentials: why, but not where the store is or what is in it.
        async with httpx2.AsyncClient(timeout=30) as fresh:  # no cookie from the authenticated calls above
            anonymous = await fresh.get(server_url + "plexus/api/tasks")
        assert anonymous.status_code == 503
        message = anonymous.json()["error"]["message"]
        assert "the store could not be opened or migrated" in message and "f00dfeed" not in message
        assert "newer.db" not in message


def test_servers_starting_at_once_on_a_new_store_migrate_it_once(store_url):
    # Three processes open a new store at the same moment: one migrates it, the others wait, then find it done.
    code = "import sys; from plexus_mcp_jupyter.core.store import Store; Store(sys.argv[1]).close()"
    starts = [
        subprocess.Popen([sys.executable, "-c", code, store_url], stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in starts]
    assert [p.returncode for p in starts] == [0, 0, 0], errors
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert schema_diff(store_url) == []


def _outbox_columns(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return {column["name"] for column in sa.inspect(engine).get_columns("plexus_event_outbox")}
    finally:
        engine.dispose()


def _migrate(url: str, step: Callable[..., None], revision: str) -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            step(_config(conn), revision)
            conn.commit()
    finally:
        engine.dispose()


def test_revision_0005_packs_the_event_outbox_in_place_and_back(store_url):
    """A store at 0004 with relayed events in the old shape (a row per event) upgrades in place to the packed
    outbox (a row per send: heads and data; the old rows, transient, dropped), and downgrades to the old shape."""
    from alembic import command

    _migrate(store_url, command.upgrade, "0004")
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO plexus_event_outbox (origin, at, kind, entity_type, entity_id, data) "
                "VALUES ('old', 1.0, 'task.created', 'task', 't', '{\"status\": \"QUEUED\"}')"
            )
    finally:
        engine.dispose()
    Store(store_url).close()  # upgraded at start
    assert {"heads", "data"} <= _outbox_columns(store_url) and "kind" not in _outbox_columns(store_url)
    assert schema_diff(store_url) == []
    store = Store(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM plexus_event_outbox").scalar_one() == 0
    finally:
        store.close()
    _migrate(store_url, command.downgrade, "0004")
    assert {"kind", "entity_type", "entity_id", "data"} <= _outbox_columns(store_url)
    assert "heads" not in _outbox_columns(store_url)


def test_revision_0006_keeps_a_stores_stages_and_samples_and_gives_a_trail_back_as_rows(store_url):
    """A store at 0005 whose tasks have stage rows and samples upgrades in place (the column added, the rows kept
    and read as before); a task ended after it carries its stages and samples in its row (tasks.trail), and a
    downgrade to 0005 makes them rows of task_stages and progress_samples again (a JSON null trail, as stored
    before none_as_null, is no trail)."""
    from alembic import command

    from plexus_mcp_jupyter.core.models import ProgressSample, Stage, StageStatus
    from plexus_mcp_jupyter.core.store import ProgressWrite

    _migrate(store_url, command.upgrade, "0005")
    at = time.time()
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO tasks (id, type, status, priority, created_at, completed_at, cancel_requested) "
                f"VALUES ('old', 'demo', 'COMPLETED', 0, {at}, {at + 1}, false)"
            )
            conn.exec_driver_sql(
                "INSERT INTO task_stages (task_id, stage_order, name, status, total_items, processed_items) "
                "VALUES ('old', 0, 'Load', 'COMPLETED', 5, 5)"
            )
            conn.exec_driver_sql(
                "INSERT INTO progress_samples (task_id, at, stage, processed, total) "
                f"VALUES ('old', {at}, 'Load', 5, 5)"
            )
    finally:
        engine.dispose()
    store = Store(store_url)  # upgraded at start
    try:
        assert current_revision(store.engine) == head_revision()
        old = store.get_task("old")
        assert [(s.name, s.status, s.processed_items) for s in old.stages] == [("Load", StageStatus.COMPLETED, 5)]
        assert store.history("old", limit=5) == ([ProgressSample(at, "Load", 5, 5)], 1)
        new = Task(id="new", type="demo", status=TaskStatus.QUEUED, created_at=at)
        store.create_task(new)
        store.claim("new", worker="srv/pid=1", started_at=at)
        new.status, new.completed_at, new.worker = TaskStatus.COMPLETED, at + 1, "srv/pid=1"
        stage = Stage("Working", 0, StageStatus.COMPLETED, None, 1, 1, at, at + 1, None)
        store.save_progress_many([ProgressWrite(new, [stage], [ProgressSample(at + 1, "Working", 1, 1)], True)])
        assert store.get_task("new").stages == [stage]
    finally:
        store.close()
    assert schema_diff(store_url) == []
    engine = make_engine(store_url)
    try:  # no trail: SQL NULL ("new" before its end), or the JSON null the code before none_as_null stored
        with engine.begin() as conn:
            json_null = "CAST('null' AS JSON)" if engine.dialect.name == "postgresql" else "'null'"
            conn.exec_driver_sql(
                "INSERT INTO tasks (id, type, status, priority, created_at, cancel_requested, trail) "
                f"VALUES ('nulled', 'demo', 'QUEUED', 0, {at}, false, {json_null})"
            )
    finally:
        engine.dispose()
    _migrate(store_url, command.downgrade, "0005")
    engine = make_engine(store_url)
    try:
        assert "trail" not in {c["name"] for c in sa.inspect(engine).get_columns("tasks")}
        with engine.connect() as conn:
            stages = conn.exec_driver_sql(
                "SELECT task_id, stage_order, name, status, processed_items FROM task_stages ORDER BY task_id"
            ).all()
            samples = conn.exec_driver_sql("SELECT task_id, processed FROM progress_samples ORDER BY task_id").all()
    finally:
        engine.dispose()
    assert stages == [("new", 0, "Working", "COMPLETED", 1), ("old", 0, "Load", "COMPLETED", 5)]
    assert samples == [("new", 1), ("old", 5)]


def test_connections_opening_a_new_sqlite_file_at_once_all_get_it_in_wal_mode(tmp_path):
    """Switching a new file to WAL takes an exclusive lock and does not wait for another connection's (SQLite's
    busy timeout does not apply): three processes released at one barrier got "database is locked" about one time
    in five; servers starting at once on a new store failed so (test above, once in CI)."""
    code = (
        "import sys, sqlite3, multiprocessing as mp\n"
        "from plexus_mcp_jupyter.core.store import _sqlite_pragmas\n"
        "def opener(path, barrier):\n"
        "    barrier.wait()\n"
        "    conn = sqlite3.connect(path)\n"
        "    _sqlite_pragmas(conn, None)\n"
        "    assert conn.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'\n"
        "    conn.close()\n"
        "if __name__ == '__main__':\n"
        "    failed = 0\n"
        "    for i in range(40):\n"
        "        barrier = mp.Barrier(3)\n"
        "        openers = [mp.Process(target=opener, args=(f'{sys.argv[1]}/{i}.db', barrier)) for _ in range(3)]\n"
        "        [p.start() for p in openers]\n"
        "        [p.join() for p in openers]\n"
        "        failed += sum(p.exitcode != 0 for p in openers)\n"
        "    print(failed)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0", done.stderr[-2000:]
