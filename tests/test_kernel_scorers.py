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

from plexus_mcp_jupyter.core.errors import InvalidArgument, PlexusError
from plexus_mcp_jupyter.evaluations.datasets import EXAMPLES_DIR
from plexus_mcp_jupyter.evaluations.kernel_scorers import SCORER_MESSAGES, parse_message
from plexus_mcp_jupyter.notebook.errors import PlexusInputError
from plexus_mcp_jupyter.notebook.scoring import check_scorer

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


# (what is wrong, the message, how the answer starts: the model's words, as a refused REST body says them)
BAD_MESSAGES = [
    ("a name with a space", {"type": "register_scorer", "name": "my scorer"}, "name: a scorer name is 1 to 64"),
    ("no name", {"type": "register_scorer"}, "name is required: The scorer's name"),
    ("a batch in words", {"type": "register_scorer", "name": "s", "batch": "yes"}, "batch: Input should be a valid"),
    ("a misspelt field", {"type": "register_scorer", "name": "s", "bach": 1}, "unknown field(s) ['bach']; allowed"),
    ("a result without its request", {"type": "score_result", "predictions": []}, "request_id is required"),
    ("an unknown type", {"type": "dance"}, "unknown message type 'dance'; expected one of register_scorer"),
    ("a type that is a list", {"type": ["x"] * 10_000}, "unknown message type"),
]


async def reply(ws) -> dict:
    """The next message the server sends the kernel, its greeting (hello) aside."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.read_message(), 30))
        if message["type"] != "hello":
            return message


@pytest.mark.parametrize(("what", "message", "says"), BAD_MESSAGES, ids=[b[0] for b in BAD_MESSAGES])
async def test_a_bad_scorer_message_is_answered_in_its_models_words(jp_ws_fetch, runtime, what, message, says):
    ws = await jp_ws_fetch("plexus", "api", "events", params={"ids": "none"})
    ws.write_message(json.dumps(message))
    answer = await reply(ws)
    with pytest.raises(InvalidArgument) as expected:
        parse_message(message)
    echoed = message["type"] if isinstance(message["type"], str) else None  # a client's value, echoed only short
    assert answer == {"type": "error", "message": str(expected.value), "in_reply_to": echoed}
    assert answer["message"].startswith(says), answer
    assert runtime.kernel_scorers.names() == []
    ws.close()


def test_the_notebook_refuses_a_bad_scorer_name_in_the_servers_words():
    with pytest.raises(PlexusInputError) as refused:
        check_scorer("my scorer", len, True)
    with pytest.raises(InvalidArgument) as server:
        parse_message({"type": "register_scorer", "name": "my scorer"})
    assert str(refused.value) == str(server.value)
    assert list(SCORER_MESSAGES) == ["register_scorer", "unregister_scorer", "score_result", "score_error"]


async def test_a_malformed_score_result_fails_its_request_at_once_in_the_same_words(jp_ws_fetch, runtime):
    ws = await jp_ws_fetch("plexus", "api", "events", params={"ids": "none"})
    ws.write_message(json.dumps({"type": "register_scorer", "name": "sloppy"}))
    assert (await reply(ws))["type"] == "scorer_registered"
    scoring = asyncio.ensure_future(runtime.kernel_scorers.score("sloppy", ["a", "b"]))
    request = await reply(ws)
    assert request["type"] == "score_request" and request["inputs"] == ["a", "b"]
    bad = {"type": "score_result", "request_id": request["request_id"], "predictions": "positive"}
    ws.write_message(json.dumps(bad))
    answer = await reply(ws)
    assert answer["type"] == "error" and answer["message"].startswith("predictions: Input should be a valid list")
    with pytest.raises(PlexusError) as failed:
        await asyncio.wait_for(scoring, 30)  # not the scorer's 600 s timeout
    assert str(failed.value) == f"kernel scorer 'sloppy' answered a malformed message: {answer['message']}"
    ws.close()


def test_kernels_started_by_the_server_can_find_it(jp_serverapp, server_url, token):
    import os
    import stat

    path = os.environ["PLEXUS_MCP_CONNECTION_FILE"]
    with open(path) as handle:
        info = json.load(handle)
    assert info["url"].rstrip("/") == jp_serverapp.connection_url.rstrip("/") and info["token"] == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # only the user can read the token
    assert token not in os.environ.values()  # the path is in the environment, the token is not
