"""`plexus mcp serve` over stdio on a store shared with another server (docs/scale-out.md), both real processes:
the stdio server (launched by the SDK's stdio client) holds the leases of the tasks it runs, so the other server
never takes them over, and its event relay carries its tasks' events to the other server's subscribers and
theirs to its own. On SQLite (one file) and on a real PostgreSQL (tests/postgres.py).

The other server is a real `jupyter server` on the same machine (tests/multi_server.py): it treats the stdio
server's claim as a server on another machine would once its lease has run out (manager `_owner_gone`: an
expired lease means a gone server on any host, whatever its process id says).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from mcp import Client, StdioServerParameters

from plexus_mcp_jupyter.config import PlexusSettings
from plexus_mcp_jupyter.runtime import PlexusRuntime

from .conftest import LEGACY, poll
from .multi_server import REPO, Server, create_store, start_server
from .test_multi_server import FAST, FINAL, Watcher, dispatch, server_of

pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")

# The stdio server with the task types of tests/multi_server.py (`recorded_once`: never retried, so a take-over
# fails it with "server restarted while the task was running").
BOOT = (
    "import sys; from tests.multi_server import register; register(); "
    "from plexus_mcp_jupyter.cli import main; sys.exit(main(sys.argv[1:]))"
)


def stdio_server(tmp_path: Path, db_url: str, **settings: Any) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_MCP_")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        JUPYTER_DATA_DIR=str(tmp_path / "stdio" / "data"),
        PLEXUS_MCP_DB_URL=db_url,
    )
    env.update({f"PLEXUS_MCP_{key.upper()}": str(value) for key, value in {**FAST, **settings}.items()})
    return StdioServerParameters(
        command=sys.executable,
        args=["-c", BOOT, "mcp", "serve", "--transport", "stdio", "--log-level", "DEBUG"],  # every log: on stderr
        env=env,
        cwd=str(REPO),
    )


def task_row(db_url: str, task_id: str) -> dict[str, Any] | None:
    """(status, worker, lease_expires_at) of a task, read from the shared store itself."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT status, worker, lease_expires_at FROM tasks WHERE id = :id"), {"id": task_id}
            ).first()
    finally:
        engine.dispose()
    return None if row is None else {"status": row[0], "worker": row[1], "lease": row[2]}


async def read_row(db_url: str, task_id: str) -> dict[str, Any] | None:
    return await asyncio.to_thread(task_row, db_url, task_id)


def other_server(tmp_path: Path, db_url: str, **settings: Any) -> Server:
    return start_server(tmp_path, "other", db_url, **{**FAST, **settings})


@pytest.mark.timeout(180)
async def test_a_stdio_servers_task_keeps_its_lease_past_its_end_and_its_events_reach_the_other_server(
    store_url, tmp_path
):
    db_url = create_store(store_url)
    items = tmp_path / "items"  # one item directory for both (PostgreSQL: the shared items check)
    # The other server runs nothing (max_concurrency 0): every task runs on the stdio server.
    other = await asyncio.to_thread(other_server, tmp_path, db_url, max_concurrency=0, evaluation_items_dir=str(items))
    watcher = await asyncio.to_thread(Watcher, other)
    runs, hold = tmp_path / "runs.txt", tmp_path / "release"
    lease, heartbeat = FAST["server_lease_seconds"], FAST["server_heartbeat_seconds"]
    garbage: list[Exception] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, Exception):  # a line on stdout that is not a JSON-RPC message (a log of the relay's?)
            garbage.append(message)

    try:
        params = stdio_server(tmp_path, db_url, evaluation_items_dir=str(items))
        async with Client(params, message_handler=on_message) as client:
            spec = {"type": "recorded_once", "params": {"runs": str(runs), "hold": str(hold)}}
            answer = await client.call_tool("dispatch_batch", {"tasks": [spec]})
            task_id = answer.structured_content["task_ids"][0]
            first = await poll(lambda: read_row(db_url, task_id), lambda r: r and r["status"] == "RUNNING", 60)
            # Past the end of the lease it was claimed with by half a lease and three of the other server's
            # heartbeats: unrenewed, the other server would have taken it over (failed it, as the stdio server ran
            # it on; 1.5 s after the end were not always enough for it at a load of 9).
            past = first["lease"] + lease / 2 + 3 * heartbeat
            await poll(time.time, lambda t: t > past, lease * 2 + 10, interval=0.2)
            held = await read_row(db_url, task_id)
            assert held is not None
            assert held["status"] == "RUNNING", held
            assert server_of(held["worker"]) == server_of(first["worker"]), "still the stdio server's claim"
            assert held["lease"] > first["lease"], "the stdio server's heartbeat renews the lease"
            # The other server's subscriber follows the task the stdio server runs (the relay).
            await poll(lambda: watcher.statuses.get(task_id), lambda s: s == "RUNNING", 30)
            hold.touch()
            done = await poll(lambda: read_row(db_url, task_id), lambda r: r["status"] in FINAL, 60)
            assert done["status"] == "COMPLETED", done
            await poll(lambda: watcher.statuses.get(task_id), lambda s: s in FINAL, 30)
            assert watcher.statuses[task_id] == "COMPLETED" and watcher.finals[task_id] == 1
            health = await asyncio.to_thread(other.health)
            assert health["server"]["relay"]["received"] > 0, health["server"]["relay"]
    finally:
        watcher.close()
        await asyncio.to_thread(other.stop)
    assert runs.read_text().split() == [task_id], "it ran once, on the stdio server"
    assert garbage == []


