"""Builds the MCP server (the official SDK's MCPServer) over a TaskManager."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, CallToolResult, ToolExecution
from mcp.types import Tool as MCPTool
from pydantic import ValidationError

from .._version import __version__
from ..core.errors import PlexusError, bounded
from ..core.manager import TaskManager
from ..core.models import Task
from ..core.requests import query_of, refusal_problems
from ..evaluations.service import EvaluationService
from ..security.audit import AuditLog, QueryAudit, audit_notes
from ..security.identity import TOOL_ACTIONS
from ..telemetry import Telemetry
from .batch_tools import register_batch_tools
from .completion import install_completion
from .evaluation_tools import evaluation_outcome, register_evaluation_tools
from .input_limits import bound_tool_error, bounded_error, check_params
from .principal import REHEARSAL, acting_as, current_principal, principal_of
from .prompts import register_prompts
from .resources import register_metrics_resource, register_resources
from .schemas import lean_output_schema
from .sdk_compat import lowlevel_server
from .subscriptions import ResourceWatch, install_subscriptions
from .task_logs import TaskLogs, install_logging
from .tasks_ext import PlexusTasks
from .tools import TASK_TOOLS, outcome_result, register_tools, unknown_arguments

INSTRUCTIONS = (
    "Plexus runs long tasks in the user's Jupyter server. Tools return at once: start work with "
    "run_demo_task, then follow it with get_task (or read plexus://tasks/{task_id}) and stop it with "
    "cancel_tasks. Many tasks at once: dispatch_batch, then plexus://batches/{batch_id}; cancel_tasks, "
    "retry_tasks and set_task_priority take ids or a filter, with dry_run to count first. Lists are paginated: "
    "pass next_cursor back as cursor."
)


async def as_the_caller(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Server middleware: each request runs as its caller, and a listing shows only what the caller may use.

    Tools, resources and task methods read the caller with current_principal(). A key sees only the tools its
    role may call, and the audit log's template only when it may read the log. The results filtered here
    are the wire form the SDK's handlers produced (`tools`, `resourceTemplates`).
    """
    principal = principal_of(ctx)
    try:
        check_params(ctx.method, ctx.params)  # a URI or text too long is refused before the SDK parses it
        with acting_as(principal):
            result = await call_next(ctx)
    except Exception as exc:  # what the client is told is bounded, whoever raised it
        bounded_error(exc)
        raise
    if not isinstance(result, dict):
        return result
    if result.get("isError") is True:
        bound_tool_error(result)
    if ctx.method == "tools/list" and not principal.is_admin:
        result["tools"] = [t for t in result.get("tools", ()) if principal.may_call(t.get("name"))]
    elif ctx.method == "resources/templates/list" and not principal.may("audit"):
        result["resourceTemplates"] = [
            t
            for t in result.get("resourceTemplates", ())
            if not str(t.get("uriTemplate", "")).startswith("plexus://audit")
        ]
    return result


