"""Issue 17's rest: scorer specs as a union of models (the published schema is theirs, the errors name the field
inside the spec), one Selection model for the bulk operations on MCP, REST, the CLI and the notebook, no PENDING
status anywhere, the CLI's local checks, and the evaluation task's params read as a model."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError
from tornado.httpclient import HTTPClientError

from plexus_mcp_jupyter import cli
from plexus_mcp_jupyter.config import PlexusSettings
from plexus_mcp_jupyter.core.demo import RunDemo
from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.core.models import TaskStatus
from plexus_mcp_jupyter.core.requests import (
    MAX_PAGE_SIZE,
    STATUS_NAMES,
    CancelTasks,
    ListTasks,
    RetryTasks,
    SetTaskPriority,
    paged,
)
from plexus_mcp_jupyter.evaluations.requests import EvaluationParams, GetEvaluationResults
from plexus_mcp_jupyter.evaluations.scorers import (
    SCORER_KINDS,
    SCORER_SPEC_SCHEMA,
    ColumnSpec,
    KernelSpec,
    PythonSpec,
    RulesSpec,
    SpecError,
    normalize_spec,
    parse_spec,
)
from plexus_mcp_jupyter.notebook import Plexus
from plexus_mcp_jupyter.notebook.errors import PlexusInputError
from plexus_mcp_jupyter.notebook.mirror import TASK_STATUSES
from plexus_mcp_jupyter.security.keys import CreateKey

from .conftest import poll
from .test_request_models import GOOD, mcp_refusal, rest_refusal
from .test_rest import call

ROOT = Path(__file__).resolve().parent.parent
DEAD_URL = "http://127.0.0.1:9/"  # nothing listens: a CLI call that reached the network would fail differently
PENDING_HINT = "expected one of QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED; a task waiting to start is QUEUED"

# -- scorer specs: one model per kind --------------------------------------------------------------------------


def test_the_published_scorer_schema_is_the_union_of_the_kind_models():
    shapes = [shape for shape in SCORER_SPEC_SCHEMA["oneOf"] if shape.get("type") == "object"]
    models = (ColumnSpec, RulesSpec, PythonSpec, KernelSpec)
    assert [shape["properties"]["kind"]["const"] for shape in shapes] == list(SCORER_KINDS)
    for shape, model in zip(shapes, models, strict=True):
        assert list(shape["properties"]) == list(model.model_fields)
        assert shape["required"] == [name for name, field in model.model_fields.items() if field.is_required()]
        assert shape["additionalProperties"] is False
    text = json.dumps(SCORER_SPEC_SCHEMA)
    assert "$ref" not in text and "$defs" not in text  # inlined: it travels inside tool and scorecard schemas
    rule = shapes[1]["properties"]["rules"]["items"]
    assert list(rule["properties"]) == ["pattern", "keywords", "label"] and rule["required"] == ["label"]
    assert "null" not in json.dumps(shapes[2]["properties"]["vectorized"])  # optional, not nullable
    assert shapes[1]["properties"]["default"]["anyOf"][1] == {"type": "null"}  # the one field that takes null
    function = shapes[2]["properties"]["function"]["pattern"]
    assert re.fullmatch(function, "pkg.mod:fn") and not re.fullmatch(function, "pkg.mod")


@pytest.mark.parametrize(
    ("spec", "message", "field"),
    [
        (
            {"kind": "rules", "rules": [{"pattern": "a", "label": "x", "weight": 2}]},
            "unknown field 'weight'; allowed: keywords, label, pattern",
            "rules[0].weight",
        ),
        (
            {"kind": "rules", "rules": ["refund"]},
            "must be a mapping with 'pattern' or 'keywords' and 'label', not 'refund'",
            "rules[0]",
        ),
        (
            {"kind": "rules", "rules": [{"pattern": None, "label": "x"}]},
            "must be a non-empty regular expression, not None",
            "rules[0].pattern",
        ),
        (
            {"kind": "rules", "rules": [{"keywords": ["a"], "label": " "}]},
            "must be a non-empty string, not ' '",
            "rules[0].label",
        ),
        (
            {"kind": "rules", "rules": [{"keywords": ["a"], "label": "x"}], "case_sensitive": "no"},
            "must be true or false, not 'no'",
            "case_sensitive",
        ),
        ({"kind": "column", "column": "p", "name": None}, "must be a non-empty string, not None", "name"),
        (
            {"kind": "column", "column": "p", "zeta": 1, "alpha": 2},
            "unknown field 'alpha' for a column scorer",
            "alpha",
        ),
        (
            {"kind": "python", "function": "not a path"},
            "'not a path' is not an import path; expected 'package.module:function'",
            "function",
        ),
        ({"kind": "kernel", "function": "f", "kernel_id": 3}, "must be a non-empty string, not 3", "kernel_id"),
        ({}, "unknown scorer kind None; expected one of column, rules, python, kernel", "kind"),
    ],
)
def test_a_bad_spec_names_the_field_inside_it_and_what_it_must_be(spec, message, field):
    with pytest.raises(SpecError) as caught:
        normalize_spec(spec)
    assert message in caught.value.detail and caught.value.field == field
    assert str(caught.value) == f"{field}: {caught.value.detail}"


def test_a_good_spec_is_normalised_as_before_and_parsed_as_its_kind():
    given = {"name": "r", "rules": [{"label": "pos", "keywords": ["good"]}], "kind": "rules", "default": None}
    normal = normalize_spec(given)
    # kind, then the given fields by name, each rule as {pattern|keywords, label}: the stored definition's form
    assert json.dumps(normal) == json.dumps(
        {"kind": "rules", "default": None, "name": "r", "rules": [{"keywords": ["good"], "label": "pos"}]}
    )
    assert normalize_spec("column:p") == {"kind": "column", "column": "p"}
    assert normalize_spec(normal) == normal
    parsed = parse_spec(given)
    assert isinstance(parsed, RulesSpec) and parsed.rules[0].regex() == "good" and parsed.case_sensitive is False
    assert isinstance(parse_spec("kernel:mine"), KernelSpec)


async def test_mcp_and_rest_refuse_a_bad_scorer_naming_the_field_inside_it(jp_fetch, mcp_client, runtime):
    arguments = {
        "type": "accuracy",
        "dataset": "example:sentiment",
        "label_column": "label",
        "scorer": {
            "kind": "rules",
            "rules": [{"pattern": "good", "label": "positive"}, {"pattern": "(", "label": "x"}],
        },
    }
    before = runtime.manager.counts()
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, "create_evaluation", arguments)
    over_rest = await rest_refusal(jp_fetch, "evaluations", body=arguments)
    for message in (over_mcp, over_rest):
        assert "rules[1].pattern: invalid regular expression '('" in message, message
    assert runtime.manager.counts() == before


# -- the selection: one model for every face of cancel, retry and re-prioritise ---------------------------------


async def test_the_bulk_tools_publish_their_request_models(mcp_client):
    async with mcp_client() as client:
        tools = {t.name: t.input_schema for t in (await client.list_tools()).tools}
    for tool, model in (
        ("cancel_tasks", CancelTasks),
        ("retry_tasks", RetryTasks),
        ("set_task_priority", SetTaskPriority),
    ):
        assert list(tools[tool]["properties"]) == list(model.model_fields), tool
    assert tools["set_task_priority"]["required"] == ["priority"]
    assert (
        "wait_seconds" in tools["cancel_tasks"]["properties"]
        and "wait_seconds" not in tools["retry_tasks"]["properties"]
    )
    assert tools["cancel_tasks"]["properties"]["status"]["anyOf"][0]["items"]["enum"] == list(STATUS_NAMES)


def run_cli(*args: str) -> int:
    return cli.main(list(args))


# (what is wrong, the request body, the CLI's arguments, what every face must say)
BAD_SELECTIONS = [
    ("a status of old", {"status": "pending"}, ["cancel", "--status", "pending"], "status[0]"),
    ("an owner too long", {"owner": "o" * 200}, ["retry", "--owner", "o" * 200], "owner"),
    ("a priority out of bounds", {"batch": "b", "priority": 5000}, ["priority", "5000", "--batch", "b"], "priority"),
]


@pytest.mark.parametrize(("what", "body", "argv", "field"), BAD_SELECTIONS, ids=[b[0] for b in BAD_SELECTIONS])
async def test_mcp_rest_and_the_cli_refuse_a_bad_selection_naming_the_same_field(
    jp_fetch, mcp_client, runtime, capsys, what, body, argv, field
):
    route = argv[0]
    tool = {"cancel": "cancel_tasks", "retry": "retry_tasks", "priority": "set_task_priority"}[route]
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, tool, body)
    over_rest = await rest_refusal(jp_fetch, "tasks", route, body=body)
    code = await asyncio.to_thread(run_cli, "tasks", *argv, "--url", DEAD_URL, "--token", "t")
    over_cli = capsys.readouterr().err
    assert code == 2 and over_cli.count("\n") == 1 and "Traceback" not in over_cli
    for message in (over_mcp, over_rest, over_cli):
        assert field in message, (over_mcp, over_rest, over_cli)
    if field == "status[0]":
        assert all(PENDING_HINT in m for m in (over_mcp, over_rest, over_cli)), (over_mcp, over_rest, over_cli)
    assert "Connection" not in over_cli  # refused before anything was sent


async def test_rest_cancel_takes_wait_seconds_as_mcp_does(jp_fetch, runtime):
    code, task = await call(
        jp_fetch, "tasks", method="POST", body={"type": "demo", "params": {"items": 2000, "item_delay_ms": 10}}
    )
    assert code == 201
    await poll(lambda: runtime.manager.get(task["task_id"]).status, lambda s: s is TaskStatus.RUNNING, timeout=60)
    code, answer = await call(
        jp_fetch, "tasks", "cancel", method="POST", body={"task_ids": task["task_id"], "wait_seconds": 20}
    )
    assert code == 200 and answer["results"][0]["outcome"] == "cancelled", answer
    assert answer["results"][0]["status"] == "CANCELLED"


def test_the_notebook_builds_the_selection_before_sending():
    nb = Plexus()  # not connected: a refusal here never reached a server
    with pytest.raises(PlexusInputError, match=r"status\[0\]: unknown status"):
        nb.cancel(status="pending")
    with pytest.raises(PlexusInputError, match=r"unknown field\(s\) \['colour'\]"):
        nb.retry(colour="red")
    with pytest.raises(PlexusInputError, match="priority"):
        nb.set_priority(10**6, batch="b")
    request = CancelTasks.parse({"status": "queued,running", "batch": "b", "dry_run": True})
    assert request.arguments() == {"status": ["QUEUED", "RUNNING"], "batch": "b", "dry_run": True}  # what is sent


async def test_the_demo_tasks_arguments_are_one_model_on_every_face(jp_fetch, mcp_client, runtime):
    before = runtime.manager.counts()
    async with mcp_client() as client:
        tools = {t.name: t.input_schema for t in (await client.list_tools()).tools}
        over_mcp = await mcp_refusal(client, "run_demo_task", {"item_delay_ms": -1})
    assert list(tools["run_demo_task"]["properties"]) == list(RunDemo.model_fields)
    assert tools["run_demo_task"]["properties"]["items"]["maximum"] == 1_000_000
    over_rest = await rest_refusal(jp_fetch, "tasks", body={"type": "demo", "params": {"item_delay_ms": -1}})
    with pytest.raises(PlexusInputError) as over_notebook:
        Plexus().run_demo(item_delay_ms=-1)  # not connected: refused before anything is sent
    assert all("item_delay_ms" in m for m in (over_mcp, over_rest, str(over_notebook.value)))
    assert "(0 to 10000)" in over_rest and "(0 to 10000)" in str(over_notebook.value)  # what is allowed
    assert runtime.manager.counts() == before


# -- no PENDING --------------------------------------------------------------------------------------------------


async def test_pending_is_no_status_and_a_client_sending_it_is_told_the_allowed_ones(jp_fetch, mcp_client):
    assert "PENDING" not in STATUS_NAMES and "PENDING" not in TASK_STATUSES
    assert list(TASK_STATUSES) == [s.value for s in TaskStatus]
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, "tasks", params={"status": "pending"})
    assert err.value.code == 400
    assert PENDING_HINT in json.loads(err.value.response.body)["error"]["message"]
    async with mcp_client() as client:
        listed = await client.call_tool("list_tasks", {"status": "PENDING"})
        tools = {t.name: t.input_schema for t in (await client.list_tools()).tools}
    assert listed.is_error and PENDING_HINT in listed.content[0].text
    assert "PENDING" not in json.dumps(tools)
    # the lab neither lists nor asks for it (source and the committed build)
    lab = [*(ROOT / "labextension" / "src").glob("*.ts"), *(ROOT / "plexus_mcp_jupyter" / "labextension").rglob("*.js")]
    assert lab and not [p.name for p in lab if "PENDING" in p.read_text(encoding="utf-8")]


# -- plexus tasks dispatch: checked here with DispatchTask --------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ([{"type": "demo", "priority": 5000}], "tasks[0].priority: Input should be less than or equal to 1000"),
        ([{"type": "demo"}, {"type": "demo", "colour": 1}], "unknown field(s) ['tasks[1].colour']; allowed: type,"),
        ([{"type": "demo"}, 1], "tasks[1]: Input should be a valid dictionary or instance of DispatchTask (got 1)"),
        ({"type": "demo"}, "must hold a non-empty list of task specs"),
        ([], "must hold a non-empty list of task specs"),
    ],
)
def test_the_cli_checks_a_batch_before_sending_it(tmp_path, capsys, content, says):
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps(content))
    code = run_cli("tasks", "dispatch", str(specs), "--url", DEAD_URL, "--token", "t")
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert err.startswith("plexus: ") and err.count("\n") == 1 and "Traceback" not in err


# -- the evaluation task's params: a model, declared once ---------------------------------------------------------


async def test_an_evaluation_tasks_params_are_its_model(jp_fetch, runtime):
    code, view = await call(jp_fetch, "evaluations", method="POST", body=GOOD)
    assert code == 201
    params = runtime.manager.get(view["task_id"]).params
    model = EvaluationParams.parse(params)
    assert model.stored() == params and model.scores[0].scorer == {"kind": "column", "column": "prediction"}
    assert "scorer_modules" not in params  # given only for an API key's evaluation
    with pytest.raises(InvalidArgument, match=r"evaluation tasks are created by create_evaluation .*scores"):
        runtime.manager.new_task("evaluation", {k: v for k, v in params.items() if k != "scores"}, internal=True)


# -- the reads: list_tasks, get_task, list_evaluations, get_evaluation_results --------------------------------------

MCP_PREFIX = "invalid arguments for {tool}: "

# (what is wrong, the MCP tool, the REST path, the arguments as a query sends them, what both must say)
BAD_READS = [
    ("an unknown task status", "list_tasks", ("tasks",), {"status": "DONE"}, "status[0]: unknown status; expected"),
    ("one bad status of two", "list_tasks", ("tasks",), {"status": "QUEUED,DONE"}, "status[1]: unknown status"),
    ("a page of none", "list_tasks", ("tasks",), {"limit": "0"}, "limit: Input should be greater than or equal to 1"),
    ("a page size in words", "list_tasks", ("tasks",), {"limit": "ten"}, "limit: Input should be a valid integer"),
    ("a misspelt filter", "list_tasks", ("tasks",), {"colour": "red"}, "colour"),
    (
        "an unknown evaluation type",
        "list_evaluations",
        ("evaluations",),
        {"type": "speed"},
        "type[0]: unknown evaluation",
    ),
    (
        "an unknown evaluation status",
        "list_evaluations",
        ("evaluations",),
        {"status": "accuracy"},
        "status[0]: unknown evaluation status; expected one of SETUP, RUNNING, COMPLETED, FAILED, CANCELLED",
    ),
    (
        "a flag that is neither true nor false",
        "get_evaluation_results",
        ("evaluations", "e1", "results"),
        {"evaluation_id": "e1", "only_mismatches": "maybe"},
        "only_mismatches: Input should be a valid boolean",
    ),
    (
        "history samples beyond the bound",
        "get_task",
        ("tasks", "t1"),
        {"task_id": "t1", "history": "true", "history_limit": "5000"},
        "history_limit: Input should be less than or equal to 1000 (got '5000'); Most recent samples to include",
    ),
]


@pytest.mark.parametrize(("what", "tool", "path", "arguments", "says"), BAD_READS, ids=[b[0] for b in BAD_READS])
async def test_a_bad_query_argument_gets_the_same_words_over_rest_and_mcp(
    jp_fetch, mcp_client, what, tool, path, arguments, says
):
    query = {k: v for k, v in arguments.items() if k not in ("task_id", "evaluation_id")}  # those are in the path
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, *path, params=query)
    assert err.value.code == 400, err.value.response.body
    over_rest = json.loads(err.value.response.body)["error"]["message"]
    async with mcp_client() as client:
        over_mcp = await mcp_refusal(client, tool, arguments)  # the values as text, as a query string has them
    assert says in over_rest, over_rest
    if what == "a misspelt filter":  # MCP refuses an unknown argument before the model sees it, in its own words
        assert "unknown argument(s) colour" in over_mcp and "unknown field(s) ['colour']" in over_rest
        return
    assert over_mcp == MCP_PREFIX.format(tool=tool) + over_rest


async def test_one_status_a_comma_separated_list_or_repeated_ones_are_accepted_alike(jp_fetch, mcp_client, runtime):
    slow = {"type": "demo", "params": {"items": 2000, "item_delay_ms": 50}}  # unfinished for the whole test
    cancelled = (await call(jp_fetch, "tasks", method="POST", body=slow))[1]["task_id"]
    await call(jp_fetch, "tasks", "cancel", method="POST", body={"task_ids": [cancelled]})
    await poll(lambda: runtime.manager.get(cancelled).status, lambda s: s is TaskStatus.CANCELLED, timeout=60)
    unfinished = (await call(jp_fetch, "tasks", method="POST", body=slow))[1]["task_id"]

    async def over_rest(query):
        return [t["task_id"] for t in (await call(jp_fetch, "tasks", params=query))[1]["tasks"]]

    async with mcp_client() as client:

        async def over_mcp(arguments):
            result = await client.call_tool("list_tasks", arguments)
            assert not result.is_error, result.content[0].text
            return [t["task_id"] for t in result.structured_content["tasks"]]

        assert await over_mcp({"status": "cancelled"}) == await over_rest({"status": "cancelled"}) == [cancelled]
        both = [unfinished, cancelled]  # newest first
        assert await over_mcp({"status": "QUEUED,RUNNING,CANCELLED"}) == both
        assert await over_mcp({"status": ["QUEUED", "RUNNING", "CANCELLED"]}) == both
        assert await over_rest({"status": "QUEUED,RUNNING,CANCELLED"}) == both
        assert await over_rest([("status", "QUEUED,RUNNING"), ("status", "CANCELLED")]) == both  # repeated
        assert await over_rest([("status", "CANCELLED"), ("type", "demo"), ("limit", "1")]) == [cancelled]
    await call(jp_fetch, "tasks", "cancel", method="POST", body={"task_ids": [unfinished]})


def test_the_notebook_and_the_cli_build_the_read_requests_before_sending(capsys):
    nb = Plexus()  # not connected: a refusal here never reached a server
    with pytest.raises(PlexusInputError, match=r"status\[0\]: unknown status; expected one of QUEUED"):
        nb.tasks(status="DONE")
    with pytest.raises(PlexusInputError, match=r"type\[0\]: unknown evaluation type 'speed'"):
        nb.evaluations(type="speed")
    request = ListTasks.parse({"status": "queued, running", "type": "demo"})
    assert request.query() == {"status": ["QUEUED", "RUNNING"], "type": ["demo"]}  # sent as repeated parameters
    assert ListTasks.from_query({"status": ["QUEUED", "RUNNING"], "type": ["demo"]}) == request  # read back alike
    results = GetEvaluationResults.parse({"evaluation_id": "e", "only_mismatches": True, "label": "pos"})
    assert results.query(exclude={"evaluation_id"}) == {"only_mismatches": "true", "label": "pos"}
    code = run_cli("evaluations", "export", "e" * 65, "--url", DEAD_URL, "--token", "t")
    err = capsys.readouterr().err
    assert code == 2 and "evaluation_id: String should have at most 64 characters" in err and "Connection" not in err


def test_a_listings_page_bound_is_its_servers_and_one_class_per_bound():
    assert paged(ListTasks, 50) is paged(ListTasks, 50)
    bounded = paged(ListTasks, 7)
    assert list(bounded.model_fields) == list(ListTasks.model_fields)  # the same fields, in the same order
    assert bounded.model_json_schema()["properties"]["limit"]["maximum"] == 7
    assert bounded().limit == 7  # the default page (20) within the bound
    with pytest.raises(InvalidArgument, match=r"limit: Input should be less than or equal to 7 \(got '8'\)"):
        bounded.from_query({"limit": ["8"]})
    with pytest.raises(ValueError, match="1 to 1000"):
        paged(ListTasks, 5000)
    assert PlexusSettings.class_traits()["max_page_size"].max == MAX_PAGE_SIZE  # the setting's bound is the models'
    assert ListTasks.model_json_schema()["properties"]["limit"]["maximum"] == MAX_PAGE_SIZE


# -- the keys body: CreateKey, on REST and in `plexus keys create` --------------------------------------------------

# (what is wrong, the body, the CLI's arguments, what both must say)
BAD_KEYS = [
    ("no name", {"role": "viewer"}, None, "name is required: Who or what uses it"),
    ("a blank name", {"name": "  "}, ["  "], "name: String should have at least 1 character"),
    ("a name too long", {"name": "n" * 101}, ["n" * 101], "name: String should have at most 100 characters"),
    ("an unknown role", {"name": "a", "role": "boss"}, None, "role: unknown role 'boss'; expected one of viewer"),
    ("a misspelt field", {"name": "a", "scope": "all"}, None, "unknown field(s) ['scope']; allowed: name, role"),
    (
        "an expiry of no days",
        {"name": "a", "expires_in_days": 0},
        ["a", "--expires-in-days", "0"],
        "expires_in_days: Input should be greater than 0",
    ),
    ("an expiry given as true", {"name": "a", "expires_in_days": True}, None, "expires_in_days: must be a number"),
    (
        "a rate beyond the bound",
        {"name": "a", "rate_limit": 20000},
        ["a", "--rate-limit", "20000"],
        "rate_limit: Input should be less than or equal to 10000",
    ),
]


@pytest.mark.parametrize(("what", "body", "argv", "says"), BAD_KEYS, ids=[b[0] for b in BAD_KEYS])
async def test_a_bad_key_body_is_refused_naming_the_field_on_rest_and_in_the_cli(
    jp_fetch, runtime, tmp_path, capsys, what, body, argv, says
):
    before = len(runtime.keys.list(include_revoked=True))
    over_rest = await rest_refusal(jp_fetch, "keys", body=body)
    assert says in over_rest, over_rest
    assert len(runtime.keys.list(include_revoked=True)) == before  # nothing was created
    if argv is not None:
        store = tmp_path / "cli-store.db"
        code = await asyncio.to_thread(run_cli, "keys", "create", *argv, "--db-url", f"sqlite:///{store}")
        over_cli = capsys.readouterr().err
        assert code == 2 and says in over_cli and over_cli.count("\n") == 1, over_cli
        assert not store.exists()  # refused before the store was opened


async def test_a_good_key_body_is_the_model_on_both_faces(jp_fetch, runtime, tmp_path, capsys):
    body = {"name": "  assistant  ", "role": "OPERATOR", "expires_in_days": 30, "rate_limit": 5}
    code, key = await call(jp_fetch, "keys", method="POST", body=body)
    assert code == 201 and key["name"] == "assistant" and key["role"] == "operator" and key["rate_limit"] == 5
    assert key["secret"].startswith("plx_") and CreateKey.parse(body).name == "assistant"
    store = tmp_path / "cli-store.db"
    argv = ["keys", "create", "assistant", "--role", "operator", "--expires-in-days", "30", "--rate-limit", "5"]
    assert await asyncio.to_thread(run_cli, *argv, "--db-url", f"sqlite:///{store}") == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in ("name", "role", "rate_limit")} == {
        k: key[k] for k in ("name", "role", "rate_limit")
    }


# -- the audit log's query: QueryAudit, on REST, the resource and `plexus audit export` -----------------------------


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({"outcome": "maybe"}, "outcome: unknown outcome; expected one of ok, error, denied (got 'maybe')"),
        (
            {"limit": "1001"},
            "limit: Input should be less than or equal to 1000 (got '1001'); Records per page, 1 to 1000",
        ),
        ({"actor": "me"}, "unknown field(s) ['actor']; allowed: action, outcome, owner, since, limit, cursor"),
    ],
)
async def test_the_audit_query_is_one_model_on_rest_and_its_resource(jp_fetch, mcp_client, query, says):
    with pytest.raises(HTTPClientError) as err:
        await call(jp_fetch, "audit", params=query)
    assert err.value.code == 400
    assert json.loads(err.value.response.body)["error"]["message"] == says
    if "actor" not in query:  # the SDK reads a template's variables only (it leaves an unknown one out)
        async with mcp_client() as client:
            with pytest.raises(MCPError) as over_resource:
                await client.read_resource("plexus://audit?" + "&".join(f"{k}={v}" for k, v in query.items()))
        assert over_resource.value.message == says
    code, page = await call(jp_fetch, "audit", params={"outcome": "ok", "limit": "2"})
    assert code == 200 and len(page["records"]) <= 2 and {r["outcome"] for r in page["records"]} <= {"ok"}
