"""Several servers on one store: two real `jupyter server` processes on one SQLite file and on one real
PostgreSQL run every task exactly once, each sees the other's task events (WebSocket stream and MCP
subscriptions), and a server killed with -9 has its running tasks recovered by the other within the lease.

PostgreSQL: a throwaway cluster started by this file's own fixture (tests/multi_server.py). When it cannot
start, its tests skip locally and FAIL on CI (CI=true): a CI run must not pass without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
import requests
import sqlalchemy as sa
import websocket

from plexus_mcp_jupyter.config import PlexusSettings, SettingsError
from plexus_mcp_jupyter.core import manager as manager_module
from plexus_mcp_jupyter.core import relay as relay_module
from plexus_mcp_jupyter.core.events import Event, EventBus
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.manager import TaskManager, _owner_gone
from plexus_mcp_jupyter.core.models import Task, TaskStatus, iso
from plexus_mcp_jupyter.core.queue import QueueWindow
from plexus_mcp_jupyter.core.relay import EventRelay
from plexus_mcp_jupyter.core.store import Store, outbox_table
from plexus_mcp_jupyter.runtime import PlexusRuntime

from .conftest import open_client, poll
from .multi_server import (
    PostgresCluster,
    PostgresUnavailable,
    Server,
    create_store,
    postgres_cluster,
    start_servers,
)

pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}
# Short relay and lease times, so the tests take seconds; the defaults are 0.25 s, 5 s and 30 s.
FAST = {"event_relay_interval": 0.1, "server_heartbeat_seconds": 0.5, "server_lease_seconds": 4}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster | None]:
    try:
        with postgres_cluster() as cluster:
            yield cluster
    except PostgresUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required on CI: {exc}")
        yield None


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return create_store(f"sqlite:///{tmp_path / 'shared.db'}")
    cluster = request.getfixturevalue("postgres")
    if cluster is None:
        pytest.skip("PostgreSQL could not be started here (on CI this fails instead)")
    return create_store(cluster.create_database())


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., list[Server]]]:
    """Factory: start servers on the shared store, {name: settings}, at once (a start takes seconds); every one
    started is stopped at the end."""
    started: list[Server] = []

    def start(db_url: str, settings_by_name: dict[str, dict[str, Any]]) -> list[Server]:
        new = start_servers(
            tmp_path, db_url, {name: {**FAST, **settings} for name, settings in settings_by_name.items()}
        )
        started.extend(new)
        return new

    yield start
    with ThreadPoolExecutor(max(len(started), 1)) as pool:
        list(pool.map(Server.stop, started))


class Watcher:
    """A WebSocket subscriber to a server's task events, on a thread: the latest status of each task seen."""

    def __init__(self, server: Server) -> None:
        self.statuses: dict[str, str] = {}
        self.finals: Counter[str] = Counter()
        self.socket = websocket.create_connection(
            server.ws_url + "?entity_type=task", timeout=60, header=[f"Authorization: token {server.token}"]
        )
        assert json.loads(self.socket.recv())["type"] == "hello"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                message = json.loads(self.socket.recv())
                if message.get("type") == "event":
                    status = message["data"]["status"]
                    self.statuses[message["entity_id"]] = status
                    if status in FINAL:
                        self.finals[message["entity_id"]] += 1
        except Exception:
            return  # closed

    def close(self) -> None:
        self.socket.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def dispatch(server: Server, specs: list[dict[str, Any]]) -> list[str]:
    answer = requests.post(server.url + "plexus/api/tasks", json={"tasks": specs}, headers=server.headers, timeout=60)
    assert answer.status_code == 201, answer.text
    return answer.json()["task_ids"]  # type: ignore[no-any-return]


def store_rows(db_url: str, ids: list[str]) -> dict[str, tuple[str, str]]:
    """(status, worker) of each task, read from the shared store itself."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, status, worker FROM tasks")).all()
    finally:
        engine.dispose()
    wanted = set(ids)
    return {r[0]: (r[1], r[2]) for r in rows if r[0] in wanted}


def server_of(worker: str) -> str:
    """The server id part of a task's worker column ("executor:host:pid:instance[/worker]")."""
    return worker.split("/", 1)[0]


@pytest.mark.timeout(300)
def test_500_tasks_through_two_servers_run_once_and_each_end_reaches_the_other(servers, db_url, tmp_path):
    a, b = servers(db_url, {"a": {}, "b": {}})
    ids_of = {a.health()["server"]["id"], b.health()["server"]["id"]}
    assert len(ids_of) == 2, "each process has a server id of its own"
    watchers = {"a": Watcher(a), "b": Watcher(b)}
    runs = tmp_path / "runs.txt"
    spec = {"type": "recorded", "params": {"runs": str(runs), "seconds": 0.01}}
    dispatched: dict[str, list[str]] = {"a": [], "b": []}
    for round_ in range(10):  # 500 tasks, 50 per batch, through the two servers in turn
        name, server = ("a", a) if round_ % 2 == 0 else ("b", b)
        dispatched[name] += dispatch(server, [spec] * 50)
    every = dispatched["a"] + dispatched["b"]
    assert len(set(every)) == 500

    def all_seen() -> bool:
        return all(all(w.statuses.get(i) in FINAL for i in every) for w in watchers.values())

    try:
        wait_until(all_seen, 180, "every final state seen by the subscribers of both servers")
    finally:
        for watcher in watchers.values():
            watcher.close()
    rows = store_rows(db_url, every)
    assert Counter(status for status, _ in rows.values()) == {"COMPLETED": 500}
    recorded = Counter(runs.read_text().split())
    assert set(recorded) == set(every) and set(recorded.values()) == {1}, "each task ran exactly once"
    ran_on = Counter(server_of(worker) for _, worker in rows.values())
    assert set(ran_on) == ids_of, f"both servers ran tasks: {ran_on}"
    # Each final state seen once per subscriber, whether its task ran on this server or came by the relay.
    for watcher in watchers.values():
        assert set(watcher.finals.values()) == {1}
    # The tasks one server dispatched and the other ran reached the dispatching server's stream: by the relay.
    for server in (a, b):
        relay = server.health()["server"]["relay"]
        assert relay["received"] > 0 and relay["sent"] > 0, relay
        assert relay["mode"] == ("notify" if db_url.startswith("postgresql") else "poll")


@pytest.mark.timeout(180)
def test_kill_9_of_a_server_leaves_its_running_tasks_to_the_other_within_the_lease(servers, db_url, tmp_path):
    runs, hold = tmp_path / "runs.txt", tmp_path / "release"
    (a,) = servers(db_url, {"a": {"max_concurrency": 4}})
    retried = dispatch(a, [{"type": "recorded", "params": {"runs": str(runs), "hold": str(hold)}}] * 2)
    failed = dispatch(a, [{"type": "recorded_once", "params": {"runs": str(runs), "hold": str(hold)}}] * 2)
    ids = retried + failed
    a_id = a.health()["server"]["id"]
    wait_until(
        lambda: all(status == "RUNNING" for status, _ in store_rows(db_url, ids).values()),
        60,
        "the four tasks RUNNING on server a",
    )
    (b,) = servers(db_url, {"b": {"max_concurrency": 4}})
    watcher = Watcher(b)
    b_id = b.health()["server"]["id"]
    lease = FAST["server_lease_seconds"]
    a.kill()
    killed_at = time.monotonic()
    # Server a is not reaped until the end: a zombie answers os.kill(pid, 0) as a live process does, so the
    # process-id check that recovers the tasks of a dead server on the same host cannot: only the lease can,
    # as for a server on another machine.
    try:
        wait_until(
            lambda: (
                all(watcher.statuses.get(i) == "FAILED" for i in failed)
                and all(watcher.statuses.get(i) == "RUNNING" for i in retried)
            ),
            30,
            "the never-retried tasks FAILED and the retried ones RUNNING again, on server b",
        )
        recovered_after = time.monotonic() - killed_at
        rows = store_rows(db_url, ids)
        assert all(server_of(rows[i][1]) == b_id for i in retried), "re-queued and claimed by the survivor"
        assert all(server_of(rows[i][1]) == a_id for i in failed)  # failed as they were: by a's claim
        hold.touch()
        wait_until(
            lambda: all(watcher.statuses.get(i) == "COMPLETED" for i in retried),
            30,
            "the retried tasks completed on server b",
        )
    finally:
        watcher.close()
        a.proc.wait(10)
    answer = requests.get(f"{b.url}plexus/api/tasks/{failed[0]}", headers=b.headers, timeout=10).json()
    assert answer["error_message"] == "server restarted while the task was running"
    recorded = Counter(runs.read_text().split())
    assert {recorded[i] for i in retried} == {2} and {recorded[i] for i in failed} == {1}
    # Noticed within the lease (plus a heartbeat and the time to start the new runs): with no lease, a task
    # on a server that died stays RUNNING until that server restarts.
    assert recovered_after < lease + 10, recovered_after


