"""Listing pages served again while nothing changed (core/listing_cache.py) are never stale once a change is made
or announced: a write from any thread of this process, a write that lands while a page is read, a retention prune,
a status change, another server's change relayed as an event."""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import sqlalchemy as sa
import tornado
from tornado import httputil
from tornado.web import RequestHandler

from plexus_mcp_jupyter.core import EventBus, Store, Task, TaskManager, TaskStatus
from plexus_mcp_jupyter.core.executors import LocalExecutor
from plexus_mcp_jupyter.core.listing_cache import PageCache
from plexus_mcp_jupyter.core.manager import list_row
from plexus_mcp_jupyter.core.relay import EventRelay
from plexus_mcp_jupyter.core.requests import ListTasks
from plexus_mcp_jupyter.core.retention import RetentionPolicy
from plexus_mcp_jupyter.core.store import tasks_table

from .conftest import open_client, poll

QUICK = {"items": 1, "item_delay_ms": 0}


@asynccontextmanager
async def manager_on(db: Path, store: Store | None = None, **kw: Any) -> AsyncIterator[TaskManager]:
    store = store or Store(f"sqlite:///{db}")
    kw.setdefault("max_concurrency", 2)
    manager = TaskManager(store, EventBus(), LocalExecutor(), cancel_grace_seconds=1.0, poll_interval=0.1, **kw)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()
        store.close()


def stored_task(**kw: Any) -> Task:
    kw.setdefault("id", str(uuid.uuid4()))
    kw.setdefault("type", "demo")
    kw.setdefault("status", TaskStatus.QUEUED)
    kw.setdefault("created_at", time.time())
    return Task(**kw)


async def page(manager: TaskManager, **filters: Any) -> list[dict[str, Any]]:
    tasks, _ = await manager.alist_tasks(manager.build_filter(**filters), limit=50)
    return [t.summary() for t in tasks]


class CountingStore(Store):
    """A real store that counts its listing reads (to tell a page served again from one read again)."""

    reads = 0
    during_read: Any = None  # called on the reading thread after the rows are read, before they are returned

    def list_tasks(self, *args: Any, **kwargs: Any) -> Any:
        type(self).reads += 1
        result = super().list_tasks(*args, **kwargs)
        if self.during_read is not None:
            hook, self.during_read = self.during_read, None
            hook()
        return result


async def test_an_unchanged_listing_is_served_again_and_any_write_makes_it_read_again(tmp_path):
    store = CountingStore(f"sqlite:///{tmp_path / 'a.db'}")
    async with manager_on(tmp_path / "a.db", store) as manager:
        first = manager.dispatch("demo", QUICK)
        await manager.wait_final([first.id], 30)
        CountingStore.reads = 0
        assert [t["task_id"] for t in await page(manager)] == [first.id]
        assert [t["task_id"] for t in await page(manager)] == [first.id]
        assert CountingStore.reads == 1, "the second identical listing is served again"
        # A write from another thread that announces nothing (the REST priority path writes like this).
        other = stored_task(owner="key:abc")
        await asyncio.to_thread(store.create_task, other)
        listed = await page(manager)
        assert [t["task_id"] for t in listed] == [other.id, first.id]
        await asyncio.to_thread(store.update_queued, [other.id], priority=7)
        assert (await page(manager))[0]["priority"] == 7
        # Another filter, another viewer: another page.
        assert await page(manager, status="COMPLETED") == [listed[1]]
        assert await page(manager, viewer="key:someone-else") == [listed[1]]


async def test_a_kept_pages_rows_are_made_once_and_a_running_tasks_on_every_call(tmp_path):
    """The rows of a page served again are those made for it (the same objects), equal to the tasks' own; a
    running task's comes from memory on each call, so its progress shows while the page is kept; a write makes
    them again."""
    async with manager_on(tmp_path / "s.db", max_concurrency=1) as manager:
        request = ListTasks.parse({"limit": 10})

        async def listed() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            tasks, rows, _ = await manager.alist_rows(request, None)
            return rows, [list_row(t) for t in tasks]

        done = manager.dispatch("demo", QUICK)
        await manager.wait_final([done.id], 30)
        first, fresh = await listed()
        again, _ = await listed()
        assert first == fresh and [s["task_id"] for s in first] == [done.id]
        assert again[0] is first[0], "a kept page's rows are made once"
        running = manager.dispatch("demo", {"items": 200, "item_delay_ms": 20})
        await poll(lambda: manager.get(running.id).progress["processed"], lambda processed: processed > 0)
        second, fresh = await listed()
        assert second == fresh and [s["task_id"] for s in second] == [running.id, done.id]
        item = second[0]["progress"]["processed"]
        await poll(lambda: manager.get(running.id).progress["processed"], lambda processed: processed > item)
        third, fresh = await listed()
        assert third == fresh and third[0]["progress"]["processed"] > item  # from memory, page kept or not
        manager.cancel([running.id])
        await manager.wait_final([running.id], 30)
        last, fresh = await listed()
        assert last == fresh and last[0]["status"] == "CANCELLED"