@pytest.mark.timeout(180)
async def test_a_stdio_servers_mcp_subscriber_follows_a_task_the_other_server_runs(store_url, tmp_path):
    db_url = create_store(store_url)
    items = tmp_path / "items"
    other = await asyncio.to_thread(other_server, tmp_path, db_url, max_concurrency=2, evaluation_items_dir=str(items))
    runs, hold = tmp_path / "runs.txt", tmp_path / "release"
    updated: list[str] = []

    async def on_message(message: Any) -> None:
        root = getattr(message, "root", message)
        params = getattr(root, "params", None)
        if getattr(root, "method", "") == "notifications/resources/updated" and params is not None:
            updated.append(str(params.uri))

    try:
        # The stdio server runs nothing (max_concurrency 0): every task runs on the other server.
        params = stdio_server(tmp_path, db_url, max_concurrency=0, evaluation_items_dir=str(items))
        async with Client(params, mode=LEGACY, message_handler=on_message) as client:  # resources/subscribe
            spec = {"type": "recorded_once", "params": {"runs": str(runs), "hold": str(hold)}}
            task_id = (await asyncio.to_thread(dispatch, other, [spec]))[0]
            uri = f"plexus://tasks/{task_id}"
            await client.subscribe_resource(uri)
            hold.touch()
            with anyio.fail_after(30):
                while True:
                    while uri not in updated:
                        await anyio.sleep(0.05)
                    updated.clear()
                    task = json.loads((await client.read_resource(uri)).contents[0].text)
                    if task["status"] in FINAL:
                        break
            assert task["status"] == "COMPLETED"
    finally:
        await asyncio.to_thread(other.stop)
    assert runs.read_text().split() == [task_id]


@pytest.mark.timeout(180)
async def test_a_task_a_stdio_server_leaves_running_when_its_client_closes_it_ends_on_the_other_servers_stream(
    tmp_path,
):
    # Its stop (PlexusRuntime.stop): the manager records the running task, then the relay sends its final state.
    db_url = create_store(f"sqlite:///{tmp_path / 'shared.db'}")
    other = await asyncio.to_thread(other_server, tmp_path, db_url, max_concurrency=0)
    watcher = await asyncio.to_thread(Watcher, other)
    runs, hold = tmp_path / "runs.txt", tmp_path / "release"  # never released
    try:
        async with Client(stdio_server(tmp_path, db_url)) as client:
            spec = {"type": "recorded_once", "params": {"runs": str(runs), "hold": str(hold)}}
            task_id = (await client.call_tool("dispatch_batch", {"tasks": [spec]})).structured_content["task_ids"][0]
            await poll(lambda: watcher.statuses.get(task_id), lambda s: s == "RUNNING", 30)
        # The client closed its stdin: the stdio server stops.
        final = await poll(lambda: watcher.statuses.get(task_id), lambda s: s in FINAL, 30)
        row = await read_row(db_url, task_id)
        assert row is not None and row["status"] == final != "COMPLETED", (row, final)
        assert watcher.finals[task_id] == 1
    finally:
        watcher.close()
        await asyncio.to_thread(other.stop)


