"""`plexus`: the notebook's entry point, connecting on first use.

from plexus_mcp_jupyter import plexus      # or: %load_ext plexus_mcp_jupyter
plexus.tasks()                             # DataFrame of recent tasks
h = plexus.run_demo(items=500); h          # a live progress bar
ev = plexus.evaluate(df, prediction="pred", label="label").wait()
ev.metrics, ev.confusion_matrix(), ev.results(only_mismatches=True)
plexus.dashboard()                         # everything running, live, with Cancel buttons
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.demo import RunDemo
from ..core.requests import (
    BulkRequest,
    CancelTasks,
    DispatchBatch,
    DispatchTask,
    ListTasks,
    RetryTasks,
    SetTaskPriority,
)
from ..evaluations.requests import (
    BeginUpload,
    CreateEvaluation,
    ListDatasets,
    ListEvaluations,
    RegisterDataset,
    UploadPart,
)
from .client import EventListener, PlexusClient, request_of, resolve_connection
from .errors import PlexusConflict, PlexusInputError
from .handles import EvaluationHandle, TaskHandle

if TYPE_CHECKING:
    import pandas as pd

    from .widgets import Dashboard

# Jupyter's default ServerApp.max_body_size (512 MiB): a larger request is refused by the server.
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
# A frame larger than this in memory is sent in parts of about this size (Arrow IPC, one request each).
UPLOAD_PART_BYTES = 64 * 1024 * 1024
NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
DEMO_FIELDS = RunDemo.model_fields  # run_demo's defaults


class Plexus:
    """The notebook's view of its Jupyter server's Plexus tasks and evaluations."""

    def __init__(self) -> None:
        self._client: PlexusClient | None = None
        self.max_upload_bytes = MAX_UPLOAD_BYTES
        self.upload_part_bytes = UPLOAD_PART_BYTES

    def __repr__(self) -> str:
        where = self._client.url if self._client else "not connected yet (connects on first use)"
        return f"<plexus: {where}>"

    # -- connection -------------------------------------------------------------------------------------

    def connect(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0) -> PlexusClient:
        """Connect to a server: `url` and `token`, else PLEXUS_MCP_URL/PLEXUS_MCP_TOKEN, else the file named by
        PLEXUS_MCP_CONNECTION_FILE. Raises PlexusConnectionError (or PlexusAuthError) saying how to fix it."""
        url, token = resolve_connection(url, token)
        client = PlexusClient(url, token, timeout=timeout)
        if self._client is not None:
            self._client.close()
        self._client = client
        return client

    @property
    def client(self) -> PlexusClient:
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def on_event(self, callback: EventListener) -> Callable[[], None]:
        """Call `callback(message)` for every event (on the event thread; keep it quick); returns an unsubscribe."""
        return self.client.on_event(callback)

    # -- tables -----------------------------------------------------------------------------------------

    def tasks(
        self, status: str | None = None, type: str | None = None, limit: int | None = 100, batch: str | None = None
    ) -> pd.DataFrame:
        """Tasks, newest first, as a DataFrame (status/type: comma-separated filters or lists; batch: a batch id;
        limit None: all). The filter is the server's ListTasks, checked here before anything is sent."""
        from .tables import tasks_frame

        request = request_of(ListTasks, {"status": status, "type": type, "batch": batch})
        return tasks_frame(self.client.pages("tasks", "tasks", request.query(), limit))

    def evaluations(self, status: str | None = None, type: str | None = None, limit: int | None = 100) -> pd.DataFrame:
        """Evaluations, newest first, as a DataFrame (status: SETUP, RUNNING, COMPLETED, FAILED, CANCELLED; type:
        accuracy, feedback, consistency; comma-separated or lists). The server's ListEvaluations, checked here."""
        from .tables import evaluations_frame

        request = request_of(ListEvaluations, {"status": status, "type": type})
        return evaluations_frame(self.client.pages("evaluations", "evaluations", request.query(), limit))

    def datasets(self, include_files: bool = False) -> pd.DataFrame:
        """Datasets the server knows: shipped examples, registered DataFrames (and files under the root)."""
        import pandas as pd

        request = request_of(ListDatasets, {"include_files": include_files})
        rows = self.client.request("GET", "datasets", params=request.query())
        return pd.DataFrame(rows["datasets"])

    # -- handles ----------------------------------------------------------------------------------------

    def task(self, task_id: str) -> TaskHandle:
        """A handle on an existing task (one an assistant started, say)."""
        return TaskHandle(self.client, task_id, self.client.get_task(task_id))

    def evaluation(self, evaluation_id: str) -> EvaluationHandle:
        """A handle on an existing evaluation (one an assistant created, say)."""
        view = self.client.request("GET", f"evaluations/{evaluation_id}")
        return EvaluationHandle(self.client, view, self.client.get_task(view["task_id"]))

    def run_demo(
        self,
        items: int = DEMO_FIELDS["items"].default,  # the defaults are the model's (core/demo.py), never copies
        item_delay_ms: float = DEMO_FIELDS["item_delay_ms"].default,
        fail: bool = DEMO_FIELDS["fail"].default,
        fail_at: int | None = DEMO_FIELDS["fail_at"].default,
        seed: int | None = DEMO_FIELDS["seed"].default,
        *,
        priority: int = DEMO_FIELDS["priority"].default,
        description: str | None = None,
    ) -> TaskHandle:
        """Dispatch the demo task (Setup, Processing `items` items, Finalizing) and return its handle: the
        arguments of MCP's run_demo_task (RunDemo), and a description."""
        fields = {"items": items, "item_delay_ms": item_delay_ms, "fail": fail, "fail_at": fail_at, "seed": seed}
        request = request_of(RunDemo, {**fields, "priority": priority})  # refused here, in the server's words
        params = {name: value for name, value in request.arguments().items() if name != "priority"}
        return self.dispatch("demo", params, priority=request.priority, description=description)

    def dispatch(
        self, type: str, params: dict[str, Any] | None = None, *, priority: int = 0, description: str | None = None
    ) -> TaskHandle:
        """Dispatch a task of any registered type and return its handle."""
        request = request_of(
            DispatchTask, {"type": type, "params": params or {}, "priority": priority, "description": description}
        )
        client = self.client
        client.stream.start()  # so its first events are not missed
        task = client.request("POST", "tasks", json=request.arguments() | {"type": request.type})
        return TaskHandle(client, task["task_id"], task)

    # -- batches ----------------------------------------------------------------------------------------

    def dispatch_batch(self, specs: list[dict[str, Any]]) -> dict[str, Any]:
        """Dispatch many tasks in one call; each spec is {type, params, priority, description}. Returns
        {batch_id, task_ids}; a bad spec is refused here (PlexusInputError, the server's words: `tasks[0].priority:
        ...`) before anything is sent, and by the server if only it can tell (a task type's params)."""
        request = request_of(DispatchBatch, {"tasks": specs})
        return self.client.dispatch_batch(request.arguments()["tasks"])

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A batch's counts by status, aggregated progress and estimated end."""
        return self.client.batch(batch_id)

    def cancel(self, task_ids: list[str] | None = None, *, dry_run: bool = False, **filter: Any) -> dict[str, Any]:
        """Cancel tasks by id or by filter (status, type, owner, created_after, created_before, batch; and
        wait_seconds); dry_run only counts. Example: `plexus.cancel(batch=b["batch_id"], dry_run=True)`."""
        return self._bulk(CancelTasks, task_ids, dry_run, filter)

    def retry(self, task_ids: list[str] | None = None, *, dry_run: bool = False, **filter: Any) -> dict[str, Any]:
        """Run FAILED or CANCELLED tasks again as new attempts (by id or by filter, as for cancel)."""
        return self._bulk(RetryTasks, task_ids, dry_run, filter)

    def set_priority(
        self, priority: int, task_ids: list[str] | None = None, *, dry_run: bool = False, **filter: Any
    ) -> dict[str, Any]:
        """Change the priority of queued tasks (by id or by filter, as for cancel)."""
        return self._bulk(SetTaskPriority, task_ids, dry_run, {**filter, "priority": priority})

    def _bulk(
        self, model: type[BulkRequest], task_ids: list[str] | None, dry_run: bool, fields: dict[str, Any]
    ) -> dict[str, Any]:
        # the server's request model, built here: a misspelt filter or a bad status is refused before connecting
        request = request_of(model, {"task_ids": task_ids, "dry_run": dry_run, **fields})
        return self.client.bulk(request)

    # -- datasets and scorers ---------------------------------------------------------------------------

    def register_dataset(self, name: str, df: pd.DataFrame, replace: bool = False) -> dict[str, Any]:
        """Make `df` a dataset (`registered:<name>`) for evaluations and for assistants (list_datasets).

        Sent as one Parquet body, or, for a frame larger than `plexus.upload_part_bytes` in memory (64 MiB) or
        whose Parquet form exceeds `plexus.max_upload_bytes` (Jupyter's request limit, 512 MiB by default), as
        Arrow record batches in parts of about that size, registered once all arrived. PlexusConflict if the
        name is taken and replace is False.
        """
        try:
            return self._send(name, df, replace)[0]
        except PlexusConflict as exc:
            raise PlexusConflict(
                f"a dataset named {name!r} is already registered: pass replace=True to replace it, "
                "or choose another name",
                exc.status,
            ) from None

    def _send(self, name: str | None, df: Any, replace: bool) -> tuple[dict[str, Any], str]:
        """Register `df` (as `name`, or `nb-<hash of its content>`): one Parquet body when it is small, else in
        parts; (the dataset's description, its name)."""
        import pandas as pd

        if name is not None:  # a bad name is refused in the server's words before the frame is converted
            request_of(RegisterDataset, {"name": name, "replace": replace})
        if not isinstance(df, pd.DataFrame):
            raise PlexusInputError(f"expected a pandas DataFrame, not {type(df).__name__}")
        if df.empty:
            raise PlexusInputError("the DataFrame has no rows: there is nothing to evaluate")
        frame = df.copy(deep=False)
        frame.columns = [str(c) for c in frame.columns]
        in_memory = int(frame.memory_usage(deep=True).sum())
        if in_memory <= self.upload_part_bytes:
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            if buffer.tell() <= self.max_upload_bytes:
                body = buffer.getvalue()
                name = name or "nb-" + hashlib.sha1(body).hexdigest()[:12]
                return self._upload(request_of(RegisterDataset, {"name": name, "replace": replace}), body), name
        if name is None:
            content = pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()
            name = "nb-" + hashlib.sha1(content + ",".join(frame.columns).encode()).hexdigest()[:12]
        begin = request_of(BeginUpload, {"name": name, "replace": replace})
        return self._upload_in_parts(begin, frame, in_memory), name

    def _upload_in_parts(self, begin: BeginUpload, frame: pd.DataFrame, in_memory: int) -> dict[str, Any]:
        """Send `frame` as Arrow IPC parts of about `upload_part_bytes` (below `max_upload_bytes`) each, one
        request per part, holding one part's bytes at a time; the server registers it once all arrived."""
        import pyarrow as pa

        try:  # every part with the whole frame's types (an object column all None in one part is still text)
            schema = pa.Schema.from_pandas(frame, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise PlexusInputError(f"cannot send the DataFrame as Arrow: {exc}") from None
        part_bytes = max(1, min(self.upload_part_bytes, self.max_upload_bytes // 2))
        rows = max(1, int(len(frame) * part_bytes / max(in_memory, 1)))
        client = self.client
        began = client.request("POST", "datasets/uploads", params=begin.query())
        upload = "datasets/uploads/" + str(began["upload_id"])
        if in_memory > int(began["max_bytes"]):
            client.request("DELETE", upload)
            raise PlexusInputError(
                f"the DataFrame is too large to register ({in_memory / 2**20:,.0f} MiB in memory; the server takes "
                f"up to {int(began['max_bytes']) / 2**20:,.0f} MiB, the max_dataset_upload_bytes setting): keep "
                "only the columns the evaluation needs, evaluate df.sample(n), or write it as Parquet under the "
                "Jupyter root (df.to_parquet('data.parquet')) and evaluate that path"
            )
        try:
            for part, start in enumerate(range(0, len(frame), rows)):
                table = pa.Table.from_pandas(frame.iloc[start : start + rows], schema=schema, preserve_index=False)
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, schema) as writer:
                    writer.write_table(table)
                client.request(
                    "PUT",
                    upload,
                    params=UploadPart(upload_id=began["upload_id"], part=part).query(exclude={"upload_id"}),
                    data=sink.getvalue().to_pybytes(),
                    headers={"Content-Type": "application/vnd.apache.arrow.stream"},
                    timeout=max(client.timeout, 300.0),
                )
            info: dict[str, Any] = client.request("POST", upload, timeout=max(client.timeout, 300.0))
            return info
        except BaseException:
            with contextlib.suppress(Exception):  # the server expires it anyway
                client.request("DELETE", upload)
            raise

    def delete_dataset(self, name: str) -> None:
        """Delete the registered dataset `name` (yours, or any as an admin): its bytes no longer count against your
        quota of registered data. Evaluations made from it keep their results."""
        self.client.request("DELETE", "datasets/registered:" + name)

    def register_scorer(self, name: str, fn: Callable[..., Any], batch: bool = True) -> str:
        """Serve `fn` from this kernel as the scorer `kernel:<name>`, which assistants can name in
        create_evaluation. batch=True: `fn(pd.Series of inputs)` returns labels (or (label, explanation) pairs);
        batch=False: `fn(input)` per item. Returns the scorer spec."""
        return self.client.register_scorer(name, fn, batch)

    def unregister_scorer(self, name: str) -> None:
        self.client.unregister_scorer(name)

    # -- evaluations ------------------------------------------------------------------------------------

    def evaluate(
        self,
        data: pd.DataFrame | str,
        scorer: str | Callable[..., Any] | dict[str, Any] | None = None,
        label: str | None = "label",
        prediction: str | None = None,
        type: str = "accuracy",
        input_column: str | None = None,
        id_column: str | None = None,
        sample_n: int | None = None,
        sample_fraction: float | None = None,
        seed: int | None = None,
        runs: int = 3,
        name: str | None = None,
        batch: bool = True,
        priority: int = 0,
    ) -> EvaluationHandle:
        """Evaluate a DataFrame (registered first, as `name` or `nb-<hash>`) or a named dataset.

        `scorer`: a spec string ("python:pkg.mod:fn", "kernel:<name>", ...), a rules mapping, or a Python
        callable, which is registered as a kernel scorer (batch as in register_scorer) and runs here;
        `prediction`: a column of predictions instead of a scorer. Returns the evaluation's handle at once.
        """
        import pandas as pd

        if scorer is not None and not isinstance(scorer, str | dict) and not callable(scorer):
            raise PlexusInputError(
                f"scorer must be a spec string, a rules mapping or a callable, not {builtin_type(scorer)} {scorer!r}"
            )
        if isinstance(data, pd.DataFrame):
            self._check_columns(
                data, scorer, label if type != "consistency" else None, prediction, input_column, id_column
            )
            name = self._send(name, data, replace=True)[1]
            dataset = f"registered:{name}"
        elif isinstance(data, str):
            dataset = data
        else:
            raise PlexusInputError(
                "data must be a pandas DataFrame or a dataset name ('example:sentiment', "
                "'registered:<name>', a file path under the Jupyter root), not "
                f"{builtin_type(data)}"
            )
        if callable(scorer) and not isinstance(scorer, str | dict):
            fn_name = NAME_UNSAFE.sub("-", getattr(scorer, "__name__", "scorer"))[:50]
            scorer = self.register_scorer(f"nb-{fn_name}", scorer, batch)
        fields: dict[str, Any] = {
            "type": type,
            "dataset": dataset,
            "scorer": scorer,
            "label_column": label if type != "consistency" else None,
            "prediction_column": prediction,
            "input_column": input_column,
            "id_column": id_column,
            "sample_n": sample_n,
            "sample_fraction": sample_fraction,
            "seed": seed,
            "priority": priority,
        }
        if type == "consistency":
            fields["runs"] = runs
        request = request_of(CreateEvaluation, {k: v for k, v in fields.items() if v is not None})
        client = self.client
        client.stream.start()
        view = client.request("POST", "evaluations", json=request.arguments())
        return EvaluationHandle(client, view)

    def _upload(self, request: RegisterDataset, body: bytes) -> dict[str, Any]:
        info: dict[str, Any] = self.client.request(
            "POST",
            "datasets",
            params=request.query(),
            data=body,
            headers={"Content-Type": "application/vnd.apache.parquet"},
            timeout=max(self.client.timeout, 300.0),
        )
        return info

    @staticmethod
    def _check_columns(
        df: pd.DataFrame,
        scorer: Any,
        label: str | None,
        prediction: str | None,
        input_column: str | None,
        id_column: str | None,
    ) -> None:
        wanted = {"label": label, "prediction": prediction, "input_column": input_column, "id_column": id_column}
        if scorer is not None and input_column is None:
            wanted["input_column (default 'text')"] = "text"
        columns = [str(c) for c in df.columns]
        for what, column in wanted.items():
            if column is not None and column not in columns:
                shown = ", ".join(repr(c) for c in columns[:30]) + (" ..." if len(columns) > 30 else "")
                raise PlexusInputError(f"{what}={column!r} is not a column of the DataFrame; its columns: {shown}")

    # -- widgets ----------------------------------------------------------------------------------------

    def dashboard(self, limit: int = 20) -> Dashboard:
        """A live view of running and recent tasks and evaluations, with progress, ETA and Cancel buttons."""
        from .widgets import Dashboard

        return Dashboard(self.client, limit=limit)


def builtin_type(value: Any) -> str:
    return type(value).__name__


plexus = Plexus()
