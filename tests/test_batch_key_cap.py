"""The per-key task cap (`max_tasks_per_key`) stays exact for batches that arrive together: concurrent
`dispatch_batch` calls of one key, and a batch beside `run_demo_task` calls of that key, never store more than
the cap, each refused call gets the cap's error (the cap, the key's count, how to free slots) and stores nothing.
Real Jupyter server, real HTTP, the official SDK client, a SQLite file and a PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from plexus_mcp_jupyter.core.ownership import key_owner

from .conftest import open_client

QUICK = {"type": "demo", "params": {"items": 1, "item_delay_ms": 0}}
REFUSAL = re.compile(r"this API key has (\d+) unfinished tasks( and asks for (\d+) more)?, more than the (\d+) allowed")


@pytest.fixture
def plexus_config(plexus_config, store_url) -> dict[str, Any]:
    return {**plexus_config, "db_url": store_url, "max_concurrency": 0, "max_batch_size": 1000}


@contextlib.asynccontextmanager
async def sessions_of(mcp_url: str, key: str, count: int) -> AsyncIterator[list[Any]]:
    """`count` SDK client sessions of one key, open at once (their calls reach the server concurrently)."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_client(mcp_url, key)) for _ in range(count)]


def capped(runtime, keys, cap: int) -> str:
    """Cap the keys at `cap` unfinished tasks; the owner of the operator key's tasks."""
    runtime.manager.max_unfinished_per_key = cap
    return key_owner(runtime.keys.verify(keys["operator"]).id)


def stored_of(runtime, owner: str) -> int:
    manager = runtime.manager
    return manager.store.count_tasks(manager.build_filter(owner=owner))


async def answer(client, tool: str, arguments: dict[str, Any]) -> tuple[bool, str, Any]:
    """(refused, the error's text, the structured answer) of one call."""
    result = await client.call_tool(tool, arguments)
    return result.is_error, result.content[0].text if result.content else "", result.structured_content


def check_refusals(answers: list[tuple[bool, str, Any]], sizes: list[int], cap: int, stored: int) -> None:
    """Each refused call got the cap's error naming the cap, and was refused for a reason: with what is stored
    now (nothing finishes: max_concurrency is 0), its tasks would still not fit."""
    for (refused, text, _), size in zip(answers, sizes, strict=True):
        if not refused:
            continue
        found = REFUSAL.search(text)
        assert found is not None and "max_tasks_per_key" in text and "cancel" in text, text
        assert int(found[4]) == cap and int(found[1]) + size > cap, text
        assert size == 1 or int(found[3]) == size, text
        assert stored + size > cap, (text, stored)


async def test_concurrent_batches_of_one_key_never_pass_its_cap(mcp_url, keys, runtime):
    cap, size, calls = 500, 200, 6
    owner = capped(runtime, keys, cap)
    async with sessions_of(mcp_url, keys["operator"], calls) as sessions:
        answers = await asyncio.gather(
            *(answer(session, "dispatch_batch", {"tasks": [QUICK] * size}) for session in sessions)
        )
    accepted = [content for refused, _, content in answers if not refused]
    stored = stored_of(runtime, owner)
    assert stored <= cap, f"{stored} tasks stored for a key capped at {cap}"
    assert stored == size * len(accepted) == size * (cap // size)  # the cap let in all it could, no more
    assert all(len(content["task_ids"]) == size for content in accepted)
    check_refusals(answers, [size] * calls, cap, stored)


@pytest.mark.parametrize("round_", range(3))  # a few rounds: the race this shuts was not met every time
async def test_a_batch_beside_single_calls_of_one_key_never_passes_its_cap(mcp_url, keys, runtime, round_):
    # The key holds 700 of its 1,000; then a batch of 300 and 24 run_demo_task calls arrive together: either the
    # batch fits (and no single), or singles stored before it take their slots and the batch is refused.
    cap, held, size, singles = 1000, 700, 300, 24
    owner = capped(runtime, keys, cap)
    async with sessions_of(mcp_url, keys["operator"], 4) as sessions:
        refused, text, _ = await answer(sessions[0], "dispatch_batch", {"tasks": [QUICK] * held})
        assert not refused, text
        calls = [answer(sessions[1 + i % 3], "run_demo_task", {"items": 1, "item_delay_ms": 0}) for i in range(singles)]
        calls.insert(0, answer(sessions[0], "dispatch_batch", {"tasks": [QUICK] * size}))
        answers = await asyncio.gather(*calls)
    sizes = [size if i == 0 else 1 for i in range(len(answers))]
    stored = stored_of(runtime, owner)
    assert stored <= cap, f"{stored} tasks stored for a key capped at {cap}"
    assert stored == held + sum(n for (refused, _, _), n in zip(answers, sizes, strict=True) if not refused)
    check_refusals(answers, sizes, cap, stored)


async def test_a_retry_beside_a_batch_of_one_key_is_counted_with_it(mcp_url, keys, runtime):
    # Six cancelled tasks retried while a batch of six arrives: with a cap of 10, one call is refused whole.
    cap, size = 10, 6
    owner = capped(runtime, keys, cap)
    async with sessions_of(mcp_url, keys["operator"], 2) as (a, b):
        refused, text, batch = await answer(a, "dispatch_batch", {"tasks": [QUICK] * size})
        assert not refused, text
        refused, text, _ = await answer(a, "cancel_tasks", {"batch": batch["batch_id"]})
        assert not refused, text
        answers = await asyncio.gather(
            answer(a, "retry_tasks", {"batch": batch["batch_id"]}),
            answer(b, "dispatch_batch", {"tasks": [QUICK] * size}),
        )
    manager = runtime.manager
    unfinished = manager.store.count_tasks(manager.build_filter(status=["QUEUED", "RUNNING"], owner=owner))
    assert [r for r, _, _ in answers].count(True) == 1, answers
    assert unfinished == size
    check_refusals(answers, [size, size], cap, unfinished)
    retry_refused, _, content = answers[0]
    if not retry_refused:
        assert {r["outcome"] for r in content["results"]} == {"retried"}