@pytest.mark.parametrize("required", [False, True])
async def test_without_the_sdks_session_manager_a_stdio_server_starts_the_rest_and_an_http_one_does_not(
    tmp_path, monkeypatch, required
):
    # Over stdio the session manager only carries the start-up rehearsals (serve_stdio: sessions_required=False);
    # the HTTP servers serve through it. Its failure to start is injected: nothing real makes it fail.
    settings = PlexusSettings(
        db_url=f"sqlite:///{tmp_path / 's.db'}", server_heartbeat_seconds=0.2, server_lease_seconds=1
    )
    runtime = PlexusRuntime(settings, data_dir=str(tmp_path))

    async def cannot_start() -> None:
        raise RuntimeError("the MCP session manager could not start: injected")

    monkeypatch.setattr(runtime.endpoint, "start", cannot_start)
    try:
        if required:
            with pytest.raises(RuntimeError, match="could not start: injected"):
                await runtime.start()
        else:
            await runtime.start(sessions_required=False)
            await poll(lambda: runtime.leases.last_beat, lambda beat: beat is not None, 20)  # the heartbeat
            assert runtime.relay._threads, "the event relay"
            assert runtime._key_watch is not None, "the key watch"
            assert runtime.evaluations.rehearsed is not None, "the evaluation service (its rehearsals, its pruning)"
    finally:
        await runtime.stop()


async def test_a_runtime_that_fails_to_start_stops_what_it_started_and_starts_again_when_asked(tmp_path, monkeypatch):
    # An HTTP server's runtime whose session manager cannot start: start() raises, and raised once only (the next
    # lazy start() returned at once, the runtime half-started: the heartbeat and relay running, no endpoint).
    settings = PlexusSettings(
        db_url=f"sqlite:///{tmp_path / 's.db'}", server_heartbeat_seconds=0.2, server_lease_seconds=1
    )
    runtime = PlexusRuntime(settings, data_dir=str(tmp_path))
    failures = []

    async def cannot_start() -> None:
        failures.append(1)
        raise RuntimeError("the MCP session manager could not start: injected")

    monkeypatch.setattr(runtime.endpoint, "start", cannot_start)
    closed = closes_told(runtime, monkeypatch)
    try:
        for attempt in (1, 2):
            with pytest.raises(RuntimeError, match="could not start: injected"):
                await runtime.start()
            assert len(failures) == attempt
            assert not runtime.manager.started and not runtime.relay._threads and runtime.leases._thread is None
        assert closed == []
    finally:
        await runtime.stop()
    # A stop after a failed start closes what the runtime made (it returned at once: audit log and store left open).
    assert sorted(closed) == ["audit", "store"]
    await runtime.stop()
    assert sorted(closed) == ["audit", "store"]  # once


async def test_a_start_that_fails_after_the_evaluation_service_started_undoes_it_and_the_next_starts_it_anew(
    tmp_path, monkeypatch
):
    """A start that fails after the evaluation service started (its items checks, its key watch): the service is
    stopped with the rest (no pruning on a cancellation meanwhile), and the next start submits its rehearsals and
    pruning anew. It stayed started: it pruned for a stopped runtime, and the next start rehearsed nothing."""
    runtime = PlexusRuntime(PlexusSettings(db_url=f"sqlite:///{tmp_path / 's.db'}"), data_dir=str(tmp_path))
    submitted: list[str] = []
    pruner = runtime.evaluations._pruner
    submit = pruner.submit
    monkeypatch.setattr(pruner, "submit", lambda fn, *a, **k: (submitted.append(fn.__name__), submit(fn, *a, **k))[1])
    watch = runtime._watch_keys

    def cannot_watch() -> Any:
        raise RuntimeError("the key watch could not start: injected")

    monkeypatch.setattr(runtime, "_watch_keys", cannot_watch)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            await runtime.start()
        assert submitted.count("warm_up_again") == 1
        submitted.clear()
        runtime.bus.publish("task.cancelled", "task", "t1", {"status": "CANCELLED", "type": "evaluation"})
        assert submitted == [], "pruning for a runtime that is not started"
        monkeypatch.setattr(runtime, "_watch_keys", watch)
        await runtime.start()
        assert sorted(submitted) == ["prune_cancelled", "sweep_files", "warm_up_again"]
        await asyncio.wait_for(runtime.evaluations.rehearsals_ended(), 30)
    finally:
        await runtime.stop()