@pytest.mark.timeout(120)
def test_an_mcp_subscriber_on_one_server_follows_a_task_the_other_runs(servers, db_url, tmp_path):
    """On PostgreSQL the runner writes rows once the follower said it follows (its sends were NOTIFYs alone)."""
    # The follower runs nothing (max_concurrency 0): every task runs on the runner.
    runner, follower = servers(db_url, {"runner": {"max_concurrency": 2}, "follower": {"max_concurrency": 0}})
    runs, hold = tmp_path / "runs.txt", tmp_path / "release"
    task_id = dispatch(runner, [{"type": "recorded", "params": {"runs": str(runs), "hold": str(hold)}}])[0]
    uris: list[str] = []

    async def on_message(message: Any) -> None:
        root = getattr(message, "root", message)
        params = getattr(root, "params", None)
        if getattr(root, "method", "") == "notifications/resources/updated" and params is not None:
            uris.append(str(params.uri))

    async def follow() -> dict[str, Any]:
        async with open_client(follower.url + "plexus/mcp", follower.token, message_handler=on_message) as client:
            uri = f"plexus://tasks/{task_id}"
            await client.subscribe_resource(uri)
            hold.touch()
            with anyio.fail_after(60):
                while True:
                    while uri not in uris:
                        await anyio.sleep(0.05)
                    uris.clear()
                    task = json.loads((await client.read_resource(uri)).contents[0].text)
                    if task["status"] in FINAL:
                        return task  # type: ignore[no-any-return]

    task = anyio.run(follow)
    assert task["status"] == "COMPLETED"
    assert follower.health()["server"]["relay"]["received"] > 0


def test_a_lease_shorter_than_two_heartbeats_is_refused_with_both_values(tmp_path):
    settings = PlexusSettings(
        db_url=f"sqlite:///{tmp_path / 's.db'}", server_heartbeat_seconds=5, server_lease_seconds=8
    )
    with pytest.raises(
        SettingsError,
        match=r"server_lease_seconds \(8\) must be at least twice "
        r"server_heartbeat_seconds \(5",
    ):
        PlexusRuntime(settings, data_dir=str(tmp_path))


async def test_the_relay_never_skips_an_event_whose_transaction_commits_late(db_url):
    """A writer whose transaction began first but commits after a later one: the reader must not move past
    its rows before they are visible (PostgreSQL: the xmin horizon; SQLite: one writer at a time)."""
    store = Store(db_url)
    bus = EventBus()
    received: list[str] = []
    bus.add_listener(lambda event: received.append(event.entity_id))
    relay = EventRelay(store, bus, mode="poll", interval=0.05)
    relay.start(asyncio.get_running_loop(), "reader")

    def row(entity_id: str) -> dict[str, Any]:  # a packed row of one event, as another server's relay sends it
        at = time.time()
        return {
            "origin": "writer",
            "at": at,
            "heads": json.dumps([[at, "task.completed", "task", entity_id, "COMPLETED"]]),
            "data": json.dumps([{"status": "COMPLETED"}]),
        }

    insert = sa.insert(outbox_table)
    if store.engine.dialect.name == "postgresql":
        insert = insert.values(txid=sa.literal_column("pg_current_xact_id()::text::bigint"))
    try:
        early = store.engine.connect()
        early.begin()
        early.execute(insert, [row("early")])  # not committed yet (on SQLite: holds the write lock)
        if store.engine.dialect.name == "postgresql":
            with store.engine.begin() as conn:
                conn.execute(insert, [row("late")])
        await asyncio.sleep(0.5)  # ten polls of the reader
        assert received == [], "nothing is read past a transaction still running"
        early.commit()
        early.close()
        if store.engine.dialect.name != "postgresql":
            with store.engine.begin() as conn:
                conn.execute(insert, [row("late")])
        await poll(lambda: sorted(received), lambda r: r == ["early", "late"], timeout=10)
    finally:
        await asyncio.to_thread(relay.stop)
        store.close()


async def test_a_send_is_packed_into_few_outbox_rows_and_its_events_arrive_in_order(db_url, monkeypatch):
    """The relay writes the events of a send as packed rows (a row per PACK_MAX events, not one per event); the
    other server unpacks them in order: each task's final state arrives once, with its data, nothing after it."""
    monkeypatch.setattr(relay_module, "PACK_MAX", 7)  # a send of many events spans several rows
    stores = [Store(db_url), Store(db_url)]
    writer_bus, reader_bus = EventBus(), EventBus()
    writer = EventRelay(stores[0], writer_bus, mode="auto", interval=0.05)
    reader = EventRelay(stores[1], reader_bus, mode="auto", interval=0.05)
    subscription = reader_bus.subscribe(lambda e: e.entity_type == "task")
    loop = asyncio.get_running_loop()
    writer.start(loop, "writer")
    reader.start(loop, "reader")
    arrived: dict[str, list[str]] = {}
    tasks = [f"packed-{i}" for i in range(60)]
    try:
        for kind, status in (("task.created", "QUEUED"), ("task.updated", "RUNNING"), ("task.completed", "COMPLETED")):
            for task_id in tasks:  # published in the loop's one turn: a send or two takes all of them
                writer_bus.publish(kind, "task", task_id, {"task_id": task_id, "status": status, "type": "demo"})

        async def collect() -> None:
            while sum("COMPLETED" in statuses for statuses in arrived.values()) < len(tasks):
                for event in await subscription.next_batch():
                    assert event.origin == "writer" and event.data["type"] == "demo"
                    arrived.setdefault(event.entity_id, []).append(event.data["status"])

        await asyncio.wait_for(collect(), 20)
        assert sorted(arrived) == sorted(tasks)
        assert all(statuses[-1] == "COMPLETED" and statuses.count("COMPLETED") == 1 for statuses in arrived.values())
        with stores[0].engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one()
        sent = writer.status()
        assert rows == sent["packs"] and sent["sent"] >= len(tasks)
        assert sent["packs"] <= sent["sends"] + sent["sent"] // 7, "a row per PACK_MAX events of a send"
        assert sent["packs"] < sent["sent"], "packed: fewer rows than events"
    finally:
        subscription.close()
        await asyncio.to_thread(writer.stop)
        await asyncio.to_thread(reader.stop)
        for store in stores:
            store.close()


@contextlib.asynccontextmanager
async def writer_and_reader(
    db_url: str, on_remote: Callable[[list[tuple[str, str | None]], relay_module.Groups], None]
) -> AsyncIterator[tuple[EventRelay, EventBus, EventRelay, EventBus]]:
    """Two relays on one store, as two servers' (intervals of 50 ms): the writer's, and the reader's telling
    `on_remote`; stopped at the end."""
    stores = [Store(db_url), Store(db_url)]
    writer_bus, reader_bus = EventBus(), EventBus()
    writer = EventRelay(stores[0], writer_bus, mode="auto", interval=0.05)
    reader = EventRelay(stores[1], reader_bus, mode="auto", interval=0.05, on_remote=on_remote)
    loop = asyncio.get_running_loop()
    writer.start(loop, "writer")
    reader.start(loop, "reader")
    try:
        yield writer, writer_bus, reader, reader_bus
    finally:
        await asyncio.to_thread(writer.stop)
        await asyncio.to_thread(reader.stop)
        for store in stores:
            store.close()


@contextlib.asynccontextmanager
async def relays_telling(
    db_url: str,
) -> AsyncIterator[tuple[list[tuple[str, str | None]], EventRelay, EventBus, EventRelay, EventBus]]:
    """writer_and_reader, the reader's relay telling the events it notes (kind, status) into a list, yielded first."""
    told: list[tuple[str, str | None]] = []
    async with writer_and_reader(db_url, lambda events, groups: told.extend(events)) as relays:
        yield (told, *relays)


