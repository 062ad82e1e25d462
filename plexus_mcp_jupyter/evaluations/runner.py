"""The evaluation task: runs in a worker process, like any Plexus task.

Stages: Setup (check columns, build the scorers, open the dataset), Scoring (score by score, the dataset read
with pyarrow in batches of only the columns needed (dataset_stream.py), cut into chunks; each chunk scored, its
items written as one Parquet file (item_files.py), its label/prediction pairs counted into a confusion matrix
(metrics.ConfusionCounter); progress reported and cancellation checked between chunks), Metrics (from the
counts; written with the evaluation once). Memory is one batch plus the counts, whatever the dataset's size
(a consistency evaluation also keeps every item's class per run; a sample reads the selected columns whole).
The worker writes to the store itself (its URL comes from `ctx.environment`, never from the task's
parameters), so a million items never cross the pipe to the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core.context import TaskContext
from ..core.errors import InvalidArgument
from ..core.store import make_engine
from .datasets import DatasetCatalog, require_names
from .file_reads import clip
from .item_files import EXCERPT_CHARS, EXPLANATION_CHARS, ItemFiles, clipped
from .limits import DEFAULT_MAX_ITEMS, DEFAULT_MAX_PARQUET_BYTES, check_items
from .metrics import ConfusionCounter, LabelNormalization, consistency_metrics, normalize_labels
from .requests import EvaluationParams, EvaluationScore
from .sampling import check_sample, sample_positions, sampled_rows
from .scorers import (
    DEFAULT_INPUT_COLUMN,
    ColumnScorer,
    KernelScorerSpec,
    ScoreBatch,
    Scorer,
    import_function,
    kernel_scorer_spec,
    module_allowed,
    scorer_from_spec,
)
from .store import SETUP_STAGE, EvaluationStore

REDACTED = "[redacted]"


def run_evaluation(ctx: TaskContext, **params: Any) -> dict[str, Any]:
    """Score a dataset, record its items and metrics; return a short summary (the task's output).

    `params` are the task's EvaluationParams (evaluations/requests.py), as the service stored them; an API key's
    evaluation has `scorer_modules`, which restricts python: scorers to functions defined there.
    """
    task = EvaluationParams.parse(params)
    env = ctx.environment
    store = EvaluationStore(make_engine(env["db_url"]), ItemFiles(env["items_dir"]) if env.get("items_dir") else None)
    try:
        record = store.get(task.evaluation_id)
        if record is None or record["task_id"] != ctx.task_id:
            raise InvalidArgument(f"evaluation {task.evaluation_id!r} does not belong to this task")
        if task.scorer_modules is not None:
            _check_functions(task.scores, task.scorer_modules)
        # A re-run (a re-queued task after a crash) starts from nothing: no items or metrics of an earlier run.
        store.reset(task.evaluation_id)
        return _run(ctx, store, task, LabelNormalization(**(task.normalization or {})))
    finally:
        store.engine.dispose()


def _run(ctx: TaskContext, store: EvaluationStore, task: EvaluationParams, norm: LabelNormalization) -> dict[str, Any]:
    evaluation_id, dataset, scores, runs = task.evaluation_id, task.dataset, task.scores, task.runs
    label_column, input_column, id_column = task.label_column, task.input_column, task.id_column
    env = ctx.environment
    ctx.stage(SETUP_STAGE, 1, f"loading {dataset}")  # one step, so that progress always has a total
    catalog = DatasetCatalog(Path(env["root_dir"]), Path(env["registered_dir"]))
    catalog.max_parquet_uncompressed_bytes = int(env.get("max_parquet_uncompressed_bytes", DEFAULT_MAX_PARQUET_BYTES))
    names = catalog.columns(dataset)
    passes = runs if task.type == "consistency" else 1
    limit = int(env.get("max_evaluation_items", DEFAULT_MAX_ITEMS))
    needed = [c for c in (label_column, input_column, id_column) if c]
    require_names(names, needed, "column")
    scorers = [
        (score.name, _build_scorer(ctx, score.scorer, input_column), score.label_column or label_column)
        for score in scores
    ]
    for _name, scorer, score_label in scorers:
        require_names(names, scorer.columns, "scorer input column")
        if score_label:
            require_names(names, [score_label], "label column")
    if input_column is None and DEFAULT_INPUT_COLUMN in names:
        input_column = DEFAULT_INPUT_COLUMN  # what scorers read by default is what results show as input
    # Only these columns are read; those compared as text are read as text (dataset_stream.py).
    text = (
        [c for _n, _s, c in scorers if c]
        + ([id_column] if id_column else [])
        + [s.column for _n, s, _c in scorers if isinstance(s, ColumnScorer)]
    )
    columns = list(
        dict.fromkeys(
            needed + text + [c for _n, s, _c in scorers for c in s.columns] + ([input_column] if input_column else [])
        )
    )
    stream = catalog.stream(dataset, columns, text)
    frames: Iterable[pd.DataFrame] = stream
    rows = stream.rows
    if task.sample:
        # The sample's rows are drawn from the file's row count (a CSV or JSON Lines file's counted first), as
        # sample_frame draws them, and each pass keeps only those rows of each batch: nothing else is held (every
        # row had been read into one frame first, lists and strings as Python objects, 10x their Arrow size).
        total = stream.exact_rows()
        if total == 0:
            raise InvalidArgument(f"dataset {dataset!r} has no rows")
        # The items bound first: a sample too large to score is refused before its positions are drawn.
        check_sample(**task.sample)
        check_items(sampled_rows(total, task.sample.get("n"), task.sample.get("fraction")), len(scores), passes, limit)
        positions = sample_positions(total, **task.sample)
        if positions is not None:
            frames, rows = SampledFrames(stream, positions, total, dataset), len(positions)
        else:
            rows = total
    estimate = rows if rows is not None else stream.estimated_rows()  # CSV, JSON Lines: lines (the rows, mostly)
    if rows is None and estimate * len(scores) * passes > limit:
        rows = stream.exact_rows()  # lines are at least the rows: only near the bound is an exact count needed
    if rows is not None:
        check_items(rows, len(scores), passes, limit)
    writes = ChunkWrites()
    states = [
        _Consistency(ctx, store, evaluation_id, name, scorer, runs, score_label, input_column, id_column, norm, writes)
        if task.type == "consistency"
        else _Accuracy(ctx, store, evaluation_id, name, scorer, score_label, input_column, id_column, norm, writes)
        for name, scorer, score_label in scorers
    ]
    ctx.advance(1)
    total = rows if rows is not None else estimate
    ctx.stage("Scoring", total * len(scorers) * passes, f"{total:,} items")
    seen = 0
    # Score by score, each a pass over the file (its reader re-opened): a slow scorer does not hold back the
    # items of a fast one, and chunks are sized for the scorer at work.
    with writes:
        for state in states:
            for start, chunk in Chunks(frames, largest=task.chunk_size):
                seen = start + len(chunk)
                if rows is None:  # a CSV or JSON Lines file's rows are known only as they are read
                    check_items(seen, len(scores), passes, limit, at_least=True)
                state.add(start, chunk)
    if seen == 0:
        raise InvalidArgument(f"dataset {dataset!r} has no rows")
    ctx.stage("Metrics", 1)
    metrics, counts = {}, {}
    for state in states:
        metrics[state.name], counts[state.name] = state.result()
    store.set_results(evaluation_id, metrics, counts)
    ctx.advance(1)
    return {"evaluation_id": evaluation_id, "items": seen, "scores": _summary(metrics, counts)}


class KernelRelay(Scorer):
    """A notebook kernel's scorer, reached through the server (evaluations/kernel_scorers.py)."""

    kind = "kernel"

    def __init__(self, ctx: TaskContext, spec: KernelScorerSpec) -> None:
        self.ctx, self.spec, self.name = ctx, spec, spec.name or f"kernel:{spec.function}"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.spec.input_column,)

    def describe(self) -> dict[str, Any]:
        return self.spec.describe()

    def score(self, chunk: pd.DataFrame) -> ScoreBatch:
        inputs = _texts(chunk[self.spec.input_column], 1_000_000)
        answer = self.ctx.request("kernel_score", {"scorer": self.spec.function, "inputs": inputs})

        def series(values: list[Any] | None) -> pd.Series | None:
            return None if values is None else pd.Series(values, index=chunk.index, dtype=object)

        errors = series(answer["errors"])
        return ScoreBatch(
            series(answer["predictions"]),
            series(answer["explanations"]),  # type: ignore[arg-type]
            errors if errors is not None and errors.notna().any() else None,
        )


