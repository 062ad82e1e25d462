"""Datasets an evaluation can read: files under the Jupyter root, registered DataFrames, shipped examples.

A dataset is named by one string, its *ref*:

- ``example:<name>``: a small dataset shipped with the package (``example:sentiment``, ``example:topics``,
  ``example:fraud``).
- ``registered:<name>``: a DataFrame registered by name (from a kernel, say); stored as Parquet.
- ``file:<path>`` or a bare ``<path>``: a CSV (``.csv``), Parquet (``.parquet``, ``.pq``) or JSON Lines
  (``.jsonl``, ``.ndjson``) file, relative to the Jupyter root, ``/``-separated. The ``file:`` prefix is
  only needed when the path itself starts with one of these prefixes.

A bare name is always a path, never a registered name: a file and a registered frame may share a name
without ambiguity.

File paths are confined to the root: absolute paths, ``~``, ``..`` and paths whose real location (symlinks
resolved with ``os.path.realpath``) is outside the root are refused. Hidden parts (a name starting with
``.``, such as ``.git`` or ``.ipynb_checkpoints``) are refused too, as Jupyter's contents API refuses them
by default: they hold tool state and secrets, not data. A symlink whose target stays inside the root is
allowed. The same check (:func:`confine_path`) guards scorecard files.

Every loaded frame has a fresh ``RangeIndex``: a stored index with a name becomes column(s), an unnamed
one is dropped.

Listing, describing and checking columns serve any caller who may read, so they read files within bounds
(:mod:`.file_reads`): never a whole file, never an unbounded line, and in the catalog's own few threads
(:meth:`DatasetCatalog.run`) so they cannot occupy the event loop or the default thread pool. Loading a
whole frame (:meth:`DatasetCatalog.load`) is for evaluation workers, in their own processes.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import io
import itertools
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.errors import Forbidden, InvalidArgument, NotFound, one_line
from ..core.ownership import is_key_owner
from ..core.pools import start_one_thread
from .dataset_stream import DatasetStream, count_lines
from .file_reads import (
    KEEP_DATES,
    MAX_TRACKED_LABELS,
    LabelCounts,
    ReadBounds,
    check_columns,
    check_header,
    check_name,
    clip,
    count_parquet,
    head,
    label_text,
    parquet_file,
    parse_head,
    read_parquet_bounded,
    unreadable,
)
from .limits import DEFAULT_MAX_PARQUET_BYTES

Source = Literal["file", "registered", "example"]
T = TypeVar("T")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
REF_PREFIXES = ("example:", "registered:", "file:")
FILE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
ALLOWED_EXTENSIONS = ", ".join(FILE_FORMATS)
REF_HELP = (
    "expected 'example:<name>', 'registered:<name>' or a path relative to the Jupyter root "
    f"(optionally 'file:<path>') ending in {ALLOWED_EXTENSIONS}"
)

REGISTERED_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
REGISTERED_NAME_HELP = "1 to 64 letters, digits, '_', '.' or '-', not starting with '.'"

# What is stored (the frame re-encoded as compressed Parquet) counts against a key's quota of registered bytes, and is
# known once the body is read and parsed: a registration body is refused before it is read only when its sender has
# nothing left, or when it is larger than this many times what is left (JSON records are several times the Parquet
# stored from them). What a sender near its quota can make the server read and parse: 16 x what it has left.
BODY_QUOTA_FACTOR = 16
MAX_LABEL_CLASSES = 20  # label_distribution keeps the most frequent classes only
MAX_COLUMNS_LISTED = 200  # DatasetInfo.columns keeps the first ones; column_count says how many there are
MAX_LISTED_IN_ERROR = 20  # require_columns names this many existing columns, then "and N more"
# Bounds of the walk that lists data files, so a huge root (a home directory) cannot stall a listing.
WALK_MAX_DEPTH = 6
WALK_MAX_FILES = 20_000
WALK_SKIPPED_DIRS = frozenset({"node_modules", "__pycache__", "site-packages", "venv"})
# A listing counts CSV / JSONL rows by counting lines up to this size; bigger files report rows=None.
COUNT_LINES_MAX_BYTES = 64 * 1024 * 1024
HEAD_ROWS = 100  # rows read to infer column dtypes of a CSV / JSONL file in a listing
MAX_REF_CHARS = 4096  # a dataset ref (a path, mostly) longer than this is refused
DESCRIBED_CACHE_SIZE = 256  # descriptions kept, keyed by file, size, mtime and label column


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    dtype: str


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, without its data. `rows` is None when counting would cost a full read."""

    ref: str
    name: str
    source: Source
    rows: int | None
    columns: tuple[ColumnInfo, ...]
    column_count: int
    label_column: str | None = None
    # The most frequent labels first, at most MAX_LABEL_CLASSES; label None counts missing values.
    label_distribution: tuple[tuple[str | None, int], ...] | None = None
    label_classes: int | None = None  # how many distinct labels in all, listed or not
    size_bytes: int | None = None
    error: str | None = None  # set in a listing when the file could not be described
    label_note: str | None = None  # why label_distribution is None although there is a label column

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "ref": self.ref,
            "name": self.name,
            "source": self.source,
            "rows": self.rows,
            "columns": [{"name": c.name, "dtype": c.dtype} for c in self.columns],
            "column_count": self.column_count,
            "label_column": self.label_column,
            "label_distribution": None
            if self.label_distribution is None
            else [{"label": label, "count": count} for label, count in self.label_distribution],
            "label_classes": self.label_classes,
        }
        if self.size_bytes is not None:
            result["size_bytes"] = self.size_bytes
        if self.error is not None:
            result["error"] = self.error
        if self.label_note is not None:
            result["label_note"] = self.label_note
        return result


