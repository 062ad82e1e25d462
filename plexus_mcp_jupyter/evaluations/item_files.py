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
# How much of an item's text a worker stores (the runner clips to these; label_class too, at write): what an item
# of a worker's file can take, and so what a row group of it may read back as.
EXCERPT_CHARS = 200  # ids, inputs, labels, classes, predictions
EXPLANATION_CHARS = 500  # explanations, errors
# The text columns a worker writes (item_id too when the ids are text), read as dictionaries where a file holds them
# so (`tables`): those written as dictionaries, and those written plain (PLAIN_TEXT) in a row group that does not.
PLAIN_TEXT = ("item_id", "input")
TEXT_COLUMNS = [*PLAIN_TEXT, "label", "label_class", "prediction", "explanation", "error"]
TEXT_DICTIONARIES = [name for name in TEXT_COLUMNS if name not in PLAIN_TEXT]
_CLIPPED = {name: EXPLANATION_CHARS if name in ("explanation", "error") else EXCERPT_CHARS for name in TEXT_COLUMNS}
# The most bytes an item of a worker's file takes, decoded or as declared in a footer: its clipped text at 4 bytes a
# character (UTF-8) with 8 bytes of offset or length each, and its numbers (seq, a numeric id, correct). A row group
# is bounded per item (rows x this), not by a fixed size: from 76cc39a until e15682d a worker wrote a chunk of up to
# 50,000 items as one row group (~104 MB declared with non-ASCII text), files that must still read. A file past it
# (corrupted, or replaced by someone with access to items_dir) is refused, not read into the server's memory.
MAX_ITEM_BYTES = sum(4 * chars + 8 for chars in _CLIPPED.values()) + 24
MAX_GROUP_ROWS = 50_000  # the most items a worker puts in a row group (a chunk's, before e15682d)
GROUP_SLACK = 1 << 20  # a row group's pages' headers, levels and dictionaries beyond its values
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
        # Classes are the only text a worker hands over unclipped: clipped here as the rest (EXCERPT_CHARS).
        classes = table.schema.get_field_index("label_class")
        table = table.set_column(classes, "label_class", clipped(table["label_class"].combine_chunks(), EXCERPT_CHARS))
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
                # Once a group has had no match, the filters' columns are read first (seq, correct, a class: numbers
                # and indices), the others only for a group with matches; only matching rows are decoded: a page of
                # sparse mismatches reads the few groups that hold them, not every group's text.
                keys = [name for name in ("seq", "correct", "label_class") if name in wanted]
                rest = [name for name in wanted if name not in keys]
                sparse = False
                for group in range(parquet.num_row_groups):
                    if after is not None and _last_seq(parquet, group, seq) <= after:
                        continue
                    reader = parquet
                    if _check_group(parquet.metadata, group, plain):
                        every = every or pq.ParquetFile(handle, metadata=parquet.metadata, read_dictionary=TEXT_COLUMNS)
                        reader = every
                    if sparse:
                        filters = reader.read_row_group(group, columns=keys)
                        mask = matching.mask(filters)
                        if mask is not None and not pc.any(mask).as_py():
                            continue
                        others = reader.read_row_group(group, columns=rest)
                        read = {name: filters[name] for name in keys} | {name: others[name] for name in rest}
                        table = pa.Table.from_arrays([read[name] for name in wanted], names=wanted)
                    else:  # (one read a group while they match: a dense filter's groups are read whole anyway)
                        table = reader.read_row_group(group, columns=wanted)
                        mask = matching.mask(table)
                        if mask is not None and not pc.any(mask).as_py():
                            sparse = True
                            continue
                    if mask is not None:
                        table = table.filter(mask)  # (a null: dropped)
                    table = _decoded(table, group)
                    if table.num_rows:
                        yield table.select(list(columns))


class DamagedItems(PlexusError):
    """An item file that is not one a worker writes (corrupted, truncated or replaced): the message says which."""


def _check_group(metadata: pq.FileMetaData, group: int, plain: list[int]) -> bool:
    """A row group's declared sizes within what a worker writes, before it is read: DamagedItems past MAX_GROUP_ROWS
    items, or past MAX_ITEM_BYTES an item (+ GROUP_SLACK) uncompressed; whether one of its columns `plain` (leaf
    indices) holds dictionary pages."""
    row_group = metadata.row_group(group)
    rows = row_group.num_rows
    # (its columns' uncompressed sizes: pyarrow's total_byte_size is what the pages take once decompressed... or not)
    chunks = sum(row_group.column(i).total_uncompressed_size for i in range(row_group.num_columns))
    declared, allowed = max(row_group.total_byte_size, chunks), rows * MAX_ITEM_BYTES + GROUP_SLACK
    if rows > MAX_GROUP_ROWS or row_group.num_columns > len(TEXT_COLUMNS) + 2 or declared > allowed:
        raise DamagedItems(
            f"row group {group} declares {rows:,} items, {row_group.num_columns} columns and {declared:,} bytes "
            f"uncompressed; a worker's hold at most {MAX_GROUP_ROWS:,} items, {len(TEXT_COLUMNS) + 2} columns and "
            f"{MAX_ITEM_BYTES:,} bytes an item"
        )
    return any(set(row_group.column(i).encodings) & _DICTIONARY_ENCODINGS for i in plain)