async def test_other_servers_events_are_only_noted_while_nobody_here_follows_them(db_url, monkeypatch):
    """A server with no subscriber reads another server's events without their data and publishes none of them,
    yet its listings see the change, a task queued there is planned here, and a client resuming from before is
    told of the gap; once something follows, every event (each final state) is published again."""
    # No resend of the last seconds sent without rows to the subscriber that comes (tested apart): nothing from before
    monkeypatch.setattr(relay_module, "RECENT_MAX", 0, raising=False)
    async with relays_telling(db_url) as (told, writer, writer_bus, reader, reader_bus):

        def publish(task_id: str, kind: str, status: str) -> None:
            writer_bus.publish(kind, "task", task_id, {"id": task_id, "status": status, "type": "demo"})

        def run(task_id: str) -> None:
            for kind, status in (
                ("task.created", "QUEUED"),
                ("task.updated", "RUNNING"),
                ("task.completed", "COMPLETED"),
            ):
                publish(task_id, kind, status)

        if db_url.startswith("postgresql"):  # what a LISTEN's start tells (sends it could not hear): not this test's
            await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
            await poll(lambda: told, lambda t: ("task.created", "QUEUED") in t, timeout=20)
            told.clear()
        seq_before = reader_bus.last_seq
        publish("unwatched", "task.created", "QUEUED")
        # A task queued there is planned here at once (a writer sends each entity's latest state per interval).
        await poll(lambda: told, lambda t: ("task.created", "QUEUED") in t, timeout=20)
        publish("unwatched", "task.completed", "COMPLETED")
        await poll(lambda: told, lambda t: ("task.completed", "COMPLETED") in t, timeout=20)
        assert reader.noted > 0 and reader.received == 0
        assert list(reader_bus.since(0)) == [], "nothing published while nobody follows"
        assert reader_bus.last_seq > seq_before, "listings read again"
        assert reader_bus.skipped_seq > seq_before, "a client resuming from before is told of a gap"

        subscription = reader_bus.subscribe(lambda e: e.entity_type == "task")
        if db_url.startswith("postgresql"):  # the writer heard it (else its sends are NOTIFYs alone)
            await poll(lambda: writer.status().get("followers", 1), lambda n: n == 1, timeout=20)
        finals: list[str] = []

        async def collect() -> None:
            while len(finals) < 20:
                finals.extend(e.entity_id for e in await subscription.next_batch() if e.data["status"] == "COMPLETED")

        collecting = asyncio.create_task(collect())
        for i in range(20):
            run(f"watched-{i}")
        await asyncio.wait_for(collecting, 20)
        assert sorted(finals) == sorted(f"watched-{i}" for i in range(20))
        assert "unwatched" not in finals and reader.received >= 20
        remote = [e for e in reader_bus.since(0) if e.entity_id.startswith("watched-")]
        assert remote and all(e.origin == "writer" and e.data["type"] == "demo" for e in remote), "with their data"
        subscription.close()


async def test_on_postgresql_a_server_nobody_follows_reads_no_row_the_notify_says_it_all(db_url, monkeypatch):
    """On PostgreSQL the NOTIFY of a send says what a server with nobody following other servers' events needs
    (how many events, their kinds and statuses, the queue groups of the tasks they created): it reads no outbox row,
    yet is told of them, and skips their rows (the cursor follows the horizon of its own statements); a subscriber
    that comes later gets what was committed after it came, with the data, and nothing from before."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only (SQLite polls)")
    monkeypatch.setattr(relay_module, "FALLBACK_POLLS", 10**6)  # no read for a lost notification
    # No resend of the last seconds sent without rows to the subscriber that comes (tested apart): nothing from before
    monkeypatch.setattr(relay_module, "RECENT_MAX", 0, raising=False)
    told: list[tuple[str, str | None]] = []
    groups_told: list[relay_module.Groups] = []

    def on_remote(events: list[tuple[str, str | None]], groups: relay_module.Groups) -> None:
        told.extend(events)
        groups_told.append(groups)

    async with writer_and_reader(db_url, on_remote) as (
        writer,
        writer_bus,
        reader,
        reader_bus,
    ):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        for i in range(30):
            data = {"status": "QUEUED", "priority": i % 2, "owner": None, "created_at": "2026-12-04T10:00:00.000Z"}
            writer_bus.publish("task.created", "task", f"before-{i}", data)
        await poll(lambda: reader.noted, lambda n: n >= 30, timeout=20)
        for i in range(30):
            writer_bus.publish("task.completed", "task", f"before-{i}", {"status": "COMPLETED"})
        await poll(lambda: reader.noted, lambda n: n >= 60, timeout=20)
        assert ("task.created", "QUEUED") in told and ("task.completed", "COMPLETED") in told
        assert set().union(*(g for g in groups_told if g)) == {(0, None), (1, None)}, "the created tasks' groups"
        assert reader.reads == 0 and reader.received == 0, reader.status()
        assert reader_bus.skipped_seq > 0, "listings read again, a resuming client told of the gap"

        subscription = reader_bus.subscribe(lambda e: e.entity_type == "task")
        await poll(lambda: writer.status().get("followers", 1), lambda n: n == 1, timeout=20)
        writer_bus.publish("task.completed", "task", "after", {"status": "COMPLETED", "type": "demo"})
        events = await asyncio.wait_for(subscription.next_batch(), 20)
        assert [(e.entity_id, e.data) for e in events] == [("after", {"status": "COMPLETED", "type": "demo"})]
        assert reader.received == 1 and reader.reads >= 1
        subscription.close()


def test_a_notify_payload_says_the_sender_its_events_and_their_kinds_and_an_older_one_only_its_id():
    events = [
        Event(1, 0.0, "task.created", "task", "a", {"status": "QUEUED"}),
        Event(2, 0.0, "task.created", "task", "b", {"status": "QUEUED"}),
        Event(3, 0.0, "task.completed", "task", "c", {"status": "COMPLETED"}),
    ]
    origin, count, pairs, groups, txid = relay_module.heard(relay_module.notice("s1", events) + "123]")
    assert (origin, count, txid, groups) == ("s1", 3, 123, None), "created tasks whose group is not said: none"
    assert sorted(pairs or []) == [("task.completed", "COMPLETED"), ("task.created", "QUEUED")]
    queued = [
        Event(
            i,
            0.0,
            "task.created",
            "task",
            str(i),
            {"status": "QUEUED", "priority": i % 2, "owner": owner, "created_at": iso(1796400000.0 + 10 - i)},
        )
        for i, owner in enumerate(["key:a", "key:a", "key:a", None, None])
    ]
    # Each group with the oldest creation time of its new tasks (a lower bound: milliseconds, less 1 us)
    assert relay_module.heard(relay_module.notice("s1", queued) + "9]")[3] == {
        (0, "key:a"): pytest.approx(1796400000.0 + 8 - 1e-6, abs=1e-7),
        (1, "key:a"): pytest.approx(1796400000.0 + 9 - 1e-6, abs=1e-7),
        (1, None): pytest.approx(1796400000.0 + 7 - 1e-6, abs=1e-7),
        (0, None): pytest.approx(1796400000.0 + 6 - 1e-6, abs=1e-7),
    }
    at = 1796400000.0006  # its ISO time is cut to the millisecond: the group's time is never later than the task's
    late = [Event(1, 0.0, "task.created", "task", "t", {"priority": 0, "owner": None, "created_at": iso(at)})]
    assert relay_module.heard(relay_module.notice("s1", late) + "9]")[3][(0, None)] < at
    untimed = [Event(1, 0.0, "task.created", "task", "t", {"priority": 0, "owner": None})]
    assert relay_module.heard(relay_module.notice("s1", untimed) + "9]")[3] is None, "no creation time: not known"
    many = [Event(i, 0.0, f"kind-{i}", "task", str(i), {"status": "x" * 50}) for i in range(200)]
    assert relay_module.heard(relay_module.notice("s1", many) + "7]") == ("s1", 200, None, None, 7), "too long: read"
    assert relay_module.heard('["s0", 2, [["task.created", "QUEUED"]], 5]') == (
        "s0",
        2,
        [("task.created", "QUEUED")],
        None,
        5,
    ), "a payload of the release before: no groups said"
    assert relay_module.heard('["s0", 1, [["task.created", "QUEUED"]], [[0, null]], 5]')[3] is None, (
        "groups without their oldest creation time (a server of the release before): not known, the head read again"
    )
    assert relay_module.heard("server-of-an-older-release") == ("server-of-an-older-release", 0, None, None, 0)


def outbox_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one())


@pytest.fixture
def quick_interest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interest said every 0.2 s, older LISTENs looked for every 0.2 s."""
    monkeypatch.setattr(relay_module, "INTEREST_EVERY", 0.2, raising=False)
    monkeypatch.setattr(relay_module, "OLDER_EVERY", 0.2, raising=False)