@dataclass(frozen=True)
class DatasetRef:
    """A parsed ref: where the dataset comes from and its name there (a relative path for files)."""

    source: Source
    name: str

    def __str__(self) -> str:
        if self.source == "file":
            return f"file:{self.name}" if self.name.startswith(REF_PREFIXES) else self.name
        return f"{self.source}:{self.name}"


DEFAULT_LABEL_COLUMN = "label"  # an evaluation's label column when none is given and the dataset has it
DEFAULT_ID_COLUMN = "id"  # its item ids likewise (otherwise row numbers)


def parse_ref(ref: object) -> DatasetRef:
    """Split a dataset ref into source and name; checks the syntax only, not that the dataset exists."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidArgument(f"dataset must be a non-empty string, not {ref!r}; {REF_HELP}")
    ref = check_name(ref, "dataset", MAX_REF_CHARS).strip()
    for source in ("example", "registered"):
        if ref.startswith(source + ":"):
            name = ref[len(source) + 1 :]
            if not name:
                raise InvalidArgument(f"dataset {ref!r} has no name after '{source}:'; {REF_HELP}")
            return DatasetRef(source, name)  # type: ignore[arg-type]
    path = ref.removeprefix("file:")
    if not path:
        raise InvalidArgument(f"dataset {ref!r} has no path after 'file:'; {REF_HELP}")
    return DatasetRef("file", path)


def confine_path(root_dir: Path | str, relative: str, *, what: str = "dataset") -> Path:
    """The real path of `relative` under `root_dir`, or InvalidArgument saying why it is refused.

    Refused: empty, absolute or ``~`` paths, ``..`` parts, hidden parts (``.git``) and anything whose
    real location (symlinks resolved) is outside the root. Existence is not checked.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise InvalidArgument(f"{what} path must be a non-empty path relative to the Jupyter root, not {relative!r}")
    check_name(relative, f"{what} path", MAX_REF_CHARS)
    if os.path.isabs(relative) or relative.startswith("~") or PurePosixPath(relative).is_absolute():
        raise InvalidArgument(f"{what} path {relative!r} is absolute; give a path relative to the Jupyter root")
    parts = PurePosixPath(relative).parts
    if ".." in parts:
        raise InvalidArgument(f"{what} path {relative!r} contains '..'; give a path inside the Jupyter root")
    _refuse_hidden(parts, relative, what)
    real_root = os.path.realpath(root_dir)
    real = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, real]) != real_root:
        raise InvalidArgument(f"{what} path {relative!r} resolves outside the Jupyter root (through a symlink)")
    _refuse_hidden(Path(os.path.relpath(real, real_root)).parts, relative, what)
    return Path(real)


def _refuse_hidden(parts: Sequence[str], relative: str, what: str) -> None:
    hidden = [part for part in parts if part.startswith(".") and part != "."]
    if hidden:
        raise InvalidArgument(
            f"{what} path {relative!r} has a hidden part {hidden[0]!r}; hidden files and folders are not served"
        )


def require_columns(df: pd.DataFrame, *names: str, what: str = "label column") -> None:
    """Raise InvalidArgument naming each of `names` missing from `df` and the columns it does have."""
    require_names([str(column) for column in df.columns], names, what)


def require_names(existing: Sequence[str], names: Sequence[str], what: str) -> None:
    """Raise InvalidArgument naming each of `names` missing from `existing` (column names) and those there are."""
    missing = [name for name in names if name not in existing]
    if not missing:
        return
    quoted = ", ".join(clip(name) for name in missing)
    raise InvalidArgument(f"{what} {quoted} not found; the columns are: {column_listing(existing)}")


def column_listing(names: Sequence[str]) -> str:
    """Column names for an error message: the first MAX_LISTED_IN_ERROR, each cut to 60 characters (names
    as long as the bound allows, twenty of them, would make a long line of a message and the log)."""
    shown = ", ".join(n if len(n) <= 60 else n[:57] + "..." for n in names[:MAX_LISTED_IN_ERROR]) or "(none)"
    if len(names) > MAX_LISTED_IN_ERROR:
        shown += f", ... ({len(names) - MAX_LISTED_IN_ERROR} more)"
    return shown