@contextlib.contextmanager
def _reading(evaluation_id: str, path: Path) -> Iterator[None]:
    """An item file's read, its failures (a file past the bounds, or that pyarrow cannot read) one clear error."""
    try:
        yield
    except DamagedItems as error:
        raise DamagedItems(_damaged(evaluation_id, path, str(error))) from None
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
    """Rows of a row group read with their text as dictionaries, decoded once their size is known to be within
    MAX_ITEM_BYTES an item: a dictionary's column counted as what it decodes to (each index's entry's length, + 8)."""
    allowed = table.num_rows * MAX_ITEM_BYTES + GROUP_SLACK
    decode = [i for i, column in enumerate(table.columns) if pa.types.is_dictionary(column.type)]
    plain = sum(column.nbytes for i, column in enumerate(table.columns) if i not in decode)
    # Indices x the longest entry first (a dictionary's maximum: cheap), what they decode to only when that is past.
    size = plain + sum(_decoded_size(table.column(i), exact=False) for i in decode)
    if size > allowed:
        size = plain + sum(_decoded_size(table.column(i), exact=True) for i in decode)
    if size > allowed:
        raise DamagedItems(
            f"row group {group} reads back as {size:,} bytes for {table.num_rows:,} items; a worker's hold at most "
            f"{MAX_ITEM_BYTES:,} bytes an item"
        )
    for index in decode:
        table = table.set_column(index, table.field(index).name, table.column(index).cast(pa.string()))
    return table


def _decoded_size(column: pa.ChunkedArray, *, exact: bool) -> int:
    """What a dictionary column decodes to (+ 8 bytes a value), or at most (`exact` False: values x the longest)."""
    size = 0
    for piece in column.chunks:
        lengths = pc.binary_length(piece.dictionary)
        if exact:
            size += (pc.sum(pc.take(lengths, piece.indices)).as_py() or 0) + 8 * len(piece)
        else:
            size += len(piece) * ((pc.max(lengths).as_py() or 0) + 8)
    return size


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


def clipped(text: pa.Array, limit: int) -> pa.Array:
    """Strings cut to `limit` characters, the last one an ellipsis where cut (the runner's text columns, classes)."""
    long = pc.greater(pc.utf8_length(text), limit)
    if not pc.any(long).as_py():
        return text
    # The ellipsis and separator of the text's own type: pandas' str columns are large_string in Arrow, and the join
    # has no kernel for mixed string widths.
    ellipsis, separator = pa.scalar("…", type=text.type), pa.scalar("", type=text.type)
    cut = pc.binary_join_element_wise(pc.utf8_slice_codeunits(text, 0, limit - 1), ellipsis, separator)
    return pc.if_else(long, cut, text)


def _clipped_label(label: str | None) -> str | None:
    return label if label is None or len(label) <= EXCERPT_CHARS else label[: EXCERPT_CHARS - 1] + "…"


def _array(values: Any, arrow_type: pa.DataType) -> pa.Array:
    return values.cast(arrow_type) if isinstance(values, pa.Array) else pa.array(values, type=arrow_type)


class _Matching:
    """A page's filters over one row group, as compute kernels on its columns: a filter expression goes through
    Acero, whose start costs more than the filtering of 1,024 rows (a third of a page's time, measured)."""

    def __init__(self, after: int | None, only_mismatches: bool, label: str | None) -> None:
        # A class is stored clipped (write_chunk): a label past EXCERPT_CHARS matches the classes it was clipped to,
        # and itself whole (a file written before the clip holds it so).
        self.after, self.only_mismatches = after, only_mismatches
        clipped = _clipped_label(label)
        self.labels = [] if label is None else [label] if clipped == label else [label, clipped]

    def __call__(self, table: pa.Table) -> pa.Table:
        mask = self.mask(table)
        return table if mask is None else table.filter(mask)  # null (no class): dropped

    def mask(self, table: pa.Table) -> pa.Array | None:
        """Which rows of `table` match (None: every row)."""
        masks = []
        if self.after is not None:
            masks.append(pc.greater(table["seq"], self.after))
        if self.only_mismatches:  # wrong, and not scored (an error, no prediction): correct is not true
            masks.append(pc.invert(pc.fill_null(table["correct"], False)))
        if self.labels:  # a null class matches no label
            kind = table["label_class"].type
            kind = kind.value_type if pa.types.is_dictionary(kind) else kind
            masks.append(pc.is_in(table["label_class"], value_set=pa.array(self.labels, kind)))
        if not masks:
            return None
        mask = masks[0]
        for more in masks[1:]:
            mask = pc.and_(mask, more)
        return mask

    def expression(self) -> pc.Expression | None:
        """The same filters as a dataset expression (reading files whole, where Acero's start is paid once)."""
        terms = []
        if self.after is not None:
            terms.append(pc.field("seq") > self.after)
        if self.only_mismatches:
            terms.append(~pc.coalesce(pc.field("correct"), pa.scalar(False)))
        if self.labels:
            terms.append(pc.field("label_class").isin(self.labels))
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
