"""API keys, roles, isolation, rate limits and the audit log, over real HTTP with the SDK client."""

from __future__ import annotations

import asyncio
import json

import httpx2
import pytest
import sqlalchemy as sa
from mcp import MCPError

from plexus_mcp_jupyter.security.keys import keys_table

from .conftest import open_client

VIEWER_TOOLS = {
    "list_tasks",
    "get_task",
    "get_evaluation",
    "get_evaluation_results",
    "list_evaluations",
    "list_datasets",
    "list_scorers",
}
ALL_TOOLS = VIEWER_TOOLS | {
    "run_demo_task",
    "cancel_tasks",
    "create_evaluation",
    "dispatch_batch",
    "retry_tasks",
    "set_task_priority",
}


def credential_of(name: str, keys: dict, token: str) -> str | None:
    return {"none": None, "jupyter": token}.get(name, keys.get(name))


async def post_mcp(url: str, credential: str | None) -> httpx2.Response:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": "2025-11-25",
    }
    if credential:
        headers["Authorization"] = f"Bearer {credential}"
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    async with httpx2.AsyncClient() as http:
        return await http.post(url, json=body, headers=headers)


@pytest.mark.parametrize(
    ("credential", "status", "says"),
    [
        ("none", 401, "authentication required"),
        ("bad", 401, "unknown API key"),
        ("malformed", 401, "malformed API key"),
        ("expired", 401, "is expired"),
        ("revoked", 401, "is revoked"),
        ("viewer", 200, None),
        ("operator", 200, None),
        ("admin", 200, None),
        ("jupyter", 200, None),
    ],
)
async def test_who_may_reach_the_endpoint(mcp_url, token, keys, credential, status, says):
    response = await post_mcp(mcp_url, credential_of(credential, keys, token))
    assert response.status_code == status
    if says:
        assert says in response.json()["error"]["message"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        secret = credential_of(credential, keys, token)
        assert not secret or secret not in response.text  # a credential is never echoed


# (tool, arguments, the role it needs); the notebook user's task id is filled in by the test.
CALLS = [
    ("list_tasks", {}, "viewer"),
    ("get_task", {"task_id": "NOTEBOOK"}, "viewer"),
    ("list_evaluations", {}, "viewer"),
    ("list_datasets", {"include_files": False}, "viewer"),
    ("list_scorers", {}, "viewer"),
    ("run_demo_task", {"items": 1, "item_delay_ms": 0}, "operator"),
    (
        "create_evaluation",
        {
            "type": "accuracy",
            "dataset": "example:sentiment",
            "prediction_column": "prediction",
            "label_column": "label",
        },
        "operator",
    ),
    ("cancel_tasks", {"status": ["QUEUED"]}, "operator"),
    ("dispatch_batch", {"tasks": [{"type": "demo", "params": {"items": 1, "item_delay_ms": 0}}]}, "operator"),
    ("retry_tasks", {"status": ["FAILED"]}, "operator"),
    ("set_task_priority", {"status": ["QUEUED"], "priority": 1}, "operator"),
]
RANK = {"viewer": 0, "operator": 1, "admin": 2, "jupyter": 2}


@pytest.mark.parametrize("who", ["viewer", "operator", "admin", "jupyter"])
async def test_the_permission_matrix_of_tools(mcp_url, token, keys, runtime, who):
    notebook_task = runtime.manager.dispatch("demo", {"items": 1, "item_delay_ms": 0}, owner="jupyter")
    async with open_client(mcp_url, credential_of(who, keys, token)) as client:
        listed = {t.name for t in (await client.list_tools()).tools}
        assert listed == (VIEWER_TOOLS if who == "viewer" else ALL_TOOLS)
        for tool, arguments, needs in CALLS:
            arguments = {k: (notebook_task.id if v == "NOTEBOOK" else v) for k, v in arguments.items()}
            result = await client.call_tool(tool, arguments)
            allowed = RANK[who] >= RANK[needs]
            text = result.content[0].text if result.content else ""
            if allowed:
                assert not result.is_error, (who, tool, text)
            else:
                assert result.is_error and "permission denied" in text and needs in text, (who, tool, text)


async def test_operator_keys_are_isolated_from_each_other_but_see_the_notebook_users_work(
    mcp_url, token, keys, runtime
):
    notebook_task = runtime.manager.dispatch("demo", {"items": 1, "item_delay_ms": 0}, owner="jupyter")
    async with open_client(mcp_url, keys["operator"]) as a, open_client(mcp_url, keys["operator2"]) as b:
        mine = (await a.call_tool("run_demo_task", {"items": 1, "item_delay_ms": 0})).structured_content["task_id"]
        evaluation = (
            await a.call_tool(
                "create_evaluation",
                {
                    "type": "accuracy",
                    "dataset": "example:sentiment",
                    "prediction_column": "prediction",
                    "label_column": "label",
                },
            )
        ).structured_content["evaluation_id"]
        assert not (await a.call_tool("get_task", {"task_id": mine})).is_error
        other = await b.call_tool("get_task", {"task_id": mine})
        assert other.is_error and "no task with id" in other.content[0].text  # as if it did not exist
        listed = (await b.call_tool("list_tasks", {"limit": 100})).structured_content["tasks"]
        seen_by_b = {t["task_id"] for t in listed}
        assert mine not in seen_by_b and notebook_task.id in seen_by_b
        assert (await b.call_tool("get_evaluation", {"evaluation_id": evaluation})).is_error
        assert (await b.call_tool("list_evaluations", {})).structured_content["evaluations"] == []
        with pytest.raises(MCPError):
            await b.read_resource(f"plexus://tasks/{mine}")
        cancel = await b.call_tool("cancel_tasks", {"task_ids": [mine, notebook_task.id]})
        outcomes = {r["task_id"]: r["outcome"] for r in cancel.structured_content["results"]}
        assert outcomes[mine] == "not_found" and outcomes[notebook_task.id] in ("forbidden", "already_finished")
    async with open_client(mcp_url, token) as admin:  # the notebook user sees everything
        assert not (await admin.call_tool("get_task", {"task_id": mine})).is_error


async def test_api_keys_may_use_only_allowed_python_scorers(mcp_url, keys, runtime):
    async with open_client(mcp_url, keys["operator"]) as client:
        refused = await client.call_tool(
            "create_evaluation",
            {"type": "accuracy", "dataset": "example:sentiment", "label_column": "label", "scorer": "python:os:system"},
        )
        assert refused.is_error and "scorer_modules" in refused.content[0].text
        allowed = await client.call_tool(
            "create_evaluation",
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "label_column": "label",
                "scorer": "python:plexus_mcp_jupyter.evaluations.examples.scorers:keyword_sentiment",
            },
        )
        assert not allowed.is_error