async def test_on_postgresql_no_outbox_row_is_written_while_no_other_server_follows_and_rows_once_one_does(
    db_url, quick_interest
):
    """While no other server follows other servers' events, a send is its NOTIFY alone: the others are told what
    they need (kinds, statuses) and no outbox row is written; once one follows (a subscriber there) it says so and
    gets every event with its data, rows written; once it stops following, sends are NOTIFYs alone again."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only (SQLite polls, every send writes rows)")
    async with relays_telling(db_url) as (told, writer, writer_bus, reader, reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        for i in range(20):
            writer_bus.publish("task.completed", "task", f"quiet-{i}", {"status": "COMPLETED", "type": "demo"})
        await poll(lambda: reader.noted, lambda n: n >= 20, timeout=20)
        assert ("task.completed", "COMPLETED") in told
        assert outbox_rows(writer.store) == 0, "no row while nobody follows"
        assert writer.status()["notified_only"] >= 20 and writer.status()["packs"] == 0, writer.status()

        subscription = reader_bus.subscribe(lambda e: e.entity_type == "task")
        await poll(writer.followers, lambda n: n == 1, timeout=20)
        assert reader.status()["following_said"] >= 1
        for i in range(20):
            writer_bus.publish("task.completed", "task", f"followed-{i}", {"status": "COMPLETED", "type": "demo"})
        finals: dict[str, dict[str, Any]] = {}

        async def collect() -> None:
            while len([k for k in finals if k.startswith("followed-")]) < 20:
                finals.update((e.entity_id, e.data) for e in await subscription.next_batch())

        await asyncio.wait_for(collect(), 20)
        assert all(finals[f"followed-{i}"] == {"status": "COMPLETED", "type": "demo"} for i in range(20))
        assert outbox_rows(writer.store) > 0 and writer.status()["packs"] > 0

        subscription.close()
        await poll(writer.followers, lambda n: n == 0, timeout=20)
        rows = outbox_rows(writer.store)
        noted = reader.noted
        for i in range(10):
            writer_bus.publish("task.completed", "task", f"after-{i}", {"status": "COMPLETED"})
        await poll(lambda: reader.noted, lambda n: n >= noted + 10, timeout=20)
        assert outbox_rows(writer.store) == rows, "no row once it stopped following"


async def test_a_subscriber_that_comes_as_a_task_ends_on_the_other_server_gets_its_final_state(
    db_url, quick_interest, monkeypatch
):
    """The race: a subscriber on the reader comes just as the writer's task ends, and the writer sends the final
    state as its NOTIFY alone (it has not heard yet that the reader follows: the reader's saying so is held back
    here). Once the writer hears it, it sends what it sent without rows lately again, with rows: the subscriber gets
    the final state, with its data."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    gate = threading.Event()
    say = getattr(EventRelay, "_say_interest", None)

    def held(self: EventRelay, at: float, stopping: bool, **how: Any) -> None:
        if say is not None and (self.server_id != "reader" or gate.is_set()):
            say(self, at, stopping, **how)

    monkeypatch.setattr(EventRelay, "_say_interest", held, raising=False)
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        writer_bus.publish("task.updated", "task", "racing", {"status": "RUNNING", "type": "demo"})
        await poll(lambda: reader.noted, lambda n: n >= 1, timeout=20)
        subscription = reader_bus.subscribe(lambda e: e.entity_id == "racing")  # it comes...
        writer_bus.publish("task.completed", "task", "racing", {"status": "COMPLETED", "type": "demo"})  # ...it ends
        await poll(lambda: reader.noted, lambda n: n >= 2, timeout=20)
        assert writer.status()["notified_only"] == 2 and outbox_rows(writer.store) == 0, "sent without rows"
        assert subscription.drain() == []
        gate.set()  # the writer hears that the reader follows
        events = await asyncio.wait_for(subscription.next_batch(), 20)
        assert [(e.entity_id, e.data, e.origin) for e in events] == [
            ("racing", {"status": "COMPLETED", "type": "demo"}, "writer")
        ]
        subscription.close()


async def test_a_listen_of_the_release_before_on_the_store_gets_rows_always(db_url, quick_interest, postgres):
    """A server of the release before never says it follows, and reads rows whenever it does: while its LISTEN is
    on the store (its last statement `LISTEN plexus_events`), every send writes rows; once it is gone, they stop."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    import psycopg

    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, _reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        dsn = writer.store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as older:
            older.execute(f"LISTEN {relay_module.CHANNEL}")
            await poll(lambda: writer.status()["older_listeners"], bool, timeout=20)
            writer_bus.publish("task.completed", "task", "for-the-older", {"status": "COMPLETED"})
            await poll(lambda: writer.status()["sent"], lambda n: n >= 1, timeout=20)
            assert outbox_rows(writer.store) == 1 and writer.status()["notified_only"] == 0
        await poll(lambda: writer.status()["older_listeners"], lambda older: not older, timeout=20)
        writer_bus.publish("task.completed", "task", "for-nobody", {"status": "COMPLETED"})
        await poll(lambda: writer.status()["notified_only"], lambda n: n >= 1, timeout=20)
        assert outbox_rows(writer.store) == 1


def test_a_claim_and_a_take_over_are_each_won_by_one_server_only(db_url):
    """The two conditional UPDATEs of the lease path, from two servers' stores on one database."""
    first, second = Store(db_url), Store(db_url)
    try:
        task = Task(id=str(uuid.uuid4()), type="recorded", status=TaskStatus.QUEUED)
        first.create_task(task)
        at = time.time()
        won = [
            store.claim(task.id, worker=name, started_at=at, lease_expires_at=at + 1)
            for store, name in ((first, "server-a"), (second, "server-b"))
        ]
        assert won == [True, False]
        # Server a is gone: b and a third server notice at once; one takes the task over, and only from a.
        taken = [
            store.take_over(task.id, previous="server-a", worker=name, lease_expires_at=at + 30)
            for store, name in ((second, "server-b"), (first, "server-c"))
        ]
        assert taken == [True, False]
        assert first.get_task(task.id).worker == "server-b"
        assert second.renew_leases("server-b", at + 60) == 1 and second.renew_leases("server-a", at + 60) == 0
        assert (
            first.expired_lease_count("server-c", at + 59) == 0 and first.expired_lease_count("server-c", at + 61) == 1
        )
        assert first.expired_lease_count("server-b", at + 61) == 0  # a server's own tasks are never "expired"
    finally:
        first.close()
        second.close()


def test_a_lease_that_ran_out_means_a_gone_server_on_any_host():
    other_host = "local:another-host:1:someone/pid=1"
    assert _owner_gone(other_host, "me", lease_expires_at=time.time() - 1)
    assert not _owner_gone(other_host, "me", lease_expires_at=time.time() + 30)
    assert not _owner_gone(other_host, "me")  # no lease (an older release): left to its own server
    assert not _owner_gone("local:another-host:1:me", "me", lease_expires_at=time.time() - 1)  # our own


@pytest.mark.timeout(300)  # three server starts and a PostgreSQL database
def test_a_server_whose_item_directory_the_others_do_not_share_says_so_in_health(servers, postgres, tmp_path):
    """Two servers on one PostgreSQL sharing evaluation_items_dir see each other's markers: health ok. A third with
    a directory of its own cannot see theirs: its health is degraded saying why, and it warns once (the first two
    notice it at their next check, a minute later)."""
    if postgres is None:
        pytest.skip("PostgreSQL could not be started here (on CI this fails instead)")
    db_url = create_store(postgres.create_database())
    shared = tmp_path / "shared-items"
    a, b = servers(db_url, {"a": {"evaluation_items_dir": shared}, "b": {"evaluation_items_dir": shared}})
    markers = shared / ".plexus-servers"  # each server writes its marker off the loop, once started
    wait_until(lambda: markers.is_dir() and len(list(markers.iterdir())) == 2, 30, "both servers' markers")
    for server in (a, b):
        assert server.health()["status"] == "ok", server.health()
    (c,) = servers(db_url, {"c": {"evaluation_items_dir": tmp_path / "own-items"}})
    health = wait_until(lambda: c.health()["evaluation_items"].get("problem") and c.health(), 30, "c's check")
    assert (
        health["status"] == "degraded" and "evaluation_items_dir is not shared" in health["evaluation_items"]["problem"]
    )
    assert str(shared) in health["evaluation_items"]["problem"]
    assert c.log().count("evaluation_items_dir is not shared") == 1
    b.stop()  # a server that stops withdraws its marker and record
    assert len(list((shared / ".plexus-servers").iterdir())) == 1


def demo_tasks(n: int, owner: str | None, created: float, *, delay_ms: int) -> list[Task]:
    """`n` queued demo tasks of `owner`, of one item taking `delay_ms`, created from `created` on, in order."""
    return [
        Task(
            id=uuid.uuid4().hex,
            type="demo",
            status=TaskStatus.QUEUED,
            params={"items": 1, "item_delay_ms": delay_ms},
            owner=owner,
            created_at=created + i * 1e-4,
        )
        for i in range(n)
    ]


