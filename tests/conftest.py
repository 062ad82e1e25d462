"""Fixtures that start the real thing: a Jupyter server with the extension, on a real SQLite file."""

from __future__ import annotations

import asyncio
import compileall
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import sqlalchemy as sa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from traitlets.config import Config

import plexus_mcp_jupyter
from plexus_mcp_jupyter.core.store import Store
from plexus_mcp_jupyter.core.tasks import TaskType, register_task_type, unregister_task_type
from plexus_mcp_jupyter.security.keys import keys_table


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package once, here, before any server starts. On a fresh clone nothing is compiled, and
    the servers' background threads (warm-ups, the datasets' threads) import modules lazily: compiling in a
    thread while the main thread parses too trips CPython 3.11's AST recursion-depth bookkeeping
    ("SystemError: AST constructor recursion depth mismatch", python/cpython#106905; pytest-dev/pytest#10874)."""
    compileall.compile_dir(plexus_mcp_jupyter.__path__[0], quiet=2)


def pytest_collection_finish(session: pytest.Session) -> None:
    """mypy, when its test is among those to run, starts now in the background (tests/test_quality.py)."""
    if any(item.nodeid == "tests/test_quality.py::test_mypy_finds_nothing" for item in session.items):
        from tests.test_quality import start_in_background

        start_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.test_quality import stop_background

    stop_background()


pytest_plugins = ("pytest_jupyter.jupyter_server", "tests.postgres")

LEGACY = "legacy"  # the 2025-11-25 initialize handshake
MODERN = "2026-07-28"  # the per-request era, no handshake


@pytest.fixture(scope="session")
def migrated_store_file(tmp_path_factory) -> Path:
    """An empty SQLite store at the newest schema, made once per session by the store itself (its migrations)."""
    path = tmp_path_factory.mktemp("store-template") / "plexus.db"
    Store(f"sqlite:///{path}").close()
    assert not path.with_name(path.name + "-wal").exists()  # closed: everything is in the one file
    return path


@pytest.fixture
def db_path(tmp_path, migrated_store_file):
    """The test's own SQLite store, empty and already at the newest schema: a copy of the session's migrated file
    (migrating a new file costs ~50-70 ms of every server start; tests/test_store_migrations.py covers that path)."""
    path = tmp_path / "plexus.db"
    shutil.copyfile(migrated_store_file, path)
    return path


@pytest.fixture
def plexus_config(db_path, request) -> dict[str, Any]:
    """Settings of the extension under test; tests may change them before the server starts.

    A test that uses the `executor_name` fixture runs once per executor (local, and dask on `dask_cluster`)."""
    config: dict[str, Any] = {
        "db_url": f"sqlite:///{db_path}",
        "cancel_grace_seconds": 1.0,
        "poll_interval": 0.2,
        "progress_write_interval": 0.2,
    }
    if "executor_name" in request.fixturenames and request.getfixturevalue("executor_name") == "dask":
        config.update(
            executor="dask",
            dask_scheduler_address=request.getfixturevalue("dask_cluster").scheduler_address,
            dask_message_interval=0.05,
        )
    return config


@pytest.fixture(params=["local", "dask"])
def executor_name(request) -> str:
    """Runs a test on both executors: `@pytest.mark.usefixtures("executor_name")` (see plexus_config)."""
    return str(request.param)


def local_cluster(workers: int) -> Any:
    """A real Dask LocalCluster of `workers` processes of 1 thread (slots=1), with nannies and a dashboard."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        memory_limit="1GB",
        resources={"slots": 1},
        dashboard_address="127.0.0.1:0",
        host="127.0.0.1",
        scheduler_kwargs={"allowed_failures": 0},
    )


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """A real Dask LocalCluster (2 worker processes of 1 thread, with nannies), started once per test session.

    allowed_failures=0, as docs/scale-out.md advises: Plexus, not Dask, decides what a worker's death means."""
    cluster = local_cluster(2)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def jp_server_config(plexus_config):
    return Config(
        {
            "ServerApp": {"jpserver_extensions": {"plexus_mcp_jupyter": True}},
            "PlexusMCPExtension": plexus_config,
        }
    )


@pytest.fixture
def server_url(jp_serverapp, http_server_client, jp_http_port, jp_base_url) -> str:
    """Base URL of the running Jupyter server (listening on a real port)."""
    return f"http://localhost:{jp_http_port}{jp_base_url}"


@pytest.fixture
def token(jp_serverapp) -> str:
    return jp_serverapp.identity_provider.token


@pytest.fixture
def mcp_url(server_url) -> str:
    return f"{server_url}plexus/mcp"


@pytest.fixture
def runtime(jp_serverapp, jp_asyncio_loop):
    """The extension's core, started (Jupyter starts it after its loop starts; pytest-jupyter never does)."""
    plexus = jp_serverapp.web_app.settings["plexus"]
    jp_asyncio_loop.run_until_complete(plexus.start())
    return plexus


@asynccontextmanager
async def open_client(url: str, token: str | None, mode: str = LEGACY, **kwargs: Any) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, **kwargs) as client,
    ):
        yield client


@pytest.fixture
def mcp_client(mcp_url, token) -> Callable[..., Any]:
    """Factory: `async with mcp_client(mode) as client:` an official SDK client over real HTTP."""

    def factory(mode: str = LEGACY, **kwargs: Any):
        return open_client(mcp_url, token, mode, **kwargs)

    return factory


async def poll(
    fn: Callable[[], Any], predicate: Callable[[Any], bool], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Call `fn` (sync or async) until `predicate(result)` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if asyncio.iscoroutine(last):
            last = await last
        if predicate(last):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


@pytest.fixture
def keys(runtime):
    """A key of each kind: (credential) by name."""
    made = {}
    for role in ("viewer", "operator", "admin"):
        made[role] = runtime.keys.create(f"{role} key", role)[1]
    made["operator2"] = runtime.keys.create("another operator", "operator")[1]
    revoked_key, made["revoked"] = runtime.keys.create("revoked", "admin")
    runtime.keys.revoke(revoked_key.id)
    expired_key, made["expired"] = runtime.keys.create("expired", "admin", expires_in_days=1)
    with runtime.store.engine.begin() as conn:
        conn.execute(sa.update(keys_table).where(keys_table.c.id == expired_key.id).values(expires_at=time.time() - 1))
    made["bad"] = made["admin"][:-4] + "AAAA"
    made["malformed"] = "plx_nonsense"
    return made


@contextmanager
def registered_task_types(*types: TaskType) -> Iterator[None]:
    """Task types that only some tests use, registered for the block and removed again afterwards."""
    for task_type in types:
        register_task_type(task_type)
    try:
        yield
    finally:
        for task_type in types:
            unregister_task_type(task_type.name)