async def test_the_audit_log_records_allowed_and_denied_calls_without_secrets(mcp_url, token, keys, runtime):
    async with open_client(mcp_url, keys["viewer"]) as client:
        await client.call_tool("list_tasks", {})
        await client.call_tool("run_demo_task", {"items": 1})
    await post_mcp(mcp_url, keys["revoked"])
    runtime.audit.flush()
    records, _ = runtime.audit.query(limit=100)
    by_action = {(r["action"], r["outcome"]) for r in records}
    assert ("tool.list_tasks", "ok") in by_action and ("tool.run_demo_task", "denied") in by_action
    assert ("http.POST", "denied") in by_action  # the revoked key's attempt
    viewer_rows = [r for r in records if r["action"] == "tool.list_tasks"]
    assert viewer_rows[0]["role"] == "viewer" and viewer_rows[0]["key_id"] and viewer_rows[0]["client"]
    dump = json.dumps(records)
    assert not any(secret in dump for secret in (token, *keys.values()))
    async with open_client(mcp_url, keys["viewer"]) as client, open_client(mcp_url, token) as admin:
        with pytest.raises(MCPError, match="permission denied"):
            await client.read_resource("plexus://audit")
        page = json.loads((await admin.read_resource("plexus://audit?outcome=denied&limit=5")).contents[0].text)
        assert page["records"] and all(r["outcome"] == "denied" for r in page["records"])


async def test_an_admin_reads_in_the_audit_the_call_just_made(mcp_url, token, keys, runtime):
    # The writer batches a second of records; a read writes what is queued first (read your writes).
    async with open_client(mcp_url, keys["viewer"]) as client, open_client(mcp_url, token) as admin:
        with pytest.raises(MCPError, match="permission denied"):
            await client.read_resource("plexus://audit?limit=1")
        page = json.loads((await admin.read_resource("plexus://audit?action=resource.read&limit=1")).contents[0].text)
    newest = page["records"][0]
    assert (newest["outcome"], newest["role"], newest["target"]) == ("denied", "viewer", "plexus://audit")