def _check_functions(scores: list[EvaluationScore], prefixes: list[str]) -> None:
    """An API key's python: scorers must be functions defined in an allowed module (checked after import)."""
    for score in scores:
        spec = score.scorer
        if spec.get("kind") == "python":
            module = getattr(import_function(spec["function"]), "__module__", "") or ""
            if not module_allowed(module, prefixes):
                raise InvalidArgument(
                    f"python scorer {spec['function']!r} is defined in {module!r}, not in an "
                    f"allowed module ({', '.join(prefixes)})"
                )


def _build_scorer(ctx: TaskContext, spec: dict[str, Any], input_column: str | None) -> Scorer:
    if isinstance(spec, dict) and spec.get("kind") == "kernel":
        return KernelRelay(ctx, kernel_scorer_spec(spec, input_column=input_column))
    return scorer_from_spec(spec, input_column=input_column)


def _require_two_classes(classes: set[str], column: str, na_label: str) -> None:
    if classes <= {na_label}:
        raise InvalidArgument(
            f"label column {column!r} has no labels: every value is missing or blank; pick the "
            "column that holds the correct labels"
        )
    if len(classes) < 2:
        raise InvalidArgument(
            f"label column {column!r} has a single class ({next(iter(classes), 'na')!r} in every row) after "
            "normalisation: agreement metrics need at least two classes; pick another label column or dataset"
        )


