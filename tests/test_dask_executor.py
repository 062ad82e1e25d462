"""The Dask executor on a real LocalCluster (processes, nannies): tasks over MCP, cancellation, a worker's death,
the scheduler unreachable at start, and the dashboard link. The cluster is started once (conftest `dask_cluster`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx2
import pytest
from distributed import Client

from plexus_mcp_jupyter.core.tasks import TaskType

from .conftest import poll, registered_task_types
from .processes import pid_alive
from .test_mcp_tools import wait_final

FINAL = ("COMPLETED", "FAILED", "CANCELLED")
STUBBORN = TaskType("stubborn", "tests.task_functions:stubborn", "ignores cancellation")
LONG_IDEMPOTENT = TaskType(
    "long_idempotent", "tests.task_functions:long_idempotent", "runs until stopped", idempotent=True
)
GPU_TASK = TaskType(
    "gpu_demo", "plexus_mcp_jupyter.core.demo:run_demo", "needs a gpu", resources={"slots": 1, "gpu": 1}
)


@pytest.fixture
def plexus_config(plexus_config, dask_cluster):
    return {
        **plexus_config,
        "executor": "dask",
        "dask_scheduler_address": dask_cluster.scheduler_address,
        "dask_message_interval": 0.05,
    }


@pytest.fixture
def cluster_client(dask_cluster):
    """The test's own client of the cluster: to find and kill a worker process, as an operator would."""
    with Client(dask_cluster.scheduler_address, set_as_default=False) as client:
        yield client


async def get_task(client, task_id: str) -> dict:
    return (await client.call_tool("get_task", {"task_id": task_id})).structured_content


async def running_on_a_worker(client, task_id: str) -> dict:
    """The task once it runs on a Dask worker and has reported progress (its worker known to the server)."""
    return await poll(
        lambda: get_task(client, task_id),
        lambda t: "dask:tcp://" in (t["worker"] or "") and t["progress"]["processed"] > 0,
        timeout=30,
    )


def worker_address(task: dict) -> str:
    return task["worker"].split("/dask:", 1)[1]


def worker_pid(cluster_client: Client, address: str) -> int:
    return int(cluster_client.run(os.getpid, workers=[address])[address])


async def test_the_demo_task_runs_to_completed_with_progress_over_mcp(mcp_client, runtime):
    assert runtime.executor.name == "dask"
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress, total, message):
        updates.append((progress, total, message))

    async with mcp_client() as client:
        result = await client.call_tool(
            "run_demo_task", {"items": 300, "item_delay_ms": 2}, progress_callback=on_progress
        )
        assert not result.is_error, result.content[0].text
        task = await wait_final(client, result.structured_content["task_id"])
    assert task["status"] == "COMPLETED", task
    assert [(s["name"], s["status"], s["processed_items"]) for s in task["stages"]] == [
        ("Setup", "COMPLETED", 3),
        ("Processing", "COMPLETED", 300),
        ("Finalizing", "COMPLETED", 2),
    ]
    assert task["output"]["items_processed"] == 300
    assert "/dask:tcp://127.0.0.1:" in task["worker"]
    assert task["dashboard_url"] is None  # only while it runs
    values = [p for p, _, _ in updates]
    assert len(values) >= 3 and values == sorted(values)
    assert any(m and m.startswith("Processing:") for _, _, m in updates)


async def test_a_running_task_names_its_worker_and_the_dashboard_which_answers(
    mcp_client, runtime, jp_fetch, dask_cluster
):
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 100_000, "item_delay_ms": 5})
        task_id = started.structured_content["task_id"]
        task = await running_on_a_worker(client, task_id)
        assert worker_address(task) in dask_cluster.scheduler_info["workers"]
        link = task["dashboard_url"]
        assert link and link.startswith("http://127.0.0.1:")
        async with httpx2.AsyncClient(timeout=10) as http:
            page = await http.get(link)
        assert page.status_code == 200 and "dask" in page.text.lower()

        health = json.loads((await jp_fetch("plexus", "api", "health")).body)
        assert health["executor"]["name"] == "dask" and health["executor"]["dashboard"] == link
        assert health["executor"]["workers"] == 2 and health["executor"]["capacity"]["slots"] == 2
        assert health["executor"]["scheduler"] == dask_cluster.scheduler_address
        await client.call_tool("cancel_tasks", {"task_ids": [task_id], "wait_seconds": 5})


async def test_the_notebook_dashboard_shows_the_executor_and_links_the_dask_dashboard(server_url, token, runtime):
    from plexus_mcp_jupyter.notebook.client import PlexusClient
    from plexus_mcp_jupyter.notebook.widgets import Dashboard

    client = await asyncio.to_thread(PlexusClient, server_url, token)  # blocking calls, to a server on this loop
    try:
        view = await asyncio.to_thread(Dashboard, client)
        link = runtime.executor.dashboard_link()
        assert link and "executor: dask" in view.header.value and f'<a href="{link}"' in view.header.value
    finally:
        await asyncio.to_thread(client.close)


