"""The base of the request models: one pydantic model per operation, shared by every face.

A model declares an operation's arguments once (names, types, bounds, descriptions). MCP publishes it as the
tool's input schema (`tool_signature`), REST validates its JSON body with it, the notebook client and the CLI
build it, and the service takes it. A body the model refuses becomes one InvalidArgument (`request_error`)
that names each bad field, what was wrong and what is allowed, the same words on every face.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    ValidationError,
    WithJsonSchema,
    create_model,
)

from .errors import InvalidArgument, one_line
from .models import TaskStatus

MAX_PROBLEMS = 3  # per message: a body with a thousand bad fields gets a bounded answer
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
MAX_DESCRIPTION = 1000
SAMPLE_SIZE = 20  # task ids a dry run shows
# The largest max_page_size (config.py: the core does not import the settings; a test holds the two equal, and
# `paged` refuses a larger bound at start). A server's own bound is `paged(model, its max_page_size)`.
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 20
HISTORY_MAX = 1000  # most progress samples one read returns
MAX_CURSOR_CHARS = 1024  # an opaque cursor (ours are under 200): a longer one is refused before it is decoded
MAX_LISTED_NAMES = 64  # names in one list-valued filter (statuses, types), after duplicates are dropped
# Ids in one bulk selection: the largest max_batch_size (config.py); a server's own bound is checked by
# BatchOperations.select, naming the setting.
MAX_SELECTED_IDS = 100_000
# Query parameters that are Jupyter's own (its token, its XSRF value), not an operation's arguments
QUERY_CREDENTIALS = frozenset({"token", "_xsrf"})


def _not_a_bool(value: Any) -> Any:
    # pydantic takes true as 1; a number argument given true or false is a mistake to refuse, not to run with
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


Number = BeforeValidator(_not_a_bool)  # Annotated[int | float, Number]: a number, never a boolean

Priority = Annotated[  # a task's queue priority, as every operation that sets one takes it
    int,
    Field(  # before Number: constraints after a validator are not published as minimum/maximum
        ge=MIN_PRIORITY,
        le=MAX_PRIORITY,
        description=f"Queue priority, {MIN_PRIORITY} to {MAX_PRIORITY} (higher starts first); operator keys at most "
        "max_priority_operator (default 10)",
    ),
    Number,
]

M = TypeVar("M", bound="RequestModel")
F = TypeVar("F", bound=Callable[..., Any])


class RequestModel(BaseModel):
    """An operation's arguments. Unknown fields are refused: a misspelt argument must not run with its
    default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls: type[M], body: Any, where: str = "") -> M:
        """The request in `body` (a JSON object), or InvalidArgument saying what is wrong with it.

        `where` prefixes field names (`params.` for a spec's params, say)."""
        if not isinstance(body, Mapping):
            raise InvalidArgument(
                f"{where.rstrip('.') or 'the request'} must be a JSON object with the fields "
                f"{', '.join(cls.model_fields)}, not {type(body).__name__}"
            )
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise request_error(cls, exc, where) from None

    @classmethod
    def from_query(cls: type[M], query: Mapping[str, Iterable[str]], **given: Any) -> M:
        """The request in a query string (REST, a resource URI): each name's values as decoded text, `given` the
        arguments taken from the path.

        A list-valued field takes every value of its name, each one name or comma-separated names
        (`?status=RUNNING&status=QUEUED` or `?status=RUNNING,QUEUED`); any other field the last value, an empty
        one counting as left out; numbers and true/false are read from their text by the model. A name the model
        does not have is refused with the allowed ones (Jupyter's `token` and `_xsrf` are not arguments)."""
        fields: dict[str, Any] = {}
        for name, raw in query.items():
            values = list(raw)
            if name in QUERY_CREDENTIALS or not values:
                continue
            if _is_listed(cls, name):
                fields[name] = [part for value in values for part in comma_list(value)]
            elif values[-1] != "":
                fields[name] = values[-1]
        return cls.parse({**fields, **given})

    def arguments(self) -> dict[str, Any]:
        """The fields that were given or differ from their default: what a client sends (JSON-ready)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    def query(self, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """The arguments as query parameters (what `from_query` reads back): a list as repeated values, a flag
        as true/false; `exclude` those that travel in the path."""
        return {
            name: ("true" if value else "false") if isinstance(value, bool) else value
            for name, value in self.arguments().items()
            if name not in exclude
        }


def query_of(**values: str | None) -> dict[str, list[str]]:
    """A resource template's variables as a query for `RequestModel.from_query`: those that were given."""
    return {name: [value] for name, value in values.items() if value is not None}


