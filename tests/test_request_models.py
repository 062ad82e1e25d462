"""One request model per operation: MCP, REST and the notebook client accept and refuse the same inputs, and
name the same field when they refuse one."""

from __future__ import annotations

import json

import pytest
from mcp.shared.exceptions import MCPError
from tornado.httpclient import HTTPClientError

from plexus_mcp_jupyter.core.requests import DispatchTask
from plexus_mcp_jupyter.evaluations.requests import CreateEvaluation
from plexus_mcp_jupyter.evaluations.scorers import SCORER_KINDS, SpecError, normalize_spec
from plexus_mcp_jupyter.notebook import Plexus
from plexus_mcp_jupyter.notebook.errors import PlexusInputError

from .test_rest import call

GOOD = {"type": "accuracy", "dataset": "example:sentiment", "prediction_column": "prediction", "label_column": "label"}

# (what is wrong, the arguments, the field the error must name)
BAD_EVALUATIONS = [
    ("an unknown type", {**GOOD, "type": "speed"}, "type"),
    ("no type", {k: v for k, v in GOOD.items() if k != "type"}, "type"),
    ("a sample of no rows", {**GOOD, "sample_n": 0}, "sample_n"),
    ("a share above one", {**GOOD, "sample_fraction": 1.5}, "sample_fraction"),
    ("too many runs", {**GOOD, "runs": 50}, "runs"),
    ("a priority beyond the bounds", {**GOOD, "priority": 5000}, "priority"),
    ("a column that is not a string", {**GOOD, "label_column": ["label"]}, "label_column"),
    ("a misspelt field", {**GOOD, "colour": "red"}, "colour"),
    ("a share given as true", {**GOOD, "sample_fraction": True}, "sample_fraction"),
    ("a priority given as false", {**GOOD, "priority": False}, "priority"),
]

BAD_DISPATCHES = [
    ("a type that is not a string", {"type": ["demo"]}, "type"),
    ("params that are not an object", {"type": "demo", "params": [1]}, "params"),
    ("a priority beyond the bounds", {"type": "demo", "priority": 10**6}, "priority"),
    ("a description too long", {"type": "demo", "description": "x" * 1001}, "description"),
    ("a misspelt field", {"type": "demo", "colour": 1}, "colour"),
    ("a priority given as true", {"type": "demo", "priority": True}, "priority"),
]


async def rest_refusal(jp_fetch, *path: str, body: dict) -> str:
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, *path, method="POST", body=body)
    assert err.value.code == 400, err.value.response.body
    return str(json.loads(err.value.response.body)["error"]["message"])


async def mcp_refusal(client, tool: str, arguments: dict) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return str(result.content[0].text)


async def test_create_evaluation_publishes_the_model_fields_as_its_input_schema(mcp_client):
    async with mcp_client() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    schema = tools["create_evaluation"].input_schema
    assert list(schema["properties"]) == list(CreateEvaluation.model_fields)
    assert schema["required"] == ["type"]
    assert schema["properties"]["type"]["enum"] == ["accuracy", "feedback", "consistency"]
    assert schema["properties"]["sample_n"]["anyOf"][0]["minimum"] == 1
    # dispatch_batch's specs are the dispatch request, bounds included
    spec = tools["dispatch_batch"].input_schema["$defs"]["DispatchTask"]
    assert set(spec["properties"]) == set(DispatchTask.model_fields)
    assert spec["properties"]["priority"]["maximum"] == 1000


@pytest.mark.parametrize(("what", "arguments", "field"), BAD_EVALUATIONS, ids=[b[0] for b in BAD_EVALUATIONS])
async def test_mcp_and_rest_refuse_a_bad_evaluation_naming_the_same_field(
    jp_fetch, mcp_client, runtime, what, arguments, field
):
    before = runtime.manager.counts()
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, "create_evaluation", arguments)
    over_rest = await rest_refusal(jp_fetch, "evaluations", body=arguments)
    assert field in over_mcp and field in over_rest, (over_mcp, over_rest)
    assert runtime.manager.counts() == before  # nothing was dispatched