async def test_cooperative_cancellation_stops_the_task_at_its_next_check_and_keeps_the_worker(
    mcp_client, runtime, cluster_client
):
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 100_000, "item_delay_ms": 5})
        task_id = started.structured_content["task_id"]
        address = worker_address(await running_on_a_worker(client, task_id))
        pid = worker_pid(cluster_client, address)
        cancelled = await client.call_tool("cancel_tasks", {"task_ids": [task_id], "wait_seconds": 5})
        assert cancelled.structured_content["results"][0]["outcome"] == "cancelled", cancelled.structured_content
        task = await get_task(client, task_id)
    assert task["status"] == "CANCELLED" and task["error_message"] == "cancelled at the task's request check"
    assert task["stages"][-1]["status"] == "CANCELLED"
    assert pid_alive(pid) and worker_pid(cluster_client, address) == pid  # a cooperative stop restarts nothing


async def test_a_task_ignoring_cancellation_is_stopped_by_restarting_its_worker(mcp_client, runtime, cluster_client):
    with registered_task_types(STUBBORN):
        task = runtime.manager.dispatch("stubborn", {})
        async with mcp_client() as client:
            await poll(lambda: get_task(client, task.id), lambda t: "dask:tcp://" in (t["worker"] or ""), timeout=30)
            address = worker_address(await get_task(client, task.id))
            pid = worker_pid(cluster_client, address)
            began = time.monotonic()
            await client.call_tool("cancel_tasks", {"task_ids": [task.id]})
            ended = await wait_final(client, task.id, timeout=30)
    assert ended["status"] == "CANCELLED"
    assert ended["error_message"] == "cancelled: the worker was stopped after the 1s grace period"
    assert time.monotonic() - began >= runtime.settings.cancel_grace_seconds
    await poll(lambda: pid_alive(pid), lambda alive: not alive, timeout=30)  # the worker running it was restarted
    await poll(lambda: len(cluster_client.scheduler_info()["workers"]), lambda n: n == 2, timeout=60)


async def test_a_worker_killed_mid_task_fails_the_task_naming_the_worker(mcp_client, runtime, cluster_client):
    async with mcp_client() as client:
        started = await client.call_tool("run_demo_task", {"items": 100_000, "item_delay_ms": 5})
        task_id = started.structured_content["task_id"]
        address = worker_address(await running_on_a_worker(client, task_id))
        os.kill(worker_pid(cluster_client, address), signal.SIGKILL)
        task = await wait_final(client, task_id, timeout=60)
    assert task["status"] == "FAILED"
    assert task["error_message"].startswith(f"the Dask worker {address} died while running the task"), task
    await poll(lambda: len(cluster_client.scheduler_info()["workers"]), lambda n: n == 2, timeout=60)


async def test_an_idempotent_task_whose_worker_died_is_queued_again_and_runs(mcp_client, runtime, cluster_client):
    with registered_task_types(LONG_IDEMPOTENT):
        task = runtime.manager.dispatch("long_idempotent", {})
        async with mcp_client() as client:
            first = await poll(
                lambda: get_task(client, task.id), lambda t: "dask:tcp://" in (t["worker"] or ""), timeout=30
            )
            os.kill(worker_pid(cluster_client, worker_address(first)), signal.SIGKILL)
            again = await poll(
                lambda: get_task(client, task.id),
                lambda t: (
                    t["status"] in FINAL or ("dask:tcp://" in (t["worker"] or "") and t["worker"] != first["worker"])
                ),
                timeout=60,
            )
            assert again["status"] == "RUNNING", again
            await client.call_tool("cancel_tasks", {"task_ids": [task.id], "wait_seconds": 5})
            ended = await wait_final(client, task.id)
    assert ended["status"] == "CANCELLED"
    await poll(lambda: len(cluster_client.scheduler_info()["workers"]), lambda n: n == 2, timeout=60)


async def test_a_batchs_ended_tasks_leave_no_key_on_the_scheduler(mcp_client, cluster_client):
    """dispatch_batch on Dask: every task COMPLETED, and once they ended the scheduler keeps none of their keys
    (the collector releases ended tasks' futures in one go, `_release_ended`)."""
    spec = {"type": "demo", "params": {"items": 1, "item_delay_ms": 0}}
    async with mcp_client() as client:
        batch = (await client.call_tool("dispatch_batch", {"tasks": [spec] * 40})).structured_content
        ended = [await wait_final(client, task_id) for task_id in batch["task_ids"]]
    assert [t["status"] for t in ended] == ["COMPLETED"] * 40
    prefixes = tuple(f"plexus-{task_id}-" for task_id in batch["task_ids"])

    def kept() -> list[str]:
        on_scheduler = cluster_client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])
        return [key for key in on_scheduler if key.startswith(prefixes)]

    await poll(kept, lambda keys: keys == [], timeout=20)