class Chunks:
    """Chunks of a stream of frames sized to take about `target` seconds each to score, as (seq of the first
    item, chunk): the batches a file is read in are cut (or kept) to the size that suits the scorer.

    Cancellation is checked and progress reported between chunks, so a slow per-item scorer gets small
    chunks (a prompt cancel, smooth progress) and a fast vectorised one large chunks (few files).
    """

    def __init__(
        self, frames: Iterable[pd.DataFrame], first: int = 4, target: float = 0.25, largest: int = 50_000
    ) -> None:
        self.frames, self.size, self.target, self.largest = frames, first, target, largest

    def __iter__(self) -> Iterator[tuple[int, pd.DataFrame]]:
        seq = 0
        for frame in self.frames:
            offset = 0
            while offset < len(frame):
                chunk = frame.iloc[offset : offset + self.size]
                started = time.perf_counter()
                yield seq, chunk
                elapsed = time.perf_counter() - started
                offset += len(chunk)
                seq += len(chunk)
                rate = len(chunk) / max(elapsed, 1e-6)
                self.size = int(min(self.largest, max(1, min(rate * self.target, self.size * 4))))


class SampledFrames:
    """The rows at `positions` (sorted) of a stream's frames, whose index is their rows' positions in the file
    (DatasetStream), batch by batch as the stream is read: a sample's rows, with their positions kept (an item's
    default id), and nothing else held. A pass that does not end at `rows` rows fails: the positions were drawn
    from that count: at the frame that passes it, or at its end short of it (the stream counts with its own reader,
    DatasetStream.exact_rows, and checks the file unchanged, so this is a reader's fault, not a writer's)."""

    def __init__(self, frames: Iterable[pd.DataFrame], positions: np.ndarray, rows: int, dataset: str = "") -> None:
        self.frames, self.positions, self.rows, self.dataset = frames, positions, rows, dataset

    def __iter__(self) -> Iterator[pd.DataFrame]:
        end = 0
        for frame in self.frames:
            start, end = int(frame.index[0]), int(frame.index[0]) + len(frame)
            if end > self.rows:
                raise self._disagree(f"more than {self.rows:,}")
            low, high = np.searchsorted(self.positions, [start, end])
            if high > low:
                yield frame.iloc[self.positions[low:high] - start]
        if end != self.rows:
            raise self._disagree(f"{end:,}")

    def _disagree(self, read: str) -> InvalidArgument:
        return InvalidArgument(
            f"dataset {clip(self.dataset)}: its rows were counted as {self.rows:,} before its sample was drawn, but "
            f"the read gave {read} rows: the count and the read disagree, so the sample cannot be kept; evaluate "
            "it without a sample, or save it as Parquet (its footer says how many rows it holds)"
        )


