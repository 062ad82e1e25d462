"""A throwaway PostgreSQL cluster for the tests, and the `store_url` fixture that runs a test on both stores.

The cluster is started once per test session (initdb in a data directory directly under the system temp
directory, a free port on 127.0.0.1, trust authentication, `pg_ctl start`) and stopped and removed at the end.
As root, the PostgreSQL programs run as the `postgres` user (they refuse to run as root). Every test that
asks for a PostgreSQL store gets a database of its own, dropped after it.

When PostgreSQL cannot be started, its tests skip locally with the reason, and FAIL on CI (CI=true): a CI
run must never pass by silently leaving the PostgreSQL half of the suite out. `.ci/run` installs Debian's
`postgresql` package when `initdb` is missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa

STORES = ("sqlite", "postgresql")


@dataclass
class PostgresCluster:
    """A running throwaway cluster: `url(db)` is the SQLAlchemy URL of one of its databases."""

    port: int
    data_dir: Path
    pg_ctl: str

    def start(self) -> None:
        """Start (or start again, on the same port) the cluster's server, waiting until it accepts connections."""
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        log = str(self.data_dir / "server.log")
        _run([self.pg_ctl, "-D", str(self.data_dir), "-o", options, "-l", log, "-w", "-t", "60", "start"])
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waits for the socket; the first connection may still race the start-up
            try:
                with self._admin() as conn:
                    conn.exec_driver_sql("SELECT 1")
                return
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server at once (connections are cut, as when a database host goes away)."""
        _run([self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"], timeout=60)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self._admin() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = sa.make_url(url).database
        with self._admin() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @contextlib.contextmanager
    def _admin(self) -> Iterator[sa.Connection]:
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()


def postgres_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else where Debian's package puts it (not on PATH there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    """As root, run a PostgreSQL program as the `postgres` user (initdb and postgres refuse root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _run(argv: list[str], timeout: float = 120) -> None:
    done = subprocess.run(_as_postgres(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}")


@contextlib.contextmanager
def start_cluster() -> Iterator[PostgresCluster]:
    """Start a throwaway cluster; stop it and remove its data directory at the end."""
    initdb, pg_ctl = postgres_program("initdb"), postgres_program("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("initdb/pg_ctl not found: install PostgreSQL (Debian: apt-get install postgresql)")
    # Directly under the system temp dir: a data directory inside a 0700 directory of root's is unreachable
    # for the postgres user.
    data_dir = Path(tempfile.mkdtemp(prefix="plexus-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
    cluster = PostgresCluster(_free_port(), data_dir, pg_ctl)
    started = False
    try:
        _run([initdb, "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        started = True
        cluster.start()
        yield cluster
    finally:
        if started:
            with contextlib.suppress(Exception):
                cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def postgres_unavailable(exc: Exception) -> NoReturn:
    """Skip the test (locally) or fail it (CI=true): a CI run must not pass without its PostgreSQL half."""
    reason = f"PostgreSQL could not be started for the tests: {exc}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run on CI)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def cluster_for_tests() -> Iterator[PostgresCluster]:
    """A throwaway cluster for as long as the block runs, or the test skipped or failed (postgres_unavailable)."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(start_cluster())
        except Exception as exc:
            postgres_unavailable(exc)
        yield cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL cluster, shared by every test that asks for a PostgreSQL database."""
    with cluster_for_tests() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a new, empty database on the session's cluster, dropped after the test."""
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty store: a SQLite file, then a PostgreSQL database (the test runs on each)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("postgres_url"))
