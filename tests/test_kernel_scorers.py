"""Kernel scorers, server side: a scorer registered over the event stream scores an evaluation's chunks.

The "kernel" here is a WebSocket client in the test speaking the protocol of evaluations/kernel_scorers.py,
as the notebook client does; the evaluation runs in a real worker process that relays through the server.
"""

from __future__ import annotations

import asyncio
import json

import pandas as pd
import pytest
from sklearn.metrics import accuracy_score

from plexus_mcp_jupyter.evaluations.datasets import EXAMPLES_DIR

from .conftest import poll
from .test_evaluations import create, finished


class FakeKernel:
    """Serves scorers on an event-stream socket: answers score_request messages with `fn`."""

    def __init__(self, ws, fn, *, stop_after: int | None = None) -> None:
        self.ws, self.fn, self.stop_after = ws, fn, stop_after
        self.requests = 0
        self.messages: list[dict] = []
        self.task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                return
            message = json.loads(raw)
            self.messages.append(message)
            if message["type"] != "score_request":
                continue
            self.requests += 1
            if self.stop_after is not None and self.requests > self.stop_after:
                self.ws.close()  # the kernel goes away mid-evaluation
                return
            predictions, errors = [], []
            for text in message["inputs"]:
                try:
                    predictions.append(self.fn(text))
                    errors.append(None)
                except Exception as exc:
                    predictions.append(None)
                    errors.append(f"{type(exc).__name__}: {exc}")
            self.ws.write_message(
                json.dumps(
                    {
                        "type": "score_result",
                        "request_id": message["request_id"],
                        "predictions": predictions,
                        "explanations": None,
                        "errors": errors,
                    }
                )
            )

    async def register(self, name: str) -> dict:
        self.ws.write_message(json.dumps({"type": "register_scorer", "name": name, "batch": True}))
        return await poll(lambda: [m for m in self.messages if m["type"] in ("scorer_registered", "error")], bool)


def keyword(text: str) -> str:
    if "refund" in text.lower():
        raise ValueError("no refunds here")
    return "positive" if any(w in text.lower() for w in ("great", "love", "excellent", "good")) else "negative"


@pytest.mark.usefixtures("executor_name")  # on the local and the Dask executor
async def test_an_evaluation_with_a_kernel_scorer_is_scored_by_that_kernel(jp_ws_fetch, mcp_client, runtime):
    frame = pd.read_csv(EXAMPLES_DIR / "sentiment.csv")
    kernel = FakeKernel(await jp_ws_fetch("plexus", "api", "events", params={"ids": "none"}), keyword)
    assert (await kernel.register("keywords"))[0] == {"type": "scorer_registered", "name": "keywords"}
    async with mcp_client() as client:
        scorers = (await client.call_tool("list_scorers", {})).structured_content
        assert {"spec": "kernel:keywords", "batch": True} in scorers["kernel_scorers"]
        started = await create(
            client,
            type="accuracy",
            dataset="example:sentiment",
            label_column="label",
            scorer="kernel:keywords",
            input_column="text",
        )
        done = await finished(client, started["evaluation_id"])
    assert done["status"] == "COMPLETED", done["error_message"]
    assert kernel.requests >= 1
    ok = ~frame["text"].str.lower().str.contains("refund")
    expected = [keyword(t) for t in frame["text"][ok]]
    assert done["counts"]["score"]["errors"] == int((~ok).sum())
    assert done["metrics"]["score"]["accuracy"] == pytest.approx(accuracy_score(frame["label"][ok], expected))
    kernel.ws.close()


async def test_a_kernel_that_goes_away_fails_its_evaluation_clearly(jp_ws_fetch, mcp_client, runtime):
    kernel = FakeKernel(await jp_ws_fetch("plexus", "api", "events", params={"ids": "none"}), keyword, stop_after=1)
    await kernel.register("leaving")
    async with mcp_client() as client:
        started = await create(
            client,
            type="accuracy",
            dataset="example:fraud",
            label_column="label",
            scorer="kernel:leaving",
            input_column="text",
        )
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "FAILED" and "disconnected" in done["error_message"]
        gone = await client.call_tool(
            "create_evaluation",
            {"type": "accuracy", "dataset": "example:sentiment", "label_column": "label", "scorer": "kernel:leaving"},
        )
        assert gone.is_error and "no kernel scorer 'leaving' is registered" in gone.content[0].text


async def test_scorer_names_belong_to_one_kernel_and_bad_messages_are_answered(jp_ws_fetch, runtime):
    first = FakeKernel(await jp_ws_fetch("plexus", "api", "events", params={"ids": "none"}), keyword)
    second = FakeKernel(await jp_ws_fetch("plexus", "api", "events", params={"ids": "none"}), keyword)
    await first.register("mine")
    answer = await second.register("mine")
    assert answer[0]["type"] == "error" and "already registered by another kernel" in answer[0]["message"]
    second.ws.write_message("not json")
    second.ws.write_message(json.dumps({"type": "dance"}))
    errors = await poll(lambda: [m for m in second.messages if m["type"] == "error"], lambda e: len(e) >= 3)
    assert "JSON objects" in errors[1]["message"] and "unknown message type 'dance'" in errors[2]["message"]
    assert runtime.kernel_scorers.names() == ["mine"]
    first.ws.close()
    await poll(runtime.kernel_scorers.names, lambda names: names == [])
    second.ws.close()


def test_kernels_started_by_the_server_can_find_it(jp_serverapp, server_url, token):
    import os
    import stat

    path = os.environ["PLEXUS_MCP_CONNECTION_FILE"]
    with open(path) as handle:
        info = json.load(handle)
    assert info["url"].rstrip("/") == jp_serverapp.connection_url.rstrip("/") and info["token"] == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # only the user can read the token
    assert token not in os.environ.values()  # the path is in the environment, the token is not