async def test_a_write_that_lands_while_a_page_is_read_is_in_the_next_answer(tmp_path):
    store = CountingStore(f"sqlite:///{tmp_path / 'b.db'}")
    async with manager_on(tmp_path / "b.db", store, max_concurrency=0) as manager:
        task = manager.dispatch("demo", QUICK)
        written, release = threading.Event(), threading.Event()

        def write_then_wait() -> None:
            store.update_queued([task.id], priority=9)
            written.set()
            release.wait(10)

        # A slow read returns the rows from before an update; meanwhile another call reads the new ones.
        store.during_read = write_then_wait
        slow = asyncio.ensure_future(page(manager))
        assert await asyncio.to_thread(written.wait, 10)
        assert (await page(manager))[0]["priority"] == 9
        release.set()
        assert (await slow)[0]["priority"] == 0  # it began before the update: an answer of that moment
        # ... but that page must not replace the current one.
        assert (await page(manager))[0]["priority"] == 9
        assert (await page(manager))[0]["priority"] == 9


async def test_a_page_read_while_a_commit_is_under_way_is_not_kept(tmp_path):
    """A write statement runs, the page is read before its commit (SQLite WAL: the old rows), then it commits:
    the page read in between is stale and must not be served again."""
    store = CountingStore(f"sqlite:///{tmp_path / 'c.db'}")
    async with manager_on(tmp_path / "c.db", store, max_concurrency=0) as manager:
        task = manager.dispatch("demo", QUICK)
        assert (await page(manager))[0]["priority"] == 0
        written, release = threading.Event(), threading.Event()

        def slow_write() -> None:
            with store.engine.begin() as conn:
                conn.execute(sa.update(tasks_table).where(tasks_table.c.id == task.id).values(priority=5))
                written.set()
                release.wait(10)

        writer = threading.Thread(target=slow_write)
        writer.start()
        assert await asyncio.to_thread(written.wait, 10)
        assert (await page(manager))[0]["priority"] == 0  # not committed yet
        release.set()
        await asyncio.to_thread(writer.join, 10)
        assert (await page(manager))[0]["priority"] == 5


async def test_status_changes_and_retention_prunes_show_at_once(tmp_path):
    async with manager_on(tmp_path / "d.db") as manager:
        queued = await page(manager, status="QUEUED")
        task = manager.dispatch("demo", {"items": 3, "item_delay_ms": 100})
        await poll(lambda: page(manager, status="RUNNING"), lambda p: [t["task_id"] for t in p] == [task.id])
        await manager.wait_final([task.id], 30)
        # Announced: the listing says so in the next call, whatever it said before.
        assert manager.get(task.id).status is TaskStatus.COMPLETED
        assert await page(manager, status="RUNNING") == []
        completed = await page(manager, status="COMPLETED")
        assert [(t["task_id"], t["progress"]["percent"]) for t in completed] == [(task.id, 100)]
        assert queued == []
        # Pruned by retention (a delete on the pruning thread, no event): gone from the next listing.
        policy = RetentionPolicy(default_seconds=0.2)
        pruned = await asyncio.to_thread(manager.store.prune_expired, policy, time.time() + 1, 100)
        assert pruned == [task.id]
        assert await page(manager) == []


async def test_another_servers_change_is_listed_once_its_event_arrived(tmp_path):
    """Two managers on one SQLite file, each with the event relay: once this server's bus has the other's event,
    the listing has the change."""
    db = tmp_path / "e.db"
    async with manager_on(db) as here, manager_on(db) as there:
        loop = asyncio.get_running_loop()
        relays = [EventRelay(m.store, m.bus, mode="poll", interval=0.05) for m in (here, there)]
        for relay, m in zip(relays, (here, there), strict=True):
            relay.start(loop, m.server_id)
        arrived: list[str] = []
        here.bus.add_listener(lambda event: arrived.append(f"{event.entity_id} {event.data.get('status')}"))
        try:
            assert await page(here) == []
            task = there.dispatch("demo", QUICK)
            await there.wait_final([task.id], 30)
            await poll(lambda: arrived, lambda a: f"{task.id} COMPLETED" in a)
            assert [(t["task_id"], t["status"]) for t in await page(here)] == [(task.id, "COMPLETED")]
        finally:
            for relay in relays:
                await asyncio.to_thread(relay.stop)


