"""An evaluation's per-item results as Parquet files beside the store, one file per scored chunk.

Rows in the database cost ~220 bytes and most of an evaluation's time per item; a chunk of columns in a
compressed Parquet file costs a few bytes and a few milliseconds. The database keeps only the evaluation's
summary, metrics and a manifest (`evaluations.items_manifest`: where the files are, chunks and rows per score).

Layout: `{items_dir}/{evaluation_id}/{score key}/chunk-{first seq:012d}-{end seq:012d}.parquet`, a chunk
covering the items first <= seq < end. Each chunk is written to a hidden temporary name, flushed to disk, then
renamed: a reader (or a crash) sees whole chunks or none, and the files listed are the items written so far.
Readers go through the chunks in seq order, skipping those before the cursor, each read with the page's
filter pushed down (pyarrow), so a page of mismatches costs what its chunks cost, never the whole set.

The directory must be one every worker and every server can reach (a shared path when the executor is Dask on
other machines, or several servers share one PostgreSQL): the manifest records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.errors import InvalidArgument, PlexusError, one_line
from .file_reads import parquet_file

FORMAT = "parquet"
ARROW_STREAM_TYPE = "application/vnd.apache.arrow.stream"  # the media type of an Arrow IPC stream (REST results)
# Columns of few distinct values, dictionary-encoded; inputs and ids are mostly distinct, where a dictionary
# costs time and bytes (zstd alone: 8 bytes per item instead of 9.4 on the benchmark's data, 20% faster).
DICTIONARY_COLUMNS = ["label", "label_class", "prediction", "explanation", "error"]
# Classes: few distinct values, stored as run-length coded dictionary indices and never compressed; other text
# (inputs, ids, explanations, errors) is compressed (zstd), and numbers (seq, a numeric id) are delta-coded. A
# chunk's small row groups are many pages, and compressing every page of every column was most of a worker's
# time (1M items, 1,024 a group: 0.84 s with zstd everywhere, 0.38 s so, 6.8 -> 4.8 bytes per item; measured
# on the e2e benchmark's items). A column with no value at all is not compressed either.
CLASS_COLUMNS = ("label", "label_class", "prediction")
# Items per row group: what a page of results reads at least (a chunk holds up to 50,000 items). Measured on 1M
# items: 8192 -> 8.2 ms a page of mismatches, 4.9 bytes/item; 1024 -> 2.9 ms, 6.4 bytes/item.
ROW_GROUP_ROWS = 1024
_CHUNK = re.compile(r"^chunk-(\d{12})-(\d{12})\.parquet$")
# What a row group of a chunk may read back as: a worker writes ROW_GROUP_ROWS items whose text is clipped to a few
# hundred characters (runner.EXCERPT_CHARS, EXPLANATION_CHARS), a few MiB; a file past it (corrupted, or replaced by
# someone with access to items_dir) is refused, not read into the server's memory.
MAX_GROUP_BYTES = 64 << 20
# The text columns a worker writes (item_id too when the ids are text), read as dictionaries where a file holds them
# so (`tables`): those written as dictionaries, and those written plain (PLAIN_TEXT) in a row group that does not.
PLAIN_TEXT = ("item_id", "input")
TEXT_COLUMNS = [*PLAIN_TEXT, "label", "label_class", "prediction", "explanation", "error"]
TEXT_DICTIONARIES = [name for name in TEXT_COLUMNS if name not in PLAIN_TEXT]
_DICTIONARY_ENCODINGS = {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}


def score_key(score: str) -> str:
    """A score's directory name: score names are free text, a directory name is not."""
    return hashlib.sha256(score.encode()).hexdigest()[:16]