def _is_listed(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields.get(name)
    return info is not None and typing.get_origin(info.annotation) in (tuple, list)


def request_error(model: type[BaseModel], error: ValidationError, where: str = "") -> InvalidArgument:
    """One message for a body `model` refused: unknown fields with the allowed ones, then each bad field
    with pydantic's reason, the value sent (quoted, bounded; a secret's never) and its description, then each
    missing one with its description."""
    secrets = {name for name, info in model.model_fields.items() if is_secret(info.annotation)}
    errors = [  # a secret's text is never quoted back (nor logged with the 400's reason)
        {**e, "input": HIDDEN} if e["loc"] and e["loc"][0] in secrets else e for e in error.errors(include_url=False)
    ]
    problems = refusal_problems(
        errors, lambda loc: _description_at(model, loc), lambda loc: _fields_at(model, loc), where
    )
    return InvalidArgument("; ".join(problems))


HIDDEN = object()  # an error's input that must not be quoted: a secret's text


def is_secret(annotation: Any) -> bool:
    """Whether a field holds a secret (`SecretStr`, or optionally one): a refusal names it, never quotes it."""
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def refusal_problems(
    errors: list[Any],
    described: Callable[[tuple[Any, ...]], str | None],
    allowed_at: Callable[[tuple[Any, ...]], Iterable[str]],
    where: str = "",
) -> list[str]:
    """A refused request's problems in words: unknown fields first, with the fields allowed where the first one
    was found (`allowed_at(loc)`: the top level, or a nested object such as a batch's spec), then `field_problems`
    (`described(loc)`: the description of the field at `loc`). REST's `request_error` reads both from the model,
    MCP from the tool's input schema."""
    problems: list[str] = []
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        unknown = [where + field_path(e["loc"]) for e in extra]
        shown = [one_line(u, 40) for u in unknown[:5]]
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        problems.append(
            f"unknown field(s) {shown}{more}; allowed: {', '.join(allowed_at(tuple(extra[0]['loc'][:-1])))}"
        )
    problems.extend(field_problems([e for e in errors if e["type"] != "extra_forbidden"], described, where))
    return problems


def _node_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The annotation of the value at `loc` inside `model` (a list's element by its index); None if not found."""
    node: Any = model
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(node)
            node = args[0] if args else None
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return None
    return node


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the object at `loc` inside `model`; none if not a model."""
    node = _node_at(model, loc)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _description_at(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The description of the field at `loc` inside `model` (a list's elements share their field's)."""
    while loc and isinstance(loc[-1], int):
        loc = loc[:-1]
    parent = _node_at(model, loc[:-1]) if loc else None
    if isinstance(parent, type) and issubclass(parent, BaseModel) and loc[-1] in parent.model_fields:
        return parent.model_fields[loc[-1]].description
    return None


def field_names(loc: Iterable[Any]) -> tuple[str, ...]:
    """The names along `loc` without the lists' indexes: a field's identity, its elements' alike."""
    return tuple(str(part) for part in loc if not isinstance(part, int))


def field_path(loc: Iterable[Any]) -> str:
    """A field's place in a request as a client writes it: names joined by dots, a list's element by its index
    in brackets (`tasks[1].priority`, `status[0]`), as the batch's own checks name a spec (`tasks[1]: ...`)."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def field_problems(errors: list[Any], described: Callable[[tuple[Any, ...]], str | None], where: str = "") -> list[str]:
    """Each bad field of a refused request in words, at most MAX_PROBLEMS: `field: reason (got value)`, then what
    is allowed (the field's description, once per field) when pydantic's reason names only one bound or the type;
    a missing one with its description. The words of every face: REST and a request model (`request_error`), and
    MCP's tool arguments (endpoint/server.py), which the SDK checks against the same fields before a tool runs."""
    problems: list[str] = []
    said: set[tuple[str, ...]] = set()  # a field's description is said once (a list's elements share it)
    for item in errors[:MAX_PROBLEMS]:
        field = field_path(item["loc"]) or "the request"
        name = where + one_line(field, 60)
        # The field's own description (a batch spec's priority says its range, not what the list of specs is).
        names = field_names(item["loc"])
        description = described(tuple(item["loc"])) if names not in said else None
        said.add(names)
        if item["type"] == "missing":
            problems.append(f"{name} is required" + (f": {description}" if description else ""))
            continue
        reason = str(item["msg"]).removeprefix("Value error, ")
        # our own validators' messages (value errors) say what is allowed already
        allowed = f"; {description}" if description and item["type"] != "value_error" else ""
        got = "" if item.get("input") is HIDDEN else f" (got {one_line(repr(item.get('input')), 60)})"
        problems.append(f"{name}: {reason}{got}{allowed}")
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more problem(s)")
    return problems


def takes(model: type[BaseModel]) -> Callable[[F], F]:
    """Give a tool function `fn(leading..., **fields)` the model's fields as keyword parameters.

    The SDK builds a tool's input schema from its function's signature (`inspect.signature`, which reads
    `__signature__`): the published schema is then the model's fields, flat, each with its type, bounds,
    default and description, declared once, here in the model. The function builds the model from them.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        leading = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        for name, field in model.model_fields.items():
            default = inspect.Parameter.empty if field.is_required() else field.default
            leading.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[field.annotation, field]
                )
            )
        fn.__signature__ = signature.replace(parameters=leading)  # type: ignore[attr-defined]
        return fn

    return decorate


# Also each spec of a batch: dispatch_batch's, POST tasks with {"tasks": [...]}, the CLI's `plexus tasks dispatch`
# file; the notebook's `dispatch` builds one. The docstring is published (the schema's description).
class DispatchTask(RequestModel):
    """One task to dispatch: the body of POST plexus/api/tasks, or one spec of a batch (dispatch_batch)."""

    type: str = Field(min_length=1, max_length=64, description="A registered task type, e.g. demo, or evaluation")
    params: Annotated[dict[str, Any], BeforeValidator(lambda value: {} if value is None else value)] = Field(
        default_factory=dict,
        description="The task type's parameters (for demo: items, "
        "item_delay_ms, fail, fail_at, seed; for evaluation: create_evaluation's "
        "arguments, type being the evaluation type)",
    )
    priority: Priority = 0
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION, description="Shown in listings")


class DispatchBatch(RequestModel):
    """Many tasks in one call: dispatch_batch (MCP), POST plexus/api/tasks with {"tasks": [...]}, `plexus tasks
    dispatch`, the notebook's dispatch_batch. A server's own bound (max_batch_size) is checked by its
    BatchOperations, naming the count and the bound (REST before the specs are parsed; a body is bounded by
    max_request_bytes)."""

    tasks: list[DispatchTask] = Field(min_length=1, description="The task specs, in order")


# -- selections: which tasks a bulk operation acts on ----------------------------------------------------------


def comma_list(value: Any) -> Any:
    """ "A,B" and "A" become ["A", "B"] and ["A"]; a list (or anything else) is left to the type's own check.

    An assistant that reads `status: RUNNING,QUEUED` in a resource template writes the same in a tool call, and
    one that wants one status writes `"RUNNING"`, not `["RUNNING"]`: both are accepted (and advertised in the
    schema) as well as a JSON list; so are the CLI's `--status RUNNING,QUEUED` and a REST body's string."""
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


STATUS_NAMES = tuple(s.value for s in TaskStatus)


def task_status(value: str) -> str:
    """A status name, any case, as the core spells it; the error lists the allowed ones, and pydantic reports it
    per element (`status[0]`), so a long bad list gets a bounded message."""
    try:
        return TaskStatus.parse(value).value
    except InvalidArgument:  # not the core's message: pydantic's "(got ...)" quotes the value, bounded
        raise ValueError(f"unknown status; {TaskStatus.expected(value)}") from None


StatusName = Annotated[str, AfterValidator(task_status)]


def listed(maximum: int, what: str = "names", *, any_case: bool = False) -> BeforeValidator:
    """A list-valued filter's validator: null or left out is none, "A,B" is ["A", "B"] (`comma_list`), a name given
    twice counts once (`?status=RUNNING&status=RUNNING`), and more than `maximum` distinct ones are refused before
    each is checked. `any_case`: names are case-insensitive (statuses), so `running` and `RUNNING` are one name
    (folded to upper case first: case variants cannot make one name many)."""

    def distinct(value: Any) -> Any:
        if value is None:
            return ()
        value = comma_list(value)
        if isinstance(value, (list, tuple)):
            if any_case:
                value = [v.strip().upper() if isinstance(v, str) else v for v in value]
            with contextlib.suppress(TypeError):  # an unhashable element (an object): its own check refuses it
                value = list(dict.fromkeys(value))
            if len(value) > maximum:
                raise ValueError(f"{len(value)} {what} given; at most {maximum} are allowed")
        return value

    return BeforeValidator(distinct)


LISTED = listed(MAX_LISTED_NAMES)
STATUSES_LISTED = listed(MAX_LISTED_NAMES, any_case=True)  # a status name in any case is one status


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


OptionalText = Annotated[str | None, BeforeValidator(_blank_is_none)]


class Selection(RequestModel):
    """Which tasks a bulk operation acts on: explicit ids, or a filter (a non-admin's reaches only its own tasks).

    The one declaration of the selection: MCP's cancel_tasks, retry_tasks and set_task_priority publish it (with
    their operation's fields, below), REST's POST tasks/{cancel,retry,priority} parse their body with it, and the
    CLI and the notebook client build it before sending."""

    task_ids: Annotated[
        tuple[Annotated[str, Field(max_length=64)], ...],
        listed(MAX_SELECTED_IDS, "task ids"),
        WithJsonSchema(
            names_schema("Ids of the tasks to act on (full ids, as list_tasks shows them; at most max_batch_size)")
        ),
    ] = ()
    status: Annotated[
        tuple[StatusName, ...],
        STATUSES_LISTED,
        WithJsonSchema(
            names_schema(
                "Filter: only tasks with these statuses (default: those the operation can change)", STATUS_NAMES
            )
        ),
    ] = ()
    type: Annotated[
        tuple[Annotated[str, Field(max_length=64)], ...],
        LISTED,
        WithJsonSchema(names_schema("Filter: only tasks of these types")),
    ] = ()
    owner: OptionalText = Field(
        None,
        max_length=128,
        description="Filter: only this owner's tasks (admins; others always act on their own tasks only)",
    )
    created_after: OptionalText = Field(
        None, max_length=64, description="Filter: created at or after this ISO 8601 time"
    )
    created_before: OptionalText = Field(None, max_length=64, description="Filter: created before this ISO 8601 time")
    batch: OptionalText = Field(None, max_length=64, description="Filter: only the tasks of this batch")

    FILTER: ClassVar[tuple[str, ...]] = ("status", "type", "owner", "created_after", "created_before", "batch")

    @property
    def filter_fields(self) -> dict[str, Any]:
        """The filter as given."""
        return {name: getattr(self, name) for name in self.FILTER if getattr(self, name) not in (None, ())}

    def audit_fields(self) -> dict[str, Any]:
        """What the audit log records of a selection: the filter, or how many ids (never the ids)."""
        return {"filter": self.filter_fields} if self.filter_fields else {"task_ids": len(self.task_ids)}


class BulkRequest(Selection):
    """A bulk operation's arguments: the selection, and whether only to count (a dry run)."""

    operation: ClassVar[str]  # what BatchOperations and the audit log call it
    route: ClassVar[str]  # REST: POST plexus/api/tasks/{route}

    dry_run: Annotated[bool, Strict()] = Field(
        False, description=f"Only count what would be acted on (and show up to {SAMPLE_SIZE} ids); change nothing"
    )

    def audit_fields(self) -> dict[str, Any]:
        """What the audit log records of the call: the operation, dry_run, the filter or how many ids."""
        return {"operation": self.operation, "dry_run": self.dry_run, **super().audit_fields()}


class CancelTasks(BulkRequest):
    """Cancel tasks by id or by filter (without status: the unfinished ones)."""

    operation: ClassVar[str] = "cancel"
    route: ClassVar[str] = "cancel"

    wait_seconds: Annotated[float, Number] = Field(
        0, ge=0, le=30, description="Wait up to this long (0 to 30 s) for running tasks to end before answering"
    )


class RetryTasks(BulkRequest):
    """Run FAILED or CANCELLED tasks again as new attempts, by id or by filter."""

    operation: ClassVar[str] = "retry"
    route: ClassVar[str] = "retry"


class SetTaskPriority(BulkRequest):
    """Change the priority of tasks that have not started, by id or by filter."""

    operation: ClassVar[str] = "set_priority"
    route: ClassVar[str] = "priority"

    priority: Annotated[Priority, Field(description=f"The new priority, {MIN_PRIORITY} to {MAX_PRIORITY}")]

    def audit_fields(self) -> dict[str, Any]:
        return {**super().audit_fields(), "priority": self.priority}


BULK_REQUESTS: dict[str, type[BulkRequest]] = {m.route: m for m in (CancelTasks, RetryTasks, SetTaskPriority)}


# -- reads: listings and one task ---------------------------------------------------------------------------------


Limit = Annotated[int, Number]  # a page size: bounded per server by `paged`
TaskId = Annotated[str, Field(min_length=1, max_length=64, description="The task's id")]
TaskTypeName = Annotated[str, Field(max_length=64)]
CreatedSince = Annotated[  # the bound on the text, not on the union (None has no length)
    Annotated[str, Field(max_length=64)] | None,
    BeforeValidator(_blank_is_none),
    Field(description="Only tasks created at or after this ISO 8601 time"),
]


def cursor_too_long(length: int) -> str:
    """What a client is told of a cursor over MAX_CURSOR_CHARS (refused before it is decoded: ours are far shorter)."""
    return (
        f"a cursor is at most {MAX_CURSOR_CHARS} characters, not {length}: pass back the next_cursor of a previous "
        "page unchanged, or omit it for the first page"
    )


def _cursor_text(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_CURSOR_CHARS:
        raise ValueError(cursor_too_long(len(value)))
    return _blank_is_none(value)


Cursor = Annotated[
    str | None, BeforeValidator(_cursor_text), Field(description="next_cursor of the previous page, unchanged")
]


def page_field(maximum: int) -> Any:
    """The `limit` field of a listing whose pages go up to `maximum` (a server's max_page_size)."""
    return Field(
        min(DEFAULT_PAGE_SIZE, maximum), ge=1, le=maximum, description=f"Page size, 1 to {maximum} (max_page_size)"
    )


@functools.cache
def paged(model: type[M], max_page_size: int) -> type[M]:
    """`model` (a listing's request) with its `limit` bounded by a server's max_page_size: what that server's MCP
    tool publishes (`maximum`) and what its REST handler and resources parse with, so a limit above it is refused
    on every face in the same words, naming the bound. One class per (model, bound)."""
    if not 1 <= max_page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"max_page_size must be 1 to {MAX_PAGE_SIZE}, not {max_page_size}")
    bounded: type[M] = create_model(  # type: ignore[call-overload]
        model.__name__,
        __base__=model,
        __module__=model.__module__,
        __doc__=model.__doc__,
        limit=(Limit, page_field(max_page_size)),
    )
    return bounded


class ListTasks(RequestModel):
    """List tasks, newest first: list_tasks (MCP), GET plexus/api/tasks, plexus://tasks{?...}, plexus.tasks().

    Task types are checked against the registered ones by the manager (the notebook's process does not know the
    server's types)."""

    status: Annotated[
        tuple[StatusName, ...],
        STATUSES_LISTED,
        WithJsonSchema(names_schema("Only tasks with one of these statuses", STATUS_NAMES)),
    ] = ()
    type: Annotated[
        tuple[TaskTypeName, ...], LISTED, WithJsonSchema(names_schema("Only tasks of these types (e.g. demo)"))
    ] = ()
    since: CreatedSince = None
    limit: Limit = page_field(MAX_PAGE_SIZE)
    cursor: Cursor = None
    batch: OptionalText = Field(
        None, max_length=64, description="Only the tasks of this batch (dispatch_batch's batch_id)"
    )


class GetTask(RequestModel):
    """One task, with its progress history if asked: get_task (MCP), GET plexus/api/tasks/{task_id}."""

    task_id: TaskId
    history: bool = Field(False, description="Include progress samples (about one per second)")
    history_limit: Annotated[int, Number] = Field(
        100, ge=1, le=HISTORY_MAX, description=f"Most recent samples to include, 1 to {HISTORY_MAX}"
    )