class PlexusMCPServer(MCPServer):
    """The SDK's MCPServer, with argument errors a person (or a model) can act on.

    The SDK reports a schema violation as pydantic's multi-line dump (model name, error type codes, a
    documentation URL). Here it becomes one line per bad argument: its name, what is allowed, and
    what was sent.
    """

    task_tools: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        task_tools: frozenset[str] = frozenset(),
        audit: AuditLog | None = None,
        task_logs: TaskLogs | None = None,
        telemetry: Telemetry | None = None,
        resource_watch: ResourceWatch | None = None,
        **sdk_options: Any,
    ) -> None:
        """The SDK's options, and Plexus's collaborators the runtime reaches through the server (None: built for
        its schemas only, without a manager)."""
        super().__init__(**sdk_options)
        self.task_tools = task_tools
        self.audit = audit
        self.task_logs = task_logs
        self.telemetry = telemetry
        self.resource_watch = resource_watch
        self._lean_schemas: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    async def list_tools(self) -> list[MCPTool]:
        tools = await super().list_tools()
        for tool in tools:
            if tool.name in self.task_tools:  # 2025-11-25: these may be called as tasks (the 2026 era drops it)
                tool.execution = ToolExecution(task_support="optional")
            if tool.output_schema is not None:
                tool.output_schema = self._lean_output_schema(tool.output_schema)
        return tools

    def _lean_output_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The published output schema in the form clients validate fastest (schemas.lean_output_schema), made once
        per tool: the SDK hands out its tool's same schema object on every listing."""
        kept = self._lean_schemas.get(id(schema))
        if kept is None or kept[0] is not schema:
            kept = self._lean_schemas[id(schema)] = (schema, lean_output_schema(schema))
        return kept[1]

    audit: AuditLog | None = None

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        """Check, run and audit one tool call (every call is recorded, with its outcome, but the endpoint's own
        start-up rehearsals: REHEARSAL). A tool may note what to record instead of its arguments
        (note_for_audit): batch operations note their filter and count."""
        outcome = "error"
        started = time.perf_counter()
        with audit_notes() as note:
            try:
                result = await self._call_tool(name, arguments, context)
                outcome = "error" if getattr(result, "is_error", False) else "ok"
                return result
            except ToolError as exc:
                outcome = "denied" if str(exc).startswith("permission denied") else "error"
                raise
            finally:
                if self.audit is not None and current_principal() is not REHEARSAL:
                    try:
                        scope = getattr(context.request_context.request, "scope", None) if context is not None else None
                    except ValueError:  # no request (stdio)
                        scope = None
                    client = scope.get("client") if isinstance(scope, dict) else None
                    target = next(
                        (
                            str(arguments[k])
                            for k in ("task_id", "evaluation_id", "dataset")
                            if isinstance(arguments, dict) and k in arguments
                        ),
                        None,
                    )
                    self.audit.record(
                        current_principal(),
                        f"tool.{name}",
                        target=target,
                        outcome=outcome,
                        client=client[0] if client else None,
                        details=dict(note) if note else {"arguments": arguments},
                        seconds=time.perf_counter() - started,
                    )

    async def _call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        schema_of = lowlevel_server(self).get_tool_input_schema  # MCPServer sets it: the tool's input schema
        schema = schema_of(name) if schema_of is not None else None
        if schema is None:
            available = ", ".join(sorted(t.name for t in await self.list_tools()))
            raise ToolError(f"unknown tool {name!r}; available tools: {available}")
        principal = current_principal()
        if not principal.may_call(name):
            raise ToolError(principal.denial(TOOL_ACTIONS.get(name, "keys")))
        unknown = unknown_arguments(name, arguments, schema.get("properties", {}))
        if unknown is not None:
            raise ToolError(unknown)
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(describe_validation_error(name, exc.__cause__, schema)) from exc.__cause__
            raise


def register_audit_resource(server: MCPServer, audit: AuditLog) -> None:
    @server.resource(
        "plexus://audit{?action,outcome,owner,since,limit,cursor}",
        name="audit",
        title="Audit log",
        description="Audit records, newest first (admins only); action takes a * wildcard "
        "(tool.*), outcome is ok, error or denied, owner a caller (key:<id>), since an ISO 8601 time.",
        mime_type="application/json",
    )
    async def audit_resource(
        action: str | None = None,
        outcome: str | None = None,
        owner: str | None = None,
        since: str | None = None,
        limit: str | None = None,
        cursor: str | None = None,
    ) -> str:
        principal = current_principal()
        if not principal.may("audit"):
            audit.record(principal, "resource.read", target="plexus://audit", outcome="denied")
            raise ResourceError(principal.denial("audit"))
        try:
            query = query_of(action=action, outcome=outcome, owner=owner, since=since, limit=limit, cursor=cursor)
            request = QueryAudit.from_query(query)
            records, next_cursor = await anyio.to_thread.run_sync(audit.query, request)  # the store, off the loop
        except PlexusError as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return json.dumps({"records": records, "next_cursor": next_cursor}, default=str)


def describe_validation_error(tool: str, error: ValidationError, schema: Mapping[str, Any] | None = None) -> str:
    """'invalid arguments for run_demo_task: items: Input should be greater than or equal to 1 (got 0); Items to
    process ...': each bad argument in the words REST uses for the same request model (`field_problems`), with
    its description from the tool's input schema."""
    problems = refusal_problems(
        error.errors(include_url=False),
        lambda loc: schema_description_at(schema, loc),
        lambda loc: schema_fields_at(schema, loc),
    )
    return bounded(f"invalid arguments for {tool}: " + "; ".join(problems))  # as REST bounds the same words


def _schema_node_at(schema: Mapping[str, Any] | None, loc: tuple[Any, ...]) -> Any:
    """The node at `loc` in a tool's input schema (a list's element by its index), as written: maybe a `$ref`."""
    node: Any = schema or {}
    for part in loc:
        node = _resolved(schema, node)
        if not isinstance(node, dict):
            return None
        node = node.get("items") if isinstance(part, int) else node.get("properties", {}).get(part)
    return node