async def drain_through_two_managers(db_url: str, owners: Callable[[int], str | None], n: int) -> list[TaskManager]:
    """Two task managers (two servers' schedulers, each with its own store pool) drain one shared queue of `n` tasks
    (the ith task's owner `owners(i)`), queued by a third party so that both learn of it at once and plan from its
    head: every task runs once, on one of them, and both run a share. No maintenance tick runs meanwhile
    (poll_interval): a pass that left a slot free with tasks queued and nothing to wake it stalls the drain, and
    fails it. Returns the managers (stopped), for their counters."""
    stores = [Store(db_url), Store(db_url)]
    managers = [
        # No maintenance tick during the test (poll_interval): its recovery would take the other manager of this
        # process, same process id, for an earlier life of this server (one manager per process is the rule).
        TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=4, poll_interval=600, lease_seconds=120)
        for store in stores
    ]
    starts: dict[str, set[str]] = {}  # task -> the managers that ran it (a running task's updates say RUNNING too)
    for manager in managers:
        manager.bus.add_listener(
            lambda e, m=manager: (
                starts.setdefault(e.entity_id, set()).add(m.server_id) if e.data.get("status") == "RUNNING" else None
            )
        )
    base = time.time()
    tasks = [
        Task(
            id=uuid.uuid4().hex,
            type="demo",
            status=TaskStatus.QUEUED,
            params={"items": 1, "item_delay_ms": 0},
            owner=owners(i),
            created_at=base + i * 1e-4,
        )
        for i in range(n)
    ]
    try:
        for manager in managers:
            await manager.start()
        await asyncio.to_thread(stores[0].create_tasks, tasks)  # queued by a third party: both learn of it at once
        for manager in managers:
            manager.queue_changed()

        def statuses() -> Counter[str]:
            with stores[0].engine.connect() as conn:
                return Counter(dict(conn.execute(sa.text("SELECT status, count(*) FROM tasks GROUP BY status")).all()))

        final = await poll(
            lambda: asyncio.to_thread(statuses), lambda c: sum(c[s] for s in FINAL) == n, timeout=90, interval=0.2
        )
        assert final == {"COMPLETED": n}
        assert sorted(starts) == sorted(task.id for task in tasks)
        assert all(len(by) == 1 for by in starts.values()), "a task ran on both"
        shares = Counter(next(iter(by)) for by in starts.values())
        assert set(shares) == {m.server_id for m in managers}, f"both make progress: {shares}"
        with stores[0].engine.connect() as conn:
            workers = dict(conn.execute(sa.text("SELECT id, worker FROM tasks")).all())
        assert all(workers[task_id].startswith(next(iter(by))) for task_id, by in starts.items()), "the row says who"
    finally:
        for manager in managers:
            await manager.stop()
        for store in stores:
            store.close()
    return managers


async def test_two_managers_claiming_one_queue_at_once_run_different_tasks_and_both_progress(db_url):
    """Both planning from the shared queue's head, with three owners sharing the slots: on PostgreSQL no planned
    claim is ever lost to the other (the claim plans around what the other is taking, in one transaction:
    Store.claim_planned), so neither reads the queue again for a lost claim."""
    managers = await drain_through_two_managers(db_url, lambda i: f"key:{i % 3}", 120)
    if db_url.startswith("postgresql"):
        assert [m.claims_lost for m in managers] == [0, 0]


async def test_tasks_another_server_queues_start_here_without_a_tick_and_the_kept_head_stays_when_it_can(db_url):
    """A task manager told that another server queued tasks (`queued_elsewhere`, from the relay's task.created
    events with their queue groups) keeps the head of the queue it read when it shows tasks of those groups (the
    new ones come after them), reads it again when a group is new, and starts every task either way: no
    maintenance tick runs (poll_interval), so a wake-up lost or a group left unknown stalls the drain. On PostgreSQL,
    where the queue holds one group its passes claim that group's first tasks without the head (`_single`), which
    is kept and dropped the same way."""
    postgres = db_url.startswith("postgresql")
    store = Store(db_url)
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=2, poll_interval=600, lease_seconds=120)
    base = time.time()

    def queued(n: int, owner: str | None, after: float = 0.0) -> list[Task]:
        return demo_tasks(n, owner, base + after, delay_ms=20)

    def statuses() -> Counter[str]:
        with store.engine.connect() as conn:
            return Counter(dict(conn.execute(sa.text("SELECT status, count(*) FROM tasks GROUP BY status")).all()))

    def kept() -> bool:
        if postgres:
            return manager._single is not None and manager._single[0] == (0, None)
        window = manager._window
        return window is not None and window.version == manager._queue_version and window.holds({(0, None): base + 1})

    def head() -> Any:
        return manager._single if postgres else manager._window

    try:
        await manager.start()
        await asyncio.to_thread(store.create_tasks, queued(20, None))  # fewer than a read takes: all read
        manager.queue_changed()
        window = await poll(lambda: kept() and head(), bool, timeout=30)
        await asyncio.to_thread(store.create_tasks, queued(20, None, after=1))  # by another server, in the group
        assert head() is window and kept(), "the first 20 still running: the head read is kept meanwhile"
        manager.queued_elsewhere({(0, None): base + 1})  # created after every task the head shows
        assert head() is window, "the head read stays kept: the new tasks come after it"
        await poll(lambda: asyncio.to_thread(statuses), lambda c: c["COMPLETED"] == 40, timeout=30)
        await asyncio.to_thread(store.create_tasks, queued(5, "key:new"))  # a group the head does not show
        manager.queued_elsewhere({(0, "key:new"): base})
        assert manager._window is None and manager._single is None, "a new group: the queue is read again"
        final = await poll(lambda: asyncio.to_thread(statuses), lambda c: c["COMPLETED"] == 45, timeout=30)
        assert final == {"COMPLETED": 45}
    finally:
        await manager.stop()
        store.close()


async def test_a_task_whose_create_committed_late_on_another_server_starts_before_newer_ones_of_its_group(
    db_url, monkeypatch
):
    """FIFO within (priority, owner) across servers: a server whose kept head of the queue shows tasks of a group
    is told by another server's NOTIFY (its payload: the groups of the tasks it created, with their oldest
    creation time) of a task of that group OLDER than those (its create committed late): it reads the queue
    again, and starts that task before the newer ones; told of a task newer than the head's, it keeps the head.
    Two servers on one PostgreSQL: the other one a store and relay of its own (its send's NOTIFY is real)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("the NOTIFY payload's groups: PostgreSQL only (SQLite polls the rows, read with their data)")
    monkeypatch.setattr(relay_module, "FALLBACK_POLLS", 10**6)  # no read for a lost notification: the NOTIFY says
    store = Store(db_url)
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=1, poll_interval=600, lease_seconds=120)
    told: list[relay_module.Groups] = []

    def on_remote(events: list[tuple[str, str | None]], groups: relay_module.Groups) -> None:
        if {kind for kind, _ in events} == {"task.created"}:  # as PlexusRuntime._on_remote_events
            told.append(groups)
            manager.queued_elsewhere(groups)

    def task(task_id: str, created_at: float, items: int = 1) -> Task:
        params = {"items": items, "item_delay_ms": 50}
        return Task(id=task_id, type="demo", status=TaskStatus.QUEUED, params=params, created_at=created_at)

    def statuses() -> dict[str, str]:
        with store.engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT id, status FROM tasks")).all())

    base = time.time()
    async with writer_and_reader(db_url, on_remote) as (writer, writer_bus, reader, _reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        try:
            # The only slot busy for as long as the test needs (ended by a cancel), three newer tasks queued behind:
            # the start's pass reads them all, starts the first and keeps the rest as the head of the queue.
            newer = [task(f"newer-{i}", base + 10 + i) for i in range(3)]
            await asyncio.to_thread(store.create_tasks, [task("blocker", base, items=10_000), *newer])
            await manager.start()

            def head_kept() -> QueueWindow | None:
                window = manager._window
                shows = window is not None and window.version == manager._queue_version and window.view(5)
                return window if shows and [t.id for t in shows[0]] == [t.id for t in newer] else None

            window = await poll(head_kept, bool, timeout=30)

            async def created_elsewhere(new: Task) -> None:
                """The other server's create: its row committed, then its task.created event sent (NOTIFY)."""
                await asyncio.to_thread(writer.store.create_task, new)
                writer_bus.publish("task.created", "task", new.id, new.summary())
                before = len(told)
                await poll(lambda: len(told), lambda n: n > before, timeout=20)

            await created_elsewhere(task("newest", base + 20))  # after every task the head shows: kept
            assert told[-1] == {(0, None): pytest.approx(base + 20, abs=2e-3)}
            assert manager._window is window, "a newer task of a group the head shows: the head read is kept"
            await created_elsewhere(task("late", base + 5))  # older than the head's: committed late
            assert told[-1] == {(0, None): pytest.approx(base + 5, abs=2e-3)}
            assert manager._window is not window, "a task older than the head's: the queue is read again"
            assert manager.cancel(["blocker"])[0].outcome in ("cancelled", "cancelling")
            final = await poll(
                lambda: asyncio.to_thread(statuses), lambda s: sum(v in FINAL for v in s.values()) == 6, timeout=60
            )
            assert final["blocker"] == "CANCELLED" and all(final[t] == "COMPLETED" for t in final if t != "blocker")
            with store.engine.connect() as conn:
                order = conn.execute(sa.text("SELECT id FROM tasks WHERE id <> 'blocker' ORDER BY started_at")).all()
            assert [r[0] for r in order] == ["late", "newer-0", "newer-1", "newer-2", "newest"], "by created_at"
        finally:
            await manager.stop()
            store.close()