def test_resources_the_cluster_lacks_are_refused_and_its_capacity_is_its_workers(runtime):
    from plexus_mcp_jupyter.core.errors import InvalidArgument

    # Two workers declaring slots=1; the monitor refreshes the capacity every few seconds, and a test before this
    # one may have just restarted a worker (a forced stop).
    deadline = time.monotonic() + 30
    while runtime.executor.capacity().get("slots") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.executor.capacity()["slots"] == 2
    with registered_task_types(GPU_TASK), pytest.raises(InvalidArgument, match="gpu: needs 1, the executor has 0"):
        runtime.manager.dispatch("gpu_demo", {})


async def test_an_evaluation_runs_on_dask(mcp_client, runtime):
    from .test_evaluations import create, finished

    async with mcp_client() as client:
        started = await create(
            client,
            type="accuracy",
            dataset="example:sentiment",
            prediction_column="prediction",
            label_column="label",
            input_column="text",
            id_column="id",
        )
        done = await finished(client, started["evaluation_id"])
        task = await get_task(client, started["task_id"])
    assert done["status"] == "COMPLETED", done["error_message"]
    assert done["processed_items"] == done["total_items"] > 0
    assert "/dask:tcp://" in task["worker"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestSchedulerUnreachableFallsBackToLocal:
    @pytest.fixture
    def plexus_config(self, plexus_config):
        return {
            **plexus_config,
            "dask_scheduler_address": f"tcp://127.0.0.1:{free_port()}",
            "dask_connect_timeout": 1.0,
        }

    async def test_tasks_run_locally_and_health_says_why(self, mcp_client, runtime, jp_fetch, plexus_config):
        health = json.loads((await jp_fetch("plexus", "api", "health")).body)
        assert health["executor"]["name"] == "local"
        problem = health["executor"]["problem"]
        assert plexus_config["dask_scheduler_address"] in problem and "dask_fallback=local" in problem
        async with mcp_client() as client:
            started = await client.call_tool("run_demo_task", {"items": 10, "item_delay_ms": 0})
            task = await wait_final(client, started.structured_content["task_id"])
        assert task["status"] == "COMPLETED" and "dask:" not in task["worker"]


class TestSchedulerUnreachableRefused:
    @pytest.fixture
    def plexus_config(self, plexus_config):
        return {
            **plexus_config,
            "dask_scheduler_address": f"tcp://127.0.0.1:{free_port()}",
            "dask_connect_timeout": 1.0,
            "dask_fallback": "refuse",
        }

    async def test_every_route_answers_503_naming_the_scheduler(self, jp_fetch, plexus_config):
        from tornado.httpclient import HTTPClientError

        with pytest.raises(HTTPClientError) as refused:
            await jp_fetch("plexus", "api", "health")
        assert refused.value.code == 503
        message = json.loads(refused.value.response.body)["error"]["message"]
        assert plexus_config["dask_scheduler_address"] in message and "dask_fallback=refuse" in message


class TestALocalClusterOfItsOwn:
    @pytest.fixture
    def plexus_config(self, plexus_config):
        config = {k: v for k, v in plexus_config.items() if k != "dask_scheduler_address"}
        return {**config, "dask_local_workers": 1, "dask_local_memory_mb": 768, "dask_worker_resources": "gpu=1"}

    async def test_it_runs_a_task_needing_its_declared_resources_and_stops_with_the_server(
        self, runtime, mcp_client, jp_fetch
    ):
        executor = runtime.executor
        assert executor.cluster is not None
        assert executor.capacity() == {"slots": 1, "memory_mb": 768, "gpu": 1}
        health = json.loads((await jp_fetch("plexus", "api", "health")).body)["executor"]
        assert health["local_cluster"] is True and health["scheduler"].startswith("tcp://127.0.0.1:")
        async with httpx2.AsyncClient(timeout=10) as http:
            assert (await http.get(health["dashboard"])).status_code == 200
        with registered_task_types(GPU_TASK):
            task = runtime.manager.dispatch("gpu_demo", {"items": 5, "item_delay_ms": 0})
            async with mcp_client() as client:
                done = await wait_final(client, task.id)
        assert done["status"] == "COMPLETED" and done["output"]["items_processed"] == 5
        await runtime.stop()
        assert executor.cluster.status.name == "closed"
