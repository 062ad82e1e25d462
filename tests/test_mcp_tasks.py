"""MCP tasks over a real server and the SDK client: the 2025-11-25 experimental tasks and the 2026-07-28
`io.modelcontextprotocol/tasks` extension, both mapped onto Plexus tasks."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import anyio
import pytest
from mcp import MCPError
from mcp.client.extension import ClaimContext, ClientExtension, NotificationBinding, ResultClaim
from mcp.types import (
    CallToolRequest,
    CallToolRequestParams,
    CallToolResult,
    CancelTaskRequest,
    CancelTaskRequestParams,
    GetTaskPayloadRequest,
    GetTaskPayloadRequestParams,
    GetTaskRequest,
    GetTaskRequestParams,
    ListTasksRequest,
    PaginatedRequestParams,
    Result,
    SubscriptionsAcknowledgedNotification,
    TaskMetadata,
)
from pydantic import BaseModel, ConfigDict, TypeAdapter

from plexus_mcp_jupyter.endpoint.tasks_ext import RELATED_TASK_META, TASKS_EXTENSION

from .conftest import MODERN, poll

RAW = TypeAdapter(dict[str, Any])
TERMINAL = {"completed", "failed", "cancelled"}


async def raw_request(client, method: str, params: dict[str, Any], **opts: Any) -> dict[str, Any]:
    """Send a request through the SDK session (its envelope and headers) and return the raw result.

    The SDK client has no typed tasks/* calls, and its typed tools/call would sieve a 2025-11-25
    CreateTaskResult as a CallToolResult.
    """
    data = {"method": method, "params": params}
    client.session._stamp(data, opts)
    return await client.session._dispatcher.send_raw_request(method, data["params"], opts)


async def task_call(client, arguments: dict[str, Any], name: str = "run_demo_task") -> dict[str, Any]:
    """A 2025-11-25 task-augmented tools/call (the SDK's typed result would sieve it as a CallToolResult)."""
    params = CallToolRequestParams(name=name, arguments=arguments, task=TaskMetadata(ttl=60_000))
    request = CallToolRequest(params=params)
    return await raw_request(client, "tools/call", request.model_dump(by_alias=True, mode="json")["params"])


async def get_task(session, task_id: str) -> dict[str, Any]:
    return await session.send_request(GetTaskRequest(params=GetTaskRequestParams(task_id=task_id)), RAW)


class AnyParams(BaseModel):
    model_config = ConfigDict(extra="allow")


class StatusObserver(ClientExtension):
    """Observes 2025-11-25 `notifications/tasks/status` (not in the SDK's notification union)."""

    identifier = TASKS_EXTENSION

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def notifications(self):
        return [NotificationBinding(method="notifications/tasks/status", params_type=AnyParams, handler=self.on)]

    async def on(self, params: AnyParams) -> None:
        self.received.append(params.model_dump())


# -- 2025-11-25 --------------------------------------------------------------------------------------------


async def test_legacy_clients_see_task_capabilities_and_task_tools(mcp_client, runtime):
    async with mcp_client() as client:
        tasks = client.server_capabilities.tasks
        assert tasks is not None and tasks.list is not None and tasks.cancel is not None
        assert tasks.requests.tools.call is not None
        execution = {t.name: t.execution for t in (await client.list_tools()).tools}
        assert execution["run_demo_task"].task_support == "optional"
        assert execution["get_task"] is None  # instant tools do not run as tasks


async def test_a_task_augmented_call_returns_at_once_and_its_result_is_fetched_later_from_a_new_session(
    mcp_client, runtime
):
    async with mcp_client() as client:
        with anyio.fail_after(5):
            created = await task_call(client, {"items": 40, "item_delay_ms": 20})
        task = created["task"]
        assert task["status"] == "working" and task["ttl"] == 60_000 and task["pollInterval"] > 0  # the ttl asked
        task_id = task["taskId"]
        assert runtime.manager.get(task_id).type == "demo"  # the MCP task is the Plexus task
        got = await get_task(client.session, task_id)
        assert got["taskId"] == task_id and got["status"] in {"working", "completed"}

    async with mcp_client() as other:  # a new session: the task and its result are still there
        payload = await other.session.send_request(
            GetTaskPayloadRequest(params=GetTaskPayloadRequestParams(task_id=task_id)), RAW
        )
        result = CallToolResult.model_validate(payload)
        assert result.is_error is False
        assert result.structured_content["task_id"] == task_id
        assert result.structured_content["status"] == "COMPLETED"
        assert result.structured_content["output"]["items_processed"] == 40
        assert payload["_meta"][RELATED_TASK_META] == {"taskId": task_id}
        assert (await get_task(other.session, task_id))["status"] == "completed"


async def test_the_creating_session_is_told_each_status_change(mcp_client, runtime):
    observer = StatusObserver()
    async with mcp_client(extensions=[observer]) as client:
        task_id = (await task_call(client, {"items": 5, "item_delay_ms": 20}))["task"]["taskId"]
        await poll(lambda: [p["status"] for p in observer.received], lambda s: "completed" in s)
        assert {p["taskId"] for p in observer.received} == {task_id}
        # One notification per change of status, not one per progress step.
        statuses = [p["status"] for p in observer.received]
        assert statuses.count("completed") == 1 and len(statuses) <= 3


async def test_a_failed_task_is_failed_with_an_error_result(mcp_client, runtime):
    async with mcp_client() as client:
        task_id = (await task_call(client, {"items": 10, "fail_at": 3}))["task"]["taskId"]
        payload = await client.session.send_request(
            GetTaskPayloadRequest(params=GetTaskPayloadRequestParams(task_id=task_id)), RAW
        )
        result = CallToolResult.model_validate(payload)
        assert result.is_error is True and "item 3" in result.content[0].text
        task = await get_task(client.session, task_id)
        assert task["status"] == "failed" and "item 3" in task["statusMessage"]


async def test_tasks_cancel_stops_the_work_and_a_second_cancel_says_it_already_ended(mcp_client, runtime):
    async with mcp_client() as client:
        task_id = (await task_call(client, {"items": 1000, "item_delay_ms": 50}))["task"]["taskId"]
        await poll(lambda: runtime.manager.get(task_id).status.value, lambda s: s == "RUNNING")
        cancel = CancelTaskRequest(params=CancelTaskRequestParams(task_id=task_id))
        answer = await client.session.send_request(cancel, RAW)
        assert answer["taskId"] == task_id and answer["status"] == "cancelled"  # cancelled from the answer on
        await poll(lambda: get_task(client.session, task_id), lambda t: t["status"] == "cancelled")
        with pytest.raises(MCPError, match="already in terminal status 'cancelled'") as info:
            await client.session.send_request(cancel, RAW)
        assert info.value.error.code == -32602


async def test_tasks_list_pages_through_every_task(mcp_client, runtime):
    ids = {runtime.manager.dispatch("demo", {"items": 1, "item_delay_ms": 0}).id for _ in range(60)}
    async with mcp_client() as client:
        seen: list[str] = []
        cursor = None
        while True:
            page = await client.session.send_request(
                ListTasksRequest(params=PaginatedRequestParams(cursor=cursor) if cursor else None), RAW
            )
            seen += [t["taskId"] for t in page["tasks"]]
            cursor = page.get("nextCursor")
            if not cursor:
                break
        assert ids <= set(seen) and len(seen) == len(set(seen))


async def test_task_requests_with_bad_input_get_clear_errors(mcp_client, runtime):
    async with mcp_client() as client:
        with pytest.raises(MCPError, match="not found") as info:
            await get_task(client.session, "no-such-task")
        assert info.value.error.code == -32602
        with pytest.raises(MCPError, match="does not run as a task") as info:
            await task_call(client, {"task_id": "x"}, name="get_task")
        assert info.value.error.code == -32601
        with pytest.raises(MCPError, match="items: Input should be greater than or equal to 1"):
            await task_call(client, {"items": 0})
        with pytest.raises(MCPError, match="Method not found"):  # a 2025-11-25 client has no tasks/update
            await raw_request(client, "tasks/update", {"taskId": "x", "inputResponses": {}})
        # Nothing was half-made: the server still answers, and no task was created by the bad calls.
        assert (await client.call_tool("list_tasks", {})).structured_content["tasks"] == []


# -- 2026-07-28: the io.modelcontextprotocol/tasks extension -----------------------------------------------


class TaskHandle(Result):
    """The extension's CreateTaskResult, as a client claims it."""

    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class TasksClient(ClientExtension):
    """A client side of the extension: resolves a task handle by polling tasks/get, observes pushes."""

    identifier = TASKS_EXTENSION

    def __init__(self) -> None:
        self.handles: list[TaskHandle] = []
        self.pushed: list[dict[str, Any]] = []

    def claims(self):
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=self.resolve)]

    def notifications(self):
        return [NotificationBinding(method="notifications/tasks", params_type=AnyParams, handler=self.on_push)]

    async def on_push(self, params: AnyParams) -> None:
        self.pushed.append(params.model_dump())

    async def resolve(self, handle: TaskHandle, ctx: ClaimContext) -> CallToolResult:
        self.handles.append(handle)
        task = await poll(lambda: get_task(ctx.session, handle.task_id), lambda t: t["status"] in TERMINAL)
        return CallToolResult.model_validate(task["result"])


async def test_a_modern_client_declaring_the_extension_gets_a_task_and_its_result(mcp_client, runtime):
    tasks = TasksClient()
    async with mcp_client(MODERN, extensions=[tasks]) as client:
        result = await client.call_tool("run_demo_task", {"items": 20, "item_delay_ms": 10})
        assert len(tasks.handles) == 1  # the call was answered with a task handle, resolved by polling
        handle = tasks.handles[0]
        assert handle.status == "working" and handle.ttl_ms == 30 * 86_400_000 and handle.poll_interval_ms
        assert result.is_error is False
        assert result.structured_content["task_id"] == handle.task_id
        assert result.structured_content["output"]["items_processed"] == 20

    async with mcp_client(MODERN, extensions=[TasksClient()]) as again:  # a new client finds it by id
        task = await get_task(again.session, handle.task_id)
        assert task["status"] == "completed" and task["resultType"] == "complete"
        assert task["result"]["structuredContent"]["status"] == "COMPLETED"


async def test_a_failed_task_completes_with_an_error_result_in_the_extension(mcp_client, runtime):
    async with mcp_client(MODERN, extensions=[TasksClient()]) as client:
        result = await client.call_tool("run_demo_task", {"items": 10, "fail_at": 2})
        assert result.is_error is True and "item 2" in result.content[0].text


async def test_without_the_extension_there_is_no_task(mcp_client, runtime):
    async with mcp_client(MODERN) as client:
        result = await client.call_tool("run_demo_task", {"items": 1})
        task_id = result.structured_content["task_id"]  # the plain answer: queued, with its id
        with pytest.raises(MCPError, match=TASKS_EXTENSION) as info:
            await get_task(client.session, task_id)
        assert info.value.error.code == -32021


async def test_extension_cancel_and_update_acknowledge_and_unknown_ids_are_refused(mcp_client, runtime):
    tasks = TasksClient()
    async with mcp_client(MODERN, extensions=[tasks]) as client:
        handle = await client.session.call_tool(
            "run_demo_task", {"items": 1000, "item_delay_ms": 50}, allow_claimed=True
        )
        assert isinstance(handle, TaskHandle)
        update = await raw_request(client, "tasks/update", {"taskId": handle.task_id, "inputResponses": {}})
        assert update.get("resultType") == "complete"
        ack = await client.session.send_request(
            CancelTaskRequest(params=CancelTaskRequestParams(task_id=handle.task_id)), RAW
        )
        assert ack.get("resultType") == "complete"
        task = await poll(lambda: get_task(client.session, handle.task_id), lambda t: t["status"] in TERMINAL)
        assert task["status"] == "cancelled" and "result" not in task
        # Cancelling a task that already ended is acknowledged (cancellation is cooperative).
        again = CancelTaskRequest(params=CancelTaskRequestParams(task_id=task["taskId"]))
        assert (await client.session.send_request(again, RAW)).get("resultType") == "complete"
        with pytest.raises(MCPError, match="not found") as info:
            await get_task(client.session, "no-such-task")
        assert info.value.error.code == -32602
        with pytest.raises(MCPError, match="Method not found"):  # 2025-11-25 only
            await raw_request(client, "tasks/result", {"taskId": task["taskId"]})


async def test_listen_with_task_ids_pushes_each_status_and_the_final_result(mcp_client, runtime):
    tasks = TasksClient()
    acks: list[dict[str, Any]] = []

    async def on_message(message):
        if isinstance(message, SubscriptionsAcknowledgedNotification):
            acks.append(message.params.notifications.model_dump(by_alias=True, exclude_none=True))

    async with mcp_client(MODERN, extensions=[tasks], message_handler=on_message) as client:
        handle = await client.session.call_tool("run_demo_task", {"items": 30, "item_delay_ms": 20}, allow_claimed=True)
        # The SDK's listen() has no argument for the extension's taskIds: the request is sent raw.
        listen = {"notifications": {"taskIds": [handle.task_id, "no-such-task"]}}
        async with anyio.create_task_group() as streams:
            streams.start_soon(partial(raw_request, client, "subscriptions/listen", listen, request_id="listen-tasks"))
            ack = (await poll(lambda: acks, bool))[0]
            assert ack["taskIds"] == [handle.task_id]  # only tasks that exist are followed
            pushed = await poll(lambda: tasks.pushed, lambda p: p and p[-1]["status"] in TERMINAL)
            streams.cancel_scope.cancel()
        final = pushed[-1]
        assert final["taskId"] == handle.task_id and final["status"] == "completed"
        assert final["result"]["structuredContent"]["output"]["items_processed"] == 30


async def test_listen_follows_at_most_max_subscriptions_task_ids(mcp_client, runtime):
    """A listen stream's taskIds (each a store read) are bounded as its resources are, in the same words."""
    runtime.mcp.resource_watch.max_subscriptions = 3
    async with mcp_client(MODERN, extensions=[TasksClient()]) as client:
        listen = {"notifications": {"taskIds": [f"t{n}" for n in range(4)] + ["t0"]}}  # four, once each
        with anyio.fail_after(30), pytest.raises(MCPError) as many:
            await raw_request(client, "subscriptions/listen", listen, request_id="listen-many")
        assert many.value.error.code == -32602
        assert "this stream would follow 4 tasks (taskIds); one stream may follow at most 3 (list fewer" in (
            many.value.error.message
        )


async def test_bad_arguments_with_the_extension_are_a_tool_error_and_no_task(mcp_client, runtime):
    tasks = TasksClient()
    async with mcp_client(MODERN, extensions=[tasks]) as client:
        result = await client.call_tool("run_demo_task", {"items": 0})
        assert result.is_error and "items" in result.content[0].text and tasks.handles == []
    assert runtime.manager.list_tasks(runtime.manager.build_filter())[0] == []


async def test_an_evaluation_runs_as_an_mcp_task_and_its_result_is_the_evaluation(mcp_client, runtime):
    async with mcp_client() as client:
        created = await task_call(
            client,
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "prediction_column": "prediction",
                "label_column": "label",
            },
            name="create_evaluation",
        )
        payload = await client.session.send_request(
            GetTaskPayloadRequest(params=GetTaskPayloadRequestParams(task_id=created["task"]["taskId"])), RAW
        )
    result = CallToolResult.model_validate(payload)
    assert result.is_error is False and result.structured_content["status"] == "COMPLETED"
    assert result.structured_content["metrics"]["score"]["n"] == 200


async def test_listening_to_a_task_that_already_ended_reports_its_final_state(mcp_client, runtime):
    task = runtime.manager.dispatch("demo", {"items": 2, "item_delay_ms": 0})
    await runtime.manager.wait_final([task.id], 20)
    tasks = TasksClient()
    async with mcp_client(MODERN, extensions=[tasks]) as client, anyio.create_task_group() as streams:
        listen = {"notifications": {"taskIds": [task.id]}}
        streams.start_soon(partial(raw_request, client, "subscriptions/listen", listen, request_id="listen-ended"))
        pushed = await poll(lambda: tasks.pushed, bool)
        streams.cancel_scope.cancel()
    assert pushed[0]["taskId"] == task.id and pushed[0]["status"] == "completed"