class ItemFiles:
    """The item files of every evaluation under one directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def directory(self, evaluation_id: str) -> Path:
        if not re.fullmatch(r"[0-9A-Za-z-]{1,64}", evaluation_id):  # ids are uuids: never a path of a client's
            raise ValueError(f"not an evaluation id: {evaluation_id!r}")
        return self.root / evaluation_id

    def manifest(self, evaluation_id: str, rows: Mapping[str, int] | None = None) -> dict[str, Any]:
        """The manifest stored with the evaluation: where its items are, and (once complete) chunks and rows."""
        out: dict[str, Any] = {"format": FORMAT, "path": str(self.directory(evaluation_id))}
        if rows is not None:
            out["scores"] = {
                name: {"chunks": len(self.chunks(evaluation_id, name)), "rows": count} for name, count in rows.items()
            }
        return out

    # -- writing (the worker) ------------------------------------------------------------------------

    def start(self, evaluation_id: str) -> None:
        """Begin a run: no file of an earlier run, an empty directory. Chunks are written only into a directory
        made here, so a chunk finished after a cancel's clean-up has nowhere to go (and is not left behind)."""
        self.remove(evaluation_id)
        self.directory(evaluation_id).mkdir(parents=True, exist_ok=False)

    def write_chunk(self, evaluation_id: str, score: str, start: int, columns: Mapping[str, Sequence[Any]]) -> int:
        """Write one chunk's items (columns as ITEM_COLUMNS + label_class) atomically; its size in bytes."""
        table = item_table(columns)
        numbers = [f.name for f in table.schema if pa.types.is_integer(f.type)]  # seq, and a numeric item id
        # Free text that holds values (an all-null column, no explanations say, costs a zstd context per page).
        text = [
            f.name
            for f in table.schema
            if pa.types.is_string(f.type) and f.name not in CLASS_COLUMNS and table[f.name].null_count < len(table)
        ]
        folder = self.directory(evaluation_id) / score_key(score)
        folder.mkdir(exist_ok=True)  # the evaluation's directory itself is never re-created (see start)
        final = folder / f"chunk-{start:012d}-{start + table.num_rows:012d}.parquet"
        temporary = folder / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(temporary, "wb") as out:
                pq.write_table(
                    table,
                    out,
                    compression={name: "zstd" if name in text else "none" for name in table.column_names},
                    use_dictionary=DICTIONARY_COLUMNS,
                    column_encoding=dict.fromkeys(numbers, "DELTA_BINARY_PACKED"),
                    write_statistics=["seq"],
                    row_group_size=ROW_GROUP_ROWS,
                )
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        return final.stat().st_size

    def remove(self, evaluation_id: str) -> bool:
        """Delete an evaluation's files (a re-run, a cancel, a delete); True if there were any."""
        folder = self.directory(evaluation_id)
        for _attempt in range(5):  # a worker may finish a chunk while the tree goes: retry until it is gone
            try:
                shutil.rmtree(folder)
                return True
            except FileNotFoundError:
                return False
            except OSError:
                continue
        shutil.rmtree(folder, ignore_errors=True)
        return True

    def evaluation_ids(self) -> list[str]:
        """The evaluations that have a directory here (for sweeping those whose record is gone)."""
        try:
            # Hidden folders are not evaluations' (the items-directory check's markers, .plexus-servers).
            return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        except FileNotFoundError:
            return []

    def size(self, evaluation_id: str | None = None) -> int:
        """Bytes on disk, of one evaluation or of all."""
        folder = self.root if evaluation_id is None else self.directory(evaluation_id)
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0

    # -- reading (the server) ------------------------------------------------------------------------

    def chunks(self, evaluation_id: str, score: str) -> list[tuple[int, int, Path]]:
        """The complete chunks of a score, (first seq, end seq, path), in seq order."""
        folder = self.directory(evaluation_id) / score_key(score)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            match = _CHUNK.match(name)
            if match:
                found.append((int(match[1]), int(match[2]), folder / name))
        return sorted(found)

    def listing(self, evaluation_id: str, score: str) -> list[dict[str, Any]]:
        """The complete chunks of a score as a reader elsewhere checks them before reading them itself (the
        notebook's `.results()`): absolute path, size and mtime (ns), seqs, in seq order."""
        out = []
        for first, end, path in self.chunks(evaluation_id, score):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed meanwhile (a re-run): not listed
                continue
            entry = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            out.append(entry | {"first_seq": first, "end_seq": end})
        return out

    def count(self, evaluation_id: str, score: str) -> int:
        return sum(end - first for first, end, _ in self.chunks(evaluation_id, score))

    def page(
        self,
        evaluation_id: str,
        score: str,
        *,
        limit: int,
        after: int | None,
        only_mismatches: bool,
        label: str | None,
        columns: Sequence[str],
    ) -> list[dict[str, Any]]:
        """Up to `limit` items with seq > `after` matching the filters, in seq order."""
        out: list[dict[str, Any]] = []
        for table in self.tables(evaluation_id, score, after, only_mismatches, label, columns):
            need = limit - len(out)
            out.extend(_rows(table.slice(0, need)))
            if len(out) >= limit:
                break
        return out

    def tables(
        self,
        evaluation_id: str,
        score: str,
        after: int | None,
        only_mismatches: bool,
        label: str | None,
        columns: Sequence[str],
    ) -> Iterator[pa.Table]:
        """The items with seq > `after` matching the filters, in seq order, a row group (at most 1024) at a time."""
        matching = _Matching(after, only_mismatches, label)
        # The filters' columns are read beside the page's, then dropped.
        wanted = list(dict.fromkeys([*columns, "seq", "correct", "label_class"]))
        for _first, end, path in self.chunks(evaluation_id, score):
            if after is not None and end - 1 <= after:
                continue
            try:
                handle = path.open("rb")
            except FileNotFoundError:  # removed meanwhile (a re-run, a cancel): what is left is nothing
                return
            with handle, _reading(evaluation_id, path):
                # Text read as dictionaries, its size bounded before it is decoded (_decoded): a dictionary page of one
                # long value and many indices to it is a few bytes in a file, and its footer's sizes say so. Those a
                # worker writes as dictionaries are read so; ids and inputs (zstd, their size in the footer) only in
                # a row group that holds them as dictionaries (a file from before 55d7dd4, or not a worker's).
                parquet = parquet_file(handle, path.name, TEXT_DICTIONARIES)  # (its footer within 16 MiB)
                every: pq.ParquetFile | None = None  # (every text column as dictionaries)
                schema = parquet.schema_arrow
                seq = schema.get_field_index("seq")
                plain = [i for i in (schema.get_field_index(n) for n in PLAIN_TEXT if n in wanted) if i >= 0]
                # Row group by row group, so a page costs the groups it needs (a few thousand items), not the
                # chunk; groups wholly before the cursor are skipped by their seq statistics.
                for group in range(parquet.num_row_groups):
                    if after is not None and _last_seq(parquet, group, seq) <= after:
                        continue
                    reader = parquet
                    if _check_group(parquet.metadata, group, plain):
                        every = every or pq.ParquetFile(handle, metadata=parquet.metadata, read_dictionary=TEXT_COLUMNS)
                        reader = every
                    table = matching(_decoded(reader.read_row_group(group, columns=wanted), group))
                    if table.num_rows:
                        yield table.select(list(columns))


