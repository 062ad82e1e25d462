"""Argument types the MCP tools share: list-valued filters that also take one name or a comma-separated string.

An assistant that reads `status: RUNNING,QUEUED` in a resource template writes the same in a tool call, and one
that wants one status writes `"RUNNING"`, not `["RUNNING"]`: both are accepted (and advertised in the schema) as
well as a JSON list (`comma_list`, `names_schema`: core/requests.py, which the bulk operations' models share).
Names are validated where they are used (the core's parsers), with errors that list the allowed ones; the schemas
also list them as enums where the set is fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field, WithJsonSchema

from ..core.requests import STATUS_NAMES, StatusName, comma_list, names_schema

__all__ = [  # comma_list, names_schema, STATUS_NAMES and StatusName are declared with the request models
    "STATUS_NAMES",
    "PageSize",
    "StatusName",
    "TaskStatuses",
    "TaskTypes",
    "annotated",
    "comma_list",
    "names_schema",
    "page_size",
]


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


TaskStatuses = Annotated[
    list[StatusName] | None,
    BeforeValidator(comma_list),
    WithJsonSchema(names_schema("Only tasks with one of these statuses", STATUS_NAMES)),
]
TaskTypes = Annotated[
    list[str] | None, BeforeValidator(comma_list), WithJsonSchema(names_schema("Only tasks of these types (e.g. demo)"))
]
