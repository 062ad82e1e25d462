"""Live ipywidgets views: `TaskProgress` for one task or evaluation, `Dashboard` for recent work.

Both observe TaskState mirrors (mirror.py), which the event thread updates (coalesced to at most ~20
updates a second); neither polls. Trait changes made on the event thread are sent by ipykernel's IOPub
thread, which is safe from any thread, so a widget keeps moving while the kernel's main thread is idle or
busy with another cell.
"""

from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from traitlets import Instance

from .mirror import TaskState

if TYPE_CHECKING:
    from .client import PlexusClient

BAR_STYLES = {"COMPLETED": "success", "FAILED": "danger", "CANCELLED": "warning"}
WATCHED = ["status", "stage", "processed", "total", "estimated_completion_at", "error_message", "description"]


def executor_html(health: dict[str, Any]) -> str:
    """Where the server runs tasks, from its health (`PlexusClient.server_info`): the executor's name, why it is not
    the configured one (dask_fallback=local), and the Dask dashboard's link when there is one."""
    executor = health.get("executor")
    if not isinstance(executor, dict) or not executor.get("name"):
        return ""
    parts = [f"executor: {html.escape(str(executor['name']))}"]
    link = executor.get("dashboard")
    if isinstance(link, str) and link.startswith(("http://", "https://")):
        parts.append(f'<a href="{html.escape(link)}" target="_blank" rel="noopener">Dask dashboard</a>')
    if executor.get("problem"):
        parts.append(f"<i>{html.escape(str(executor['problem']))}</i>")
    return " · ".join(parts)


def eta_text(state: TaskState) -> str:
    if state.final or state.estimated_completion_at is None:
        return ""
    left = max(0.0, state.estimated_completion_at - time.time())
    return f"ETA {left:.0f} s" if left < 120 else f"ETA {left / 60:.0f} min"


def title(state: TaskState) -> str:
    text = state.description or state.type or "task"
    return text if len(text) <= 40 else text[:39] + "…"


def show_state(state: TaskState, bar: widgets.IntProgress) -> None:
    """Move a bar to the state: value/max from the current stage, the colour from the final status."""
    total = state.total or 0
    bar.max = max(total, 1)
    bar.value = bar.max if state.status == "COMPLETED" else min(state.processed, bar.max)
    bar.bar_style = BAR_STYLES.get(state.status, "info" if state.status == "RUNNING" else "")


def status_text(state: TaskState) -> str:
    parts = [state.status]
    if state.stage and not state.final:
        parts.append(f"{state.stage} {state.processed}/{state.total}" if state.total else state.stage)
    eta = eta_text(state)
    if eta:
        parts.append(eta)
    if state.error_message and state.status in ("FAILED", "CANCELLED"):
        parts.append(state.error_message[:120])
    return " · ".join(parts)


class TaskProgress(widgets.HBox):
    """A live progress bar and status line for one task (or an evaluation's task)."""

    state = Instance(TaskState)

    def __init__(self, state: TaskState, **kwargs: Any) -> None:
        self.bar = widgets.IntProgress(
            min=0, max=1, value=0, description=title(state)[:20], style={"description_width": "initial"}
        )
        self.label = widgets.Label()
        super().__init__(children=[self.bar, self.label], state=state, **kwargs)
        state.observe(self._update, names=WATCHED)
        self._update()

    def _update(self, change: Any = None) -> None:
        state = self.state
        show_state(state, self.bar)
        self.label.value = status_text(state)
        if state.final:
            state.unobserve(self._update, names=WATCHED)


class TaskRow(widgets.HBox):
    """One row of the dashboard: name, status, bar, stage, ETA and a Cancel button."""

    state = Instance(TaskState)

    def __init__(self, state: TaskState, client: PlexusClient) -> None:
        self.client = client
        self.name = widgets.Label(title(state), layout=widgets.Layout(width="260px"))
        self.status = widgets.Label(layout=widgets.Layout(width="100px"))
        self.bar = widgets.IntProgress(min=0, max=1, value=0, layout=widgets.Layout(width="220px"))
        self.stage = widgets.Label(layout=widgets.Layout(width="200px"))
        self.eta = widgets.Label(layout=widgets.Layout(width="90px"))
        self.cancel = widgets.Button(
            description="Cancel",
            button_style="warning",
            icon="stop",
            layout=widgets.Layout(width="90px"),
            tooltip=f"cancel task {state.task_id}",
        )
        self.cancel.on_click(self._cancel)
        super().__init__(children=[self.name, self.status, self.bar, self.stage, self.eta, self.cancel], state=state)
        state.observe(self._update, names=WATCHED)
        self._update()

    def _update(self, change: Any = None) -> None:
        state = self.state
        self.name.value = title(state)
        self.status.value = state.status
        show_state(state, self.bar)
        self.stage.value = (
            ""
            if state.final
            else (f"{state.stage} {state.processed}/{state.total}" if state.total else (state.stage or ""))
        )
        if state.status == "FAILED" and state.error_message:
            self.stage.value = state.error_message[:60]
        self.eta.value = eta_text(state)
        if state.final:
            self.cancel.disabled = True
            state.unobserve(self._update, names=WATCHED)

    def _cancel(self, button: widgets.Button | None = None) -> None:
        self.cancel.disabled = True
        self.cancel.description = "Cancelling"
        try:
            self.client.cancel(self.state.task_id)
        except Exception as exc:
            self.cancel.disabled = False
            self.cancel.description = "Cancel"
            self.stage.value = f"cancel failed: {exc}"[:60]


class Dashboard(widgets.VBox):
    """Running and recent tasks and evaluations, newest first, updated from events only.

    New tasks (from this notebook, an assistant over MCP, or anyone) appear as their `task.created`
    event arrives; rows settle on the final state; beyond `limit` rows the oldest finished ones go.
    """

    def __init__(self, client: PlexusClient, limit: int = 20) -> None:
        self.client = client
        self.limit = limit
        self._lock = threading.RLock()
        self._rows: dict[str, TaskRow] = {}
        where = executor_html(client.server_info)
        self.header = widgets.HTML("<b>Plexus tasks</b> (live)" + (f" · {where}" if where else ""))
        self.table = widgets.VBox()
        super().__init__(children=[self.header, self.table])
        self._stop = client.on_event(self._on_event)
        self._load()

    def _load(self) -> None:
        for summary in reversed(self.client.pages("tasks", "tasks", {}, self.limit)):
            self._add(summary)

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("type") == "refresh":
            self._load()
        elif (
            message.get("type") == "event"
            and message.get("entity_type") == "task"
            and message["entity_id"] not in self._rows
        ):
            self._add(message["data"])

    def _add(self, summary: dict[str, Any]) -> None:
        task_id = summary["task_id"]
        with self._lock:
            if task_id in self._rows:
                return
            row = self._rows[task_id] = TaskRow(self.client.mirror(task_id, summary), self.client)
            rows = [row, *self.table.children]
            while len(rows) > self.limit:
                gone = next((r for r in reversed(rows) if isinstance(r, TaskRow) and r.state.final), None)
                if gone is None:
                    break
                rows.remove(gone)
                self._rows.pop(gone.state.task_id, None)
                gone.close()
            self.table.children = tuple(rows)

    def row(self, task_id: str) -> TaskRow:
        """The row of a task (KeyError if it is not shown)."""
        return self._rows[task_id]

    def close(self) -> None:
        self._stop()
        super().close()