def _resolved(schema: Mapping[str, Any] | None, node: Any) -> Any:
    """`node`, or the `$defs` entry its `$ref` points to."""
    ref = node.get("$ref", "") if isinstance(node, dict) else ""
    return (schema or {}).get("$defs", {}).get(ref.rsplit("/", 1)[-1]) if ref.startswith("#/$defs/") else node


def schema_fields_at(schema: Mapping[str, Any] | None, loc: tuple[Any, ...]) -> list[str]:
    """The property names of the object at `loc` in a tool's input schema (`$ref`s to its `$defs` followed): what
    an unknown nested field is told is allowed, as REST reads it from the model."""
    node = _resolved(schema, _schema_node_at(schema, loc))
    return list(node.get("properties", {})) if isinstance(node, dict) else []


def schema_description_at(schema: Mapping[str, Any] | None, loc: tuple[Any, ...]) -> str | None:
    """The description of the property at `loc` (a list's elements share their property's), as REST reads it
    from the model."""
    while loc and isinstance(loc[-1], int):
        loc = loc[:-1]
    node = _schema_node_at(schema, loc) if loc else None
    for candidate in (node, _resolved(schema, node)):
        if isinstance(candidate, dict) and isinstance(candidate.get("description"), str):
            return candidate["description"]
    return None


def build_mcp_server(
    manager: TaskManager,
    evaluations: EvaluationService | None = None,
    audit: AuditLog | None = None,
    session_count: Callable[[], int] | None = None,
) -> PlexusMCPServer:
    """The MCP server over `manager`; `session_count` tells the service metrics how many MCP sessions are open
    (the endpoint, built after this server)."""
    # MCPServer() calls logging.basicConfig() with a Rich handler on the root logger. Inside Jupyter that
    # would re-route the whole server's logging (and Rich formatting halves throughput), so whatever it
    # adds to the root logger is taken away again; the SDK's loggers stay at WARNING.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def outcome(task: Task) -> CallToolResult:
        """The final tool result of a task, by the tool that starts tasks of its type."""
        if task.type == "evaluation" and evaluations is not None:
            return evaluation_outcome(evaluations, task)
        return outcome_result(task)

    task_tools = (*TASK_TOOLS, "create_evaluation") if evaluations is not None else TASK_TOOLS
    # Each part is built with its collaborators. The metrics and the watch know each other: the metrics count
    # what the watch follows (read when scraped, so the watch built next is there by then), the watch reports
    # its update latency to the metrics.
    telemetry = watch = None
    if manager is not None:  # None when only the schemas are wanted
        telemetry = Telemetry(
            manager, sessions=session_count, subscriptions=lambda: watch.followed() if watch is not None else 0
        )
        watch = ResourceWatch(manager, evaluations, on_sent=telemetry.on_update_sent)
    scrub = audit.scrubber.scrub if audit is not None else None
    logs = TaskLogs(scrub, subscribers=watch.sessions_following if watch is not None else None)
    tasks = PlexusTasks(
        manager, task_tools, outcome, audit, follow_status=watch.follow_status if watch is not None else None
    )
    server = PlexusMCPServer(
        task_tools=tasks.task_tools,
        audit=audit,
        task_logs=logs,
        telemetry=telemetry,
        resource_watch=watch,
        name="plexus",
        title="Plexus tasks and evaluations",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level="WARNING",
        extensions=[tasks],
        middleware=[as_the_caller, tasks.legacy_middleware],
    )
    if audit is not None:
        register_audit_resource(server, audit)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name in ("mcp", "sse_starlette"):
        logging.getLogger(name).setLevel(logging.WARNING)
    register_tools(server, manager, logs)
    register_batch_tools(server, manager, logs)
    register_resources(server, manager)
    if evaluations is not None:
        register_evaluation_tools(server, evaluations, logs)
    register_prompts(server)
    install_logging(server, logs)
    if manager is not None and telemetry is not None and watch is not None:
        install_completion(server, manager, evaluations)
        manager.log_listeners.append(logs.on_line)
        manager.bus.add_listener(telemetry.on_event, remote=False)  # this server's own evaluations only
        if audit is not None:
            audit.observers.append(telemetry.on_audit)
        register_metrics_resource(server, telemetry)
        install_subscriptions(server, watch, outcome)
    return server
