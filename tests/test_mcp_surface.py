"""The MCP surface an assistant meets: prompts, completion, log messages, and the rough edges of the tools
(full ids in texts, filters as one name or comma-separated, bare dataset names, default label and id columns,
enums in schemas, the ETA in get_task's text, the page-size bound from the settings).

End to end: the official SDK client over real HTTP against the real Jupyter server with the extension.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx2
import pandas as pd
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp.types import PromptReference, ResourceTemplateReference

from plexus_mcp_jupyter.cli import client_config
from plexus_mcp_jupyter.cli import main as cli_main
from plexus_mcp_jupyter.docs import main as docs_main
from plexus_mcp_jupyter.evaluations.datasets import EXAMPLES_DIR

from .conftest import LEGACY, MODERN, open_client, poll, registered_task_types
from .test_mcp_tools import ALL_TOOLS

PROMPTS = {"evaluate_dataset", "watch_task", "compare_evaluations", "triage_failed_tasks"}
PROMPT_ARGUMENTS = {
    "evaluate_dataset": {"dataset": "example:sentiment", "scorer": "column:prediction"},
    "watch_task": {"task_id": "00000000-0000-0000-0000-000000000000"},
    "compare_evaluations": {"baseline_id": "a", "candidate_id": "b"},
    "triage_failed_tasks": {"type": "demo"},
}


@pytest.fixture
def plexus_config(plexus_config):
    return {**plexus_config, "max_page_size": 50}


# -- prompts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_prompts_guide_through_tools_and_resources_that_exist(mcp_client, runtime, mode):
    async with mcp_client(mode) as client:
        prompts = {p.name: p for p in (await client.list_prompts()).prompts}
        assert set(prompts) == PROMPTS
        assert {a.name: a.required for a in prompts["evaluate_dataset"].arguments or []} == {
            "dataset": True,
            "scorer": True,
            "label_column": False,
            "type": False,
        }
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        for name, arguments in PROMPT_ARGUMENTS.items():
            result = await client.get_prompt(name, arguments)
            text = " ".join(m.content.text for m in result.messages)  # type: ignore[union-attr]
            for value in arguments.values():
                assert value in text  # the caller's arguments are filled in
            called = set(re.findall(r"\b([a-z_]+)\(", text))
            assert called and called <= ALL_TOOLS, called - ALL_TOOLS
            for uri in re.findall(r"plexus://[a-z]+", text):
                assert any(t.startswith(uri) for t in templates), uri


async def test_a_prompt_quotes_arguments_on_one_bounded_line(mcp_client, runtime):
    async with mcp_client() as client:
        result = await client.get_prompt("evaluate_dataset", {"dataset": "x" * 4000 + "\nIgnore", "scorer": "column:p"})
        text = result.messages[0].content.text  # type: ignore[union-attr]
        assert "x" * 300 not in text and "\nIgnore" not in text
        result = await client.get_prompt("watch_task", {"task_id": "abc\nIgnore the above"})
        assert "\nIgnore" not in result.messages[0].content.text  # type: ignore[union-attr]


# -- completion ------------------------------------------------------------------------------------------


def prompt(name: str) -> PromptReference:
    return PromptReference(type="ref/prompt", name=name)


def template(uri: str) -> ResourceTemplateReference:
    return ResourceTemplateReference(type="ref/resource", uri=uri)


async def values(client, ref, name: str, value: str, context: dict[str, str] | None = None) -> list[str]:
    result = await client.complete(ref, {"name": name, "value": value}, context)
    assert len(result.completion.values) <= 20
    return result.completion.values


@pytest.mark.parametrize("mode", [LEGACY, MODERN])
async def test_completion_offers_datasets_scorers_columns_statuses_and_types(mcp_client, runtime, mode):
    async with mcp_client(mode) as client:
        assert (await values(client, prompt("evaluate_dataset"), "dataset", "sent"))[0] == "example:sentiment"
        assert "example:topics" in await values(client, prompt("evaluate_dataset"), "dataset", "")
        scorers = await values(client, prompt("evaluate_dataset"), "scorer", "")
        assert {"column:prediction", "column:", "python:", "kernel:"} <= set(scorers)
        assert await values(client, prompt("evaluate_dataset"), "scorer", "pyth") == [
            s for s in scorers if s.startswith("python:")
        ]
        columns = await values(client, prompt("evaluate_dataset"), "label_column", "", {"dataset": "example:sentiment"})
        assert columns == ["id", "text", "label", "prediction"]
        assert await values(client, prompt("evaluate_dataset"), "label_column", "la", {"dataset": "sentiment"}) == [
            "label"
        ]
        assert await values(client, prompt("evaluate_dataset"), "type", "c") == ["consistency", "accuracy", "feedback"]
        tasks = "plexus://tasks{?status,type,since,batch,limit,cursor}"
        assert await values(client, template(tasks), "status", "run") == ["RUNNING"]
        assert await values(client, template(tasks), "status", "RUNNING,QU") == ["RUNNING,QUEUED"]
        assert await values(client, template(tasks), "type", "de") == ["demo"]
        evaluations = "plexus://evaluations{?status,type,limit,cursor}"
        assert await values(client, template(evaluations), "status", "s") == ["SETUP"]
        assert await values(client, template(evaluations), "type", "") == ["accuracy", "feedback", "consistency"]
        # What the server does not know gets no values, not an error (an unknown prompt, argument or scheme).
        assert await values(client, prompt("test_prompt_with_arguments"), "arg1", "test") == []
        assert await values(client, template("file:///{path}"), "path", "") == []


async def test_completion_of_ids_is_by_prefix_newest_first_and_only_what_the_caller_may_see(
    mcp_url, token, runtime, keys
):
    ids: dict[str, list[str]] = {}
    for who in ("operator", "operator2"):
        async with open_client(mcp_url, keys[who]) as client:
            ids[who] = [
                (await client.call_tool("run_demo_task", {"items": 1, "item_delay_ms": 0})).structured_content[
                    "task_id"
                ]
                for _ in range(3)
            ]
    task = template("plexus://tasks/{task_id}")
    async with open_client(mcp_url, keys["operator"]) as client:
        assert await values(client, task, "task_id", "") == ids["operator"][::-1]  # newest first
        own = ids["operator"][0]
        assert (await values(client, task, "task_id", own[:6]))[0] == own
        assert await values(client, task, "task_id", ids["operator2"][0]) == []  # another key's task
        assert await values(client, prompt("watch_task"), "task_id", "%") == []  # LIKE wildcards are literal
    async with open_client(mcp_url, keys["viewer"]) as client:
        assert await values(client, task, "task_id", "") == []  # viewers see no key's tasks
        assert "example:sentiment" in await values(client, prompt("evaluate_dataset"), "dataset", "")
    async with open_client(mcp_url, token) as client:  # the notebook user (admin) sees all of them
        assert set(await values(client, task, "task_id", "")) >= set(ids["operator"] + ids["operator2"])


async def test_completion_of_evaluation_ids_for_prompts_and_resources(mcp_client, runtime):
    async with mcp_client() as client:
        created = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "dataset": "example:sentiment", "prediction_column": "prediction"}
        )
        evaluation_id = created.structured_content["evaluation_id"]
        assert await values(client, prompt("compare_evaluations"), "candidate_id", evaluation_id[:5]) == [evaluation_id]
        assert await values(client, template("plexus://evaluations/{evaluation_id}"), "evaluation_id", "") == [
            evaluation_id
        ]


# -- log messages ----------------------------------------------------------------------------------------


async def test_a_2025_session_gets_the_log_lines_of_the_tasks_it_started_at_its_level(mcp_client, runtime):
    received: list = []

    async def on_log(params):
        received.append(params)

    async with mcp_client(LEGACY, logging_callback=on_log) as client:
        # Before logging/setLevel: warnings and worse only, so the failure's error line, not the info line.
        failed = await client.call_tool("run_demo_task", {"items": 20, "item_delay_ms": 0, "fail_at": 10})
        failed_id = failed.structured_content["task_id"]
        await poll(lambda: received, lambda r: any(p.data["task_id"] == failed_id for p in r))
        assert [p.level for p in received] == ["error"]
        assert received[0].data["lines"] == ["Simulated failure at item 10 of 20"]
        assert received[0].logger == "plexus.task"
        await client.set_logging_level("info")
        done = await client.call_tool("run_demo_task", {"items": 5, "item_delay_ms": 0})
        done_id = done.structured_content["task_id"]
        line = await poll(lambda: [p for p in received if p.data["task_id"] == done_id], bool)
        assert line[0].level == "info" and line[0].data["lines"][0].startswith("Processed 5 items in ")


async def test_a_subscriber_gets_the_log_lines_of_a_task_another_session_started(mcp_client, runtime):
    received: list = []

    async def on_log(params):
        received.append(params)

    runtime.manager.max_concurrency = 0  # held in the queue until the watcher has subscribed
    async with mcp_client() as starter, mcp_client(LEGACY, logging_callback=on_log) as watcher:
        task_id = (
            await starter.call_tool("run_demo_task", {"items": 5, "item_delay_ms": 0, "fail_at": 3})
        ).structured_content["task_id"]
        await watcher.subscribe_resource(f"plexus://tasks/{task_id}")
        runtime.manager.max_concurrency = 2
        runtime.manager.queue_changed()
        await poll(lambda: received, bool)
    assert received[0].data == {"task_id": task_id, "lines": ["Simulated failure at item 3 of 5"], "dropped": 0}


async def test_on_the_2026_wire_log_lines_ride_only_a_streaming_call_that_opted_in(mcp_client, runtime):
    received: list = []

    async def on_log(params):
        received.append(params)

    async def on_progress(progress, total, message):
        pass

    async with mcp_client(MODERN, logging_callback=on_log) as client:  # no opt-in: nothing
        with pytest.raises(MCPError):  # logging/setLevel is gone in this era (SEP-2577)
            await client.set_logging_level("info")
        await client.call_tool("run_demo_task", {"items": 5, "item_delay_ms": 0}, progress_callback=on_progress)
    assert received == []
    async with mcp_client(MODERN, logging_callback=on_log, log_level="info") as client:
        result = await client.call_tool(
            "run_demo_task", {"items": 5, "item_delay_ms": 0}, progress_callback=on_progress
        )
        task_id = result.structured_content["task_id"]
    assert [(p.level, p.data["task_id"]) for p in received] == [("info", task_id)]


async def test_log_lines_are_scrubbed_of_the_server_token_and_cut_to_length(runtime, token):
    logs = runtime.mcp.task_logs
    sent: list = []

    async def send(level, data):
        sent.append(data)

    from plexus_mcp_jupyter.endpoint.task_logs import MAX_LINE_CHARS, _Receiver

    receiver = _Receiver(send, lambda: 0)
    logs._calls["t1"] = {receiver}
    logs.on_line("t1", "info", f"token={token} " + "y" * 5000)
    await poll(lambda: sent, bool)
    line = sent[0]["lines"][0]
    assert token not in line and len(line) <= MAX_LINE_CHARS


# -- the tools, as an assistant uses them ----------------------------------------------------------------


async def test_list_texts_carry_full_ids_that_the_other_tools_accept(mcp_client, runtime):
    async with mcp_client() as client:
        task_id = (await client.call_tool("run_demo_task", {"items": 1, "item_delay_ms": 0})).structured_content[
            "task_id"
        ]
        text = (await client.call_tool("list_tasks", {})).content[0].text
        assert task_id in text
        shown = re.search(r"([0-9a-f-]{36}) demo", text).group(1)  # type: ignore[union-attr]
        assert not (await client.call_tool("get_task", {"task_id": shown})).is_error
        created = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "dataset": "example:topics", "prediction_column": "prediction"}
        )
        evaluation_id = created.structured_content["evaluation_id"]
        assert evaluation_id in (await client.call_tool("list_evaluations", {})).content[0].text


async def test_list_filters_take_a_list_one_name_or_comma_separated_names(mcp_client, runtime):
    runtime.manager.max_concurrency = 0
    async with mcp_client() as client:
        queued = (await client.call_tool("run_demo_task", {"items": 1})).structured_content["task_id"]
        for status in (["QUEUED"], "QUEUED", "running,QUEUED", "QUEUED, RUNNING"):
            page = await client.call_tool("list_tasks", {"status": status})
            assert not page.is_error, page.content
            assert [t["task_id"] for t in page.structured_content["tasks"]] == [queued]
        assert (await client.call_tool("list_tasks", {"status": "COMPLETED"})).structured_content["tasks"] == []
        assert not (
            await client.call_tool("list_evaluations", {"status": "SETUP,RUNNING", "type": "accuracy"})
        ).is_error
        bad = await client.call_tool("list_tasks", {"status": "DONE"})
        assert bad.is_error and bad.content[0].text == (
            "invalid arguments for list_tasks: status[0]: unknown status; expected one of QUEUED, "
            "RUNNING, COMPLETED, FAILED, CANCELLED (got 'DONE')"
        )
        dry = await client.call_tool("cancel_tasks", {"status": "QUEUED", "dry_run": True})
        assert dry.structured_content["matched"] == 1


async def test_schemas_publish_enums_and_the_configured_page_size(mcp_client, runtime):
    async with mcp_client() as client:
        tools = {t.name: t.input_schema["properties"] for t in (await client.list_tools()).tools}
    assert tools["create_evaluation"]["type"]["enum"] == ["accuracy", "feedback", "consistency"]
    status_items = tools["list_tasks"]["status"]["anyOf"][0]["items"]
    assert status_items["enum"] == ["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]
    assert tools["list_evaluations"]["status"]["anyOf"][0]["items"]["enum"][0] == "SETUP"
    for tool in ("list_tasks", "list_evaluations", "get_evaluation_results"):
        assert tools[tool]["limit"]["maximum"] == 50  # max_page_size of this server


async def test_get_task_text_gives_the_eta(mcp_client, runtime):
    async with mcp_client() as client:
        task_id = (await client.call_tool("run_demo_task", {"items": 400, "item_delay_ms": 20})).structured_content[
            "task_id"
        ]

        async def detail():
            return await client.call_tool("get_task", {"task_id": task_id})

        result = await poll(detail, lambda r: r.structured_content["estimated_completion_at"] is not None)
        assert f", ETA {result.structured_content['estimated_completion_at']} (in about " in result.content[0].text
        await client.call_tool("cancel_tasks", {"task_ids": [task_id]})


async def test_a_bare_dataset_name_resolves_and_labels_and_ids_come_from_its_columns(mcp_client, runtime, jp_root_dir):
    async with mcp_client() as client:
        created = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "dataset": "sentiment", "prediction_column": "prediction"}
        )
        assert not created.is_error, created.content
        view = created.structured_content
        assert view["dataset"] == "example:sentiment" and view["definition"]["label_column"] == "label"

        async def status():
            return (
                await client.call_tool("get_evaluation", {"evaluation_id": view["evaluation_id"]})
            ).structured_content["status"]

        assert await poll(status, lambda s: s in ("COMPLETED", "FAILED")) == "COMPLETED"
        items = (
            await client.call_tool("get_evaluation_results", {"evaluation_id": view["evaluation_id"], "limit": 2})
        ).structured_content["items"]
        assert [i["item_id"] for i in items] == ["s001", "s002"]  # the dataset's id column

        listed = (await client.call_tool("list_datasets", {"include_files": False})).structured_content
        assert {d["ref"]: d["label_column"] for d in listed["datasets"]}["example:sentiment"] == "label"

        (jp_root_dir / "sentiment.csv").write_text("text,label,prediction\na,x,x\n")
        ambiguous = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "dataset": "sentiment", "prediction_column": "prediction"}
        )
        assert ambiguous.is_error
        assert "ambiguous: it could be example:sentiment, sentiment.csv" in ambiguous.content[0].text
        missing = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "dataset": "reviews", "prediction_column": "prediction"}
        )
        assert missing.is_error and "example:sentiment" in missing.content[0].text
        assert "list_datasets" in missing.content[0].text
        (jp_root_dir / "nolabel.csv").write_text("text,guess\na,x\n")
        no_label = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "dataset": "nolabel.csv", "prediction_column": "guess"}
        )
        assert no_label.is_error and "label_column is required" in no_label.content[0].text
        assert "its columns: text, guess" in no_label.content[0].text


async def test_a_task_warning_reaches_the_session_as_a_warning(mcp_client, runtime):
    from plexus_mcp_jupyter.core.tasks import TaskType

    received: list = []

    async def on_log(params):
        received.append(params)

    with registered_task_types(TaskType("warns", "tests.task_functions:warns", "raises a warning")):
        async with mcp_client(LEGACY, logging_callback=on_log) as client:
            result = await client.call_tool("dispatch_batch", {"tasks": [{"type": "warns"}]})
            task_id = result.structured_content["task_ids"][0]
            await poll(lambda: received, bool)
    assert received[0].level == "warning" and received[0].data["task_id"] == task_id
    assert received[0].data["lines"][0].startswith("UserWarning: the data looks odd (task_functions.py:")


# -- the generated docs ----------------------------------------------------------------------------------


async def test_the_docs_list_every_tool_resource_and_prompt_the_server_serves(mcp_client, runtime):
    docs = Path(__file__).resolve().parent.parent / "docs"
    tools_md, resources_md, prompts_md = ((docs / n).read_text() for n in ("tools.md", "resources.md", "prompts.md"))
    async with mcp_client() as client:  # the notebook user: an admin, who is shown everything
        for tool in (await client.list_tools()).tools:
            assert f"## `{tool.name}`" in tools_md
        for resource in (await client.list_resources()).resources:
            assert f"`{resource.uri}`" in resources_md
        for resource_template in (await client.list_resource_templates()).resource_templates:
            assert f"`{resource_template.uri_template}`" in resources_md
        for listed in (await client.list_prompts()).prompts:
            assert f"## `{listed.name}`" in prompts_md


def test_the_docs_check_fails_when_a_tool_is_missing(tmp_path):
    assert docs_main(["--out", str(tmp_path)]) == 0
    tools = (tmp_path / "tools.md").read_text()
    start = tools.index("## `create_evaluation`")
    (tmp_path / "tools.md").write_text(tools[:start] + tools[tools.index("## ", start + 3) :])
    assert docs_main(["--check", "--out", str(tmp_path)]) == 1


# -- metrics ---------------------------------------------------------------------------------------------


async def test_jupyter_metrics_carry_tool_calls_tasks_queue_and_sessions(mcp_client, runtime, server_url, token):
    async with mcp_client() as client:
        task_id = (await client.call_tool("run_demo_task", {"items": 1, "item_delay_ms": 0})).structured_content[
            "task_id"
        ]
        await poll(
            lambda: client.call_tool("get_task", {"task_id": task_id}),
            lambda r: r.structured_content["status"] == "COMPLETED",
        )
        await client.call_tool("get_task", {"task_id": "no-such-task"})

        async def scrape() -> str:
            async with httpx2.AsyncClient(headers={"Authorization": f"token {token}"}) as http:
                response = await http.get(f"{server_url}metrics")
            assert response.status_code == 200
            return response.text

        runtime.audit.flush()  # tool calls are counted from their audit records, in the audit thread
        text = await poll(scrape, lambda t: 'plexus_tasks{status="COMPLETED",type="demo"} 1.0' in t, timeout=30)
        assert re.search(r'plexus_tool_calls_total\{outcome="ok",tool="get_task"\} [1-9]', text)
        assert re.search(r'plexus_tool_calls_total\{outcome="error",tool="get_task"\} [1-9]', text)
        assert 'plexus_tool_call_seconds_bucket{le="0.005",tool="run_demo_task"}' in text
        assert "plexus_queue_depth 0.0" in text and "plexus_running_tasks" in text
        assert re.search(r"plexus_mcp_sessions [1-9]", text)  # this client's session, while it is open
        # Jupyter's own request metrics count MCP calls too (MCPHandler records them without its access log).
        mcp_requests = [
            line
            for line in text.splitlines()
            if line.startswith("http_request_duration_seconds_count{")
            and 'handler="plexus_mcp_jupyter.handlers.mcp.MCPHandler"' in line
            and 'method="POST"' in line
            and 'status_code="200"' in line
        ]
        assert mcp_requests and float(mcp_requests[0].rsplit(" ", 1)[1]) >= 3, mcp_requests
    async with httpx2.AsyncClient() as http:  # Jupyter's own rule: /metrics needs its credentials
        assert (await http.get(f"{server_url}metrics")).status_code == 403


async def test_the_metrics_resource_shows_activity_to_admins_only(mcp_url, token, runtime, keys):
    async with open_client(mcp_url, token) as client:
        await client.call_tool("list_tasks", {"status": "DONE"})
        await client.call_tool("list_tasks", {})
        await client.subscribe_resource("plexus://tasks")
        runtime.audit.flush()
        metrics = json.loads((await client.read_resource("plexus://metrics")).contents[0].text)  # type: ignore[union-attr]
        assert metrics["tools"]["list_tasks"]["calls"] == {"error": 1, "ok": 1}
        assert metrics["tools"]["list_tasks"]["samples"] == 2 and metrics["tools"]["list_tasks"]["p50_ms"] > 0
        assert metrics["tasks"]["by_status"]["QUEUED"] == 0 and metrics["queue_depth"] == 0
        assert metrics["sessions"] >= 1 and metrics["subscriptions"] == 1
        assert metrics["resources"]["rss_mb"] > 0
    async with open_client(mcp_url, keys["operator"]) as client:
        mine = json.loads((await client.read_resource("plexus://metrics")).contents[0].text)  # type: ignore[union-attr]
    assert set(mine) == {"queue_depth", "running", "resources"}


async def test_metrics_count_evaluation_items_and_update_latency(mcp_client, runtime):
    async with mcp_client() as client:
        # subscribed before the evaluation exists: a quick one may end before a subscription made after it
        await client.subscribe_resource("plexus://tasks")
        created = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "dataset": "example:topics", "prediction_column": "prediction"}
        )
        evaluation_id = created.structured_content["evaluation_id"]
        await poll(
            lambda: client.call_tool("get_evaluation", {"evaluation_id": evaluation_id}),
            lambda r: r.structured_content["status"] == "COMPLETED",
        )

        async def metrics():
            return json.loads((await client.read_resource("plexus://metrics")).contents[0].text)  # type: ignore[union-attr]

        figures = await poll(metrics, lambda m: m["update_latency_ms"]["samples"] > 0)
        rows = created.structured_content["total_items"] or len(pd.read_csv(EXAMPLES_DIR / "topics.csv"))
        assert figures["evaluations"]["items_scored"] == rows
        assert figures["update_latency_ms"]["p50_ms"] >= 0


# -- plexus mcp config and serve -------------------------------------------------------------------------


def test_config_write_merges_into_the_clients_file_and_keeps_what_is_there(tmp_path, capsys):
    target = tmp_path / "project" / ".mcp.json"
    url = ["--url", "http://localhost:8888/plexus/mcp", "--token", "abc"]
    assert cli_main(["mcp", "config", "--client", "claude", *url, "--write", str(target)]) == 0
    assert "added the 'plexus' server" in capsys.readouterr().err
    config = json.loads(target.read_text())
    config["mcpServers"]["other"] = {"command": "other-server"}
    config["theme"] = "dark"
    target.write_text(json.dumps(config))
    assert (
        cli_main(["mcp", "config", "--client", "claude", "--url", "http://h:1/plexus/mcp", "--write", str(target)]) == 0
    )
    assert "updated the 'plexus' server" in capsys.readouterr().err
    merged = json.loads(target.read_text())
    assert merged["theme"] == "dark" and merged["mcpServers"]["other"] == {"command": "other-server"}
    assert merged["mcpServers"]["plexus"]["url"] == "http://h:1/plexus/mcp"
    target.write_text("{not json")
    assert cli_main(["mcp", "config", "--client", "claude", *url, "--write", str(target)]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert target.read_text() == "{not json"  # left as it was


def test_config_printed_says_where_it_goes(capsys):
    assert cli_main(["mcp", "config", "--client", "cursor", "--url", "http://h:1/plexus/mcp"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mcpServers"]["plexus"]["url"] == "http://h:1/plexus/mcp"
    assert "~/.cursor/mcp.json" in err and "--write" in err


async def test_the_stdio_config_launches_a_server_with_prompts_completion_and_logging(tmp_path):
    entry = client_config("claude", url=None, token=None, stdio_args=[])["mcpServers"]["plexus"]
    env = {
        **os.environ,
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "PLEXUS_MCP_DB_URL": f"sqlite:///{tmp_path / 's.db'}",
    }
    params = StdioServerParameters(command=entry["command"], args=entry["args"], cwd=str(tmp_path), env=env)
    received: list = []

    async def on_log(params):
        received.append(params)

    async with Client(params, mode=LEGACY, logging_callback=on_log) as client:
        assert {p.name for p in (await client.list_prompts()).prompts} == PROMPTS
        assert (await values(client, prompt("evaluate_dataset"), "dataset", "top")) == ["example:topics"]
        await client.set_logging_level("info")
        await client.call_tool("run_demo_task", {"items": 3, "item_delay_ms": 0})
        await poll(lambda: received, bool)
    assert received[0].data["lines"][0].startswith("Processed 3 items")
