"""Handles on one task or evaluation: live status from events, wait, cancel, results, a progress widget.

They are the same tasks an assistant sees over MCP (owned by the notebook user). A handle's state is its
TaskState mirror, moved by the event thread; `wait()` blocks on a threading.Event that the event thread
sets when the final state arrives, never by polling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..evaluations.requests import GetEvaluationResults
from .client import request_of
from .errors import PlexusError, PlexusTaskFailed
from .mirror import TaskState

if TYPE_CHECKING:
    import pandas as pd

    from .client import PlexusClient
    from .widgets import TaskProgress


class TaskHandle:
    """A task: `.id`, `.status` (live), `.wait()`, `.cancel()`, `.result()`, `.progress()`."""

    kind = "task"

    def __init__(self, client: PlexusClient, task_id: str, summary: dict[str, Any] | None = None) -> None:
        self.client = client
        self.task_id = task_id
        self.state: TaskState = client.mirror(task_id, summary)

    @property
    def id(self) -> str:
        return self.task_id

    @property
    def status(self) -> str:
        """The task's status as of the latest event: QUEUED, RUNNING, COMPLETED, FAILED or CANCELLED."""
        return self.state.status

    @property
    def done(self) -> bool:
        return self.state.final

    def __repr__(self) -> str:
        s = self.state
        progress = f", {s.stage} {s.processed}/{s.total}" if s.total else ""
        return f"<{type(self).__name__} {self.id} {self.status}{progress}>"

    def wait(self, timeout: float | None = None) -> TaskHandle:
        """Block until the final state (returns self); TimeoutError after `timeout` seconds."""
        if not self.state.done.wait(timeout):
            s = self.state
            where = f" ({s.stage} {s.processed}/{s.total})" if s.total else ""
            raise TimeoutError(
                f"{self.kind} {self.id} is still {self.status}{where} after {timeout:g} s: call "
                ".wait() again to keep waiting, or .cancel() to stop it"
            )
        return self

    def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel: the outcome (`cancelled`, `cancelling` or `already_finished`)."""
        return self.client.cancel(self.task_id)

    def refresh(self) -> dict[str, Any]:
        """Re-read the task by REST (events keep it current; this is for after a long disconnection)."""
        data = self.client.get_task(self.task_id)
        self.state.offer(data)
        return data

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its output; PlexusTaskFailed if it failed or was cancelled."""
        self.wait(timeout)
        data = self.client.get_task(self.task_id)
        if data["status"] != "COMPLETED":
            raise PlexusTaskFailed(
                f"{self.kind} {self.id} ended {data['status']}: {data.get('error_message') or 'no message'}"
            )
        return data.get("output")

    def progress(self) -> TaskProgress:
        """A live progress widget (a new one on each call; all follow the same state)."""
        from .widgets import TaskProgress

        return TaskProgress(self.state)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.progress())


class EvaluationHandle(TaskHandle):
    """An evaluation: the task handle's API plus `.metrics`, `.results()`, `.confusion_matrix()`."""

    kind = "evaluation"

    def __init__(self, client: PlexusClient, view: dict[str, Any], task: dict[str, Any] | None = None) -> None:
        self.evaluation_id = view["evaluation_id"]
        self.view = view
        super().__init__(client, view["task_id"], task)

    @property
    def id(self) -> str:
        return str(self.evaluation_id)

    @property
    def status(self) -> str:
        """SETUP, RUNNING, COMPLETED, FAILED or CANCELLED, as of the latest event."""
        return self.state.evaluation_status

    def refresh(self) -> dict[str, Any]:
        """Re-read the evaluation (status, progress, definition, metrics) by REST."""
        self.view = self.client.request("GET", f"evaluations/{self.evaluation_id}")
        return self.view

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the evaluation and return its full view (with metrics); PlexusTaskFailed if it failed."""
        self.wait(timeout)
        view = self.refresh()
        if view["status"] != "COMPLETED":
            raise PlexusTaskFailed(
                f"evaluation {self.id} ended {view['status']}: {view.get('error_message') or 'no message'}"
            )
        return view

    def _metrics(self, score: str | None) -> dict[str, Any]:
        if not self.done:
            raise PlexusError(
                f"evaluation {self.id} is {self.status}: metrics come when it completes; call .wait() first"
            )
        metrics = self.view.get("metrics")
        if metrics is None:
            metrics = self.refresh().get("metrics")
        if not metrics:
            raise PlexusTaskFailed(
                f"evaluation {self.id} ended {self.status} without metrics: "
                f"{self.view.get('error_message') or 'no message'}"
            )
        name = score or next(iter(metrics))
        if name not in metrics:
            raise PlexusError(f"evaluation {self.id} has no score {name!r}; its scores: {', '.join(metrics)}")
        return dict(metrics[name])

    @property
    def metrics(self) -> pd.DataFrame:
        """Per-class precision, recall, f1 and support (index: label); the summary in `.attrs["summary"]`.

        The first score's; `metrics_for(score)` for another score of a scorecard.
        """
        return self.metrics_for(None)

    def metrics_for(self, score: str | None) -> pd.DataFrame:
        from .tables import metrics_frame

        return metrics_frame(self._metrics(score))

    @property
    def summary(self) -> pd.Series:
        """The headline figures: n, correct, accuracy and its 95% interval, macro/weighted F1, kappa, AC1."""
        import pandas as pd

        return pd.Series(self.metrics.attrs["summary"], name=self.id)

    def confusion_matrix(self, score: str | None = None, styled: bool = True) -> Any:
        """The confusion matrix (rows actual, columns predicted) as a heatmap Styler, or the DataFrame."""
        from .tables import confusion_frame, heatmap

        frame = confusion_frame(self._metrics(score))
        return heatmap(frame) if styled else frame

    def results(
        self,
        only_mismatches: bool = False,
        label: str | None = None,
        limit: int | None = None,
        score: str | None = None,
    ) -> pd.DataFrame:
        """Per-item results (input, label, prediction, correct, explanation, error), all or the first `limit`.

        All of them are read from the evaluation's Parquet files when this kernel sees them as the server listed
        them (the owner's or an admin's, on the same disk: `attrs["read_from"]` is "files"), else as one Arrow
        IPC stream over REST ("server"): millions of items in seconds, not a JSON page per hundred. The first
        `limit` come as pages."""
        from .tables import items_frame

        request = request_of(
            GetEvaluationResults,
            {"evaluation_id": self.evaluation_id, "only_mismatches": only_mismatches, "label": label, "score": score},
        )  # the server's model: a bad argument is refused here
        params = request.query(exclude={"evaluation_id"})
        path = f"evaluations/{self.evaluation_id}/results"
        if limit is None:
            table = self.client.local_items(self.evaluation_id, params)
            read_from = "files" if table is not None else "server"
            if table is None:
                table = self.client.arrow_stream(path, params).read_all()
            frame = items_frame(table)
            frame.attrs["read_from"] = read_from
            return frame
        return items_frame(self.client.pages(path, "items", params, limit))