def closes_told(runtime: PlexusRuntime, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the runtime's audit log and store as each is closed."""
    closed: list[str] = []
    for name in ("audit", "store"):
        part = getattr(runtime, name)
        monkeypatch.setattr(part, "close", lambda close=part.close, name=name: (closed.append(name), close())[1])
    return closed


async def test_a_start_asked_while_a_failed_start_is_undone_leaves_the_runtime_started_whole(tmp_path, monkeypatch):
    """A lazy start() (a request) that comes while a failed start stops what it started: it must not start what
    that undoing then stops (the runtime said started, its manager, heartbeat and relay stopped: every later start()
    returned at once, its tasks' leases never renewed)."""
    settings = PlexusSettings(
        db_url=f"sqlite:///{tmp_path / 's.db'}", server_heartbeat_seconds=0.2, server_lease_seconds=1
    )
    runtime = PlexusRuntime(settings, data_dir=str(tmp_path))
    real_start, real_undo = runtime.endpoint.start, runtime._stop_services
    undoing, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def fails_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the MCP session manager could not start: injected")
        await real_start()

    async def slow_undo() -> None:
        undoing.set()
        await release.wait()
        await real_undo()

    monkeypatch.setattr(runtime.endpoint, "start", fails_once)
    monkeypatch.setattr(runtime, "_stop_services", slow_undo)
    first = asyncio.ensure_future(runtime.start())
    try:
        await asyncio.wait_for(undoing.wait(), 30)
        await runtime.start()  # meanwhile: a request's lazy start
        monkeypatch.setattr(runtime, "_stop_services", real_undo)
        release.set()
        with pytest.raises(RuntimeError, match="injected"):
            await first
        await runtime.start()  # the next request's
        assert runtime.manager.started and runtime.leases._thread is not None and runtime.relay._threads
    finally:
        release.set()
        await runtime.stop()


def test_a_stdio_server_whose_stop_fails_still_closes_its_audit_log_and_store(tmp_path):
    """A stop step that raises (the endpoint's, injected) no longer skips the audit log's last records and the
    store's close (runtime.stop: the closing part in a finally)."""
    import subprocess

    bootstrap = (
        "import sys\n"
        "from plexus_mcp_jupyter.endpoint.transport import MCPEndpoint\n"
        "from plexus_mcp_jupyter.security.audit import AuditLog\n"
        "from plexus_mcp_jupyter.core.store import Store\n"
        "async def failing(self):\n"
        "    raise RuntimeError('endpoint stop: injected')\n"
        "MCPEndpoint.stop = failing\n"
        "def telling(cls, marker):\n"
        "    close = cls.close\n"
        "    def told(self, *args, **kwargs):\n"
        "        sys.stderr.write(marker + '\\n'); sys.stderr.flush()\n"
        "        return close(self, *args, **kwargs)\n"
        "    cls.close = told\n"
        "telling(AuditLog, 'AUDIT-CLOSED'); telling(Store, 'STORE-CLOSED')\n"
        "from plexus_mcp_jupyter.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "data"), PLEXUS_MCP_DB_URL=f"sqlite:///{tmp_path / 's.db'}")
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    done = subprocess.run(
        [sys.executable, "-c", bootstrap, "mcp", "serve", "--transport", "stdio", "--root-dir", str(tmp_path)],
        input=(json.dumps(init) + "\n").encode(),  # then stdin's end: the server stops
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    err = done.stderr.decode()
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in done.stdout.splitlines()), [done.stdout, err]
    assert "endpoint stop: injected" in err and "AUDIT-CLOSED" in err and "STORE-CLOSED" in err, err


async def test_a_part_that_fails_to_close_leaves_the_others_to_close_the_audit_log_and_store_last(
    tmp_path, monkeypatch, caplog
):
    # The uploads' close raising (an upload's file that cannot be removed: injected) skipped the dataset catalog,
    # the audit log's last records and the store's close.
    settings = PlexusSettings(db_url=f"sqlite:///{tmp_path / 's.db'}")
    runtime = PlexusRuntime(settings, data_dir=str(tmp_path))
    closed = closes_told(runtime, monkeypatch)

    def cannot_close() -> None:
        raise OSError("cannot remove an upload's file: injected")

    monkeypatch.setattr(runtime.uploads, "close", cannot_close)
    await runtime.start(sessions_required=False)
    await runtime.stop()
    assert sorted(closed) == ["audit", "store"]
    assert "closing the uploads failed" in caplog.text
