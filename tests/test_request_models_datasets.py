"""Issue 17, the last arguments read by hand: the dataset endpoints' query strings, get_evaluation, the event
stream's query and the MCP prompts' arguments are request models; each refusal reads the same on every face that
takes the operation (compared whole), and the notebook builds the same models before sending."""

from __future__ import annotations

import inspect
import json
from urllib.parse import parse_qs

import pandas as pd
import pytest
from mcp.shared.exceptions import MCPError
from tornado.httpclient import HTTPClientError

from plexus_mcp_jupyter.core.demo import RunDemo
from plexus_mcp_jupyter.core.filters import EventFilter, FollowEvents
from plexus_mcp_jupyter.evaluations.requests import BeginUpload, ListDatasets, RegisterDataset, UploadPart
from plexus_mcp_jupyter.notebook import Plexus
from plexus_mcp_jupyter.notebook.errors import PlexusInputError
from plexus_mcp_jupyter.notebook.stream import EventStream

from .test_request_models import mcp_refusal
from .test_rest import call

NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', not starting with '.'"

# (what is wrong, method, path, query, body, the whole message)
BAD_DATASET_QUERIES = [
    (
        "a flag that is neither true nor false",
        "GET",
        ("datasets",),
        {"include_files": "maybe"},
        None,
        "include_files: Input should be a valid boolean, unable to interpret input (got 'maybe'); Also look for data "
        "files under the root",
    ),
    ("a misspelt flag", "GET", ("datasets",), {"include_file": "false"}, None, None),
    (
        "an unknown parameter to describe",
        "GET",
        ("datasets", "example:sentiment"),
        {"labels": "label"},
        None,
        "unknown field(s) ['labels']; allowed: ref, label_column",
    ),
    (
        "no name",
        "POST",
        ("datasets",),
        {},
        '{"records": [{"text": "a", "label": "b"}]}',
        f"name is required: The dataset's name: {NAME_RULE}",
    ),
    (
        "a hidden name",
        "POST",
        ("datasets",),
        {"name": ".hidden"},
        '{"records": [{"text": "a", "label": "b"}]}',
        f"name: invalid registered dataset name '.hidden'; use {NAME_RULE} (got '.hidden')",
    ),
    (
        "replace in words",
        "POST",
        ("datasets",),
        {"name": "fine", "replace": "perhaps"},
        '{"records": [{"text": "a", "label": "b"}]}',
        "replace: Input should be a valid boolean, unable to interpret input (got 'perhaps'); Replace a dataset of "
        "that name (its owner's or, for an admin, any)",
    ),
    (
        "a negative declared size",
        "POST",
        ("datasets", "uploads"),
        {"name": "fine", "bytes": "-1"},
        "",
        "bytes: Input should be greater than or equal to 0 (got '-1'); The frame's size in bytes, when the client "
        "knows it: checked against the quota now",
    ),
    (
        "a part in words",
        "PUT",
        ("datasets", "uploads", "0" * 32),
        {"part": "first"},
        "",
        "part: Input should be a valid integer, unable to parse string as an integer (got 'first'); The part's "
        "number: 0 first, then one more for each part",
    ),
    (
        "no part",
        "PUT",
        ("datasets", "uploads", "0" * 32),
        {},
        "",
        "part is required: The part's number: 0 first, then one more for each part",
    ),
    (
        "an unknown parameter to one evaluation",
        "GET",
        ("evaluations", "e1"),
        {"only_mismatches": "true"},
        None,
        "unknown field(s) ['only_mismatches']; allowed: evaluation_id",
    ),
]


@pytest.mark.parametrize(
    ("what", "method", "path", "query", "body", "says"), BAD_DATASET_QUERIES, ids=[b[0] for b in BAD_DATASET_QUERIES]
)
async def test_a_bad_dataset_query_is_a_400_naming_the_argument(
    jp_fetch, runtime, what, method, path, query, body, says
):
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, *path, method=method, params=query, body=body)
    assert err.value.code == 400, err.value.response.body
    message = json.loads(err.value.response.body)["error"]["message"]
    if says is None:
        assert message == "unknown field(s) ['include_file']; allowed: include_files"
    else:
        assert message == says
    assert not runtime.catalog.registered_names()  # nothing was registered
    assert not list((runtime.catalog.registered_dir / ".uploads").glob("*"))  # nor an upload begun


async def test_list_datasets_and_get_evaluation_refuse_in_the_words_of_rest(jp_fetch, mcp_client):
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, "list_datasets", {"include_files": "maybe"})
        assert over_mcp == "invalid arguments for list_datasets: " + BAD_DATASET_QUERIES[0][-1]
        long_id = "e" * 65
        with pytest.raises(HTTPClientError) as err:
            await call(jp_fetch, "evaluations", long_id)
        over_rest = json.loads(err.value.response.body)["error"]["message"]
        assert over_rest.startswith("evaluation_id: String should have at most 64 characters (got 'eeee")
        assert await mcp_refusal(client, "get_evaluation", {"evaluation_id": long_id}) == (
            "invalid arguments for get_evaluation: " + over_rest
        )
        listed = await client.call_tool("list_datasets", {"include_files": False})
        assert not listed.is_error and all(d["source"] != "file" for d in listed.structured_content["datasets"])