@pytest.mark.parametrize(("what", "spec", "field"), BAD_DISPATCHES, ids=[b[0] for b in BAD_DISPATCHES])
async def test_rest_and_a_batch_spec_refuse_a_bad_dispatch_naming_the_same_field(
    jp_fetch, mcp_client, runtime, what, spec, field
):
    before = runtime.manager.counts()
    over_rest = await rest_refusal(jp_fetch, "tasks", body=spec)
    over_batch = await rest_refusal(jp_fetch, "tasks", body={"tasks": [spec]})
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, "dispatch_batch", {"tasks": [spec]})
    for message in (over_rest, over_batch, over_mcp):
        assert field in message, (over_rest, over_batch, over_mcp)
    # the batch is one model (DispatchBatch) on both faces: the same words, whole
    assert over_batch.startswith("unknown field(s) ['tasks[0]." if what == "a misspelt field" else "tasks[0].")
    assert over_mcp == "invalid arguments for dispatch_batch: " + over_batch
    assert runtime.manager.counts() == before


BAD_BATCHES = [
    ("no spec", {"tasks": []}, "tasks: List should have at least 1 item after validation, not 0 (got [])"),
    ("a spec that is a number", {"tasks": [{"type": "demo"}, 1]}, "tasks[1]: Input should be a valid dictionary"),
    ("specs that are not a list", {"tasks": {"type": "demo"}}, "tasks: Input should be a valid list"),
    (
        "a misspelt field in the second spec",
        {"tasks": [{"type": "demo"}, {"type": "demo", "colour": 1}]},
        "unknown field(s) ['tasks[1].colour']; allowed: type, params, priority, description",
    ),
]


@pytest.mark.parametrize(("what", "body", "says"), BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
async def test_a_bad_batch_is_refused_in_the_same_words_over_rest_mcp_and_the_notebook(
    jp_fetch, mcp_client, runtime, what, body, says
):
    before = runtime.manager.counts()
    over_rest = await rest_refusal(jp_fetch, "tasks", body=body)
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, "dispatch_batch", body)
    with pytest.raises(PlexusInputError) as over_notebook:
        Plexus().dispatch_batch(body["tasks"])  # not connected: refused before anything is sent
    assert over_rest.startswith(says), over_rest
    assert over_mcp == "invalid arguments for dispatch_batch: " + over_rest
    assert str(over_notebook.value) == over_rest
    assert runtime.manager.counts() == before


async def test_a_nested_fields_refusal_ends_with_its_own_description_on_both_faces(jp_fetch, mcp_client, runtime):
    """A bad spec's priority is told the priority's range (DispatchTask's field), not what the list of specs is."""
    body = {"tasks": [{"type": "demo"}, {"type": "demo", "priority": 5000}]}
    over_rest = await rest_refusal(jp_fetch, "tasks", body=body)
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, "dispatch_batch", body)
    described = DispatchTask.model_fields["priority"].description
    assert described and over_rest.startswith(
        "tasks[1].priority: Input should be less than or equal to 1000 (got 5000)"
    )
    assert over_rest.endswith(described) and "The task specs" not in over_rest, over_rest
    assert over_mcp == "invalid arguments for dispatch_batch: " + over_rest


async def test_a_batch_takes_nothing_beside_its_specs(jp_fetch, runtime):
    message = await rest_refusal(jp_fetch, "tasks", body={"tasks": [{"type": "demo"}], "priority": 5})
    assert message == "unknown field(s) ['priority']; allowed: tasks"


async def test_a_good_evaluation_is_accepted_alike_over_mcp_and_rest(jp_fetch, mcp_client, runtime):
    async with mcp_client() as client:
        result = await client.call_tool("create_evaluation", GOOD)
    assert not result.is_error, result.content[0].text
    code, view = await call(jp_fetch, "evaluations", method="POST", body=GOOD)
    assert code == 201
    assert view["definition"] == result.structured_content["definition"]