async def test_keys_are_managed_over_rest_by_admins_and_revocation_ends_open_streams(
    jp_fetch, jp_ws_fetch, keys, runtime
):
    response = await jp_fetch(
        "plexus", "api", "keys", method="POST", body=json.dumps({"name": "assistant", "role": "operator"})
    )
    created = json.loads(response.body)
    assert response.code == 201 and created["secret"].startswith(created["prefix"] + "_")
    listed = json.loads((await jp_fetch("plexus", "api", "keys")).body)["keys"]
    assert created["id"] in [k["id"] for k in listed] and all("secret" not in k for k in listed)
    stored = (
        runtime.store.engine.connect()
        .execute(sa.select(keys_table.c.secret_hash).where(keys_table.c.id == created["id"]))
        .scalar_one()
    )
    assert created["secret"] not in stored and len(stored) == 64  # only a hash is kept

    ws = await jp_ws_fetch("plexus", "api", "events", headers={"Authorization": f"Bearer {created['secret']}"})
    assert json.loads(await ws.read_message())["type"] == "hello"
    response = await jp_fetch("plexus", "api", "keys", created["id"], method="DELETE")
    assert json.loads(response.body)["status"] == "revoked"
    assert await asyncio.wait_for(ws.read_message(), 5) is None and ws.close_code == 4401

    with pytest.raises(Exception) as denied:
        await jp_fetch("plexus", "api", "keys", headers={"Authorization": f"Bearer {keys['operator']}"})
    assert denied.value.code == 403 and "keys" in denied.value.response.body.decode()


@pytest.mark.parametrize(
    ("who", "method", "path", "body", "status"),
    [
        ("viewer", "GET", ("tasks",), None, 200),
        ("viewer", "POST", ("tasks",), {"type": "demo", "params": {"items": 1}}, 403),
        ("operator", "POST", ("tasks",), {"type": "demo", "params": {"items": 1}}, 201),
        (
            "viewer",
            "POST",
            ("evaluations",),
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "prediction_column": "prediction",
                "label_column": "label",
            },
            403,
        ),
        ("viewer", "GET", ("evaluations",), None, 200),
        ("viewer", "GET", ("audit",), None, 403),
        ("operator", "GET", ("keys",), None, 403),
        ("admin", "GET", ("keys",), None, 200),
        ("admin", "GET", ("audit",), None, 200),
        ("viewer", "POST", ("tasks", "NOTEBOOK", "cancel"), {}, 403),
        ("operator", "POST", ("tasks", "NOTEBOOK", "cancel"), {}, 403),
        ("admin", "POST", ("tasks", "NOTEBOOK", "cancel"), {}, 200),
    ],
)
async def test_the_permission_matrix_of_rest(jp_fetch, keys, runtime, who, method, path, body, status):
    notebook_task = runtime.manager.dispatch("demo", {"items": 1000, "item_delay_ms": 50}, owner="jupyter")
    path = tuple(notebook_task.id if p == "NOTEBOOK" else p for p in path)
    kwargs = {"method": method, "headers": {"Authorization": f"Bearer {keys[who]}"}}
    if body is not None:
        kwargs["body"] = json.dumps(body)
    try:
        response = await jp_fetch("plexus", "api", *path, **kwargs)
        code, text = response.code, response.body.decode()
    except Exception as exc:  # tornado raises for 4xx
        code, text = exc.code, exc.response.body.decode()
    runtime.manager.cancel([notebook_task.id])
    assert code == status, text
    if status == 403:
        assert "permission denied" in text or "may cancel only your own" in text


async def test_a_viewer_key_cannot_serve_scorers_on_the_event_stream(jp_ws_fetch, keys, runtime):
    ws = await jp_ws_fetch(
        "plexus", "api", "events", headers={"Authorization": f"Bearer {keys['viewer']}"}, params={"ids": "none"}
    )
    assert json.loads(await ws.read_message())["type"] == "hello"
    ws.write_message(json.dumps({"type": "register_scorer", "name": "sneaky"}))
    answer = json.loads(await asyncio.wait_for(ws.read_message(), 5))
    assert answer["type"] == "error" and "permission denied" in answer["message"]
    assert runtime.kernel_scorers.names() == []
    ws.close()


