"""The output schemas are published in a lean form (schemas.lean_output_schema: refs written out, anyOf-null as a
type list, no field-name titles, an array's object items checked one step each with their full schema in `$defs`)
that clients validate many times faster. With each item's `$defs` entry applied again it allows exactly what the
models' own schemas allow; as published it allows that and more only inside array items (whose type and required
fields it still checks)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

from jsonschema import Draft202012Validator
from pydantic import BaseModel

from plexus_mcp_jupyter.endpoint import schemas
from plexus_mcp_jupyter.endpoint.schemas import ROW_FIELDS, lean_output_schema

from .conftest import MODERN

ODD_VALUES = (None, 0, 1.5, -3, "", "QUEUED", "x", True, [], [1], {}, {"a": None})
MODELS = [m for _, m in inspect.getmembers(schemas, inspect.isclass) if issubclass(m, BaseModel) and m is not BaseModel]


def mutations(value: Any, depth: int = 0):
    """The value itself, then each of its fields (and list items' fields, two levels down) replaced by odd values
    or removed."""
    yield value
    if depth > 2:
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            for odd in ODD_VALUES:
                changed = dict(value)
                changed[key] = odd
                yield changed
            removed = {k: v for k, v in value.items() if k != key}
            yield removed
            for deeper in mutations(inner, depth + 1):
                if deeper is not inner:
                    yield {**value, key: deeper}
    elif isinstance(value, list) and value:
        for deeper in mutations(value[0], depth + 1):
            if deeper is not value[0]:
                yield [deeper, *value[1:]]


def rows_applied(node: Any) -> Any:
    """A published schema with each shallow item schema pointing at its `$defs` entry again (what it names)."""
    if isinstance(node, list):
        return [rows_applied(v) for v in node]
    if not isinstance(node, dict):
        return node
    if ROW_FIELDS in node:
        return {"$ref": node[ROW_FIELDS]}
    return {k: rows_applied(v) for k, v in node.items()}


def same_verdicts(model: type[BaseModel], instances: list[Any]) -> int:
    """The lean schema with its rows' `$defs` applied gives the models' verdict on every instance; as published,
    it allows every instance the models allow, and refuses a row that is not an object or lacks a required field."""
    full = model.model_json_schema()
    lean = lean_output_schema(full)
    Draft202012Validator.check_schema(lean)
    a, b, published = Draft202012Validator(full), Draft202012Validator(rows_applied(lean)), Draft202012Validator(lean)
    for instance in instances:
        assert a.is_valid(instance) == b.is_valid(instance), (model.__name__, instance)
        assert published.is_valid(instance) or not a.is_valid(instance), (model.__name__, instance)
    return sum(a.is_valid(i) for i in instances)


def test_every_output_model_allows_the_same_values_in_its_lean_schema():
    assert len(MODELS) > 10
    for model in MODELS:
        schema = model.model_json_schema()
        samples = [{}, None, [], "x"] + [{name: odd} for name in schema.get("properties", {}) for odd in ODD_VALUES]
        same_verdicts(model, samples)
        lean = str(lean_output_schema(schema))
        assert "'$ref'" not in lean or "$defs" in lean  # a reference left (a recursive model) keeps its definitions


async def test_published_schemas_are_lean_and_real_results_and_their_mutations_get_the_same_verdicts(mcp_client):
    async with mcp_client() as client:
        task_id = (await client.call_tool("run_demo_task", {"items": 2, "item_delay_ms": 0})).structured_content[
            "task_id"
        ]
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        page = (await client.call_tool("list_tasks", {"limit": 5})).structured_content
        detail = (await client.call_tool("get_task", {"task_id": task_id, "history": True})).structured_content
    for name, model, value in (("list_tasks", schemas.TaskPage, page), ("get_task", schemas.TaskDetail, detail)):
        published = listed[name].output_schema
        assert published == lean_output_schema(model.model_json_schema())
        assert "anyOf" not in str(published["properties"]) or name == "get_task"
        instances = list(mutations(copy.deepcopy(value)))
        assert len(instances) > 100  # a listing row leaves its null fields out: fewer to mutate
        assert same_verdicts(model, instances) >= 1  # the real result is valid, and so are some mutations


async def test_the_official_client_validates_results_against_the_lean_schemas_in_both_eras(mcp_client):
    for mode in ("legacy", MODERN):
        async with mcp_client(mode) as client:
            result = await client.call_tool("list_tasks", {"limit": 3})
            assert not result.is_error and "tasks" in result.structured_content


def test_array_items_are_checked_one_step_each_with_their_fields_in_defs():
    published = lean_output_schema(schemas.TaskPage.model_json_schema())
    rows = published["properties"]["tasks"]["items"]
    assert set(rows) == {"type", "description", "required", ROW_FIELDS}
    assert rows["required"] == ["task_id", "type", "status", "priority", "progress"]
    assert rows[ROW_FIELDS] == "#/$defs/TaskListRow" and "$defs/TaskListRow" in rows["description"]
    fields = published["$defs"]["TaskListRow"]  # the rows' documentation: every field with its type and description
    assert set(fields["properties"]) == set(schemas.TaskListRow.model_fields)
    assert fields["properties"]["status"]["enum"] == ["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]
    check = Draft202012Validator(published)
    row = {"task_id": "t", "type": "demo", "status": "QUEUED", "priority": 0, "progress": {"processed": 0}}
    assert check.is_valid({"tasks": [row], "next_cursor": None})
    assert not check.is_valid({"tasks": ["t"], "next_cursor": None})  # an item is an object
    assert not check.is_valid({"tasks": [row], "next_cursor": 3})  # the page's own fields
    assert not check.is_valid({"tasks": [{k: v for k, v in row.items() if k != "status"}], "next_cursor": None})
    detail = lean_output_schema(schemas.TaskDetail.model_json_schema())  # a nullable array of objects too
    assert detail["properties"]["history"]["items"][ROW_FIELDS] == "#/$defs/ProgressPoint"
    assert detail["properties"]["stages"]["items"][ROW_FIELDS] == "#/$defs/StageInfo"
