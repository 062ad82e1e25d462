"""The evaluations face of the core: create, read and list evaluations, their results and datasets.

Used by the MCP tools and resources and by REST alike; knows nothing of either. Creating an evaluation
checks what is cheap to check at once (the type and its arguments, the dataset exists and is under the
root, its columns, the scorer specs' shape), then dispatches an `evaluation` task and returns in
milliseconds; loading, scoring and metrics happen in the worker (runner.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from ..core.batches import Actor, PlannedSpec
from ..core.errors import Expired, Forbidden, InvalidArgument, NotFound, one_line
from ..core.executors import ExecutorUnavailable
from ..core.manager import TaskManager
from ..core.models import Task, iso
from ..core.ownership import owner_visible
from ..core.retention import expired_message
from ..core.store import values_with_prefix
from .datasets import DEFAULT_ID_COLUMN, DEFAULT_LABEL_COLUMN, DatasetCatalog, column_listing
from .file_reads import clip
from .item_files import ArrowStream, ItemFiles
from .kernel_scorers import KernelScorerRegistry
from .limits import DEFAULT_LIMITS, EvaluationLimits, check_items
from .metrics import LabelNormalization
from .requests import CreateEvaluation, EvaluationParams, GetEvaluationResults, ListEvaluations
from .sampling import check_sample, sampled_rows
from .scorecards import load_scorecard
from .scorers import SCORER_KINDS, module_allowed, normalize_spec
from .store import (
    ITEM_SCHEMA,
    EvaluationFilter,
    EvaluationStatus,
    EvaluationStore,
    ItemFilter,
    evaluations_table,
    lock_timed_out,
)

MAX_LABELS_SHOWN = 50  # per-class rows and confusion matrix beyond this many classes are left out
DEFAULT_SCORE = "score"
PRUNE_BATCH = 5000  # items deleted per transaction when pruning: the SQLite write lock is released between
# A pruning transaction's most wait for a lock held elsewhere (another process's write transaction on SQLite, a row
# lock on PostgreSQL): tried again up to PRUNE_LOCK_TRIES times (about the store's own 5 s busy timeout in all), but
# not once the service closes, so that a server's exit waits for a pass stuck on such a lock about this long at most
# (it waited out the busy timeout, 5 s). Each transaction is rolled back when it gives up: nothing half-written.
PRUNE_LOCK_WAIT = 1.0
PRUNE_LOCK_TRIES = 5

# A new record's columns that its insert leaves null (the worker writes them later): metrics, counts, ...
_NULL_RECORD: dict[str, Any] = {column.name: None for column in evaluations_table.columns}
# Rehearsals of a create after start, beside warm_up's: CPython (3.11+) specializes a function's bytecode once it
# has run a few times (about 8), so the first calls of any path run slower; the rehearsal's path (the plan, the
# inserts, the reads, the view) is the first create_evaluation's, off the loop. ~5 ms of CPU each.
WARM_REPEATS = 8
# Each start-up rehearsal's most (warm_up's and warm_up_again's): one slower (a store locked by another process
# waits out its busy timeout, 5 s on SQLite; a PostgreSQL that hangs, its statement timeout, 30 s) ends them, and
# `rehearsals_ended` stops waiting for it (it ends on its own, in the pruning thread).
REHEARSAL_SECONDS = 1.0

log = logging.getLogger("plexus_mcp_jupyter")
T = TypeVar("T")


def evaluation_uri(evaluation_id: str) -> str:
    return f"plexus://evaluations/{evaluation_id}"


@dataclass(frozen=True)
class EvaluationPlan:
    """A checked create request: what dispatching it needs (EvaluationService.plan makes one)."""

    type: str
    dataset: str
    scores: list[dict[str, Any]]
    label_column: str | None
    input_column: str | None
    id_column: str | None
    sample: dict[str, Any] | None
    runs: int
    restricted: bool  # python: scorers limited to scorer_modules (an API key's request)
    scorecard: str | None


class EvaluationService:
    """Evaluations over one TaskManager, EvaluationStore and DatasetCatalog."""

    def __init__(
        self,
        manager: TaskManager,
        store: EvaluationStore,
        catalog: DatasetCatalog,
        kernel_scorers: KernelScorerRegistry | None = None,
        scorer_modules: Sequence[str] = (),
        redact_columns: Sequence[str] = (),
        limits: EvaluationLimits = DEFAULT_LIMITS,
    ) -> None:
        self.redacted = frozenset(c.strip() for c in redact_columns if c.strip())
        self.scorer_modules = tuple(m.strip() for m in scorer_modules if m.strip())
        self.manager = manager
        self.store = store
        self.catalog = catalog
        self.kernel_scorers = kernel_scorers or KernelScorerRegistry()
        self.limits = limits
        self._pruner = ThreadPoolExecutor(1, thread_name_prefix="plexus-evaluation-prune")
        self._stopping = threading.Event()
        self.warmed = threading.Event()  # set once warm_up has run (warm_up_soon)
        self._warm_lock = threading.Lock()
        self._warm_asked = False
        # A client has come (its first MCP message, or a create): the rehearsals after start stop (warm_up_again).
        self._served = False
        # Done once warm_up and warm_up_again have run (start() submits it): see rehearsals_ended.
        self.rehearsed: Future[None] | None = None
        self._rehearsing_since: float | None = None  # when the rehearsal running now began (time.monotonic)
        self._rehearsals_over = False  # warm_up failed or ran longer than REHEARSAL_SECONDS: no more rehearsals
        # Why evaluations cannot run now (Dask workers that do not see the items directory), or None: set by the
        # runtime (items_check.WorkerItemsCheck).
        self.items_problem: Callable[[], str | None] = lambda: None
        self._unlisten: Callable[[], None] | None = None  # set while started (`start`, `stop`)
        self._started_work: list[Future[Any]] = []  # what `start` submitted: dropped by `stop` if not begun
        # Moves at each start and stop: the rehearsals and pruning passes a start (or its listeners) submitted stop
        # once it moved (one running when `stop` came ends at its next step, not running on for a stopped runtime
        # ahead of the next start's).
        self._generation = 0
        manager.spec_planners["evaluation"] = self.batch_spec

    # -- life cycle: pruning the items of cancelled evaluations ------------------------------------------

    def start(self) -> None:
        """Prune the items of cancelled evaluations from now on, and those an earlier server left; and the
        item files of evaluations removed by retention, after each retention pass and at start."""
        if self._unlisten is None:
            self._unlisten = self.manager.bus.add_listener(self._on_event, remote=False)
            self.manager.pruned_listeners.append(self._on_tasks_pruned)
            # The rehearsals first, the pruning after them (it may take long: a stdio server waits for the
            # rehearsals before it reads its first message, `rehearsed`).
            self._generation += 1
            self.warm_up_soon()
            self.rehearsed = self._pruner.submit(self.warm_up_again, self._generation)
            self._started_work = [
                self.rehearsed,
                self._pruner.submit(self.prune_cancelled, self._generation),
                self._pruner.submit(self.sweep_files),
            ]

    def stop(self) -> None:
        """Undo `start` (a server whose start failed after it, or that stops): no more pruning on cancellations or
        retention passes, its rehearsals and passes not begun yet dropped, and one running ends at its next step
        (a rehearsal, a pruning batch); a later start starts them again."""
        if self._unlisten is None:
            return
        self._generation += 1
        self._unlisten()
        self._unlisten = None
        with contextlib.suppress(ValueError):
            self.manager.pruned_listeners.remove(self._on_tasks_pruned)
        for future in self._started_work:
            future.cancel()
        self._started_work = []

    def warm_up_soon(self) -> None:
        """Run `warm_up` once, in the pruning thread (the runtime asks as soon as it is built, before the server
        answers; start() asks again, which does nothing more)."""
        with self._warm_lock:
            if self._warm_asked:
                return
            self._warm_asked = True
        self._pruner.submit(self.warm_up)

    def warm_up(self) -> None:
        """Once, in the pruning thread, before the server is ready: what the first create_evaluation would
        otherwise do for the first time, on the event loop (SQLite: the task's insert) or in the threads it waits
        for. A request is planned (an example dataset: its header read, the scorer spec checked), its task and
        record inserted in a transaction rolled back with its claim, progress, stage, sample and final writes
        and the task read back with its stages (SQLAlchemy, and on SQLite the store's driver-level writes, compile
        and cache the statements), the answer's view made, and the record and task read (none found). 130-330 ms
        of the first call's, measured; nothing is stored. start() then asks for `warm_up_again`."""
        try:
            self._timed_rehearsal()
        except Exception:  # the store is unreachable, say: the first evaluation then pays it, as before
            self._rehearsals_over = True  # (warm_up_again's would fail alike, each after its timeouts)
            log.debug("Plexus: the evaluation warm-up failed", exc_info=True)
        finally:
            self.warmed.set()

    def client_came(self) -> None:
        """A client's first request has arrived (the MCP endpoint says so, once): the rehearsals after start stop,
        as at a create. Its create_evaluation follows within milliseconds (a session's initialize, then the call)."""
        self._served = True

    def _ended(self, generation: int | None) -> bool:
        """Whether work a start submitted (its `generation`; None: whatever started it) is to stop: the service
        closes, or it was stopped (or started again) since."""
        return self._stopping.is_set() or (generation is not None and generation != self._generation)

    def warm_up_again(self, generation: int | None = None) -> None:
        """After start (the server answers meanwhile), in the pruning thread, after warm_up: its rehearsal
        WARM_REPEATS times more, so that the first create_evaluation runs code already specialized by the
        interpreter (the first call's server CPU was 1.32x the next ones', 0.98x after ten rehearsals: 5 fresh
        servers each). Not at all after warm_up failed or ran longer than REHEARSAL_SECONDS; stops at the first
        failure, after a rehearsal longer than REHEARSAL_SECONDS, when the service closes, or once a client has
        come (its first MCP message, or a create), also between a rehearsal's plan and its store statements: a
        rehearsal beside a call competes with it for the GIL (~5 ms of CPU each) and, on SQLite, holds the write
        lock the call's insert needs until it rolls back; real calls warm the path from then on. Not either once the
        start that asked for it (`generation`) was undone (`stop`)."""
        for _ in range(WARM_REPEATS):
            if self._ended(generation) or self._served or self._rehearsals_over:
                return
            try:
                self._timed_rehearsal(until_served=True)
            except Exception:
                log.debug("Plexus: the evaluation warm-up failed", exc_info=True)
                return

    def _timed_rehearsal(self, until_served: bool = False) -> None:
        """`_rehearse`, timed: one longer than REHEARSAL_SECONDS, or failing, ends them (`_rehearsals_over`)."""
        began = self._rehearsing_since = time.monotonic()
        try:
            self._rehearse(until_served=until_served)
        except BaseException:
            self._rehearsals_over = True
            raise
        finally:
            self._rehearsing_since = None
        if time.monotonic() - began > REHEARSAL_SECONDS:
            self._rehearsals_over = True
            log.debug("Plexus: an evaluation rehearsal took %.1f s: no more", time.monotonic() - began)

    async def rehearsals_ended(self) -> None:
        """Until the start-up rehearsals have ended (`rehearsed`; at once before start), or the one running has run
        longer than REHEARSAL_SECONDS (a store locked or hanging: it ends on its own, and none runs after it). A
        stdio server waits for this before it reads its first message (standalone.serve_stdio)."""
        if self.rehearsed is None:
            return
        done = asyncio.wrap_future(self.rehearsed)
        while not done.done():
            began = self._rehearsing_since
            left = REHEARSAL_SECONDS if began is None else began + REHEARSAL_SECONDS - time.monotonic()
            if left <= 0:
                return
            await asyncio.wait({done}, timeout=left)

    def _rehearse(self, until_served: bool = False) -> None:
        """A create_evaluation's work, nothing stored (see warm_up); with `until_served`, nothing after the plan
        once a client has come."""
        request = CreateEvaluation.parse(
            {"type": "accuracy", "dataset": "example:sentiment", "prediction_column": "prediction"}
        )
        inserted: dict[str, Any] = {}
        plan = self.plan(request)
        if until_served and self._served:
            return
        spec = self.planned_spec(plan, None, inserted)
        task = self.manager.new_task("evaluation", spec.params, description=spec.description, internal=True)
        record = spec.record
        self.manager.store.rehearse_create_task(
            task, also=lambda conn: record(task, conn), holder=self.manager.server_id, lock_wait=REHEARSAL_SECONDS
        )
        self.view({**_NULL_RECORD, **inserted}, {task.id: task})
        self.store.get(task.params["evaluation_id"])
        self._stored_tasks([{"task_id": task.id}])
        self.manager.store.cancel_requested_ids([task.id])  # the manager's check while the task runs (every tick)

    def _on_tasks_pruned(self, _task_ids: list[str]) -> None:
        if not self._stopping.is_set():
            self._pruner.submit(self.sweep_files)

    def sweep_files(self) -> int:
        """Delete the item files whose evaluation is gone (retention pruned its task); how many evaluations'."""
        try:
            return len(self.store.sweep_files())
        except Exception:  # the store is unreachable, say: the next pass tries again
            log.exception("Plexus: removing the item files of pruned evaluations failed")
            return 0

    def close(self) -> None:
        """Stop pruning (between two batches); the thread ends on its own. Not waited for while a start-up
        rehearsal runs (one stuck on a store lock held elsewhere waits up to REHEARSAL_SECONDS, `_rehearse`; it
        stores nothing): a stdio server whose client closes it exits without that wait (its client kills it 4 s
        after closing stdin, before its audit log's last records)."""
        try:
            self.stop()
        finally:  # whatever stop raised, the pruning thread is told to end
            self._stopping.set()
            self._pruner.shutdown(wait=self._rehearsing_since is None, cancel_futures=True)

    def _on_event(self, event: Any) -> None:
        # Another server's cancelled evaluation (event.origin) is pruned by that server, which ended it.
        if event.origin is None and event.kind == "task.cancelled" and event.data.get("type") == "evaluation":
            self._prune_soon()

    def _prune_soon(self) -> None:
        if not self._stopping.is_set():
            self._pruner.submit(self.prune_cancelled, self._generation)

    def prune_cancelled(self, generation: int | None = None) -> int:
        """Delete the items of cancelled evaluations (their files; rows PRUNE_BATCH per transaction), and mark
        each record pruned; returns how many item rows went. Runs in the pruning thread; blocks on the store. Stops
        between two transactions once the service closes, or the start that asked for it (`generation`) was undone
        (`stop`): the next start prunes what is left."""
        deleted = 0
        try:
            for evaluation_id in self.store.unpruned_cancelled():
                self.store.remove_files(evaluation_id)  # one directory: gone at once
                while not self._ended(generation):
                    batch = self._pruning_write(generation, self.store.delete_items, evaluation_id, PRUNE_BATCH)
                    deleted += batch or 0
                    if not batch:
                        break
                    time.sleep(0.005)  # let the server and the workers take the write lock between batches
                if self._ended(generation):
                    break
                self._pruning_write(generation, self.store.mark_pruned, evaluation_id, time.time())
        except Exception:  # the store is unreachable, say: the next cancellation or start tries again
            log.exception("Plexus: pruning the items of cancelled evaluations failed")
        return deleted

    def _pruning_write(self, generation: int | None, write: Callable[..., T], *args: Any) -> T | None:
        """One of the pruning's transactions, `write(*args, lock_wait=PRUNE_LOCK_WAIT)`, tried again while a lock
        held elsewhere fails it, PRUNE_LOCK_TRIES times at most; None, not tried (again), once the service closes
        or its start (`generation`) was undone."""
        for attempt in range(1, PRUNE_LOCK_TRIES + 1):
            if self._ended(generation):
                return None
            try:
                return write(*args, lock_wait=PRUNE_LOCK_WAIT)
            except Exception as exc:
                if attempt == PRUNE_LOCK_TRIES or not lock_timed_out(exc):
                    raise
        return None

    # -- creating ---------------------------------------------------------------------------------------

    async def create(
        self, request: CreateEvaluation, *, owner: str | None = None, trusted: bool = True, role: str | None = None
    ) -> tuple[dict[str, Any], Task]:
        """Check a request (:meth:`plan`) in the catalog's threads, then dispatch it.

        `role` is the caller's, whose priority ceiling applies (TaskManager.check_priority): checked first, on
        the loop, since it is the cheapest refusal.

        Parsing a scorecard and reading a dataset's header take time that grows with what the client sent
        or named, so they never run on the event loop; they share the catalog's `dataset_threads` with
        listing and describing (the rest wait their turn), so a flood of them cannot take the loop's
        default thread pool either.
        """
        self.manager.check_priority(request.priority, role)
        self.check_runnable()
        self._served = True
        plan = await self.catalog.run(self.plan, request, trusted=trusted)
        return await self.dispatch(plan, priority=request.priority, owner=owner, role=role)

    def plan(self, request: CreateEvaluation, trusted: bool = True) -> EvaluationPlan:
        """Check a request without dispatching it: what depends on several fields (the model checked each on
        its own), the scorecard, the dataset's columns (its header only) and rows where known cheaply, the
        scorer specs' shape, the item bound.

        An untrusted caller (an API key, not an admin) may name python: scorers only in `scorer_modules`.
        Blocks on the file system and the YAML parser: call it from a thread (as :meth:`create` does).
        """
        kind, dataset, scorer, scorecard = request.type, request.dataset, request.scorer, request.scorecard
        label_column, prediction_column = request.label_column, request.prediction_column
        input_column, id_column, runs = request.input_column, request.id_column, request.runs
        sample_n, sample_fraction, seed = request.sample_n, request.sample_fraction, request.seed
        sample = None
        if scorecard is not None:
            if dataset is not None or scorer is not None or prediction_column is not None:
                raise InvalidArgument(
                    "a scorecard names its dataset and scores: do not also give dataset, scorer or prediction_column"
                )
            overridden = [
                name
                for name, value in (
                    ("input_column", input_column),
                    ("id_column", id_column),
                    ("sample_n", sample_n),
                    ("sample_fraction", sample_fraction),
                )
                if value is not None
            ]
            if overridden:
                raise InvalidArgument(
                    f"a scorecard sets its own columns and sample: do not also give "
                    f"{', '.join(overridden)} (edit the scorecard instead)"
                )
            card = load_scorecard(scorecard, root_dir=self.catalog.root_dir, limits=self.limits)
            dataset, input_column, id_column = card.dataset, card.input_column, card.id_column
            label_column = label_column or card.label_column
            scores = [s.to_dict() for s in card.scores]
            if card.sample is not None:
                sample = card.sample.to_dict()
        else:
            if dataset is None:
                raise InvalidArgument(
                    "dataset is required (or a scorecard): e.g. 'example:sentiment', "
                    "'registered:<name>' or a file path under the Jupyter root"
                )
            scores = [{"name": DEFAULT_SCORE, "scorer": self._scorer(kind, scorer, prediction_column)}]
        if sample_n is not None or sample_fraction is not None:
            check_sample(sample_n, sample_fraction, seed)
            sample = {"n": sample_n, "fraction": sample_fraction, "seed": seed}
        if sample is not None and sample.get("seed") is None:
            # Chosen now and kept in the definition: a re-run after a crash scores the same rows.
            sample["seed"] = secrets.randbelow(2**31)
        restricted = False
        dataset = self.catalog.resolve(dataset)
        columns = self.catalog.columns(dataset)
        if kind != "consistency" and label_column is None:
            if DEFAULT_LABEL_COLUMN not in columns:
                raise InvalidArgument(
                    f"label_column is required for a {kind} evaluation: the column holding the correct labels"
                    + (" (the human-corrected values)" if kind == "feedback" else "")
                    + f" (dataset {dataset!r} has no column {DEFAULT_LABEL_COLUMN!r}); its columns: "
                    + column_listing(columns)
                )
            label_column = DEFAULT_LABEL_COLUMN
        if id_column is None and DEFAULT_ID_COLUMN in columns:
            id_column = DEFAULT_ID_COLUMN
        wanted = {"label_column": label_column, "input_column": input_column, "id_column": id_column}
        for score in scores:
            spec = score["scorer"]
            if spec.get("kind") == "python" and not trusted:
                self._check_importable(spec["function"])
                restricted = True
            if spec.get("kind") == "column":
                wanted[f"score {score['name']!r} column"] = spec["column"]
            elif spec.get("input_column") or input_column:
                wanted[f"score {score['name']!r} input column"] = spec.get("input_column") or input_column
            elif "text" not in columns:
                raise InvalidArgument(
                    f"score {score['name']!r} reads the column 'text' by default, which dataset "
                    f"{dataset!r} lacks: give input_column; columns: {column_listing(columns)}"
                )
            if score.get("label_column"):
                wanted[f"score {score['name']!r} label column"] = score["label_column"]
        for what, column in wanted.items():
            if column in self.redacted and what != "id_column" and "input" not in what:
                # Predictions and labels appear in results and metrics: a redacted column cannot be either.
                raise InvalidArgument(
                    f"{what.replace('_', ' ')} {column!r} is redacted (redact_columns): its values "
                    "would appear in results and metrics; ask an admin, or use another column"
                )
            if column is not None and column not in columns:
                raise InvalidArgument(
                    f"{what.replace('_', ' ')} {_quoted(column)} is not in dataset {dataset!r}; "
                    f"its columns: {column_listing(columns)}"
                )
        runs = runs if kind == "consistency" else 1
        rows = self.catalog.known_rows(dataset)
        if rows is not None:  # otherwise the worker checks once it has loaded the rows, before scoring any
            check_items(
                sampled_rows(rows, **{k: v for k, v in (sample or {}).items() if k != "seed"}),
                len(scores),
                runs,
                self.limits.max_evaluation_items,
            )
        return EvaluationPlan(
            type=kind,
            dataset=dataset,
            scores=scores,
            label_column=label_column,
            input_column=input_column,
            id_column=id_column,
            sample=sample,
            runs=runs,
            restricted=restricted,
            scorecard=scorecard,
        )

    async def dispatch(
        self, plan: EvaluationPlan, *, priority: int = 0, owner: str | None = None, role: str | None = None
    ) -> tuple[dict[str, Any], Task]:
        """Dispatch a checked request and insert its record (TaskManager.adispatch: on a networked store, on its
        writer thread).

        The answer is the view of the record as inserted and of the task as the manager holds it, not read back
        from the store (a store call's thread: ~1 ms of CPU and a thread's wake-up, which right after start or an
        idle spell took several ms); read back only if the task has already ended (its metrics are in the store)."""
        inserted: dict[str, Any] = {}
        spec = self.planned_spec(plan, owner, inserted)
        # The record is stored with the task, in one transaction: a worker may start it at once.
        task = await self.manager.adispatch(
            "evaluation",
            spec.params,
            priority=priority,
            owner=owner,
            description=spec.description,
            internal=True,
            role=role,
            record=spec.record,
        )
        if inserted and not self.manager.current(task.id, task).status.is_final:
            return self.view({**_NULL_RECORD, **inserted}, {task.id: task}), task
        return await self.get(spec.params["evaluation_id"]), task

    def planned_spec(
        self, plan: EvaluationPlan, owner: str | None, inserted: dict[str, Any] | None = None
    ) -> PlannedSpec:
        """A checked request as the evaluation task's params, and the record stored beside its task (also put in
        `inserted` when it is written)."""
        for score in plan.scores:
            if score["scorer"].get("kind") == "kernel":  # the registry lives on the loop: checked here
                self.kernel_scorers.check(score["scorer"]["function"], owner)
        evaluation_id = str(uuid.uuid4())
        fields: dict[str, Any] = {
            "evaluation_id": evaluation_id,
            "type": plan.type,
            "dataset": plan.dataset,
            "scores": plan.scores,
            "label_column": plan.label_column,
            "input_column": plan.input_column,
            "id_column": plan.id_column,
            "sample": plan.sample,
            "runs": plan.runs,
        }
        if plan.restricted:  # the worker checks again, after importing, where the function really comes from
            fields["scorer_modules"] = list(self.scorer_modules)
        params = EvaluationParams.model_validate(fields).stored()
        definition = {k: v for k, v in params.items() if k not in ("evaluation_id", "type", "dataset")}
        if plan.scorecard is not None:
            definition["scorecard"] = plan.scorecard

        def record(task: Task, conn: Connection) -> None:
            row = {
                "id": evaluation_id,
                "task_id": task.id,
                "type": plan.type,
                "owner": owner,
                "dataset": plan.dataset,
                "definition": definition,
                "created_at": time.time(),
            }
            self.store.create(row, conn)
            if inserted is not None:
                inserted.update(row)

        return PlannedSpec(params, f"{plan.type} evaluation of {plan.dataset}", record)

    async def batch_spec(self, arguments: Mapping[str, Any], actor: Actor) -> PlannedSpec:
        """One evaluation of a batch (`dispatch_batch` with type "evaluation"; params are create_evaluation's
        arguments but priority, which is the spec's): checked as `create` checks it, for this caller."""
        request = CreateEvaluation.parse(arguments, "params.")
        if "priority" in request.model_fields_set:
            raise InvalidArgument(
                "params.priority: an evaluation spec's priority is the spec's own field "
                "(tasks[i].priority), not one of its params"
            )
        self.check_runnable()
        plan = await self.catalog.run(self.plan, request, trusted=actor.admin)
        return self.planned_spec(plan, actor.owner)

    def check_runnable(self) -> None:
        """Refuse an evaluation at once (ExecutorUnavailable: 503) while its workers could not write its items
        where this server reads them, rather than let it fail on a worker, or succeed out of reach."""
        problem = self.items_problem()
        if problem:
            raise ExecutorUnavailable(f"evaluations cannot run now: {problem}")

    def _check_importable(self, path: str) -> None:
        module, _, attribute = path.partition(":")
        if "." in attribute or attribute.startswith("_"):
            # module:a.b walks attributes, which reaches other modules (pd.io.common.os.system): not for keys.
            raise InvalidArgument(
                f"python scorer {path!r}: API keys may name a function defined in an allowed "
                "module as module:function (no dotted or private attribute)"
            )
        if not module_allowed(module, self.scorer_modules):
            raise InvalidArgument(
                f"python scorer {path!r} is not in a module API keys may use (scorer_modules: "
                f"{', '.join(self.scorer_modules) or 'none'}); an admin can add its module to scorer_modules, or "
                "use a column or rules scorer"
            )

    @staticmethod
    def _scorer(kind: str, scorer: Any, prediction_column: str | None) -> dict[str, Any]:
        if kind == "feedback":
            if scorer is not None or prediction_column is None:
                raise InvalidArgument(
                    "a feedback evaluation compares earlier predictions with corrected labels: "
                    "give prediction_column (and label_column), not a scorer"
                )
            return {"kind": "column", "column": prediction_column}
        if (scorer is None) == (prediction_column is None):
            raise InvalidArgument(
                f"give either scorer (a spec; kinds: {', '.join(SCORER_KINDS)}) or prediction_column, not both "
                "or neither"
            )
        if kind == "consistency" and scorer is None:
            raise InvalidArgument(
                "a consistency evaluation runs a scorer several times: give scorer, not prediction_column"
            )
        return normalize_spec(scorer if scorer is not None else f"column:{prediction_column}")

    # -- reading ----------------------------------------------------------------------------------------

    def _record(self, evaluation_id: str, viewer: str | None = None) -> dict[str, Any]:
        """The record, if a caller with owner `viewer` (None: an admin) may see it; NotFound otherwise."""
        row = self.store.get(evaluation_id) if isinstance(evaluation_id, str) else None
        if row is None and isinstance(evaluation_id, str):
            tombstone = self.manager.store.tombstone(evaluation_id=evaluation_id)  # pruned by retention?
            if tombstone is not None and owner_visible(tombstone["owner"], viewer):
                raise Expired(expired_message(evaluation_id, tombstone, "evaluation"))
        if row is None or not owner_visible(row["owner"], viewer):
            raise NotFound(f"no evaluation {evaluation_id!r}; list_evaluations shows the ones that exist")
        return row

    def view_of_task(self, task: Task) -> dict[str, Any] | None:
        """The evaluation view of an ended evaluation task (None: its record was never written). One indexed row,
        read where the caller is (the MCP task lane's result callback is synchronous)."""
        row = self.store.by_task(task.id)
        return None if row is None else self.view(row, {task.id: task})

    async def ids_with_prefix(self, prefix: str, viewer: str | None, limit: int) -> list[str]:
        """Evaluation ids starting with `prefix` that `viewer` may see, newest first (completion), off the loop."""
        e = evaluations_table
        return await self.manager.calls.run(
            values_with_prefix, self.store.engine, e.c.id, e.c.owner, e.c.created_at, prefix, viewer, limit
        )

    async def task_of(self, evaluation_id: str, viewer: str | None = None) -> str:
        """The id of the evaluation's task, if `viewer` may see it (read off the event loop)."""
        row = await self.manager.calls.run(self._record, evaluation_id, viewer)
        return str(row["task_id"])

    async def get(self, evaluation_id: str, viewer: str | None = None) -> dict[str, Any]:
        """The evaluation as clients see it; the store is read off the event loop (TaskManager.calls).

        A task running here may end while the record is read (the loop goes on meanwhile): its view would pair
        the final status in memory with a record read before the worker wrote its metrics. The record is then
        read again: the worker writes it before it reports the end."""
        row, tasks = await self.manager.calls.run(self._read_one, evaluation_id, viewer)
        stored = tasks.get(row["task_id"])
        ended_meanwhile = (stored is None or not stored.status.is_final) and self.manager.current(
            row["task_id"], stored
        ).status.is_final
        if ended_meanwhile:
            row, tasks = await self.manager.calls.run(self._read_one, evaluation_id, viewer)
        return self.view(row, tasks)

    def _read_one(self, evaluation_id: str, viewer: str | None) -> tuple[dict[str, Any], dict[str, Task]]:
        row = self._record(evaluation_id, viewer)
        return row, self._stored_tasks([row])

    def _stored_tasks(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Task]:
        """The stored tasks of these records, by id, in one read (any thread)."""
        return {t.id: t for t in self.manager.store.tasks_by_ids([r["task_id"] for r in rows], stages=True)}

    def view(self, row: Mapping[str, Any], tasks: Mapping[str, Task], *, summary: bool = False) -> dict[str, Any]:
        """An evaluation as clients see it: the record plus status and progress from its task (`tasks`: the
        stored ones, read with the record; a task running here is fresher in memory)."""
        task = self.manager.current(row["task_id"], tasks.get(row["task_id"]))
        scoring = next((s for s in task.stages if s.name == "Scoring"), None)
        started, ended = task.started_at, task.completed_at
        elapsed = None if started is None else round((ended or time.time()) - started, 3)
        remaining = None
        if task.estimated_completion_at is not None and not task.status.is_final:
            remaining = max(0.0, round(task.estimated_completion_at - time.time(), 3))
        definition = row["definition"]
        data: dict[str, Any] = {
            "evaluation_id": row["id"],
            "task_id": row["task_id"],
            "type": row["type"],
            "status": EvaluationStatus.of(task.status, task.current_stage),
            "dataset": row["dataset"],
            "scores": [s["name"] for s in definition["scores"]],
            "created_at": iso(row["created_at"]),
            "started_at": iso(started),
            "completed_at": iso(ended),
            "elapsed_seconds": elapsed,
            "remaining_seconds": remaining,
            "processed_items": scoring.processed_items if scoring else 0,
            "total_items": scoring.total_items if scoring else None,
            "counts": row["counts"],
            "error_message": task.error_message,
            "items_pruned_at": iso(row["items_pruned_at"]),
            "resource_uri": evaluation_uri(row["id"]),
        }
        if not summary:
            data["definition"] = definition
            data["metrics"] = _bounded(row["metrics"]) if row["metrics"] is not None else None
        return data

    async def list_evaluations(
        self, request: ListEvaluations | None = None, *, owner: str | None = None, viewer: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of evaluations, newest first (every face's list_evaluations), and the next cursor."""
        request = request or ListEvaluations()
        flt = EvaluationFilter(statuses=request.status, types=request.type, owner=owner, viewer=viewer)
        limit, cursor = self.manager.check_limit(request.limit), request.cursor

        def read() -> tuple[list[dict[str, Any]], str | None, dict[str, Task]]:
            rows, next_cursor = self.store.list_records(flt, limit=limit, cursor=cursor)
            return rows, next_cursor, self._stored_tasks(rows)

        rows, next_cursor, tasks = await self.manager.calls.run(read)
        return [self.view(r, tasks, summary=True) for r in rows], next_cursor

    def results(
        self, request: GetEvaluationResults, viewer: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None, dict[str, Any]]:
        """One page of per-item results, in dataset order, the next cursor, and what was asked."""
        row, flt = self._item_filter(request, viewer)
        items, next_cursor = self.store.items(
            request.evaluation_id,
            flt,
            limit=self.manager.check_limit(request.limit),
            cursor=request.cursor,
            manifest=row["items_manifest"],
        )
        asked = {
            "evaluation_id": request.evaluation_id,
            "score": flt.score,
            "only_mismatches": request.only_mismatches,
            "label": request.label,
        }
        return items, next_cursor, asked

    def item_stream(self, request: GetEvaluationResults, viewer: str | None = None) -> ArrowStream:
        """Every item the pages would give (same filters, same order; the page aside), as an Arrow IPC stream made
        piece by piece (ArrowStream.next, in a thread): REST's results as Arrow, exports, a notebook's
        `.results()`."""
        row, flt = self._item_filter(request, viewer)
        return ArrowStream(self.store.item_tables(request.evaluation_id, flt, row["items_manifest"]), ITEM_SCHEMA)

    def item_files(
        self, request: GetEvaluationResults, viewer: str | None = None, owner: str | None = None
    ) -> dict[str, Any]:
        """Where the items are, for a reader on the same disk (the notebook's `.results()` reads them itself):
        the chunk files of the score with size and mtime, the filter resolved as the pages apply it, and the
        items' Arrow schema (the page, `limit` and `cursor`, aside). Only for the evaluation's owner, or an admin
        (`viewer` None): the paths of one caller's work are not another's to see (Forbidden), even where the
        results are."""
        evaluation_id = request.evaluation_id
        row, flt = self._item_filter(request, viewer)
        if viewer is not None and row["owner"] != owner:
            raise Forbidden(
                f"the item files of evaluation {evaluation_id!r} are listed only to its owner or an admin; "
                "read its items as results (GET .../results, Arrow or JSON pages)"
            )
        manifest = row["items_manifest"]
        if manifest is None:
            raise NotFound(
                f"evaluation {evaluation_id!r} keeps its items as rows in the store (it was made before item "
                "files): read them as results"
            )
        files = ItemFiles(Path(manifest["path"]).parent).listing(evaluation_id, flt.score)
        label = request.label
        normalized = LabelNormalization().normalize(label) if label is not None else None
        return {
            "evaluation_id": evaluation_id,
            "score": flt.score,
            "format": manifest["format"],
            "files": files,
            "filter": {"only_mismatches": request.only_mismatches, "label_class": normalized},
            "schema": base64.b64encode(ITEM_SCHEMA.serialize().to_pybytes()).decode(),
        }

    def _item_filter(self, request: GetEvaluationResults, viewer: str | None) -> tuple[dict[str, Any], ItemFilter]:
        evaluation_id, score = request.evaluation_id, request.score
        row = self._record(evaluation_id, viewer)
        if row["items_pruned_at"] is not None:
            raise InvalidArgument(
                f"evaluation {evaluation_id!r} was cancelled and its per-item results were pruned "
                "(items of cancelled evaluations are not kept); its record remains"
            )
        names = [s["name"] for s in row["definition"]["scores"]]
        if score is None:
            score = names[0]
        elif score not in names:
            raise InvalidArgument(
                f"evaluation {evaluation_id!r} has no score {score!r}; its scores: {', '.join(names)}"
            )
        return row, ItemFilter(score=score, only_mismatches=request.only_mismatches, label=request.label)

    # -- datasets and scorers ---------------------------------------------------------------------------

    def datasets(self, *, include_files: bool = True, limit: int = 200) -> list[dict[str, Any]]:
        return [info.to_dict() for info in self.catalog.list(include_files=include_files, limit=limit)]

    def scorers(self, owner: str | None = None) -> dict[str, Any]:
        """The scorer kinds and their spec forms, the example scorers shipped with the package, and the
        kernel scorers `owner`'s evaluations can name."""
        return {
            "kinds": {
                "column": "column:<column>: predictions already in a column",
                "rules": "{kind: rules, rules: [{pattern: <regex> | keywords: [...], label}], default, input_column}",
                "python": "python:<package.module>:<function> (vectorised when it takes a pandas Series)",
                "kernel": "kernel:<name>: a callable registered from a notebook kernel",
            },
            "examples": [
                {
                    "spec": "python:plexus_mcp_jupyter.evaluations.examples.scorers:keyword_sentiment",
                    "for": "example:sentiment",
                },
                {
                    "spec": "python:plexus_mcp_jupyter.evaluations.examples.scorers:ticket_topic",
                    "for": "example:topics",
                },
                {"spec": "column:prediction", "for": "example:sentiment, example:topics, example:fraud"},
            ],
            "kernel_scorers": self.kernel_scorers.describe(owner),
        }


def _quoted(value: Any) -> str:
    """A value the client sent (a column name, mostly), as an error quotes it: at most about 100 characters."""
    return clip(value) if isinstance(value, str) else one_line(repr(value), 100)


def _bounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as stored, but no more than MAX_LABELS_SHOWN classes in per-class rows and the matrix."""
    out = {}
    for name, m in metrics.items():
        labels = m.get("labels") or []
        if len(labels) > MAX_LABELS_SHOWN:
            m = dict(m)
            m["per_class"] = sorted(m.get("per_class", []), key=lambda r: -r["support"])[:MAX_LABELS_SHOWN]
            m.pop("confusion_matrix", None)
            m["truncated"] = (
                f"{len(labels)} classes: the {MAX_LABELS_SHOWN} largest are shown, without the confusion matrix"
            )
        out[name] = m
    return out