async def test_two_managers_draining_one_groups_flood_claim_its_first_tasks_without_reading_the_queue(
    db_url, monkeypatch
):
    """One owner's flood drained by two managers at once: on PostgreSQL each knows from its first read that the
    queue holds that one group, so its passes claim the group's first free tasks in one statement
    (`Store.claim_group_head`) instead of reading the head and claiming from it: no row of the head the other took
    is read or found gone, and the queue is read only when the group runs short. Every task runs once."""
    reads: list[int] = []
    queue_window = Store.queue_window

    def counted(self: Store, **kwargs: Any) -> Any:
        reads.append(1)
        return queue_window(self, **kwargs)

    monkeypatch.setattr(Store, "queue_window", counted)
    n = 300
    managers = await drain_through_two_managers(db_url, lambda i: None, n)
    if not db_url.startswith("postgresql"):
        return
    # A first read each, and one each time a manager's claim finds the group short (the last tasks): a read per 32
    # tasks or so each before (the kept window, both managers' claims draining it).
    assert len(reads) <= 8, f"{len(reads)} reads of the queue for {n} tasks of one group"
    # Only the first passes, planned from the head both read, find tasks of it taken by the other.
    assert sum(m.claims_gone for m in managers) <= 2 * manager_module._pass_head(managers[0]._policy(), contended=True)


async def test_a_manager_that_finds_its_head_taken_looks_deeper_and_leaves_no_slot_idle(db_url):
    """Two owners' flood drained by two managers at once: their claims find tasks of the head the other took
    (`claims_gone`), and a manager that did then plans from a deeper head (`TaskManager._head`: the replan without
    what the other took still fills its slots), for CONTENDED_SECONDS; every task still runs once with no
    maintenance tick to wake a pass that left a slot free. (On SQLite a claim is a write's conditional UPDATE:
    one taken meanwhile is a lost claim, planned again, not a task found gone; the drain is the test there. One
    owner's flood on PostgreSQL is claimed without the head: the test below.)"""
    managers = await drain_through_two_managers(db_url, lambda i: f"key:{i % 2}", 300)
    if not db_url.startswith("postgresql"):
        return
    policy = managers[0]._policy()
    plain = manager_module._pass_head(policy)
    assert plain == 5  # 4 slots
    contended = [m for m in managers if m.claims_gone]
    assert contended, "two managers draining one head found none of it taken"
    for manager in contended:
        assert manager._head(policy) == 9
        manager._contended_at -= manager_module.CONTENDED_SECONDS  # no claim found the head taken since
        assert manager._head(policy) == plain


async def test_slots_left_free_by_a_short_head_are_filled_when_another_server_queues_more_of_its_group(db_url):
    """The one-group claim (`_single`, PostgreSQL) claims as many tasks as a plan of the head last read starts. A
    read that found one task makes that plan start one: when another server then queues more of the same group (the
    mode stays: `queued_elsewhere`), the slots it leaves free are filled at once all the same, with no maintenance
    tick (poll_interval), not one task a pass."""
    store = Store(db_url)
    manager = TaskManager(store, EventBus(), LocalExecutor(), max_concurrency=8, poll_interval=600, lease_seconds=120)
    base = time.time()

    def queued(n: int, after: float) -> list[Task]:
        return demo_tasks(n, None, base + after, delay_ms=20_000)

    def running() -> int:
        with store.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM tasks WHERE status = 'RUNNING'")).scalar_one())

    try:
        await manager.start()
        first = queued(1, 0)
        await asyncio.to_thread(store.create_tasks, first)
        manager.queue_changed()
        await poll(lambda: asyncio.to_thread(running), lambda n: n == 1, timeout=30)
        if db_url.startswith("postgresql"):  # what a pass keeps when its read found that one task of the group
            manager._single = ((0, None), first)
        await asyncio.to_thread(store.create_tasks, queued(20, 1))  # by another server, in the same group
        manager.queued_elsewhere({(0, None): base + 1})
        await poll(lambda: asyncio.to_thread(running), lambda n: n == 8, timeout=30)
    finally:
        await manager.stop()
        store.close()


def test_what_was_sent_without_rows_is_not_sent_again_once_a_newer_state_went_with_rows(tmp_path):
    """The resend to a new follower carries the last seconds sent without rows, but never an entity's older state
    after a newer one of it was written with rows (another follower was there meanwhile)."""
    store = Store(create_store(f"sqlite:///{tmp_path / 's.db'}"))
    relay = EventRelay(store, EventBus(), mode="poll")
    relay.server_id = "writer"
    running = Event(1, 1.0, "task.updated", "task", "t", {"status": "RUNNING"})
    other = Event(2, 1.0, "task.updated", "task", "u", {"status": "RUNNING"})
    try:
        relay._keep_recent([running, other], time.monotonic())
        relay._send([Event(3, 2.0, "task.completed", "task", "t", {"status": "COMPLETED"})])
        assert relay._with_recent([]) == [other]
        assert relay._with_recent([]) == [], "sent once"
    finally:
        store.close()


async def test_a_server_whose_listen_begins_asks_who_follows_and_hears_it_at_once(db_url, monkeypatch):
    """A follower says it follows every INTEREST_EVERY seconds; a server that starts (or whose LISTEN reconnects)
    asks, and a follower answers at once: the new server writes rows for it without waiting for its next saying."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    monkeypatch.setattr(relay_module, "INTEREST_EVERY", 600.0, raising=False)  # no renewal during the test
    stores = [Store(db_url), Store(db_url)]
    writer_bus, reader_bus = EventBus(), EventBus()
    writer = EventRelay(stores[0], writer_bus, mode="auto", interval=0.05)
    reader = EventRelay(stores[1], reader_bus, mode="auto", interval=0.05)
    subscription = reader_bus.subscribe(lambda e: e.entity_type == "task")
    loop = asyncio.get_running_loop()
    try:
        reader.start(loop, "reader")
        await poll(lambda: reader.status().get("following_said", 0), lambda n: n >= 1, timeout=20)  # said, unheard
        writer.start(loop, "writer")
        await poll(writer.followers, lambda n: n == 1, timeout=20)
        assert reader.status()["following_said"] == 2, "said again when asked"
        writer_bus.publish("task.completed", "task", "t", {"status": "COMPLETED", "type": "demo"})
        events = await asyncio.wait_for(subscription.next_batch(), 20)
        assert [(e.entity_id, e.data) for e in events] == [("t", {"status": "COMPLETED", "type": "demo"})]
        assert outbox_rows(stores[0]) == 1
    finally:
        subscription.close()
        await asyncio.to_thread(writer.stop)
        await asyncio.to_thread(reader.stop)
        for store in stores:
            store.close()


async def test_a_server_whose_listen_begins_reads_listings_and_the_queue_again(db_url):
    """Sends without rows made while a server's LISTEN was down (or before it began) were not heard and cannot be
    read: when it (re)connects, listings are read again (a sequence number taken) and the queue is read again."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    told: list[tuple[list[tuple[str, str | None]], relay_module.Groups]] = []
    store, bus = Store(db_url), EventBus()
    relay = EventRelay(
        store, bus, mode="auto", interval=0.05, on_remote=lambda events, groups: told.append((events, groups))
    )
    relay.start(asyncio.get_running_loop(), "reader")
    try:
        await poll(lambda: told, lambda t: t == [([("task.created", "QUEUED")], None)], timeout=20)
        assert bus.skipped_seq > 0
    finally:
        await asyncio.to_thread(relay.stop)
        store.close()