def test_the_page_cache_keeps_only_current_values_and_at_most_its_size():
    generation = [0]
    cache: PageCache[str] = PageCache(lambda: generation[0], size=2)
    assert cache.get("a") is None
    read_at = cache.generation()
    generation[0] += 1  # a write while "a" was read
    cache.put("a", read_at, "stale")
    assert cache.get("a") is None
    read_at = cache.generation()
    for key in ("a", "b", "c"):
        cache.put(key, read_at, key.upper())
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == "C"
    generation[0] += 1
    assert cache.get("c") is None and len(cache) == 0


async def test_list_tasks_over_mcp_shows_a_new_task_and_its_end_at_once(mcp_url, token, runtime):
    async with open_client(mcp_url, token) as client:
        before = (await client.call_tool("list_tasks", {"limit": 5})).structured_content["tasks"]
        assert before == (await client.call_tool("list_tasks", {"limit": 5})).structured_content["tasks"]
        started = (await client.call_tool("run_demo_task", QUICK)).structured_content["task_id"]
        listed = (await client.call_tool("list_tasks", {"limit": 5})).structured_content["tasks"]
        assert listed[0]["task_id"] == started
        await runtime.manager.wait_final([started], 30)
        done = await client.call_tool("list_tasks", {"status": "COMPLETED", "limit": 5})
        assert done.structured_content["tasks"][0]["task_id"] == started
        assert done.structured_content["tasks"][0]["status"] == "COMPLETED"


async def test_answers_served_as_one_json_body_are_not_kept_for_replay_and_streamed_ones_are(mcp_url, token, runtime):
    store = runtime.endpoint.event_store
    async with open_client(mcp_url, token) as client:
        await client.call_tool("list_tasks", {"limit": 5})
        before = store.size
        for _ in range(5):
            assert not (await client.call_tool("list_tasks", {"limit": 5})).is_error
            assert (await client.call_tool("get_task", {"task_id": "nope"})).is_error  # an error answer too
        assert store.size == before, "a JSON body carries no event id: nothing could resume from it"
        updates: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            updates.append(progress)

        streamed = await client.call_tool("run_demo_task", QUICK, progress_callback=on_progress)
        assert not streamed.is_error and updates
        assert store.size > before, "a streamed answer stays resumable"


def test_tornado_clear_still_does_what_the_cached_date_header_does():
    """CachedDateHeader.clear replaces tornado's: it must do the same, with the Date of the current second."""
    source = inspect.getsource(RequestHandler.clear)
    body = [line.strip() for line in source.splitlines()[2:] if line.strip()]  # past the def and docstring
    assert body == [
        "self._headers = httputil.HTTPHeaders(",
        "{",
        '"Server": "TornadoServer/%s" % tornado.version,',
        '"Content-Type": "text/html; charset=UTF-8",',
        '"Date": httputil.format_timestamp(time.time()),',
        "}",
        ")",
        "self.set_default_headers()",
        "self._write_buffer: list[bytes] = []",
        "self._status_code = 200",
        "self._reason = httputil.responses[200]",
    ], "tornado changed RequestHandler.clear: update jupyter_compat.CachedDateHeader"


async def test_mcp_responses_carry_tornados_headers_with_the_current_date(mcp_url, token):
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx2.AsyncClient(timeout=30) as http:
        for auth in ({"Authorization": f"Bearer {token}"}, {}):  # an answer, and an error page (401)
            before = time.time()
            reply = await http.post(mcp_url, json=ping, headers={**headers, **auth})
            after = time.time()
            assert reply.status_code in (200, 400, 401)
            assert reply.headers["Server"] == f"TornadoServer/{tornado.version}"
            sent = email.utils.parsedate_to_datetime(reply.headers["Date"]).timestamp()
            assert int(before) <= sent <= after, reply.headers["Date"]
            assert reply.headers["Date"] == httputil.format_timestamp(sent)
            assert reply.headers["X-Content-Type-Options"] == "nosniff"