async def test_evaluation_tasks_cannot_be_dispatched_directly(jp_fetch, keys, runtime):
    body = {
        "type": "evaluation",
        "params": {
            "evaluation_id": "x",
            "type": "accuracy",
            "dataset": "example:fraud",
            "scores": [{"name": "s", "scorer": {"kind": "python", "function": "os:system"}}],
        },
    }
    for credential in (keys["operator"], keys["admin"]):
        with pytest.raises(Exception) as refused:
            await jp_fetch(
                "plexus",
                "api",
                "tasks",
                method="POST",
                body=json.dumps(body),
                headers={"Authorization": f"Bearer {credential}"},
            )
        assert refused.value.code == 400 and "create_evaluation" in refused.value.response.body.decode()


async def test_api_keys_cannot_walk_out_of_an_allowed_module(mcp_url, keys, runtime):
    async with open_client(mcp_url, keys["operator"]) as client:
        escape = await client.call_tool(
            "create_evaluation",
            {
                "type": "accuracy",
                "dataset": "example:sentiment",
                "label_column": "label",
                "scorer": "python:plexus_mcp_jupyter.evaluations.examples.scorers:pd.io.common.os.system",
            },
        )
    assert escape.is_error and "no dotted or private attribute" in escape.content[0].text


async def test_a_keys_kernel_scorer_never_scores_someone_elses_evaluation(jp_ws_fetch, mcp_url, token, keys, runtime):
    ws = await jp_ws_fetch(
        "plexus", "api", "events", params={"ids": "none"}, headers={"Authorization": f"Bearer {keys['operator']}"}
    )
    assert json.loads(await ws.read_message())["type"] == "hello"
    ws.write_message(json.dumps({"type": "register_scorer", "name": "my_model"}))
    assert json.loads(await asyncio.wait_for(ws.read_message(), 5))["type"] == "scorer_registered"
    async with open_client(mcp_url, token) as notebook_user, open_client(mcp_url, keys["operator2"]) as other:
        for client in (notebook_user, other):
            refused = await client.call_tool(
                "create_evaluation",
                {
                    "type": "accuracy",
                    "dataset": "example:sentiment",
                    "label_column": "label",
                    "scorer": "kernel:my_model",
                },
            )
            assert refused.is_error and "no kernel scorer 'my_model'" in refused.content[0].text
    ws.close()


async def test_revoking_with_the_whole_credential_works_and_keeps_the_secret_out_of_the_audit(jp_fetch, runtime):
    key, secret = runtime.keys.create("leaked", "operator")
    response = await jp_fetch("plexus", "api", "keys", secret, method="DELETE")
    assert json.loads(response.body)["status"] == "revoked"
    runtime.audit.flush()
    records, _ = runtime.audit.query(limit=50)
    assert secret not in json.dumps(records) and any(key.id in (r["target"] or "") for r in records)


async def test_a_key_cannot_replace_someone_elses_dataset(jp_fetch, keys, runtime):
    import io

    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_parquet(buffer)
    parquet = {"Content-Type": "application/vnd.apache.parquet"}
    await jp_fetch(
        "plexus",
        "api",
        "datasets",
        method="POST",
        body=buffer.getvalue(),
        headers=dict(parquet),
        params={"name": "shared"},
    )
    with pytest.raises(Exception) as refused:
        await jp_fetch(
            "plexus",
            "api",
            "datasets",
            method="POST",
            body=buffer.getvalue(),
            headers={**parquet, "Authorization": f"Bearer {keys['operator']}"},
            params={"name": "shared", "replace": "true"},
        )
    assert refused.value.code == 403 and "only they or an admin" in refused.value.response.body.decode()


async def test_a_huge_argument_is_audited_as_its_size_and_the_record_keeps_the_rest(mcp_url, token, keys, runtime):
    card = "name: big\n# " + "x" * 300_000 + f"\n# {token}\n"  # refused for its size; the token must not leak either
    async with open_client(mcp_url, keys["operator"]) as client:
        refused = await client.call_tool(
            "create_evaluation", {"type": "accuracy", "scorecard": card, "runs": 3, "label_column": "label"}
        )
        assert refused.is_error and "max_scorecard_bytes" in refused.content[0].text
        await client.call_tool("list_tasks", {"status": ["QUEUED"] * 150})
    runtime.audit.flush()
    records, _ = runtime.audit.query(limit=20, action="tool.create_evaluation")
    details = records[0]["details"]
    assert details["arguments"]["scorecard"] == f"[{len(card):,} characters]"
    assert details["arguments"]["label_column"] == "label" and details["arguments"]["runs"] == 3
    listing = runtime.audit.query(limit=20, action="tool.list_tasks")[0][0]["details"]
    assert listing["arguments"]["status"] == "[150 entries]"
    assert token not in json.dumps(records)