@pytest.mark.parametrize("how", ["poll", "auto-listen-broken"])
async def test_on_postgresql_a_server_that_polls_says_it_follows_and_hears_an_auto_servers_sends(
    db_url, quick_interest, monkeypatch, how
):
    """A server that reads rows only (`event_relay = poll` on PostgreSQL, e.g. behind PgBouncer in transaction
    mode, or `auto` whose LISTEN cannot connect) hears no NOTIFY: it always says it follows, so an `auto` server
    writes rows for it, and its listings and its queue see the other server's tasks without a subscriber."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    told: list[tuple[str, str | None]] = []
    stores = [Store(db_url), Store(db_url)]
    writer_bus, reader_bus = EventBus(), EventBus()
    writer = EventRelay(stores[0], writer_bus, mode="auto", interval=0.05)
    reader = EventRelay(
        stores[1],
        reader_bus,
        mode="poll" if how == "poll" else "auto",
        interval=0.05,
        on_remote=lambda events, groups: told.extend(events),
    )
    if how != "poll":  # its LISTEN connection fails (the store's other connections work)
        monkeypatch.setattr(reader, "_listen_dsn", lambda: "postgresql://nobody@127.0.0.1:1/none", raising=False)
    loop = asyncio.get_running_loop()
    writer.start(loop, "writer")
    reader.start(loop, "reader")
    try:
        await poll(lambda: writer.listening, bool, timeout=20)
        await poll(writer.followers, lambda n: n == 1, timeout=20)
        seq = reader_bus.last_seq
        writer_bus.publish("task.created", "task", "queued-there", {"status": "QUEUED", "type": "demo"})
        await poll(lambda: told, lambda t: ("task.created", "QUEUED") in t, timeout=20)
        assert reader_bus.last_seq > seq, "listings read again"
        assert outbox_rows(stores[0]) == 1 and writer.status()["notified_only"] == 0
    finally:
        await asyncio.to_thread(writer.stop)
        await asyncio.to_thread(reader.stop)
        for store in stores:
            store.close()


def test_the_resend_to_a_new_follower_carries_only_the_last_recent_seconds(tmp_path):
    """What was sent without rows longer than RECENT_SECONDS ago is not sent again to a follower heard later, even
    when nothing was sent since (an idle sender)."""
    store = Store(create_store(f"sqlite:///{tmp_path / 's.db'}"))
    relay = EventRelay(store, EventBus(), mode="poll")
    relay.server_id = "writer"
    old = Event(1, 1.0, "task.updated", "task", "old", {"status": "RUNNING"})
    fresh = Event(2, 2.0, "task.updated", "task", "fresh", {"status": "RUNNING"})
    try:
        at = time.monotonic()
        relay._keep_recent([old], at - relay_module.RECENT_SECONDS - 1.0)
        relay._keep_recent([fresh], at - relay_module.RECENT_SECONDS - 1.0)  # (kept: the last added)
        relay._recent[("task", "fresh")] = (at - 0.1, fresh)
        assert relay._with_recent([]) == [fresh]
    finally:
        store.close()


@pytest.mark.parametrize("sent", ["at-stop", "a-turn-before"])
async def test_the_final_states_a_stopping_server_sends_are_written_as_rows(db_url, quick_interest, monkeypatch, sent):
    """A server that stops sends its tasks' final states with rows even while nobody follows, and those it sent
    without rows in the last RECENT_SECONDS again: a follower heard only later (it cannot have those sent again:
    the sender is gone) reads them."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    gate = threading.Event()
    say = EventRelay._say_interest

    def held(self: EventRelay, at: float, stopping: bool, **how: Any) -> None:
        if self.server_id != "reader" or gate.is_set():
            say(self, at, stopping, **how)

    monkeypatch.setattr(EventRelay, "_say_interest", held)
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        await poll(lambda: reader.status()["noted"] + writer.status()["followers"], lambda n: n == 0, timeout=5)
        subscription = reader_bus.subscribe(lambda e: e.entity_id == "ended-at-stop")
        writer_bus.publish("task.failed", "task", "ended-at-stop", {"status": "FAILED", "type": "demo"})
        if sent == "a-turn-before":  # sent without rows before the stop
            await poll(lambda: writer.status()["notified_only"], lambda n: n == 1, timeout=20)
        await asyncio.to_thread(writer.stop)
        assert outbox_rows(writer.store) == 1
        gate.set()
        events = await asyncio.wait_for(subscription.next_batch(), 20)
        assert [(e.entity_id, e.data) for e in events] == [("ended-at-stop", {"status": "FAILED", "type": "demo"})]
        subscription.close()


async def test_a_listen_of_the_release_before_that_appears_is_sent_the_last_seconds_with_rows(
    db_url, quick_interest, postgres
):
    """A server of the release before that starts LISTENing is sent again, with rows, what was sent without rows
    in the last RECENT_SECONDS (as a follower heard anew), not only what is sent after it was seen."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    import psycopg

    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, _reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        writer_bus.publish("task.updated", "task", "before-the-older", {"status": "RUNNING"})
        await poll(lambda: writer.status()["notified_only"], lambda n: n >= 1, timeout=20)
        assert outbox_rows(writer.store) == 0
        dsn = writer.store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as older:
            older.execute(f"LISTEN {relay_module.CHANNEL}")
            await poll(lambda: outbox_rows(writer.store), lambda n: n == 1, timeout=20)


async def test_a_server_that_may_not_read_pg_stat_activity_writes_rows_and_keeps_sending(
    db_url, quick_interest, monkeypatch, caplog
):
    """The look for a LISTEN of the release before fails (pg_stat_activity revoked): whether one listens is not
    known, so sends write rows; the relay's turn goes on (its sends are not held back) and it warns once."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    monkeypatch.setattr(relay_module, "_PG_OLDER", "SELECT count(*) FROM plexus_no_such_view", raising=False)
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, _reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        for i in range(5):
            writer_bus.publish("task.completed", "task", f"t{i}", {"status": "COMPLETED"})
            await poll(lambda: writer.status()["sent"], lambda n, i=i: n >= i + 1, timeout=20)
        assert writer.status()["notified_only"] == 0 and outbox_rows(writer.store) >= 1
        assert writer.status()["older_listeners"] is None, "not known"
    warned = [r for r in caplog.records if "pg_stat_activity" in r.getMessage()]
    assert len(warned) == 2, "once a server"


def test_a_saying_that_a_server_follows_holds_three_relay_turns_at_least(tmp_path):
    """With a long event_relay_interval the lease of a saying is three turns at least, renewed within a third."""
    store = Store(create_store(f"sqlite:///{tmp_path / 's.db'}"))
    try:
        assert EventRelay(store, EventBus(), interval=0.25)._lease() == (10.0, 2.0)
        assert EventRelay(store, EventBus(), interval=20.0)._lease() == (60.0, 2.0)
    finally:
        store.close()


async def test_a_follower_whose_relay_thread_is_busy_still_renews_its_saying(db_url, monkeypatch):
    """A follower's relay thread busy for longer than a lease (a long store call): its LISTEN thread renews the
    saying, so the sender keeps writing rows for it."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    monkeypatch.setattr(relay_module, "INTEREST_LEASE", 4.0, raising=False)  # (renewed each second or so)
    monkeypatch.setattr(relay_module, "INTEREST_EVERY", 0.2, raising=False)
    busy, free = threading.Event(), threading.Event()
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, _writer_bus, reader, reader_bus):
        due = reader._due

        def held(at: float) -> list[Event]:
            if busy.is_set():
                free.wait(20)
            return due(at)

        monkeypatch.setattr(reader, "_due", held)
        subscription = reader_bus.subscribe(lambda e: e.entity_type == "task")
        try:
            await poll(writer.followers, lambda n: n == 1, timeout=20)
            busy.set()
            deadline = time.monotonic() + 6.0  # one and a half leases
            while time.monotonic() < deadline:
                assert writer.followers() == 1, "the lease lapsed while the follower's relay thread was busy"
                await asyncio.sleep(0.1)
        finally:
            free.set()
            subscription.close()


async def test_a_follower_whose_connection_pool_is_exhausted_still_renews_its_saying_and_hears_notifies(
    db_url, monkeypatch
):
    """Every pooled connection of the follower held elsewhere (its relay thread waits for one): its LISTEN thread
    renews its saying over the LISTEN connection, and still hears the other servers' NOTIFYs (here the writer's
    saying that it stopped following). It waited for the pool, db_pool_timeout_seconds (30 s), with neither."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    monkeypatch.setattr(relay_module, "INTEREST_LEASE", 4.0, raising=False)  # (renewed each second or so)
    monkeypatch.setattr(relay_module, "INTEREST_EVERY", 0.2, raising=False)
    held: list[sa.Connection] = []
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, reader_bus):
        following = reader_bus.subscribe(lambda e: e.entity_type == "task")
        writer_following = writer_bus.subscribe(lambda e: e.entity_type == "task")  # the reader hears its sayings
        try:
            await poll(lambda: (writer.followers(), reader.followers()), lambda n: n == (1, 1), timeout=20)
            for _ in range(reader.store.engine.pool.size()):  # the pool exhausted
                held.append(await asyncio.to_thread(reader.store.engine.connect))
            writer_following.close()  # the writer says lease 0: heard by the reader's LISTEN thread
            await poll(reader.followers, lambda n: n == 0, timeout=5)
            deadline = time.monotonic() + 6.0  # one and a half leases
            while time.monotonic() < deadline:
                assert writer.followers() == 1, "the follower's lease lapsed while its pool was exhausted"
                await asyncio.sleep(0.1)
        finally:
            for conn in held:
                conn.close()
            following.close()