async def test_the_dataset_queries_round_trip_and_register_as_before(jp_fetch, runtime):
    begin = BeginUpload.parse({"name": "frame-1", "replace": True, "bytes": 10})
    assert begin.query() == {"name": "frame-1", "replace": "true", "bytes": 10}
    assert BeginUpload.from_query({k: [str(v)] for k, v in begin.query().items()}) == begin
    assert UploadPart(upload_id="u", part=0).query(exclude={"upload_id"}) == {"part": 0}
    assert ListDatasets(include_files=False).query() == {"include_files": "false"} and ListDatasets().query() == {}

    async def register(**query):
        return await jp_fetch(
            "plexus",
            "api",
            "datasets",
            method="POST",
            params=query,
            body='{"records": [{"text": "a", "label": "b"}]}',
            headers={"Content-Type": "application/json"},
        )

    registered = await register(name="frame-1")
    assert registered.code == 201 and json.loads(registered.body)["rows"] == 1
    with pytest.raises(HTTPClientError) as err:  # taken: 409 unless replace=true (yes, 1 and on read alike)
        await register(name="frame-1")
    assert err.value.code == 409
    assert (await register(name="frame-1", replace="yes")).code == 201
    _, described = await call(jp_fetch, "datasets", "registered:frame-1", params={"label_column": "text"})
    assert described["label_column"] == "text"
    _, listed = await call(jp_fetch, "datasets", params={"include_files": "0"})
    assert "registered:frame-1" in [d["ref"] for d in listed["datasets"]]


def test_the_notebook_builds_the_dataset_requests_before_sending():
    nb = Plexus()  # not connected: a refusal here never reached a server
    frame = pd.DataFrame({"text": ["a"], "label": ["b"]})
    with pytest.raises(PlexusInputError) as caught:
        nb.register_dataset("evil\x00", frame)
    assert str(caught.value) == f"name: invalid registered dataset name 'evil\\x00'; use {NAME_RULE} (got 'evil\\x00')"
    with pytest.raises(PlexusInputError, match=r"^include_files: Input should be a valid boolean"):
        nb.datasets(include_files="maybe")  # type: ignore[arg-type]
    assert RegisterDataset.parse({"name": "ok"}).query() == {"name": "ok"}


# -- the event stream's query ---------------------------------------------------------------------------------


def test_the_event_streams_query_is_one_model_read_as_sent_and_built_by_the_notebook():
    request = FollowEvents.from_query(
        {"entity_type": ["task"], "ids": ["a,b", "c"], "status": ["queued"], "type": ["demo"], "since": ["7"]}
    )
    assert request.event_filter() == EventFilter(
        frozenset({"task"}), frozenset({"a", "b", "c"}), frozenset({"QUEUED"}), frozenset({"demo"})
    )
    assert request.since == 7 and request.epoch is None
    assert FollowEvents.from_query({"token": ["secret"]}) == FollowEvents()  # Jupyter's credential: no argument
    stream = EventStream.__new__(EventStream)  # the query of a reconnection, without a socket
    stream.last_seq, stream.epoch = 12, "e-1"
    query = parse_qs(stream._query().removeprefix("?"))
    assert FollowEvents.from_query(query) == FollowEvents(since=12, epoch="e-1")


# -- the prompts' arguments ----------------------------------------------------------------------------------


async def prompt_refusal(client, name: str, arguments: dict) -> str:
    with pytest.raises(MCPError) as caught:
        await client.get_prompt(name, arguments)
    return caught.value.error.message


# (the prompt and its arguments, the tool taking the same field and its arguments)
SAME_FIELD = [
    ("watch_task", {"task_id": "t" * 65}, "get_task", {"task_id": "t" * 65}),
    ("watch_task", {}, "get_task", {}),
    (
        "evaluate_dataset",
        {"dataset": "d", "scorer": "column:p", "type": "speed"},
        "create_evaluation",
        {"type": "speed"},
    ),
    ("triage_failed_tasks", {"since": "2026" * 20}, "list_tasks", {"since": "2026" * 20}),
]


async def test_a_prompts_bad_argument_reads_as_the_same_tool_argument_does(mcp_client):
    async with mcp_client() as client:
        for prompt, arguments, tool, tool_arguments in SAME_FIELD:
            over_prompt = await prompt_refusal(client, prompt, arguments)
            over_tool = await mcp_refusal(client, tool, tool_arguments)
            assert over_prompt.removeprefix(f"invalid arguments for {prompt}: ") == over_tool.removeprefix(
                f"invalid arguments for {tool}: "
            ), (over_prompt, over_tool)
            assert over_prompt.startswith(f"invalid arguments for {prompt}: ")
        assert await prompt_refusal(client, "watch_task", {"task_id": "t", "colour": "red"}) == (
            "invalid arguments for watch_task: unknown argument(s) colour; allowed: task_id"
        )
        # an empty string is an argument left out (a prompt menu's blank field): the default, or required
        rendered = await client.get_prompt("evaluate_dataset", {"dataset": "d", "scorer": "column:p", "type": ""})
        assert "create_evaluation(type='accuracy'" in rendered.messages[0].content.text  # type: ignore[union-attr]
        assert await prompt_refusal(client, "compare_evaluations", {"baseline_id": "", "candidate_id": "e"}) == (
            "invalid arguments for compare_evaluations: baseline_id is required: The evaluation to compare against"
        )
        listed = {p.name: p for p in (await client.list_prompts()).prompts}
    assert [(a.name, a.description, a.required) for a in listed["watch_task"].arguments or []] == [
        ("task_id", "The task's id", True)
    ]


def test_run_demo_takes_the_models_fields_with_its_defaults():
    parameters = inspect.signature(Plexus.run_demo).parameters
    for name, field in RunDemo.model_fields.items():
        assert parameters[name].default == field.default
    assert list(parameters)[1:] == [*RunDemo.model_fields, "description"]
    with pytest.raises(PlexusInputError, match=r"^items: Input should be less than or equal to 1000000"):
        Plexus().run_demo(10**7)  # not connected: refused before anything is sent