def _score(ctx: TaskContext, scorer: Scorer, chunk: pd.DataFrame) -> ScoreBatch:
    ctx.check_cancelled()
    return scorer.score(chunk)


class ChunkWrites:
    """Item chunks written on a thread of their own while the next chunk is read and scored.

    Writing a chunk's items (Arrow columns, then Parquet) was half a fast evaluation's time in the worker, and
    pyarrow does it without the GIL: on a thread it overlaps the reading and scoring of the next chunk. One
    write at a time: `submit` waits for the previous one first, so memory is two chunks at most, chunks are
    complete files in the order written, and a failed write (a full disk) fails the evaluation at the next
    chunk, or at the end (leaving the block), with its own error.
    """

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="plexus-item-writes")
        self._pending: Future[None] | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._thread.submit(write)

    def wait(self) -> None:
        """Until the last chunk submitted is written; its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> ChunkWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()  # the metrics are written only once every item is
            elif self._pending is not None:
                self._pending.exception()  # ended (its error is the lesser news): no write outlives the task
        finally:
            self._thread.shutdown(wait=True)


class _ScoreWriter:
    """What the scores of an evaluation share: where a chunk's items go (one file chunk per score and start)."""

    store: EvaluationStore
    evaluation_id: str
    name: str
    input_column: str | None
    id_column: str | None
    redacted: frozenset[str]
    writes: ChunkWrites

    def _write(
        self,
        start: int,
        chunk: pd.DataFrame,
        labels: Any,
        classes: Any,
        batch: ScoreBatch,
        correct: Any,
        failed: np.ndarray,
    ) -> None:
        """Write a chunk's items, on the writes' thread (none of these arguments is changed afterwards)."""

        def write() -> None:
            columns = _columns(
                start, chunk, labels, classes, batch, correct, failed, self.input_column, self.id_column, self.redacted
            )
            self.store.add_chunk(self.evaluation_id, self.name, start, columns)

        self.writes.submit(write)


class _Accuracy(_ScoreWriter):
    """One score of an accuracy evaluation, chunk by chunk: items written, a confusion matrix counted.

    What it keeps between chunks is the counts (ConfusionCounter), never the chunks: an evaluation of ten
    million rows holds one chunk and a K x K matrix.
    """

    def __init__(
        self,
        ctx: TaskContext,
        store: EvaluationStore,
        evaluation_id: str,
        name: str,
        scorer: Scorer,
        label_column: str | None,
        input_column: str | None,
        id_column: str | None,
        norm: LabelNormalization,
        writes: ChunkWrites,
    ) -> None:
        if label_column is None:
            raise InvalidArgument(f"score {name!r} needs a label column to compare its predictions with")
        self.ctx, self.store, self.evaluation_id, self.name, self.scorer = ctx, store, evaluation_id, name, scorer
        self.label_column, self.input_column, self.id_column = label_column, input_column, id_column
        self.counter = ConfusionCounter(norm)
        self.label_classes: set[int] = set()
        self.items = self.scored = 0
        self.redacted = _redacted(ctx)
        self.writes = writes

    def add(self, start: int, chunk: pd.DataFrame) -> None:
        batch = _score(self.ctx, self.scorer, chunk)
        labels = chunk[self.label_column]
        ref = self.counter.classes(labels)
        predicted = self.counter.classes(batch.predictions)
        failed = _failed_mask(batch)
        # Classes are numbers here: the label_class column is the class names taken by number (no per-row str).
        classes = pa.array(self.counter.names, pa.string()).take(pa.array(ref))
        self._write(start, chunk, labels, classes, batch, ref == predicted, failed)
        # Items whose scoring failed are left out of the metrics (and counted); a missing prediction without
        # an error is the "na" class like any other.
        keep = ~failed
        self.counter.add(ref[keep], predicted[keep])
        self.label_classes.update(np.unique(ref).tolist())
        self.items += len(chunk)
        self.scored += int(keep.sum())
        self.ctx.advance(len(chunk))

    def result(self) -> tuple[dict[str, Any], dict[str, Any]]:
        _require_two_classes(
            {self.counter.names[c] for c in self.label_classes}, self.label_column, self.counter.normalization.na_label
        )
        if self.scored == 0:
            raise InvalidArgument(f"score {self.name!r}: every item failed to score; see the items' errors")
        counts = {"items": self.items, "scored": self.scored, "errors": self.items - self.scored}
        return self.counter.metrics().to_dict(), counts