async def test_a_saying_that_failed_after_it_went_out_is_ended_when_the_server_stops_following(db_url, monkeypatch):
    """A saying that this server follows whose statement failed after it reached the database (its answer lost):
    the others hold its lease all the same, so once nothing here follows, its end is said (it was taken for
    "nothing said": the others wrote rows for it a whole lease longer)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    wants, failed = threading.Event(), threading.Event()
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, _writer_bus, reader, reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        heard: list[float] = []
        hear = writer._heard_interest

        def heard_interest(payload: str) -> None:
            server, lease = json.loads(payload)
            if server == "reader":
                heard.append(lease)
            hear(payload)

        monkeypatch.setattr(writer, "_heard_interest", heard_interest)
        monkeypatch.setattr(reader, "_renew_interest", lambda *args: None)  # the relay thread's saying alone
        monkeypatch.setattr(reader_bus, "wants_remote", wants.is_set)

        def answer_lost(conn, cursor, statement, params, context, executemany):
            said = params.get("payload") if isinstance(params, dict) and "pg_notify" in statement else None
            if said is not None and json.loads(said)[1] > 0 and not failed.is_set():  # a saying that it follows
                wants.clear()  # nothing here follows any longer when it is said again
                failed.set()
                raise sa.exc.OperationalError(statement, params, Exception("injected: the answer was lost"))

        sa.event.listen(reader.store.engine, "after_cursor_execute", answer_lost)
        try:
            wants.set()
            reader._wake.set()
            await poll(failed.is_set, bool, timeout=20)
            await poll(lambda: list(heard), lambda said: said[-1:] == [0], timeout=5)
            assert heard[0] > 0, heard
            assert writer.followers() == 0
        finally:
            sa.event.remove(reader.store.engine, "after_cursor_execute", answer_lost)


async def test_a_store_outage_is_not_taken_for_a_pg_stat_activity_it_may_not_read(
    db_url, quick_interest, monkeypatch, caplog
):
    """The look for a LISTEN of the release before fails because the database is gone (here its connection ends
    under it): not known (rows, as when it may not be read), but no warning that pg_stat_activity cannot be read."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    monkeypatch.setattr(
        relay_module, "_PG_OLDER", "SELECT count(pg_terminate_backend(pg_backend_pid()))", raising=False
    )
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, _reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        await poll(lambda: writer.status()["older_listeners"], lambda older: older is None, timeout=20)
        for i in range(3):
            writer_bus.publish("task.completed", "task", f"t{i}", {"status": "COMPLETED"})
            await poll(lambda: writer.status()["sent"], lambda n, i=i: n >= i + 1, timeout=20)
        assert writer.status()["notified_only"] == 0 and outbox_rows(writer.store) >= 1
    warned = [r for r in caplog.records if "pg_stat_activity" in r.getMessage()]
    assert warned == []


def _conninfo(conn: Any) -> dict[str, str | None]:
    """A psycopg connection's libpq parameters, defaults included."""
    return {o.keyword.decode(): None if o.val is None else o.val.decode() for o in conn.pgconn.info}


async def test_the_listen_connection_has_the_pools_keepalives_a_tcp_user_timeout_and_a_statement_timeout(
    db_url, monkeypatch
):
    """The LISTEN connection, which also says this server follows, is found dead as the pool's connections are
    (the store's keepalives), and a statement sent on it when it was dropped silently ends after about 25 s
    (tcp_user_timeout), not TCP's 15 minutes of retransmissions with the saying lock held; its statements have a
    timeout of their own. It had none of them (the pool's are its connect arguments, not in the URL)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    import psycopg

    from plexus_mcp_jupyter.core.store import KEEPALIVES

    made: list[Any] = []
    connect = psycopg.connect

    def recorded(*args: Any, **kwargs: Any) -> Any:
        conn = connect(*args, **kwargs)
        if threading.current_thread().name == "plexus-event-listen":  # (not the pool's)
            made.append(conn)
        return conn

    monkeypatch.setattr(psycopg, "connect", recorded)
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, _writer_bus, reader, _reader_bus):
        await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
        listening = [_conninfo(conn) for conn in made]
    assert len(listening) == 2, listening
    for info in listening:
        assert {key: info[key] for key in KEEPALIVES} == {key: str(value) for key, value in KEEPALIVES.items()}
        assert info["tcp_user_timeout"] == str(relay_module.LISTEN_TCP_TIMEOUT_MS)
        assert f"statement_timeout={relay_module.LISTEN_STATEMENT_TIMEOUT_MS}" in (info["options"] or "")


async def test_a_saying_stuck_on_the_listen_connection_stalls_neither_the_relay_threads_sends_nor_its_last_saying(
    db_url, monkeypatch
):
    """The saying lock held (the LISTEN thread's saying on a connection dropped silently): the relay thread waits
    SAY_LOCK_WAIT for it at most, sends meanwhile (its saying asked for its next turn), and when the server stops
    says it no longer follows without the lock. It waited for the lock as long as the statement lasted (~15 minutes
    of TCP retransmissions): no sends, no reads, and the others held its lease to its end."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    monkeypatch.setattr(relay_module, "INTEREST_LEASE", 60.0, raising=False)
    monkeypatch.setattr(relay_module, "INTEREST_EVERY", 0.2, raising=False)
    async with writer_and_reader(db_url, lambda events, groups: None) as (writer, writer_bus, reader, reader_bus):
        following = reader_bus.subscribe(lambda e: e.entity_type == "task")  # the reader's sayings are due
        arriving = writer_bus.subscribe(lambda e: e.entity_id == "sent-while-stuck")
        try:
            await poll(lambda: (writer.followers(), reader.followers()), lambda n: n == (1, 1), timeout=20)
            assert await asyncio.to_thread(reader._say_lock.acquire, timeout=10)  # held by a stuck saying
            try:
                await poll(lambda: reader._say_asked, bool, timeout=20)  # a saying due waited for it, and gave up
                reader_bus.publish("task.completed", "task", "sent-while-stuck", {"status": "COMPLETED"})
                events = await asyncio.wait_for(arriving.next_batch(), 20)
                assert [e.entity_id for e in events] == ["sent-while-stuck"]
                await asyncio.to_thread(reader.stop)
                await poll(writer.followers, lambda n: n == 0, timeout=10)  # its lease: 60 s
            finally:
                reader._say_lock.release()
        finally:
            following.close()
            arriving.close()


async def test_a_first_saying_the_listen_thread_makes_as_the_server_stops_is_ended(db_url, monkeypatch):
    """The LISTEN thread partway through the first saying that this server follows as the relay thread's last turn
    comes: that turn waits for it, and says it is over. It looked without the lock, found nothing said, and ended:
    the others held the lease to its end."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    import psycopg

    store = Store(db_url)
    relay = EventRelay(store, EventBus(), mode="auto", interval=0.05)
    relay.server_id = "stopping"
    monkeypatch.setattr(relay.bus, "wants_remote", lambda: True)
    dsn = relay._listen_dsn()
    with psycopg.connect(dsn, autocommit=True) as others, psycopg.connect(dsn, autocommit=True) as listen:
        others.execute(f"LISTEN {relay_module.INTEREST_CHANNEL}")
        entered, go = threading.Event(), threading.Event()

        class Slow:
            def execute(self, *args: Any) -> Any:
                entered.set()
                go.wait(20)
                return listen.execute(*args)

        first = threading.Thread(target=relay._renew_interest, args=(Slow(),))  # the LISTEN thread's renewal
        first.start()
        try:
            assert entered.wait(20)
            relay._stop.set()
            last = threading.Thread(target=relay._say_interest, args=(time.monotonic(), True))
            last.start()
            last.join(0.5)  # it waits for the saying under way (it ended here at once)
        finally:
            go.set()
            first.join(20)
        last.join(20)
        leases = [json.loads(note.payload)[1] for note in others.notifies(timeout=2.0)]
    store.close()
    assert leases == [relay._lease()[0], 0], leases


async def test_a_psycopg_that_drops_notifies_during_a_statement_says_who_follows_on_a_pooled_connection(
    db_url, monkeypatch, caplog
):
    """psycopg before 3.2.4 drops the NOTIFYs that arrive while a statement runs on the LISTEN connection: with one
    installed (the package's floor holds only at install), the LISTEN thread warns once and asks and says on a
    pooled connection, as before."""
    if not db_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY: PostgreSQL only")
    import psycopg

    monkeypatch.setattr(psycopg, "__version__", "3.2.3")
    pooled: list[tuple[str, float]] = []

    def on_the_pool(conn, cursor, statement, params, context, executemany):
        if (
            threading.current_thread().name == "plexus-event-listen"
            and isinstance(params, dict)
            and "payload" in params
        ):
            pooled.append(tuple(json.loads(params["payload"])))

    sa.event.listen(sa.engine.Engine, "after_cursor_execute", on_the_pool)
    try:
        async with writer_and_reader(db_url, lambda events, groups: None) as (writer, _wb, reader, _rb):
            await poll(lambda: reader.listening and writer.listening, bool, timeout=20)
            await poll(lambda: sorted(pooled), lambda said: said == [("reader", -1), ("writer", -1)], timeout=20)
    finally:
        sa.event.remove(sa.engine.Engine, "after_cursor_execute", on_the_pool)
    warned = [r for r in caplog.records if "drops the NOTIFYs" in r.getMessage()]
    assert len(warned) == 2, warned  # once per relay
