"""Builds the MCP server (the official SDK's MCPServer) over a TaskManager."""

from __future__ import annotations

import logging
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ToolExecution
from mcp.types import Tool as MCPTool
from pydantic import ValidationError

from .._version import __version__
from ..core.manager import TaskManager
from ..core.models import Task
from ..evaluations.service import EvaluationService
from ..security.identity import TOOL_ACTIONS
from .evaluation_tools import evaluation_outcome, register_evaluation_tools
from .principal import acting_as, current_principal, principal_of
from .resources import register_resources
from .subscriptions import ResourceWatch, install_subscriptions
from .tasks_ext import PlexusTasks, install_task_capability
from .tools import TASK_TOOLS, outcome_result, register_tools

INSTRUCTIONS = (
    "Plexus runs long tasks in the user's Jupyter server. Tools return at once: start work with "
    "run_demo_task, then follow it with get_task (or read plexus://tasks/{task_id}) and stop it with "
    "cancel_tasks. Lists are paginated: pass next_cursor back as cursor."
)


class PlexusMCPServer(MCPServer):
    """The SDK's MCPServer, with argument errors a person (or a model) can act on.

    The SDK reports a schema violation as pydantic's multi-line dump (model name, error type codes, a
    documentation URL). Here it becomes one line per bad argument: its name, what is allowed, and
    what was sent.
    """

    task_tools: frozenset[str] = frozenset()

    async def list_tools(self) -> list[MCPTool]:
        tools = await super().list_tools()
        for tool in tools:
            if tool.name in self.task_tools:  # 2025-11-25: these may be called as tasks (the 2026 era drops it)
                tool.execution = ToolExecution(task_support="optional")
        return tools

    async def _handle_list_tools(self, ctx: Any, params: Any) -> Any:
        result = await super()._handle_list_tools(ctx, params)
        principal = principal_of(ctx)
        if not principal.is_admin:  # a key sees only the tools its role may call
            result.tools = [t for t in result.tools if principal.may_call(t.name)]
        return result

    async def _handle_call_tool(self, ctx: Any, params: Any) -> Any:
        with acting_as(principal_of(ctx)):
            return await super()._handle_call_tool(ctx, params)

    async def _handle_read_resource(self, ctx: Any, params: Any) -> Any:
        with acting_as(principal_of(ctx)):
            return await super()._handle_read_resource(ctx, params)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            available = ", ".join(sorted(t.name for t in self._tool_manager.list_tools()))
            raise ToolError(f"unknown tool {name!r}; available tools: {available}")
        principal = current_principal()
        if not principal.may_call(name):
            raise ToolError(principal.denial(TOOL_ACTIONS.get(name, "keys")))
        allowed = set(tool.parameters.get("properties", {}))
        unknown = sorted(set(arguments) - allowed)
        if unknown:
            # pydantic would drop them silently: a misspelt argument must not run with its default.
            raise ToolError(
                f"invalid arguments for {name}: unknown argument(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):
                raise ToolError(describe_validation_error(name, exc.__cause__)) from exc.__cause__
            raise


def describe_validation_error(tool: str, error: ValidationError) -> str:
    """'invalid arguments for run_demo_task: items: Input should be greater than or equal to 1 (got 0)'."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "arguments"
        text = f"{where}: {item['msg']}"
        if item["type"] != "missing":
            sent = repr(item.get("input"))
            text += f" (got {sent if len(sent) <= 60 else sent[:57] + '...'})"
        problems.append(text)
    return f"invalid arguments for {tool}: " + "; ".join(problems)


def build_mcp_server(manager: TaskManager, evaluations: EvaluationService | None = None) -> MCPServer:
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
    tasks = PlexusTasks(manager, task_tools, outcome)
    server = PlexusMCPServer(
        name="plexus",
        title="Plexus tasks and evaluations",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level="WARNING",
        extensions=[tasks],
        middleware=[tasks.legacy_middleware],
    )
    server.task_tools = tasks.task_tools
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name in ("mcp", "sse_starlette"):
        logging.getLogger(name).setLevel(logging.WARNING)
    register_tools(server, manager)
    register_resources(server, manager)
    if evaluations is not None:
        register_evaluation_tools(server, evaluations)
    install_task_capability(server._lowlevel_server)
    if manager is not None:  # None when only the schemas are wanted (docs.py)
        watch = ResourceWatch(manager, evaluations)
        tasks.follow_status = watch.follow_status
        install_subscriptions(server, watch, outcome)
        server.resource_watch = watch  # type: ignore[attr-defined]
    return server