class DamagedItems(PlexusError):
    """An item file that is not one a worker writes (corrupted, truncated or replaced): the message says which."""


def _check_group(metadata: pq.FileMetaData, group: int, plain: list[int]) -> bool:
    """A row group's declared sizes within what a worker writes (ROW_GROUP_ROWS items of text clipped to a few hundred
    characters: a few MiB), before it is read: DamagedItems past MAX_GROUP_BYTES, uncompressed or as values; whether
    one of its columns `plain` (leaf indices) holds dictionary pages."""
    row_group = metadata.row_group(group)
    # (its columns' uncompressed sizes: pyarrow's total_byte_size is what the pages take once decompressed... or not)
    chunks = sum(row_group.column(i).total_uncompressed_size for i in range(row_group.num_columns))
    declared, values = max(row_group.total_byte_size, chunks), row_group.num_rows * max(row_group.num_columns, 1) * 8
    if max(declared, values) > MAX_GROUP_BYTES:
        raise DamagedItems(
            f"row group {group} declares {row_group.num_rows:,} items and {declared:,} bytes uncompressed"
        )
    return any(set(row_group.column(i).encodings) & _DICTIONARY_ENCODINGS for i in plain)


@contextlib.contextmanager
def _reading(evaluation_id: str, path: Path) -> Iterator[None]:
    """An item file's read, its failures (a file past the bounds, or that pyarrow cannot read) one clear error."""
    try:
        yield
    except DamagedItems as error:
        raise DamagedItems(_damaged(evaluation_id, path, f"{error}, more than {MAX_GROUP_BYTES:,} allowed")) from None
    except InvalidArgument as error:  # (parquet_file: a footer past its bound)
        raise DamagedItems(_damaged(evaluation_id, path, str(error).split("cannot be read: ", 1)[-1])) from None
    except (pa.ArrowException, OSError, ValueError, KeyError) as error:  # (KeyError: a text column missing)
        raise DamagedItems(_damaged(evaluation_id, path, one_line(error))) from None


def _damaged(evaluation_id: str, path: Path, why: str) -> str:
    return (
        f"the items of evaluation {evaluation_id} cannot be read: their file {path.parent.name}/{path.name} is not "
        f"one a worker writes (corrupted or replaced: {why}); run the evaluation again to write them anew"
    )


def _decoded(table: pa.Table, group: int) -> pa.Table:
    """A row group read with its text as dictionaries, decoded once its size is known to be within MAX_GROUP_BYTES
    (a dictionary's column counted as its indices times its longest value: at least what it decodes to)."""
    size = 0
    decode = []
    for index, column in enumerate(table.columns):
        if pa.types.is_dictionary(column.type):
            decode.append(index)
            for piece in column.chunks:
                longest = pc.max(pc.binary_length(piece.dictionary)).as_py() or 0
                size += len(piece) * (longest + 8)
        else:
            size += column.nbytes
    if size > MAX_GROUP_BYTES:
        raise DamagedItems(f"row group {group} reads back as up to {size:,} bytes")
    for index in decode:
        table = table.set_column(index, table.field(index).name, table.column(index).cast(pa.string()))
    return table


def _last_seq(parquet: pq.ParquetFile, group: int, column: int) -> int:
    """The last seq of a row group, from its statistics (written for seq); a group without them is read."""
    statistics = parquet.metadata.row_group(group).column(column).statistics
    return int(statistics.max) if statistics is not None and statistics.has_min_max else 2**62