class DatasetCatalog:
    """Finds, loads, describes and registers datasets. Holds no data but a small cache of descriptions;
    safe to share between threads.

    `root_dir` is the Jupyter root that file refs are relative to; `registered_dir` holds registered
    frames as ``<name>.parquet`` (created on first use). `bounds` limit what listing, describing and
    column checks read of a file; `threads` is how many of them run at once through :meth:`run`.
    """

    def __init__(
        self, root_dir: Path | str, registered_dir: Path | str, *, bounds: ReadBounds | None = None, threads: int = 2
    ) -> None:
        self.root_dir = Path(root_dir)
        self.registered_dir = Path(registered_dir)
        self.bounds = bounds or ReadBounds()
        self.threads = threads
        # Most bytes of registered datasets one API key's owner may keep (0: no limit); the
        # max_registered_bytes_per_principal setting, set by the runtime.
        self.max_registered_bytes = 0
        # Most bytes (and cells x 8) a Parquet body may declare uncompressed (read_parquet_body); the
        # max_parquet_uncompressed_bytes setting, set by the runtime.
        self.max_parquet_uncompressed_bytes = DEFAULT_MAX_PARQUET_BYTES
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._admitting = threading.Lock()  # one quota check and placement at a time (admit)
        self._described: OrderedDict[tuple[Any, ...], DatasetInfo] = OrderedDict()
        self._describing: dict[str, threading.Lock] = {}

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the catalog's threads, at most `threads` at once; the rest wait in turn.

        Reading files takes time that grows with the files, so it never runs on the event loop; and in
        a pool of its own, so that many slow listings cannot take every thread of the default pool.
        """
        return await asyncio.get_running_loop().run_in_executor(self._threads(), functools.partial(fn, *args, **kwargs))

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="plexus-datasets")
            return self._pool

    def start_threads(self) -> None:
        """Start a thread of the pool now (a server, before it is ready), not in the first request's `run`."""
        start_one_thread(self._threads())

    def close(self) -> None:
        """Stop the threads (those at work finish first)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- finding ---------------------------------------------------------------------------------------

    def resolve_path(self, relative: str, *, what: str = "dataset") -> Path:
        """The real path of a file under the root; see :func:`confine_path`."""
        return confine_path(self.root_dir, relative, what=what)

    def example_names(self) -> builtins.list[str]:
        return sorted(path.stem for path in EXAMPLES_DIR.glob("*.csv"))

    def registered_names(self) -> builtins.list[str]:
        if not self.registered_dir.is_dir():
            return []
        return sorted(path.stem for path in self.registered_dir.glob("*.parquet") if not path.name.startswith("."))

    def _locate(self, ref: DatasetRef) -> tuple[Path, str]:
        """The file holding a dataset and its format; NotFound / InvalidArgument say what is allowed."""
        if ref.source == "example":
            path = EXAMPLES_DIR / f"{ref.name}.csv"
            if "/" in ref.name or not path.is_file():
                raise NotFound(
                    f"no example dataset {ref.name!r}; the examples are: "
                    f"{', '.join('example:' + n for n in self.example_names())}"
                )
            return path, "csv"
        if ref.source == "registered":
            _check_registered_name(ref.name)
            path = self.registered_dir / f"{ref.name}.parquet"
            if not path.is_file():
                names = self.registered_names()
                known = ", ".join(names[:MAX_LISTED_IN_ERROR]) if names else "none yet"
                raise NotFound(f"no registered dataset {ref.name!r}; registered: {known}")
            return path, "parquet"
        suffix = PurePosixPath(ref.name).suffix.lower()
        if suffix not in FILE_FORMATS:
            raise InvalidArgument(
                f"dataset file {ref.name!r} has an unsupported extension {suffix or '(none)'!r}; "
                f"supported: {ALLOWED_EXTENSIONS}"
            )
        path = self.resolve_path(ref.name)
        if path.is_dir():
            raise InvalidArgument(f"dataset path {ref.name!r} is a folder; give a data file ({ALLOWED_EXTENSIONS})")
        if not path.is_file():
            raise NotFound(f"no dataset file {ref.name!r} under the Jupyter root")
        return path, FILE_FORMATS[suffix]

    def resolve(self, ref: str) -> str:
        """The full ref of `ref`: itself, unless it is a bare name (no source, no extension, no folder), which
        resolves to the one example, registered frame or data file of that name; InvalidArgument lists the
        candidates (or the examples) otherwise. Walks the root for files (bounded): call it from a thread."""
        parsed = parse_ref(ref)
        if (
            parsed.source != "file"
            or "/" in parsed.name
            or PurePosixPath(parsed.name).suffix
            or ref.startswith("file:")
        ):
            return ref
        name = parsed.name
        candidates = [f"example:{name}"] if name in self.example_names() else []
        if name in self.registered_names():
            candidates.append(f"registered:{name}")
        candidates += [str(f) for f in self._data_files() if PurePosixPath(f.name).stem == name]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise InvalidArgument(
                f"dataset {clip(name)} is ambiguous: it could be {', '.join(candidates[:10])}; give one of these refs"
            )
        examples = ", ".join("example:" + n for n in self.example_names())
        raise InvalidArgument(
            f"no dataset named {clip(name)}: give a ref such as {examples}, registered:<name> or "
            f"a file path under the Jupyter root ({ALLOWED_EXTENSIONS}); list_datasets shows them"
        )

    # --- loading ---------------------------------------------------------------------------------------

    def load(self, ref: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The dataset as a DataFrame with a RangeIndex, optionally only `columns` (in that order).

        Raises NotFound (no such dataset), InvalidArgument (bad ref, path refused, unsupported extension,
        unreadable or malformed file, no rows, a column in `columns` missing).
        """
        parsed = parse_ref(ref)
        path, fmt = self._locate(parsed)
        wanted = builtins.list(columns) if columns is not None else None
        df = _read(path, fmt, str(parsed), wanted, self.max_parquet_uncompressed_bytes)
        if wanted is not None:
            require_columns(df, *wanted, what=f"column(s) of dataset {str(parsed)!r}:")
            df = df[wanted]
        if len(df) == 0:
            raise InvalidArgument(f"dataset {str(parsed)!r} has no rows")
        return df

    def stream(self, ref: str, columns: Sequence[str], text_columns: Sequence[str] = ()) -> DatasetStream:
        """The dataset's `columns`, batch by batch, for an evaluation worker (dataset_stream.py): bounded
        memory whatever the file's size. Raises like :meth:`load`, and InvalidArgument for a missing column."""
        parsed = parse_ref(ref)
        path, fmt = self._locate(parsed)
        names = self.columns(ref)
        require_names(names, builtins.list(columns), f"column(s) of dataset {str(parsed)!r}:")
        with _reading(str(parsed), fmt):
            return DatasetStream(
                path,
                fmt,
                str(parsed),
                names,
                columns,
                text_columns,
                self.bounds,
                max_parquet_bytes=self.max_parquet_uncompressed_bytes,
            )

    def columns(self, ref: str) -> builtins.list[str]:
        """The dataset's column names, read from its first line or its Parquet footer only, within the
        catalog's bounds (so at most `bounds.header_bytes` of a text file, whatever its size).

        Raises like :meth:`load` for a dataset that is missing, refused or unreadable, and InvalidArgument
        for one outside the bounds (a first line too long, too many columns, a column name too long).
        """
        parsed = parse_ref(ref)
        path, fmt = self._locate(parsed)
        with _reading(str(parsed), fmt), path.open("rb") as handle:
            if fmt == "parquet":
                names = [str(c) for c in parquet_file(handle, str(parsed)).schema_arrow.names]
            else:
                data, _ = head(handle, self.bounds, str(parsed), sample=0)
                check_header(data, fmt, self.bounds, str(parsed))
                names = [str(c) for c in parse_head(data, fmt, 0 if fmt == "csv" else 1).columns]
        return check_columns(names, self.bounds, str(parsed))

    # --- describing ------------------------------------------------------------------------------------

    def describe(self, ref: str, label_column: str | None = None) -> DatasetInfo:
        """Rows, columns and dtypes, and the label distribution of `label_column` (or of a column named
        ``label`` when there is one and none is given).

        Never loads the dataset: columns and dtypes come from the first rows (or the Parquet schema), rows
        and label counts from one streaming pass over that column (Parquet metadata when there is no label
        column). A label column with more than MAX_TRACKED_LABELS distinct values gets no distribution,
        and `label_note` says why. The result is cached by file, size and mtime, and one file is
        described by one thread at a time: others asking meanwhile wait for that result.
        """
        parsed = parse_ref(ref)
        if label_column is not None:
            check_name(label_column, "label column", self.bounds.name_chars)
        path, fmt = self._locate(parsed)
        with self._lock:
            lock = self._describing.setdefault(str(path), threading.Lock())
        with lock:
            key = (*_version(path), "describe", label_column)
            info = self._recall(key)
            if info is None:
                info = self._remember(key, self._describe(parsed, path, fmt, label_column, path.stat().st_size))
        return info

    def _recall(self, key: tuple[Any, ...]) -> DatasetInfo | None:
        with self._lock:
            info = self._described.get(key)
            if info is not None:
                self._described.move_to_end(key)
            return info

    def _remember(self, key: tuple[Any, ...], info: DatasetInfo) -> DatasetInfo:
        with self._lock:
            self._described[key] = info
            while len(self._described) > DESCRIBED_CACHE_SIZE:
                self._described.popitem(last=False)
        return info

    def _describe(self, parsed: DatasetRef, path: Path, fmt: str, label_column: str | None, size: int) -> DatasetInfo:
        ref = str(parsed)
        _, columns = self._peek(path, fmt, ref, count_rows=False)
        names = [name for name, _ in columns]
        if label_column is not None:
            require_names(names, [label_column], "label column")
        elif DEFAULT_LABEL_COLUMN in names:
            label_column = DEFAULT_LABEL_COLUMN
        with _reading(ref, fmt):
            if fmt == "parquet":
                counted = count_parquet(path, label_column, self.max_parquet_uncompressed_bytes, ref)
            else:
                counted = self._count_text(path, fmt, ref, names, label_column)
        if counted.rows == 0:
            raise InvalidArgument(f"dataset {clip(ref)} has no rows")
        extra: dict[str, Any] = {"label_column": label_column}
        if label_column is not None and counted.too_many:
            extra["label_note"] = (
                f"more than {MAX_TRACKED_LABELS:,} distinct values: not counted (is this a label column?)"
            )
        elif label_column is not None:
            extra["label_distribution"] = counted.top(MAX_LABEL_CLASSES)
            extra["label_classes"] = len(counted.counts or {})
        return _info(parsed, counted.rows, columns, size_bytes=size if parsed.source == "file" else None, **extra)

    def _count_text(
        self, path: Path, fmt: str, ref: str, names: builtins.list[str], label_column: str | None
    ) -> LabelCounts:
        """A CSV or JSON Lines file's rows and label counts from one pass of the stream an evaluation reads it with
        (DatasetStream, the label column as text, or the first column): the rows an evaluation reads, and its errors.
        Counts of their own (pyarrow's CSV reader in 1 MiB blocks, JSON records line by line) had differed: a JSON
        Lines file of records split by a bare CR was refused (a record read as two), a record that is not an object
        raised a raw TypeError, and a CSV row over 1 MiB failed the count, not the evaluation."""
        column = label_column if label_column is not None else names[0]
        stream = DatasetStream(
            path,
            fmt,
            ref,
            names,
            [column],
            [column],
            self.bounds,
            max_parquet_bytes=self.max_parquet_uncompressed_bytes,
        )
        counted = LabelCounts()
        for frame in stream:
            counted.add(label_text(frame[column]) if label_column is not None else None, len(frame))
        return counted

    def list(self, *, include_files: bool = True, limit: int = 500) -> builtins.list[DatasetInfo]:
        """Examples, then registered frames, then data files under the root (sorted by path), at most
        `limit` in all. Described cheaply, without label distributions: Parquet from its metadata, CSV and
        JSONL from their first rows plus a line count (rows=None above COUNT_LINES_MAX_BYTES). A file that
        cannot be described, or not within the catalog's bounds, is listed with `error` set (saying why).
        The walk skips hidden folders, node_modules and the like, and stops at WALK_MAX_DEPTH levels or
        after WALK_MAX_FILES files."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be a whole number of at least 1, not {limit!r}")
        refs: Iterator[DatasetRef] = itertools.chain(
            (DatasetRef("example", name) for name in self.example_names()),
            (DatasetRef("registered", name) for name in self.registered_names()),
            self._data_files() if include_files else iter(()),
        )
        result: builtins.list[DatasetInfo] = []
        for parsed in refs:
            if len(result) >= limit:
                break
            result.append(self._describe_cheaply(parsed))
        return result

    def _describe_cheaply(self, parsed: DatasetRef) -> DatasetInfo:
        try:
            path, fmt = self._locate(parsed)
            key = (*_version(path), "list", str(parsed))
            size = path.stat().st_size if parsed.source == "file" else None
            info = self._recall(key)
            if info is None:
                rows, columns = self._peek(path, fmt, str(parsed))
                info = self._remember(key, _info(parsed, rows, columns, size_bytes=size))
        except (InvalidArgument, NotFound, OSError) as error:
            return _info(parsed, None, [], error=one_line(error))
        return info

    def _peek(
        self, path: Path, fmt: str, ref: str, *, count_rows: bool = True
    ) -> tuple[int | None, builtins.list[tuple[str, str]]]:
        """Rows (None if too costly, or not `count_rows`) and column dtypes, from bounded reads only."""
        with _reading(ref, fmt), path.open("rb") as handle:
            if fmt == "parquet":
                parquet = parquet_file(handle, ref)
                check_columns([str(c) for c in parquet.schema_arrow.names], self.bounds, ref)
                # Dtypes as pandas would report them, from an empty table of the same schema.
                empty = parquet.schema_arrow.empty_table().to_pandas()
                return parquet.metadata.num_rows, [(str(c), str(t)) for c, t in empty.dtypes.items()]
            data, whole = head(handle, self.bounds, ref)
            check_header(data, fmt, self.bounds, ref)
            first = parse_head(data, fmt, HEAD_ROWS)
        columns = [(str(c), str(t)) for c, t in first.dtypes.items()]
        check_columns([name for name, _ in columns], self.bounds, ref)
        if whole and len(first) < HEAD_ROWS:
            return len(first), columns
        if not count_rows or path.stat().st_size > COUNT_LINES_MAX_BYTES:
            return None, columns
        # Counts lines, so a CSV value with an embedded newline makes this an over-estimate.
        lines = count_lines(path)
        return (lines - 1 if fmt == "csv" else lines), columns

    def _data_files(self) -> Iterator[DatasetRef]:
        real_root = os.path.realpath(self.root_dir)
        skip = {os.path.realpath(self.registered_dir)}
        found: builtins.list[str] = []
        visited = 0
        for directory, dirnames, filenames in os.walk(real_root):
            depth = 0 if directory == real_root else os.path.relpath(directory, real_root).count(os.sep) + 1
            dirnames[:] = (
                []
                if depth >= WALK_MAX_DEPTH
                else [
                    d
                    for d in dirnames
                    if not d.startswith(".") and d not in WALK_SKIPPED_DIRS and os.path.join(directory, d) not in skip
                ]
            )
            for filename in filenames:
                visited += 1
                if filename.startswith(".") or os.path.splitext(filename)[1].lower() not in FILE_FORMATS:
                    continue
                parts = Path(os.path.relpath(os.path.join(directory, filename), real_root)).parts
                found.append(str(PurePosixPath(*parts)))
            if visited >= WALK_MAX_FILES:
                break
        for relative in sorted(found):
            yield DatasetRef("file", relative)

    # --- registering -----------------------------------------------------------------------------------

    @staticmethod
    def check_registered_name(name: object) -> str:
        """`name` if it may name a registered dataset; InvalidArgument saying what is allowed otherwise."""
        _check_registered_name(name)
        return name  # type: ignore[return-value]

    def owner_of(self, name: str) -> str | None:
        """Who registered `name` (its sidecar `.<name>.owner`), None when unknown (before owners were kept)."""
        _check_registered_name(name)
        path = self.registered_dir / f".{name}.owner"
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def set_owner(self, name: str, owner: str | None) -> None:
        _check_registered_name(name)
        self.registered_dir.mkdir(parents=True, exist_ok=True)
        (self.registered_dir / f".{name}.owner").write_text(owner or "", encoding="utf-8")

    def registered_bytes(self, owner: str | None, *, besides: str | None = None) -> tuple[int, int]:
        """Bytes and number of the registered datasets `owner` registered (besides `besides`, one being replaced)."""
        used = count = 0
        for name in self.registered_names():
            if name != besides and self.owner_of(name) == owner:
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    used += (self.registered_dir / f"{name}.parquet").stat().st_size
                    count += 1
        return used, count

    def check_quota(self, owner: str | None, name: str, adding: int) -> None:
        """Forbidden when registering `adding` bytes as `name` would put an API key's registered datasets past
        `max_registered_bytes` (the one `name` replaces, if theirs, is not counted: it goes)."""
        use = self.quota_use(owner, name)
        if use is not None and use[0] + adding > self.max_registered_bytes:
            raise self.quota_refusal(name, adding, *use)

    def quota_refusal(self, name: str, adding: int, used: int, count: int, sent: bool = False) -> Forbidden:
        """The quota's refusal of `adding` bytes registered as `name` by a key whose `count` datasets use `used` bytes;
        `sent`: a request body's, before it is read (nothing left, or a body past BODY_QUOTA_FACTOR x what is)."""
        quota = self.max_registered_bytes
        left = max(0, quota - used)
        if sent and left:  # (a body past BODY_QUOTA_FACTOR x what is left)
            allowed = _size(BODY_QUOTA_FACTOR * left)
            return Forbidden(
                f"registering {name!r} (a body of {_size(adding)}): a body, JSON or Parquet, is read only up to "
                f"{BODY_QUOTA_FACTOR} times what your quota of registered data has left, {allowed} now "
                f"(max_registered_bytes_per_principal: {_size(quota)}; your {count} registered dataset(s) use "
                f"{_size(used)}). What is stored, the frame as compressed Parquet, is what counts: send compressed "
                "Parquet (what the notebook client sends) or fewer rows, or delete datasets you no longer need "
                "(plexus.delete_dataset(name))"
            )
        what = "" if sent else f" ({_size(adding)})"  # (sent: nothing left)
        return Forbidden(
            f"registering {name!r}{what} would pass your quota of registered data, {_size(quota)} "
            f"(the max_registered_bytes_per_principal setting): your {count} registered dataset(s) use "
            f"{_size(used)}. Delete those you no longer need (plexus.delete_dataset(name), or DELETE "
            "plexus/api/datasets/registered:<name>), keep only the columns the evaluation needs, or ask an "
            "admin for a larger quota"
        )

    def quota_use(self, owner: str | None, name: str) -> tuple[int, int] | None:
        """Bytes and number of `owner`'s registered datasets besides `name` when a quota applies to them, else None."""
        if not self.max_registered_bytes or not is_key_owner(owner):
            return None
        return self.registered_bytes(owner, besides=name)

    def register(self, name: str, df: pd.DataFrame, *, replace: bool = False, owner: str | None = None) -> DatasetInfo:
        """Store `df` as the registered dataset `name` (ref ``registered:<name>``).

        The file is written to a temporary name and renamed into place, so a reader never sees half a
        file. A named index becomes column(s); an unnamed one is dropped. Raises InvalidArgument for a
        bad name, a name already taken (unless `replace`), an empty frame, or columns Parquet cannot
        store (the message says which).
        """
        _check_registered_name(name)
        if not isinstance(df, pd.DataFrame):
            raise InvalidArgument(f"a registered dataset must be a pandas DataFrame, not {type(df).__name__}")
        if len(df) == 0:
            raise InvalidArgument(f"DataFrame for {name!r} has no rows; register a frame with at least one row")
        names = [str(column) for column in df.columns]
        if len(set(names)) != len(names):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            raise InvalidArgument(f"DataFrame for {name!r} has duplicate column names {duplicated}")
        frame = _with_range_index(df)
        frame.columns = check_columns([str(column) for column in frame.columns], self.bounds, f"registered:{name}")
        try:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise InvalidArgument(f"cannot store DataFrame {name!r} as Parquet: {one_line(error)}") from None
        self.registered_dir.mkdir(parents=True, exist_ok=True)
        final = self.registered_dir / f"{name}.parquet"
        if final.exists() and not replace:
            raise InvalidArgument(f"a dataset is already registered as {name!r}; pass replace=True to overwrite it")
        descriptor, temporary = tempfile.mkstemp(dir=self.registered_dir, prefix=f".{name}.", suffix=".tmp")
        os.close(descriptor)
        try:
            pq.write_table(table, temporary)
            self.admit(temporary, name, owner=owner, replace=replace)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return _info(DatasetRef("registered", name), len(frame), [(str(c), str(t)) for c, t in frame.dtypes.items()])

    def read_parquet_body(self, body: bytes, name: str) -> pd.DataFrame:
        """The DataFrame a request's Parquet body holds, within `max_parquet_uncompressed_bytes`: its footer's
        declared sizes first, then its decoded size as it is read (read_parquet_bounded); InvalidArgument past
        them, or when it is not Parquet. Run it in the catalog's threads: it reads the whole body."""
        ref = f"registered:{name}"
        try:
            return read_parquet_bounded(io.BytesIO(body), self.max_parquet_uncompressed_bytes, ref).to_pandas()
        except InvalidArgument:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InvalidArgument(f"the body is not a readable Parquet file: {one_line(exc)}") from None

    def admit(self, temporary: str | Path, name: str, *, owner: str | None, replace: bool) -> DatasetInfo:
        """Check `owner`'s quota on the complete file `temporary` (the bytes it takes on disk), place it as
        `name` and record its owner, as one step: two registrations by one key at once (in this server or
        another on the same directory) cannot both pass the quota on the same free bytes."""
        with self._admitting, _file_lock(self.registered_dir / ".admit.lock"):
            self.check_quota(owner, name, os.path.getsize(temporary))
            info = self.place(temporary, name, replace=replace)
            self.set_owner(name, owner)
            return info

    def place(self, temporary: str | Path, name: str, *, replace: bool) -> DatasetInfo:
        """Make a complete Parquet file written under the registered directory the dataset `name`, atomically
        (a rename; without `replace`, a hard link that fails if the name was taken meanwhile)."""
        _check_registered_name(name)
        final = self.registered_dir / f"{name}.parquet"
        if replace:
            os.replace(temporary, final)
        else:
            _rename_new(str(temporary), final, name)
        dtypes = pq.read_schema(final).empty_table().to_pandas().dtypes
        rows = pq.ParquetFile(final).metadata.num_rows
        return _info(DatasetRef("registered", name), rows, [(str(c), str(t)) for c, t in dtypes.items()])

    def unregister(self, name: str) -> None:
        """Remove a registered dataset; NotFound if there is none by that name."""
        _check_registered_name(name)
        try:
            (self.registered_dir / f"{name}.parquet").unlink()
        except FileNotFoundError:
            raise NotFound(f"no registered dataset {name!r}") from None
        with contextlib.suppress(FileNotFoundError):
            (self.registered_dir / f".{name}.owner").unlink()

    def known_rows(self, ref: str) -> int | None:
        """The dataset's rows when they are known without a scan: Parquet metadata (registered frames and
        files) and the small shipped examples; None for CSV and JSON Lines files (counted when loaded)."""
        parsed = parse_ref(ref)
        path, fmt = self._locate(parsed)
        with _reading(str(parsed), fmt):
            if fmt == "parquet":
                with path.open("rb") as handle:
                    return int(parquet_file(handle, str(parsed)).metadata.num_rows)
            if parsed.source == "example":
                return len(pd.read_csv(path))
        return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) between processes sharing the directory; held until
    the block ends. Where the file system has no locks, the process-wide lock the caller holds is all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rename_new(temporary: str, final: Path, name: str) -> None:
    # A hard link fails if the name exists, so two concurrent registrations cannot both win.
    try:
        os.link(temporary, final)
    except FileExistsError:
        raise InvalidArgument(
            f"a dataset is already registered as {name!r}; pass replace=True to overwrite it"
        ) from None
    except OSError:  # a file system without hard links: check, then rename
        if final.exists():
            raise InvalidArgument(
                f"a dataset is already registered as {name!r}; pass replace=True to overwrite it"
            ) from None
        os.replace(temporary, final)


