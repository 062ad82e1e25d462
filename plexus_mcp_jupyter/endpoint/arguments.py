"""Argument types the MCP tools share: list-valued filters that also take one name or a comma-separated string.

An assistant that reads `status: RUNNING,QUEUED` in a resource template writes the same in a tool call, and one
that wants one status writes `"RUNNING"`, not `["RUNNING"]`: both are accepted (and advertised in the schema) as
well as a JSON list. Names are validated where they are used (the core's parsers), with errors that list the
allowed ones; the schemas also list them as enums where the set is fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

from ..core.errors import InvalidArgument
from ..core.models import TaskStatus


def comma_list(value: Any) -> Any:
    """ "A,B" and "A" become ["A", "B"] and ["A"]; a list (or anything else) is left to the type's own check."""
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return value


def names_schema(description: str, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON schema of a list-valued filter: a list of names, one name, or comma-separated names."""
    item: dict[str, Any] = {"type": "string"}
    if allowed:
        item["enum"] = list(allowed)
    return {
        "anyOf": [{"type": "array", "items": item}, {"type": "string"}, {"type": "null"}],
        "default": None,
        "description": f"{description}: a list, one name, or comma-separated names",
    }


def page_size(maximum: int) -> Any:
    """The page-size argument, bounded by the server's max_page_size (not a constant)."""
    return Annotated[int, Field(ge=1, le=maximum, description=f"Page size, 1 to {maximum} (max_page_size)")]


F = TypeVar("F", bound=Callable[..., Any])


def annotated(**types: Any) -> Callable[[F], F]:
    """Set argument types known only when the server is built (a bound from its settings).

    The SDK reads a tool's signature with `eval_str=True`, against the module's globals: a type that depends
    on a local (the configured max_page_size) must be put in as an object, before the tool is registered.
    """

    def decorate(fn: F) -> F:
        fn.__annotations__.update(types)
        return fn

    return decorate


PageSize = Annotated[int, Field(ge=1, description="Page size, 1 to max_page_size")]  # bound per server (annotated)


STATUS_NAMES = tuple(s.value for s in TaskStatus)


def task_status(value: str) -> str:
    """A status name, any case, as the core spells it; the core's error (a ValueError) names the allowed ones, and
    pydantic reports it per element (`status.0`), so a long bad list gets a bounded message."""
    try:
        return TaskStatus.parse(value).value
    except InvalidArgument:  # not the core's message: pydantic's "(got ...)" quotes the value, bounded
        raise ValueError(f"unknown status; expected one of {', '.join(STATUS_NAMES)}") from None


StatusName = Annotated[str, AfterValidator(task_status)]
TaskStatuses = Annotated[
    list[StatusName] | None,
    BeforeValidator(comma_list),
    WithJsonSchema(names_schema("Only tasks with one of these statuses", STATUS_NAMES)),
]
TaskTypes = Annotated[
    list[str] | None, BeforeValidator(comma_list), WithJsonSchema(names_schema("Only tasks of these types (e.g. demo)"))
]