def item_table(columns: Mapping[str, Sequence[Any]]) -> pa.Table:
    """A chunk's items as an Arrow table with the items' schema (strings, seq int64, correct bool)."""
    ids = columns["item_id"]
    id_type = pa.int64() if isinstance(ids, pa.Array) and pa.types.is_integer(ids.type) else pa.string()
    fields = [pa.field("seq", pa.int64()), pa.field("item_id", id_type)]
    fields += [pa.field(name, pa.string()) for name in ("input", "label", "label_class", "prediction")]
    fields += [pa.field("correct", pa.bool_()), pa.field("explanation", pa.string()), pa.field("error", pa.string())]
    schema = pa.schema(fields)
    return pa.table({f.name: _array(columns[f.name], f.type) for f in schema}, schema=schema)


def _array(values: Any, arrow_type: pa.DataType) -> pa.Array:
    return values.cast(arrow_type) if isinstance(values, pa.Array) else pa.array(values, type=arrow_type)


class _Matching:
    """A page's filters over one row group, as compute kernels on its columns: a filter expression goes through
    Acero, whose start costs more than the filtering of 1,024 rows (a third of a page's time, measured)."""

    def __init__(self, after: int | None, only_mismatches: bool, label: str | None) -> None:
        self.after, self.only_mismatches, self.label = after, only_mismatches, label

    def __call__(self, table: pa.Table) -> pa.Table:
        masks = []
        if self.after is not None:
            masks.append(pc.greater(table["seq"], self.after))
        if self.only_mismatches:  # wrong, and not scored (an error, no prediction): correct is not true
            masks.append(pc.invert(pc.fill_null(table["correct"], False)))
        if self.label is not None:
            masks.append(pc.equal(table["label_class"], self.label))  # a null class matches no label
        if not masks:
            return table
        mask = masks[0]
        for more in masks[1:]:
            mask = pc.and_(mask, more)
        return table.filter(mask)  # null (no class): dropped

    def expression(self) -> pc.Expression | None:
        """The same filters as a dataset expression (reading files whole, where Acero's start is paid once)."""
        terms = []
        if self.after is not None:
            terms.append(pc.field("seq") > self.after)
        if self.only_mismatches:
            terms.append(~pc.coalesce(pc.field("correct"), pa.scalar(False)))
        if self.label is not None:
            terms.append(pc.field("label_class") == self.label)
        out = None
        for term in terms:
            out = term if out is None else out & term
        return out


def read_listed(
    files: Sequence[Mapping[str, Any]], *, only_mismatches: bool, label: str | None, schema: pa.Schema
) -> pa.Table | None:
    """The items of listed chunk files (ItemFiles.listing, paths as this process sees them) matching the filters,
    in seq order, as one table of `schema`; None when a file is not here as listed (missing, or another size or
    mtime: another machine's disk, or a re-run since), so the caller reads over the server instead.

    Each file is read whole with the filter pushed down (pyarrow's threads, no Python step per item)."""
    for entry in files:
        try:
            stat = os.stat(entry["path"])
        except OSError:
            return None
        if stat.st_size != entry["size"] or stat.st_mtime_ns != entry["mtime_ns"]:
            return None
    matching = _Matching(None, only_mismatches, label).expression()
    tables = []
    try:
        for entry in files:
            table = pq.read_table(entry["path"], columns=schema.names, filters=matching)
            tables.append(table.cast(schema))
    except (OSError, pa.ArrowException):  # gone or changed since the check: the server's read then
        return None
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    if "item_id" in table.column_names and pa.types.is_integer(table.schema.field("item_id").type):
        for row in rows:
            row["item_id"] = str(row["item_id"])
    return rows


class ArrowStream:
    """Tables as one Arrow IPC stream, produced piece by piece: each `next()` reads one table and returns its
    encoded bytes (the first with the schema, the last the end-of-stream mark), so a server sends a whole
    evaluation's items while holding one row group, and each piece can be made in a thread."""

    def __init__(self, tables: Iterator[pa.Table], schema: pa.Schema) -> None:
        self.tables, self.schema = tables, schema
        self._sink = io.BytesIO()  # emptied after each piece
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._done = False

    def next(self) -> bytes | None:
        """The next piece of the stream; None once it is all out."""
        if self._done:
            return None
        if self._writer is None:
            self._writer = pa.ipc.new_stream(pa.PythonFile(self._sink, mode="w"), self.schema)
        table = next(self.tables, None)
        if table is None:
            self._writer.close()
            self._done = True
        else:
            self._writer.write_table(table.cast(self.schema))
        out = self._sink.getvalue()
        self._sink.seek(0)
        self._sink.truncate()
        return out