def _check_registered_name(name: object) -> None:
    if not isinstance(name, str) or not REGISTERED_NAME.fullmatch(name) or name.startswith("."):
        shown = clip(name) if isinstance(name, str) else repr(name)
        raise InvalidArgument(f"invalid registered dataset name {shown}; use {REGISTERED_NAME_HELP}")


@contextlib.contextmanager
def _reading(ref: str, fmt: str) -> Iterator[None]:
    """Turn a parser's failure into one InvalidArgument line naming the dataset and the format."""
    try:
        yield
    except InvalidArgument:  # already says what is wrong (a bound of file_reads)
        raise
    except pd.errors.EmptyDataError:
        raise InvalidArgument(f"dataset {clip(ref)} is empty (no header and no rows)") from None
    except (ValueError, TypeError, pa.ArrowException, UnicodeDecodeError, OSError, RecursionError) as error:
        # (pd.errors.ParserError is a ValueError; a TypeError: pandas' JSON reader given a line that is not an object)
        raise InvalidArgument(unreadable(ref, fmt, error)) from None


def _read(path: Path, fmt: str, ref: str, columns: builtins.list[str] | None, max_parquet_bytes: int) -> pd.DataFrame:
    with _reading(ref, fmt):
        if fmt == "csv":
            df = pd.read_csv(path)
        elif fmt == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False, **KEEP_DATES)
        else:
            # One open file for schema and data: a registered frame replaced meanwhile is read whole, old or new.
            with path.open("rb") as handle:
                stored = parquet_file(handle, ref).schema_arrow.names
                # Read only the wanted columns when they are all there (and the index pandas keeps); otherwise load()
                # reports the gap. Within max_parquet_uncompressed_bytes, as a body is (read_parquet_bounded).
                index = [n for n in stored if n.startswith("__index_level_")]
                wanted = columns + index if columns is not None and set(columns) <= set(stored) else None
                too_large = f"dataset {clip(ref, 60)} is too large to load"
                advice = "evaluate it (an evaluation streams it), or load fewer of its columns"
                df = read_parquet_bounded(handle, max_parquet_bytes, ref, wanted, too_large, advice).to_pandas()
    return _with_range_index(df)