def _failed_mask(batch: ScoreBatch) -> np.ndarray:
    if batch.errors is None:
        return np.zeros(len(batch.predictions), dtype=bool)
    return batch.errors.notna().to_numpy()


def _columns(
    start: int,
    chunk: pd.DataFrame,
    labels: pd.Series | None,
    classes: np.ndarray | pa.Array | None,
    batch: ScoreBatch,
    correct: np.ndarray | None,
    failed: np.ndarray,
    input_column: str | None,
    id_column: str | None,
    redacted: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The chunk's items as columns of INSERT_COLUMNS (no Python work per field).

    The default id is the row's position in the dataset (the index survives sampling), kept as numbers
    (an int64 column costs a byte or two per item in Parquet; shown as text). Columns named in `redacted`
    (the redact_columns setting) are scored as they are but never stored.
    """
    n = len(chunk)
    none = pa.nulls(n, pa.string())
    hidden: list[Any] = [REDACTED] * n
    ids: Any
    if id_column and _whole_numbers(chunk[id_column]):
        ids = pa.array(chunk[id_column].to_numpy(dtype=np.int64))  # kept as numbers, as the default id is
    elif id_column:
        ids = _text_column(chunk[id_column], EXCERPT_CHARS)
    elif pd.api.types.is_integer_dtype(chunk.index.dtype):
        ids = pa.array(chunk.index.to_numpy(dtype=np.int64))
    else:
        ids = chunk.index.astype(str).tolist()
    inputs = _text_column(chunk[input_column], EXCERPT_CHARS) if input_column and input_column in chunk else none
    if id_column in redacted:
        ids = hidden
    if input_column in redacted:
        inputs = hidden
    if labels is not None and labels.name in redacted:
        labels, classes = pd.Series(hidden, index=chunk.index), np.asarray(hidden, dtype=object)
    predictions = _text_column(batch.predictions, EXCERPT_CHARS)
    oks = pa.array(correct, mask=failed, type=pa.bool_()) if correct is not None else pa.nulls(n, pa.bool_())
    if failed.any():
        predictions = pc.if_else(pa.array(failed), pa.scalar(None, predictions.type), predictions)
    return {
        "seq": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "item_id": ids,
        "input": inputs,
        "label": _text_column(labels, EXCERPT_CHARS) if labels is not None else none,
        "label_class": (
            classes
            if isinstance(classes, pa.Array)
            else pa.array(classes, type=pa.string())
            if classes is not None
            else none
        ),
        "prediction": predictions,
        "correct": oks,
        "explanation": (
            _text_column(batch.explanations, EXPLANATION_CHARS) if batch.explanations is not None else none
        ),
        "error": _text_column(batch.errors, EXPLANATION_CHARS) if batch.errors is not None else none,
    }


def _redacted(ctx: TaskContext) -> frozenset[str]:
    return frozenset(c.strip() for c in str(ctx.environment.get("redact_columns", "")).split(",") if c.strip())


def _text_column(values: pd.Series, limit: int) -> pa.Array:
    """Values as bounded strings (null for missing), as an Arrow array: a text column read from a file is
    Arrow already (pandas' str dtype), so it is sliced in place, without a Python object per value."""
    if not (isinstance(values.dtype, pd.StringDtype) and values.dtype.storage == "pyarrow"):
        return pa.array(_texts(values, limit), type=pa.string())
    text = pa.array(values)
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    return clipped(text, limit)


def _whole_numbers(values: pd.Series) -> bool:
    """An integer column without a missing value (a Parquet file's numeric id): stored as numbers, shown as
    text, rather than turned into a string per row (most of a 1M-row evaluation's time, measured)."""
    return pd.api.types.is_integer_dtype(values.dtype) and not values.hasnans


def _texts(values: pd.Series, limit: int) -> list[str | None]:
    """Values as bounded strings (None for missing), so no item floods a client; vectorised."""
    missing = values.isna().to_numpy()
    text = values.astype(object).where(~missing, "").astype(str)
    long = (text.str.len() > limit).to_numpy()
    if long.any():
        text[long] = text[long].str.slice(0, limit - 1) + "…"
    out = text.astype(object)
    if missing.any():
        out[missing] = None
    return out.tolist()  # type: ignore[no-any-return]


class _Consistency(_ScoreWriter):
    """One score of a consistency evaluation, chunk by chunk. The runs' predictions of every item are kept
    (the agreement metrics need them all: items x runs class names); the modal accuracy is counted."""

    def __init__(
        self,
        ctx: TaskContext,
        store: EvaluationStore,
        evaluation_id: str,
        name: str,
        scorer: Scorer,
        runs: int,
        label_column: str | None,
        input_column: str | None,
        id_column: str | None,
        norm: LabelNormalization,
        writes: ChunkWrites,
    ) -> None:
        self.ctx, self.store, self.evaluation_id, self.name, self.scorer = ctx, store, evaluation_id, name, scorer
        self.runs, self.label_column, self.input_column, self.id_column = runs, label_column, input_column, id_column
        self.norm = norm
        self.modal_counter = ConfusionCounter(norm)
        self.grids: list[np.ndarray] = []
        self.items = self.errors = 0
        self.redacted = _redacted(ctx)
        self.writes = writes

    def add(self, start: int, chunk: pd.DataFrame) -> None:
        columns, failed = [], np.zeros(len(chunk), dtype=bool)
        errors_seen = pd.Series([None] * len(chunk), index=chunk.index, dtype=object)
        for _ in range(self.runs):
            batch = _score(self.ctx, self.scorer, chunk)
            failed |= _failed_mask(batch)
            if batch.errors is not None:  # keep each item's first error message
                errors_seen = errors_seen.where(errors_seen.notna(), batch.errors)
            columns.append(normalize_labels(batch.predictions, self.norm))
            self.ctx.advance(len(chunk))
        grid = np.stack(columns, axis=1)
        unanimous = (grid == grid[:, :1]).all(axis=1)
        modal = consistency_metrics(grid, self.norm).modal_prediction
        self.errors += int(failed.sum())
        self.items += len(chunk)
        explanation = pd.Series([", ".join(row) for row in grid.tolist()], index=chunk.index)
        batch = ScoreBatch(
            pd.Series(modal, index=chunk.index), explanation, errors_seen if errors_seen.notna().any() else None
        )
        labels = chunk[self.label_column] if self.label_column else None
        classes = normalize_labels(labels, self.norm) if labels is not None else None
        self._write(start, chunk, labels, classes, batch, unanimous, failed)
        self.grids.append(np.asarray(grid[~failed], dtype=object))
        if labels is not None:
            keep = ~failed
            self.modal_counter.add(
                self.modal_counter.classes(labels)[keep],
                self.modal_counter.classes(np.asarray(modal, dtype=object))[keep],
            )

    def result(self) -> tuple[dict[str, Any], dict[str, Any]]:
        grid = np.concatenate(self.grids) if self.grids else np.zeros((0, self.runs), dtype=object)
        if len(grid) == 0:
            raise InvalidArgument(f"score {self.name!r}: every item failed to score; see the items' errors")
        result = consistency_metrics(grid, self.norm).to_dict()
        if self.label_column:
            result["accuracy_of_modal"] = self.modal_counter.metrics().to_dict()
        return result, {"items": self.items, "scored": len(grid), "errors": self.errors}


def _summary(metrics: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, m in metrics.items():
        keys = ("accuracy", "macro_f1", "cohen_kappa", "gwet_ac1", "mean_pairwise_agreement", "unanimous_share")
        out[name] = {k: m[k] for k in keys if k in m} | counts[name]
    return out
