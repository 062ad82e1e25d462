"""`{base_url}plexus/api/tasks`: the REST face of TaskManager (same filters, cursors and errors as MCP)."""

from __future__ import annotations

from typing import Any

from tornado import web

from ..core.errors import InvalidArgument, NotFound, PlexusError
from .base import PlexusHandler, http_error

MAX_DESCRIPTION = 1000
DISPATCH_FIELDS = ("type", "params", "priority", "description")


class TasksHandler(PlexusHandler):
    async def get(self) -> None:
        """List tasks: ?status=RUNNING,QUEUED&type=demo&since=ISO&limit=20&cursor=..."""
        manager = self.runtime.manager
        try:
            flt = manager.build_filter(
                status=self.get_argument("status", None),
                type=self.get_argument("type", None),
                since=self.get_argument("since", None),
                viewer=self.principal.viewer,
            )
            tasks, next_cursor = manager.list_tasks(
                flt,
                limit=manager.parse_limit(self.get_argument("limit", None)),
                cursor=self.get_argument("cursor", None) or None,
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply({"tasks": [t.summary() for t in tasks], "next_cursor": next_cursor})

    async def post(self) -> None:
        """Dispatch a task: {"type": "demo", "params": {...}, "priority": 0}. 201 with the task."""
        self.require("dispatch")
        try:
            body = _dispatch_body(await self.json_body())
            task = self.runtime.manager.dispatch(
                body["type"], body["params"], priority=body["priority"], owner=self.identity,
                description=body["description"], role=self.principal.role.value,
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.set_header("Location", self.request.path.rstrip("/") + "/" + task.id)
        self.reply(task.to_dict(), status=201)


def _dispatch_body(body: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - set(DISPATCH_FIELDS))
    if unknown:
        raise InvalidArgument(f"unknown field(s) {unknown}; allowed: {', '.join(DISPATCH_FIELDS)}")
    task_type = body.get("type", "demo")
    if not isinstance(task_type, str):
        raise InvalidArgument(f"type must be a task type name (a string), not {task_type!r}")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise InvalidArgument("params must be a JSON object")
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION):
        raise InvalidArgument(f"description must be a string of at most {MAX_DESCRIPTION} characters")
    return {"type": task_type, "params": params, "priority": body.get("priority", 0), "description": description}


class TaskHandler(PlexusHandler):
    async def get(self, task_id: str) -> None:
        """One task; ?history=true&history_limit=100 adds its progress history."""
        manager = self.runtime.manager
        try:
            task = manager.get(task_id, self.principal.viewer)
            data = {**task.to_dict(), **manager.queue_fields(task)}
            if self.get_argument("history", "false").lower() in ("1", "true", "yes"):
                raw = self.get_argument("history_limit", "100")
                if not (raw.isascii() and raw.isdigit()):
                    raise InvalidArgument(f"history_limit must be a whole number, not {raw!r}")
                samples, total = manager.store.history(task_id, limit=manager.check_history_limit(int(raw)))
                data["history"] = [s.to_dict() for s in samples]
                data["history_total"] = total
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply(data)


class TaskCancelHandler(PlexusHandler):
    async def post(self, task_id: str) -> None:
        """Cancel one task. 404 if it does not exist; a finished task answers 200 with outcome already_finished."""
        principal = self.require("cancel_own")
        outcome = self.runtime.manager.cancel([task_id], viewer=principal.viewer, others=principal.may("cancel_any"))[0]
        if outcome.outcome == "forbidden":
            raise web.HTTPError(403, outcome.message)
        if outcome.outcome == "not_found":
            raise http_error(NotFound(outcome.message))
        self.reply(outcome.to_dict())


class CancelTasksHandler(PlexusHandler):
    async def post(self) -> None:
        """Cancel several tasks: {"task_ids": [...]}."""
        body = await self.json_body()
        ids = body.get("task_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids) or len(ids) > 100:
            raise http_error(InvalidArgument("task_ids must be a list of 1 to 100 task id strings"))
        principal = self.require("cancel_own")
        outcomes = self.runtime.manager.cancel(ids, viewer=principal.viewer, others=principal.may("cancel_any"))
        self.reply({"results": [o.to_dict() for o in outcomes]})