def test_the_notebook_client_builds_the_same_model_and_refuses_before_sending():
    nb = Plexus()  # not connected: a refusal here never reached a server
    for _what, arguments, field in BAD_EVALUATIONS:
        if field in ("colour", "type"):  # not expressible through evaluate's keyword arguments
            continue
        keywords = {
            "sample_n": "sample_n",
            "sample_fraction": "sample_fraction",
            "runs": "runs",
            "priority": "priority",
            "label_column": "label",
        }
        kwargs = {keywords[field]: arguments[field]}
        if field == "runs":
            kwargs["type"] = "consistency"
        with pytest.raises(PlexusInputError, match=field):
            nb.evaluate("example:sentiment", prediction="prediction", **kwargs)
    with pytest.raises(PlexusInputError, match="type"):
        nb.evaluate("example:sentiment", prediction="prediction", type="speed")
    with pytest.raises(PlexusInputError, match="priority"):
        nb.dispatch("demo", priority=10**6)
    # the body it would send is the model's arguments: what REST validates with the same model
    request = CreateEvaluation.parse(GOOD)
    assert CreateEvaluation.parse(request.arguments()) == request


@pytest.fixture
def plexus_config(plexus_config):
    """A server whose pages go up to 1000 (max_page_size's upper bound): no schema may say 100."""
    return {**plexus_config, "max_page_size": 1000}


async def test_every_page_bound_comes_from_max_page_size(jp_fetch, mcp_client):
    async with mcp_client() as client:
        tools = (await client.list_tools()).tools
    paged = {t.name: t.input_schema["properties"]["limit"] for t in tools if "limit" in t.input_schema["properties"]}
    assert {"list_tasks", "list_evaluations", "get_evaluation_results"} <= set(paged)
    assert {name: schema.get("maximum") for name, schema in paged.items()} == dict.fromkeys(paged, 1000)
    code, page = await call(jp_fetch, "tasks", params={"limit": "1000"})
    assert code == 200 and page["next_cursor"] is None
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, "evaluations", params={"limit": "1001"})
    assert (
        "less than or equal to 1000 (got '1001'); Page size, 1 to 1000"
        in json.loads(err.value.response.body)["error"]["message"]
    )


async def test_the_published_scorer_spec_shows_each_kind_and_the_fields_it_accepts(mcp_client):
    async with mcp_client() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    published = tools["create_evaluation"].input_schema["properties"]["scorer"]["anyOf"][0]["oneOf"]
    kinds = {shape["properties"]["kind"]["const"]: shape for shape in published if shape["type"] == "object"}
    assert tuple(kinds) == SCORER_KINDS
    samples = {
        "column": "prediction",
        "rules": [{"pattern": "good", "label": "positive"}],
        "default": None,
        "case_sensitive": False,
        "function": "pkg.mod:fn",
        "vectorized": True,
    }
    for kind, shape in kinds.items():
        spec = {"kind": kind, **{f: samples.get(f, "x") for f in shape["properties"] if f != "kind"}}
        assert normalize_spec(spec)["kind"] == kind  # every published field is accepted...
        with pytest.raises(SpecError, match="unknown field 'colour'"):
            normalize_spec({**spec, "colour": "red"})  # ...and only those
        for required in set(shape["required"]) - {"kind"}:
            with pytest.raises(SpecError, match=f"needs '{required}'"):
                normalize_spec({k: v for k, v in spec.items() if k != required})


@pytest.mark.parametrize(
    ("tool", "path", "arguments"),
    [
        ("list_tasks", ("tasks",), {}),
        ("list_evaluations", ("evaluations",), {}),
        ("get_evaluation_results", ("evaluations", "e1", "results"), {"evaluation_id": "e1"}),
    ],
)
async def test_a_limit_above_the_configured_max_is_refused_with_the_bound_on_every_face(
    jp_fetch, mcp_client, tool, path, arguments
):
    says = "limit: Input should be less than or equal to 1000 (got '1001'); Page size, 1 to 1000 (max_page_size)"
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, *path, params={"limit": "1001"})
    over_rest = json.loads(err.value.response.body)["error"]["message"]
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, tool, {**arguments, "limit": "1001"})
        uri = "plexus://" + "/".join(path) + "?limit=1001"
        with pytest.raises(MCPError) as over_resource:
            await client.read_resource(uri)
    assert err.value.code == 400 and over_rest == says
    assert over_mcp == f"invalid arguments for {tool}: {says}"
    assert over_resource.value.message == says and over_resource.value.code == -32602