def _with_range_index(df: pd.DataFrame) -> pd.DataFrame:
    if isinstance(df.index, pd.RangeIndex) and df.index.start == 0 and df.index.step == 1:
        return df
    named = any(name is not None for name in df.index.names)
    return df.reset_index(drop=not named)


def _version(path: Path) -> tuple[str, int, int, int]:
    """What identifies one version of a file for the description cache: path, size, mtime, inode."""
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def _info(parsed: DatasetRef, rows: int | None, columns: Sequence[tuple[str, str]], **extra: Any) -> DatasetInfo:
    if "label_column" not in extra and any(name == DEFAULT_LABEL_COLUMN for name, _ in columns):
        extra["label_column"] = DEFAULT_LABEL_COLUMN  # what an evaluation of it uses unless told otherwise
    return DatasetInfo(
        ref=str(parsed),
        name=parsed.name,
        source=parsed.source,
        rows=rows,
        columns=tuple(ColumnInfo(n, t) for n, t in columns[:MAX_COLUMNS_LISTED]),
        column_count=len(columns),
        **extra,
    )


__all__ = [
    "ALLOWED_EXTENSIONS",
    "ColumnInfo",
    "DatasetCatalog",
    "DatasetInfo",
    "DatasetRef",
    "confine_path",
    "parse_ref",
    "require_columns",
    "require_names",
]


def _size(count: int) -> str:
    """Bytes as a person reads them (a quota's error)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:,} bytes"
