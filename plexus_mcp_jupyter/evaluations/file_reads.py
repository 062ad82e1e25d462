"""Reading what a data file holds (columns, first rows, rows, label counts) within fixed bounds.

A listing, a describe or a column check runs in the server for any caller who may read datasets, on files
anyone with write access to the Jupyter root may have put there. None of them may hold a whole file in
memory or read an unbounded line: a 200 MB line without a newline once became a 1.26 GB listing, and a
2 GB one a MemoryError. So:

- the first line of a CSV or JSON Lines file (the header, or the first record) must end within
  `ReadBounds.header_bytes`, and a Parquet file's footer (its schema and metadata) must fit in
  PARQUET_FOOTER_BYTES;
- a file may have at most `ReadBounds.columns` columns, each named in at most `ReadBounds.name_chars`
  characters, so every message that lists column names is bounded too;
- the first rows (for dtypes) come from at most HEAD_SAMPLE_BYTES after the header;
- a Parquet body registered in one request is read in batches whose decoded size is added up, within a
  bound (read_parquet_bounded: its footer's declared sizes are only a first filter, its page headers a second),
  and so is the label column of a Parquet file a describe counts (count_parquet);
- rows and label counts come from a streaming pass in blocks (Parquet batches of one column; for CSV and JSON
  Lines, one pass of the stream an evaluation reads the file with, dataset_stream.py, over one column, so that a
  describe counts the rows an evaluation reads), never from a loaded frame.

A file outside the bounds raises InvalidArgument saying which bound and the setting that sets it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import struct
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.errors import InvalidArgument, one_line

HEAD_SAMPLE_BYTES = 1 << 20  # bytes after the header read to infer column dtypes from the first rows
PARQUET_FOOTER_BYTES = 16 << 20  # a Parquet footer above this is refused (thrift metadata, read whole)
MAX_TRACKED_LABELS = 10_000  # more distinct values than this and a column is not counted as labels
MAX_LABEL_CHARS = 200  # a label value is shown up to this many characters
MIN_BLOCK_BYTES = 1 << 20
# pd.read_json's options that keep values as they are: pandas 3 converts no date without dtype (its `convert_dates`
# is deprecated there); pandas 2 converted columns named like dates ("date", "modified", "*_at", "timestamp"...: a
# "modified" column of integers became timestamps) unless told not to. Every pd.read_json of a dataset passes them.
KEEP_DATES: dict[str, bool] = {} if int(pd.__version__.split(".")[0]) >= 3 else {"convert_dates": False}


@dataclass(frozen=True)
class ReadBounds:
    """How much of a data file the server reads to describe it (settings max_dataset_header_bytes and
    max_dataset_columns; `name_chars` is fixed)."""

    header_bytes: int = 1 << 20
    columns: int = 10_000
    name_chars: int = 1_000

    @property
    def block_bytes(self) -> int:
        """Largest line (CSV row or JSON record) a streaming pass reads; a longer one is an error."""
        return max(MIN_BLOCK_BYTES, self.header_bytes)


def clip(text: str, limit: int = 100) -> str:
    """`text` as repr, cut to about `limit` characters: what of a client's or a file's string an error echoes."""
    shown = repr(text[:limit])
    return shown + f"... ({len(text):,} characters)" if len(text) > limit else shown


def unreadable(ref: str, fmt: str, error: BaseException) -> str:
    """The one line saying why a parser refused a dataset file (a TypeError: pandas' JSON reader given a line that
    is not an object, `[1, 2]`, which it words as a dict() conversion)."""
    if isinstance(error, TypeError) and fmt == "jsonl":
        return f"cannot read dataset {clip(ref)} as JSONL: a line is not a JSON object (each line must be one record)"
    return f"cannot read dataset {clip(ref)} as {fmt.upper()}: {one_line(error)}"


def check_name(value: object, what: str, limit: int) -> str:
    """`value` if it is a non-empty string of at most `limit` characters without control characters.

    A name is refused, never changed: silently dropping a NUL (as tornado's argument cleaning does)
    would register or read something other than what the caller named.
    """
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string, not {value!r}")
    if len(value) > limit:
        raise InvalidArgument(f"{what} {clip(value)} is longer than {limit:,} characters")
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise InvalidArgument(
            f"{what} {clip(value)} contains the control character {bad!r}; "
            "use printable characters only (no NUL, tab, newline or other control characters)"
        )
    return value


# --- the first line and the first rows ---------------------------------------------------------------


def head(handle: IO[bytes], bounds: ReadBounds, ref: str, sample: int = HEAD_SAMPLE_BYTES) -> tuple[bytes, bool]:
    """The file's first line plus up to `sample` bytes of whole lines after it, and whether that is all of it.

    Raises InvalidArgument when the first line does not end within `bounds.header_bytes`.
    """
    data = handle.read(bounds.header_bytes + sample + 1)
    first_end = data.find(b"\n", 0, bounds.header_bytes + 1)
    whole = len(data) <= bounds.header_bytes + sample
    if first_end < 0 and not (whole and len(data) <= bounds.header_bytes):
        raise InvalidArgument(
            f"dataset {clip(ref)} cannot be read: its first line is longer than "
            f"{bounds.header_bytes:,} bytes (the max_dataset_header_bytes setting)"
        )
    if whole:
        return data, True
    return data[: data.rindex(b"\n") + 1], False


def check_columns(names: list[str], bounds: ReadBounds, ref: str) -> list[str]:
    """`names` if there are at most `bounds.columns` of them, none longer than `bounds.name_chars`."""
    if len(names) > bounds.columns:
        raise InvalidArgument(
            f"dataset {clip(ref)} has {len(names):,} columns, more than {bounds.columns:,} "
            "(the max_dataset_columns setting)"
        )
    long = next((name for name in names if len(name) > bounds.name_chars), None)
    if long is not None:
        raise InvalidArgument(
            f"dataset {clip(ref)} has a column name of {len(long):,} characters "
            f"({clip(long, 40)}), more than {bounds.name_chars:,}"
        )
    return names


def header_names(data: bytes, fmt: str) -> list[str] | None:
    """The column names the first line of a head declares, read without pandas (None when they cannot be
    told here; pandas then says why).

    Counted before pandas parses the head: pandas takes about a minute and a gigabyte for a 1 MiB header
    of half a million empty names, and the column bound must refuse such a file in milliseconds.
    """
    end = data.find(b"\n")
    line = (data if end < 0 else data[:end]).rstrip(b"\r").decode("utf-8", "replace")
    if fmt == "csv":
        try:
            return next(csv.reader([line]), [])
        except csv.Error:  # a name above csv's field size limit, say: split at every comma (at least as many)
            return line.split(",")
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return [str(key) for key in record] if isinstance(record, dict) else None


def check_header(data: bytes, fmt: str, bounds: ReadBounds, ref: str) -> None:
    """The column bounds applied to a head's first line before pandas parses it (see header_names)."""
    names = header_names(data, fmt)
    if names is not None:
        check_columns(names, bounds, ref)


def parse_head(data: bytes, fmt: str, rows: int | None) -> pd.DataFrame:
    """The first `rows` rows (None: all) of a CSV or JSON Lines head, as pandas reads the whole file."""
    if fmt == "csv":
        return pd.read_csv(io.BytesIO(data), nrows=rows)
    if not data.strip():
        raise pd.errors.EmptyDataError("no records")
    return pd.read_json(io.BytesIO(data), lines=True, nrows=rows, dtype=False, **KEEP_DATES)


def parquet_file(handle: IO[bytes], ref: str, read_dictionary: list[str] | None = None) -> pq.ParquetFile:
    """A ParquetFile (its `read_dictionary` columns read as dictionaries), after checking its footer length: a crafted
    footer can claim gigabytes."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    if size >= 12:
        handle.seek(size - 8)
        tail = handle.read(8)
        footer = int.from_bytes(tail[:4], "little")
        if tail[4:] == b"PAR1" and footer > PARQUET_FOOTER_BYTES:
            raise InvalidArgument(
                f"dataset {clip(ref)} cannot be read: its Parquet footer is {footer:,} bytes, "
                f"more than {PARQUET_FOOTER_BYTES:,}"
            )
    handle.seek(0)
    return pq.ParquetFile(handle, read_dictionary=read_dictionary)


def column_chunks(
    metadata: pq.FileMetaData, leaves: list[int] | None = None, groups: list[int] | None = None
) -> list[Any]:
    """Every column chunk of a Parquet file's footer (of its leaf columns `leaves` only, given; of its row groups
    `groups` only, given), row group by row group."""
    wanted = range(metadata.num_columns) if leaves is None else leaves
    chosen = range(metadata.num_row_groups) if groups is None else groups
    return [metadata.row_group(i).column(j) for i in chosen for j in wanted]


def leaves_of(metadata: pq.FileMetaData, columns: list[str] | None) -> list[int] | None:
    """The leaf columns (by index) of a Parquet file's top-level `columns` (None: all of them, None too), from its
    Arrow schema (a nested column has several leaves; a name may hold a dot); every leaf when the Arrow fields' leaves
    do not add up to the file's (no file pyarrow writes)."""
    if columns is None:
        return None
    wanted, first = set(columns), 0
    leaves: list[int] = []
    for top in metadata.schema.to_arrow_schema():
        count = sum(1 for _ in _leaf_types(top.type))
        if top.name in wanted:
            leaves.extend(range(first, first + count))
        first += count
    return leaves if first == metadata.num_columns else list(range(metadata.num_columns))


def check_parquet_sizes(metadata: pq.FileMetaData, max_bytes: int, ref: str) -> None:
    """InvalidArgument when a Parquet file's footer declares more than `max_bytes` of uncompressed column data, or
    more than `max_bytes / 8` values: rows x columns, and leaf values (a list column's elements; a run-length
    encoded column of a billion equal values is a few bytes on disk and uncompressed, and gigabytes in a frame), or
    values of more than 8 bytes each (fixed-size binary, decimal, view) of more than `max_bytes` (wide_value_bytes).
    Only the footer is read: a first filter, since a writer sets these fields freely; read_parquet_bounded enforces
    the bound on what the body reads back as."""
    declared = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    cells = metadata.num_rows * max(metadata.num_columns, 1)
    leaves = sum(chunk.num_values for chunk in column_chunks(metadata))
    if declared > max_bytes or max(cells, leaves) * 8 > max_bytes:
        raise InvalidArgument(
            f"{clip(ref, 60)} is too large for one request: its Parquet footer declares {declared:,} bytes "
            f"uncompressed, {metadata.num_rows:,} rows x {metadata.num_columns:,} columns and {leaves:,} values; "
            f"at most {max_bytes:,} bytes and {max_bytes // 8:,} values (setting max_parquet_uncompressed_bytes): "
            "send it in parts"
        )
    wide = wide_value_bytes(metadata, value_widths(metadata))
    if wide > max_bytes:
        raise InvalidArgument(
            f"{clip(ref, 60)} is too large for one request: its fixed-size binary, decimal or view columns read back "
            f"as {wide:,} bytes (their values times their width); at most {max_bytes:,} (setting "
            "max_parquet_uncompressed_bytes): send it in parts"
        )


def wide_value_bytes(metadata: pq.FileMetaData, widths: dict[int, int]) -> int:
    """What a Parquet file's leaves of values wider than 8 bytes (value_widths) decode to: each value takes its
    width whatever its encoding (a dictionary page of one 100 kB fixed-size value and 20,000 indices to it is 429
    bytes of zstd, and 2 GB in one batch), counted for the most values the read may decode of each chunk: its own,
    or its row group's rows."""
    total = 0
    for g in range(metadata.num_row_groups if widths else 0):
        group = metadata.row_group(g)
        total += sum(max(group.column(i).num_values, group.num_rows) * width for i, width in widths.items())
    return total


def value_widths(metadata: pq.FileMetaData) -> dict[int, int]:
    """The bytes a value of each leaf of a Parquet file takes once read, by the leaf's index, where more than 8: by
    the Arrow type pyarrow reads it as (the file's ARROW:schema may say), not its physical type: a fixed-size
    binary's width, 16 or 32 for a decimal (an INT32 decimal reads as a decimal128; a one-byte BYTE_ARRAY annotated
    DECIMAL(76) as a decimal256), 16 for a string or binary view (besides its data); and a FIXED_LEN_BYTE_ARRAY
    leaf's width (its values are decoded at it first, a decimal's too). When the Arrow leaves do not match the
    Parquet ones (no file pyarrow writes), every leaf is taken at the widest, 32 bytes."""
    leaves = arrow_leaf_types(metadata)
    schema = metadata.schema
    widths = {}
    for i in range(metadata.num_columns):
        width = WIDEST_VALUE_BYTES if leaves is None else _value_width(leaves[i])
        if schema.column(i).physical_type == "FIXED_LEN_BYTE_ARRAY":
            width = max(width, schema.column(i).length or 0)
        if width > 8:
            widths[i] = width
    return widths


def arrow_leaf_types(metadata: pq.FileMetaData) -> list[pa.DataType] | None:
    """The Arrow type pyarrow reads each leaf of a Parquet file as (a dictionary's value type, an extension's storage
    type), by the leaf's index; None when they do not match the file's leaves."""
    leaves = [leaf for field in metadata.schema.to_arrow_schema() for leaf in _leaf_types(field.type)]
    return leaves if len(leaves) == metadata.num_columns else None


WIDEST_VALUE_BYTES = 32  # a decimal256's


def _leaf_types(kind: pa.DataType) -> Iterator[pa.DataType]:
    """The leaf types of an Arrow type, depth first: in the order of a Parquet file's leaves."""
    if isinstance(kind, pa.BaseExtensionType):
        kind = kind.storage_type
    if pa.types.is_dictionary(kind):
        yield kind.value_type
        return
    children = [kind.field(i).type for i in range(kind.num_fields)]
    if not children:
        yield kind
    for child in children:
        yield from _leaf_types(child)


def _reads_as_dictionary(kind: pa.DataType) -> bool:
    """Whether pyarrow reads a BYTE_ARRAY leaf of Arrow type `kind` as dictionaries when asked (read_dictionary)."""
    checks = ("is_string", "is_binary", "is_large_string", "is_large_binary", "is_string_view", "is_binary_view")
    return any(getattr(pa.types, check)(kind) for check in checks)


def _value_width(kind: pa.DataType) -> int:
    """The bytes a value of a leaf of type `kind` takes (its offsets or its own, at least 8: what the walk counts)."""
    if pa.types.is_string_view(kind) or pa.types.is_binary_view(kind):
        return 16
    try:
        return max(8, kind.byte_width)
    except ValueError:  # not of a fixed width (a string's offset, a boolean's bit)
        return 8


PARQUET_BATCH_ROWS = 65_536  # rows per batch of read_parquet_bounded: the bound is checked after each


def add_decoded(total: int, batch: pa.RecordBatch, max_bytes: int, too_large: str) -> int:
    """`total` plus the bytes `batch` decodes to (decoded_nbytes: a dictionary's indices at their values' lengths);
    InvalidArgument(`too_large`) past `max_bytes`. Each Parquet read within max_parquet_uncompressed_bytes adds up its
    batches so, as they come."""
    total += sum(decoded_nbytes(column) for column in batch.columns)
    if total > max_bytes:
        raise InvalidArgument(too_large)
    return total


def read_parquet_bounded(
    handle: IO[bytes],
    max_bytes: int,
    ref: str,
    columns: list[str] | None = None,
    too_large: str | None = None,
    advice: str = "send it in parts",
) -> pa.Table:
    """The table a Parquet file holds (its `columns` only, given), read in batches whose decoded size is added up as
    they come: past `max_bytes` the read stops with InvalidArgument (setting max_parquet_uncompressed_bytes; starting
    `too_large`, by default a request body's wording, and ending `advice`), so a footer that under-declares is caught
    too. The footer is parsed once and checked first (check_parquet_sizes, a
    first filter, for a whole file), then the page headers (walk_parquet_pages: pyarrow decompresses a page whole,
    and decodes the values its header says it holds, whatever the footer says): bounded_columns.

    A string or binary column is decoded as it is read when the walk bounds what it decodes to (dense_byte_arrays:
    its plain pages hold their values, and its dictionary-encoded values are counted times its dictionaries'
    longest entry), together within what the pages leave of `max_bytes`. Any other string or binary column is read
    as dictionaries (a dictionary page of one long value and a thousand indices to it is a few hundred bytes on
    disk): a batch's size counts each index as its value's length, without decoding it, so memory stays bounded by
    the decompressed pages plus one batch; once the total is known to be within the bound, such columns are cast
    back to the file's own types (what pandas.read_parquet reads). Reading as dictionaries costs about 5x the
    plain read for a column of unique strings (pyarrow hashes every value a page did not dictionary-encode)."""
    opened = parquet_file(handle, ref)
    metadata = opened.metadata
    if columns is None:
        check_parquet_sizes(metadata, max_bytes, ref)
    too_large = too_large or f"{clip(ref, 60)} is too large for one request"
    leaves = leaves_of(metadata, columns)
    as_dictionaries = bounded_columns(handle, opened, max_bytes, ref, leaves, None, too_large, advice)
    parquet = pq.ParquetFile(handle, metadata=metadata, read_dictionary=as_dictionaries or None)
    batches, total = [], 0
    past = (
        f"{too_large}: its Parquet data reads back as more than {max_bytes:,} bytes (its footer declared "
        f"{metadata.num_rows:,} rows); at most {max_bytes:,} (setting max_parquet_uncompressed_bytes): {advice}"
    )
    for batch in _batches(parquet, by_row_group=bool(as_dictionaries), columns=columns):
        total = add_decoded(total, batch, max_bytes, past)
        batches.append(batch)
    schema = parquet.schema_arrow if columns is None else _selected(parquet.schema_arrow, columns)
    table = pa.Table.from_batches(batches, schema=schema)
    if not as_dictionaries:
        return table
    return _as_file_types(table, opened.schema_arrow if columns is None else _selected(opened.schema_arrow, columns))


def _selected(schema: pa.Schema, columns: list[str]) -> pa.Schema:
    """`schema`'s fields named in `columns`, in that order (as pyarrow reads them), with its metadata."""
    return pa.schema([schema.field(name) for name in columns], metadata=schema.metadata)


def _as_file_types(data: Any, schema: pa.Schema) -> Any:
    """A table or batch read with dictionaries, cast back to the file's own types (`schema`)."""
    try:
        return data.cast(schema)
    except pa.ArrowNotImplementedError:  # no cast from a dictionary to some types (string_view): through its values
        dense_schema = pa.schema([_dense_field(field) for field in data.schema], metadata=data.schema.metadata)
        return data.cast(dense_schema).cast(schema)


def bounded_columns(
    handle: IO[bytes],
    opened: pq.ParquetFile,
    max_bytes: int,
    ref: str,
    leaves: list[int] | None,
    groups: list[int] | None,
    too_large: str,
    advice: str = "send it in parts",
) -> list[str]:
    """The columns of a Parquet file to read as dictionaries for its leaves `leaves` of its row groups `groups` (None:
    all) to be read within `max_bytes`, from their page headers (walk_parquet_pages) before any page is decompressed:
    InvalidArgument (starting `too_large`) when the pages decompress to more, hold more values (times 8, or their
    width) than `max_bytes` allows, or hold a string or binary column that no bound reaches: DELTA_BYTE_ARRAY pages
    (each value repeats a prefix of the one before it: 471 bytes of them read back as 200 MB, and pyarrow reads them
    neither as dictionaries nor a page at a time: refused, before any is read), or byte arrays pyarrow decodes whole
    (a decimal's); `advice` ends the first two. ValueError when a page header is not one
    (walk_parquet_pages)."""
    walk = walk_parquet_pages(handle, opened.metadata, leaves, groups)  # (ValueError: not Parquet pyarrow reads)
    return _judged(handle, opened, walk, max_bytes, ref, leaves, too_large, advice)[0]


def _judged(
    handle: IO[bytes],
    opened: pq.ParquetFile,
    walk: PageWalk,
    max_bytes: int,
    ref: str,
    leaves: list[int] | None,
    too_large: str,
    advice: str,
) -> tuple[list[str], int]:
    """bounded_columns' judgement of a walk: the columns to read as dictionaries, and what the others' byte arrays
    decode to at most (dense_byte_arrays) besides the pages."""
    metadata = opened.metadata
    if walk.decompressed > max_bytes:
        raise InvalidArgument(
            f"{too_large}: its Parquet pages decompress to {walk.decompressed:,} "
            f"bytes; at most {max_bytes:,} (setting max_parquet_uncompressed_bytes): {advice}"
        )
    if walk.value_bytes > max_bytes:
        wide = f" (read back as {walk.value_bytes:,} bytes)" if walk.value_bytes > walk.values * 8 else ""
        raise InvalidArgument(
            f"{too_large}: its Parquet pages hold {walk.values:,} values{wide}; at "
            f"most {max_bytes // 8:,} values and {max_bytes:,} bytes (setting max_parquet_uncompressed_bytes): {advice}"
        )
    bounds = byte_array_bounds(handle, walk)
    dense = dense_within(bounds, max_bytes - walk.decompressed)
    schema, arrow_leaves = opened.schema, arrow_leaf_types(metadata)
    prefixed = {chunk.column for chunk in walk.byte_arrays if chunk.prefixed}
    as_dictionaries = []
    for i in leaves if leaves is not None else range(metadata.num_columns):
        if schema.column(i).physical_type != "BYTE_ARRAY" or i in dense:
            continue
        if i in prefixed:
            raise InvalidArgument(
                f"{clip(ref, 60)}: its column {clip(schema.column(i).path, 60)} holds DELTA_BYTE_ARRAY pages, which "
                "cannot be read within a size bound; write it with the PLAIN, dictionary or DELTA_LENGTH_BYTE_ARRAY "
                "encoding"
            )
        if arrow_leaves is None or not _reads_as_dictionary(arrow_leaves[i]):  # pyarrow decodes it whole
            kind = "?" if arrow_leaves is None else str(arrow_leaves[i])
            raise InvalidArgument(
                f"{clip(ref, 60)} cannot be read within a size bound: its column {clip(schema.column(i).path, 60)} "
                f"is read as {clip(kind, 60)} from byte arrays whose pages do not bound what they decode to (a "
                "dictionary of long entries, or a page of another encoding); send it as strings, or a decimal as "
                "an integer or fixed-size one"
            )
        as_dictionaries.append(schema.column(i).path)
    return as_dictionaries, sum(bounds[i] or 0 for i in dense)


def parquet_rows(metadata: pq.FileMetaData, ref: str, leaves: list[int] | None = None) -> int:
    """The rows of a Parquet file whose row groups are read one by one (parquet_batches_bounded), checked across the
    whole file before any is: its row groups' rows must add up to its footer's (a writer sets both: 50 row groups of
    200 rows under a footer's 200 had streamed 10,000 rows), and the byte ranges of the column chunks of its leaves
    `leaves` (None: all) must not overlap (50 row groups pointing at one chunk of 13 kB had each been walked and
    bounded alone, 1 GB decoded in all). InvalidArgument otherwise."""
    groups = sum(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    if groups != metadata.num_rows:
        raise InvalidArgument(
            f"dataset {clip(ref, 60)} cannot be read: its row groups hold {groups:,} rows, its footer says "
            f"{metadata.num_rows:,} (not a file a Parquet writer makes)"
        )
    ranges = sorted(_chunk_range(chunk) for chunk in column_chunks(metadata, leaves) if chunk.num_values > 0)
    for (_start, end), (following, _end) in itertools.pairwise(ranges):
        if following < end:
            raise InvalidArgument(
                f"dataset {clip(ref, 60)} cannot be read: its column chunks overlap (bytes {following:,} to "
                f"{min(end, _end):,} belong to two of them; not a file a Parquet writer makes)"
            )
    return groups


def _chunk_range(chunk: Any) -> tuple[int, int]:
    """The bytes of a column chunk, as walk_parquet_pages reads them (from its dictionary page, if any)."""
    position = chunk.data_page_offset
    if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < position:
        position = chunk.dictionary_page_offset
    return position, position + chunk.total_compressed_size


def parquet_batches_bounded(
    handle: IO[bytes], max_bytes: int, ref: str, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet file's `columns`, of at most `batch_rows` rows, row group by row group, each
    row group read within `max_bytes` (setting max_parquet_uncompressed_bytes) as a body is (read_parquet_bounded):
    its selected columns' page headers walked first (bounded_columns), then its batches' decoded size added up as they
    come, a string column whose pages do not bound it read as dictionaries and counted from them, then cast back to
    the file's type. A file of any size streams; a row group that reads back as more is refused (InvalidArgument)
    before it is decoded, or at the batch that passes the bound (an evaluation's sample keeps only its rows of each
    batch: runner.SampledFrames). The file is checked whole first (parquet_rows: its row groups' rows add up to its
    footer's, its chunks do not overlap), so that no byte is read, and bounded, more than once. For an evaluation's
    worker: what a file under the Jupyter root holds is anyone's with write access to it."""
    opened = parquet_file(handle, ref)
    metadata = opened.metadata
    leaves = leaves_of(metadata, columns)
    parquet_rows(metadata, ref, leaves)
    file_types = _selected(opened.schema_arrow, columns)
    for groups, as_dictionaries in _row_group_runs(handle, opened, max_bytes, ref, leaves, batch_rows):
        parquet = pq.ParquetFile(handle, metadata=metadata, read_dictionary=as_dictionaries or None)
        total = 0
        shown = f" {groups[0]:,} is" if len(groups) == 1 else f"s {groups[0]:,} to {groups[-1]:,} are"
        past = (
            f"dataset {clip(ref, 60)}: its row group{shown} too large to read at once: its columns "
            f"{clip(', '.join(columns), 60)} read back as more than {max_bytes:,} bytes "
            "(setting max_parquet_uncompressed_bytes): write the file with smaller row groups"
        )
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            total = add_decoded(total, batch, max_bytes, past)
            yield _as_file_types(batch, file_types) if as_dictionaries else batch


def _row_group_runs(
    handle: IO[bytes], opened: pq.ParquetFile, max_bytes: int, ref: str, leaves: list[int] | None, batch_rows: int
) -> Iterator[tuple[list[int], list[str]]]:
    """A Parquet file's row groups in runs read at once (a batch may span them: 1,000 row groups of 1,000 rows had
    been 1,000 batches, their scoring 25x slower), with the columns each run reads as dictionaries. Each row group's
    page headers are walked before it is read (bounded_columns: InvalidArgument for one too large alone); consecutive
    ones join while they hold at most `batch_rows` rows in all and their pages, values and byte arrays together fit in
    `max_bytes`, as they would walked at once. A row group with a column read as dictionaries is a run alone: pyarrow
    cannot join a nested column's dictionaries of two row groups into one batch, nor does a flat one's batch span
    them."""
    metadata = opened.metadata
    run: list[int] = []
    rows = pages = values = 0
    for group in range(metadata.num_row_groups):
        too_large = f"dataset {clip(ref, 60)}: its row group {group:,} is too large to read at once"
        walk = walk_parquet_pages(handle, metadata, leaves, [group])  # (ValueError: not Parquet pyarrow reads)
        advice = "write the file with smaller row groups"
        as_dictionaries, dense = _judged(handle, opened, walk, max_bytes, ref, leaves, too_large, advice)
        group_rows = metadata.row_group(group).num_rows
        joins = (
            not as_dictionaries
            and rows + group_rows <= batch_rows
            and pages + walk.decompressed + dense <= max_bytes
            and values + walk.value_bytes <= max_bytes
        )
        if run and not joins:
            yield run, []
            run, rows, pages, values = [], 0, 0, 0
        if as_dictionaries:
            yield [group], as_dictionaries
            continue
        run.append(group)
        rows, pages, values = rows + group_rows, pages + walk.decompressed + dense, values + walk.value_bytes
    if run:
        yield run, []


def _batches(
    parquet: pq.ParquetFile, *, by_row_group: bool, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The batches of PARQUET_BATCH_ROWS rows of a Parquet file; with `by_row_group`, none spanning two row groups:
    pyarrow cannot read a nested column as dictionaries into one batch from two chunks whose dictionaries differ
    ("Nested data conversions not implemented for chunked array outputs")."""
    if not by_row_group:
        yield from parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        return
    for group in range(parquet.metadata.num_row_groups):
        yield from parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=columns)


def _dense(kind: pa.DataType) -> pa.DataType:
    """`kind` with each dictionary type, at any depth, replaced by its value type."""
    if pa.types.is_dictionary(kind):
        return kind.value_type
    if pa.types.is_map(kind):
        return pa.map_(_dense_field(kind.key_field), _dense_field(kind.item_field), kind.keys_sorted)
    if pa.types.is_list(kind):
        return pa.list_(_dense_field(kind.value_field))
    if pa.types.is_large_list(kind):
        return pa.large_list(_dense_field(kind.value_field))
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(_dense_field(kind.value_field), kind.list_size)
    if pa.types.is_struct(kind):
        return pa.struct([_dense_field(kind.field(i)) for i in range(kind.num_fields)])
    return kind


def _dense_field(field: pa.Field) -> pa.Field:
    return field.with_type(_dense(field.type))


# A body may have at most two pages per column chunk, one per PARQUET_BYTES_PER_PAGE bytes and one per
# PARQUET_VALUES_PER_PAGE values (pyarrow starts a page every 20,000 rows: a run of equal values is a few bytes each)
PARQUET_BYTES_PER_PAGE = 256
PARQUET_VALUES_PER_PAGE = 1_000
# A page header is read whole into memory and parsed there: first PAGE_HEADER_FIRST_READ bytes (a writer's headers
# are tens of bytes; statistics of long strings a few kB), then, if it runs past them, up to PAGE_HEADER_MAX_BYTES
# (pyarrow writes statistics of at most 4,096 bytes a value; other writers may keep a long string's whole: a page of
# documents is not refused for its header). A larger header, or one holding a list or map of more than
# PAGE_HEADER_MAX_ELEMENTS elements (a page header has none), is refused. (The headers' bytes together are at most
# the body's: the bound is on one header's read, the walk's on the body.)
PAGE_HEADER_FIRST_READ = 1024
# pyarrow reads up to this many bytes past a chunk's range (files of parquet-mr before 1.2.9 left the dictionary page's
# header out of total_compressed_size, PARQUET-816) while the pages so far hold fewer values than the footer says
PARQUET_816_PADDING = 100
PAGE_HEADER_MAX_BYTES = 1024 * 1024
PAGE_HEADER_MAX_ELEMENTS = 1_000


# Page types and encodings of parquet.thrift that the walk tells apart
DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
PLAIN, PLAIN_DICTIONARY, DELTA_LENGTH_BYTE_ARRAY, DELTA_BYTE_ARRAY, RLE_DICTIONARY = 0, 2, 6, 7, 8
# PageHeader's fields read by the walk: type, sizes, and (num_values, encoding) of a data page, a dictionary page and
# a data page v2
PAGE_HEADER_FIELDS: dict[int, Any] = {1: None, 2: None, 3: None, 5: {1: None, 2: None}, 7: {1: None, 2: None}}
PAGE_HEADER_FIELDS[8] = {1: None, 4: None}


class PageHeader(NamedTuple):
    """What the walk reads of a page header (`values` and `encoding` are -1 for a page type without them)."""

    kind: int
    uncompressed: int
    compressed: int
    size: int  # the header's own bytes
    values: int
    encoding: int


class DictionaryPage(NamedTuple):
    """Where a dictionary page's (compressed) bytes are, their sizes and its number of entries."""

    start: int
    compressed: int
    uncompressed: int
    entries: int


@dataclass
class ByteArrayChunk:
    """The pages of one column chunk of a BYTE_ARRAY leaf, as far as they bound what it decodes to."""

    column: int  # the leaf's index in the schema
    codec: str  # the chunk's compression, as the footer names it
    declared_values: int  # the footer's num_values of the chunk
    values: int = 0  # values in its data pages (nulls included)
    dictionary_values: int = 0  # of which in dictionary-encoded ones
    dictionaries: list[DictionaryPage] = field(default_factory=list)
    unbounded: bool = False  # a page of another encoding (DELTA_BYTE_ARRAY: a value may repeat its predecessor's)
    prefixed: bool = False  # a DELTA_BYTE_ARRAY page (pyarrow reads it neither as dictionaries nor a page at a time)


@dataclass
class PageWalk:
    """What walk_parquet_pages found: the bytes the pages decompress to, the values their headers say they hold (what
    pyarrow decodes from them: a footer may under-declare a chunk's), the bytes they read back as (8 each, or their
    leaf's width: value_widths), the chunks of BYTE_ARRAY leaves and the widths of the leaves wider than 8 bytes."""

    decompressed: int = 0
    values: int = 0
    value_bytes: int = 0
    byte_arrays: list[ByteArrayChunk] = field(default_factory=list)
    widths: dict[int, int] = field(default_factory=dict)


def parquet_page_bytes(handle: IO[bytes], metadata: pq.FileMetaData, leaves: list[int] | None = None) -> int:
    """The bytes a Parquet file's pages decompress to (walk_parquet_pages; of its leaf columns `leaves` only, given)."""
    return walk_parquet_pages(handle, metadata, leaves).decompressed


def walk_parquet_pages(
    handle: IO[bytes], metadata: pq.FileMetaData, leaves: list[int] | None = None, groups: list[int] | None = None
) -> PageWalk:
    """The bytes a Parquet file's pages decompress to, from their headers (what pyarrow allocates to read them, a
    plain page of one repeated value included; the footer's sizes are a writer's to set), and, for each column
    chunk of a BYTE_ARRAY leaf, its dictionary pages and the values of its dictionary-encoded data pages (the
    encoding pyarrow decodes a page by is its header's). Each column chunk is walked as pyarrow reads it: from its
    first page, `total_compressed_size` bytes (none of a chunk of no values; pyarrow reads no page past a chunk's
    values, so a crafted chunk may be over-counted, never under), and on, while its pages hold fewer values than
    the footer says, into the PARQUET_816_PADDING bytes pyarrow reads past it for old parquet-mr files.
    ValueError when a header is not one (or is larger than PAGE_HEADER_MAX_BYTES, or holds a list or map of more
    than PAGE_HEADER_MAX_ELEMENTS elements), when the chunks walked add up to more bytes than the file has (they
    overlap), or when there are more pages than PARQUET_BYTES_PER_PAGE and PARQUET_VALUES_PER_PAGE allow (writers
    make pages of about a megabyte or 20,000 rows): the walk is bounded by the body's size and its values (which
    check_parquet_sizes bounds), each header's parse by PAGE_HEADER_MAX_BYTES."""
    size = handle.seek(0, io.SEEK_END)
    chunks = column_chunks(metadata, leaves, groups)
    walked_leaves = list(range(metadata.num_columns)) if leaves is None else leaves  # each row group's, in order
    values = sum(chunk.num_values for chunk in chunks)
    most_pages = 2 * len(chunks) + size // PARQUET_BYTES_PER_PAGE + values // PARQUET_VALUES_PER_PAGE
    byte_array = {i for i in range(metadata.num_columns) if metadata.schema.column(i).physical_type == "BYTE_ARRAY"}
    widths = value_widths(metadata)
    walk = PageWalk(widths=widths)
    walked = pages = 0
    for index, chunk in enumerate(chunks):
        if chunk.num_values <= 0:  # pyarrow reads no page of it (an empty table's chunk starts at byte 0)
            continue
        column = walked_leaves[index % len(walked_leaves)]
        strings = ByteArrayChunk(column, chunk.compression, chunk.num_values) if column in byte_array else None
        if strings is not None:
            walk.byte_arrays.append(strings)
        position = chunk.data_page_offset
        if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < position:
            position = chunk.dictionary_page_offset
        end = position + chunk.total_compressed_size
        padded = end + min(PARQUET_816_PADDING, max(size - end, 0))
        found = 0  # values in the chunk's data pages so far
        while position < end or (position < padded and found < chunk.num_values):
            pages += 1
            if pages > most_pages:
                raise ValueError(f"it has more than {most_pages:,} pages for {size:,} bytes and {values:,} values")
            page = _page_header(handle, position)
            walk.decompressed += page.uncompressed
            if page.kind in (DATA_PAGE, DATA_PAGE_V2) and page.values > 0:
                found += page.values
                walk.values += page.values
                walk.value_bytes += page.values * widths.get(column, 8)
            if strings is not None:
                _note_page(strings, page, position)
            position += page.size + page.compressed
            walked += page.size + page.compressed
            if walked > size:
                raise ValueError("its column chunks overlap")
    return walk


def _note_page(chunk: ByteArrayChunk, page: PageHeader, position: int) -> None:
    if page.kind == DICTIONARY_PAGE and page.encoding in (PLAIN, PLAIN_DICTIONARY) and page.values >= 0:
        chunk.dictionaries.append(DictionaryPage(position + page.size, page.compressed, page.uncompressed, page.values))
    elif page.kind in (DATA_PAGE, DATA_PAGE_V2) and page.values >= 0:
        chunk.values += page.values
        if page.encoding in (PLAIN_DICTIONARY, RLE_DICTIONARY):
            chunk.dictionary_values += page.values
        elif page.encoding not in (PLAIN, DELTA_LENGTH_BYTE_ARRAY):
            chunk.unbounded = True
            chunk.prefixed = chunk.prefixed or page.encoding == DELTA_BYTE_ARRAY
    else:
        chunk.unbounded = True


# Most dictionary entries dense_byte_arrays reads (about 60 ns each in Python: a million unique strings' dictionaries
# hold some 40,000); a file's columns past it are read as dictionaries
DICTIONARY_SCAN_ENTRIES = 1 << 22
# pyarrow's names of the codecs dense_byte_arrays decompresses a dictionary page with (parquet's LZ4, framed or
# not, is left to pyarrow: its columns are read as dictionaries)
DICTIONARY_CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd", "BROTLI": "brotli", "LZ4_RAW": "lz4_raw"}


def dense_byte_arrays(handle: IO[bytes], walk: PageWalk, budget: int) -> set[int]:
    """The BYTE_ARRAY leaves that may be decoded as they are read: those whose pages bound what they decode to,
    together within `budget` bytes besides their pages. A plain (or delta-length) page holds its values, so its
    decompressed size (in the walk's) bounds them; a dictionary-encoded value decodes to at most its chunk's longest
    dictionary entry, read here from the dictionary pages (decompressed one at a time, each within the walk's
    total), so a chunk adds its dictionary-encoded values times that entry's length (and an offset), and a leaf read
    as values wider than 8 bytes (a decimal, a view: value_widths) each value's width. A leaf with a
    page of another encoding, a dictionary this cannot read, or past DICTIONARY_SCAN_ENTRIES is not in the set; nor
    is one with a chunk whose pages hold fewer values than its footer says: pyarrow reads pages until it has them, so
    past the range the walk saw (it pads that range by up to 100 bytes for files of parquet-mr before 1.2.9,
    PARQUET-816: room for a dictionary-encoded page of a million values)."""
    return dense_within(byte_array_bounds(handle, walk), budget)


def byte_array_bounds(handle: IO[bytes], walk: PageWalk) -> dict[int, int | None]:
    """What each BYTE_ARRAY leaf of a walk decodes to at most besides its pages (None: not bounded by them), as
    dense_byte_arrays says."""
    bounds: dict[int, int | None] = {}
    scanned = 0
    for chunk in walk.byte_arrays:
        bound = bounds.get(chunk.column, 0)
        if bound is None:
            continue
        if chunk.unbounded or chunk.values < chunk.declared_values:
            bounds[chunk.column] = None
            continue
        bound += chunk.values * walk.widths.get(chunk.column, 0)  # a decimal's or a view's own bytes, besides its data
        if not chunk.dictionary_values:
            bounds[chunk.column] = bound
            continue
        entries = sum(page.entries for page in chunk.dictionaries)
        longest = None
        if chunk.dictionaries and scanned + entries <= DICTIONARY_SCAN_ENTRIES:
            scanned += entries
            lengths = [_longest_entry(handle, page, chunk.codec) for page in chunk.dictionaries]
            longest = None if None in lengths else max(length or 0 for length in lengths)
        bounds[chunk.column] = None if longest is None else bound + chunk.dictionary_values * (longest + 8)
    return bounds


def dense_within(bounds: dict[int, int | None], budget: int) -> set[int]:
    """The leaves of `bounds` (byte_array_bounds) decoded as they are read: the least first, together within
    `budget`."""
    dense, total = set(), 0
    for column, bound in sorted(bounds.items(), key=lambda item: (item[1] is None, item[1] or 0)):
        if bound is None or total + bound > budget:
            break
        dense.add(column)
        total += bound
    return dense


def _longest_entry(handle: IO[bytes], page: DictionaryPage, codec: str) -> int | None:
    """The longest of a (plain-encoded) dictionary page's entries, as pyarrow decodes its `entries` from it; None
    when its codec is not one this knows or its bytes are not what the header says (pyarrow then says why)."""
    handle.seek(page.start)
    data = handle.read(page.compressed)
    if len(data) < page.compressed:
        return None
    if codec != "UNCOMPRESSED":
        if codec not in DICTIONARY_CODECS:
            return None
        try:
            data = pa.Codec(DICTIONARY_CODECS[codec]).decompress(data, page.uncompressed, asbytes=True)
        except (pa.ArrowException, ValueError):
            return None
    unpack = struct.Struct("<I").unpack_from
    position = longest = 0
    try:
        for _ in range(page.entries):
            (length,) = unpack(data, position)
            position += 4 + length
            if length > longest:
                longest = length
    except struct.error:
        return None
    return longest if position <= len(data) else None


def _page_header(handle: IO[bytes], position: int) -> PageHeader:
    """The page header at `position`."""
    for limit in (PAGE_HEADER_FIRST_READ, PAGE_HEADER_MAX_BYTES):
        handle.seek(position)
        data = handle.read(limit)
        reader = _CompactReader(data)
        try:
            fields = reader.struct_fields(PAGE_HEADER_FIELDS)
        except _PastBuffer:
            if len(data) < limit:
                raise ValueError("a page header runs past the end of the file") from None
            continue
        uncompressed, compressed = fields.get(2, -1), fields.get(3, -1)
        if uncompressed < 0 or compressed < 0:
            raise ValueError(f"a page header at byte {position:,} has no sizes")
        kind = fields.get(1, -1)
        details = fields.get({DATA_PAGE: 5, DICTIONARY_PAGE: 7, DATA_PAGE_V2: 8}.get(kind, 0), {})
        encoding = details.get(4 if kind == DATA_PAGE_V2 else 2, -1)
        return PageHeader(kind, uncompressed, compressed, reader.position, details.get(1, -1), encoding)
    raise ValueError(f"a page header at byte {position:,} is larger than {PAGE_HEADER_MAX_BYTES:,} bytes")


# Thrift compact protocol: the types of the fields the walk reads, and the largest field id (an i16)
THRIFT_I32, THRIFT_STRUCT = 5, 12
THRIFT_MAX_FIELD_ID = 32_767


class _PastBuffer(Exception):
    """A page header runs past the bytes read for it."""


class _CompactReader:
    """Just enough of Thrift's compact protocol to read a page header's integer fields and skip the rest, from the
    bytes read for it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def _read(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self.data):
            raise _PastBuffer
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def _byte(self) -> int:
        if self.position >= len(self.data):
            raise _PastBuffer
        self.position += 1
        return self.data[self.position - 1]

    def _varint(self) -> int:
        value = shift = 0
        while True:
            byte = self._byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 70:
                raise ValueError("a page header holds an overlong integer")

    def _zigzag(self) -> int:
        value = self._varint()
        return (value >> 1) ^ -(value & 1)

    def struct_fields(self, wanted: dict[int, Any] | None = None, depth: int = 0) -> dict[int, Any]:
        """The fields `wanted` of the struct at the reader's position, which is read to its end: an i32 field wanted
        as None, a struct field as the dict of its own wanted fields.

        ValueError for a struct no writer makes, whose fields pyarrow's Thrift could read otherwise than this: field
        ids not strictly increasing within 1..32,767 (pyarrow wraps an id to 16 bits, and keeps a field's last copy),
        a wanted field of another type (pyarrow skips an i16 or i64 one where it reads an i32) or an i32 past 32 bits
        (pyarrow truncates it). Else a header could say one thing to pyarrow and another to the walk."""
        if depth > 32:
            raise ValueError("a page header nests too deep")
        wanted = wanted or {}
        found: dict[int, Any] = {}
        number = 0
        while True:
            header = self._byte()
            if header == 0:
                return found
            kind, delta = header & 0x0F, header >> 4
            following = number + delta if delta else self._zigzag()
            if not number < following <= THRIFT_MAX_FIELD_ID:
                raise ValueError(
                    f"a page header's field ids are not increasing within 1..{THRIFT_MAX_FIELD_ID:,} (field "
                    f"{following:,} after {number:,}), which no Parquet writer makes"
                )
            number = following
            spec = wanted.get(number, False)
            if spec is None:
                if kind != THRIFT_I32:
                    raise ValueError(f"a page header's field {number} is not an i32 (Thrift type {kind})")
                value = self._varint()
                if value >> 32:
                    raise ValueError(f"a page header's field {number} does not fit in 32 bits")
                found[number] = (value >> 1) ^ -(value & 1)
            elif isinstance(spec, dict):
                if kind != THRIFT_STRUCT:
                    raise ValueError(f"a page header's field {number} is not a struct (Thrift type {kind})")
                found[number] = self.struct_fields(spec, depth + 1)
            else:
                self._skip(kind, depth)

    def _elements(self, size: int) -> int:
        if size > PAGE_HEADER_MAX_ELEMENTS:
            raise ValueError(
                f"a page header holds a list or map of {size:,} elements; at most {PAGE_HEADER_MAX_ELEMENTS:,}"
            )
        return size

    def _skip(self, kind: int, depth: int) -> None:
        if kind in (1, 2):  # booleans: the value is the type
            return
        if kind == 3:
            self._byte()
        elif kind in (4, 5, 6):
            self._varint()
        elif kind == 7:
            self._read(8)
        elif kind == 8:
            self._read(self._varint())
        elif kind in (9, 10):
            header = self._byte()
            size, element = header >> 4, header & 0x0F
            if size == 15:
                size = self._varint()
            for _ in range(self._elements(size)):
                self._skip_element(element, depth + 1)
        elif kind == 11:
            size = self._elements(self._varint())
            if size:
                types = self._byte()
                for _ in range(size):
                    self._skip_element(types >> 4, depth + 1)
                    self._skip_element(types & 0x0F, depth + 1)
        elif kind == 12:
            self.struct_fields(depth=depth + 1)
        else:
            raise ValueError(f"a page header holds an unknown Thrift type {kind}")

    def _skip_element(self, kind: int, depth: int) -> None:
        if depth > 32:  # lists of lists
            raise ValueError("a page header nests too deep")
        if kind in (1, 2):  # a boolean in a list or map is one byte
            self._byte()
        else:
            self._skip(kind, depth)


def decoded_nbytes(array: pa.Array) -> int:
    """About the bytes `array` takes once its dictionaries are decoded: a dictionary of strings counts each index
    as its value's length (plus an offset), lists and structs their own buffers and their children's decoded size.
    """
    kind = array.type
    if pa.types.is_dictionary(kind):
        value_type = kind.value_type
        if not (
            pa.types.is_string(value_type)
            or pa.types.is_binary(value_type)
            or pa.types.is_large_string(value_type)
            or pa.types.is_large_binary(value_type)
        ):  # another value type (no read asks for one): one batch of it, decoded
            return int(array.dictionary_decode().nbytes)
        lengths = pc.binary_length(array.dictionary)
        decoded = pc.sum(pc.take(lengths, array.indices)).as_py() or 0
        return int(decoded) + 8 * len(array)
    if pa.types.is_map(kind):  # (not a list to pa.types, and flatten() has no kernel for it)
        if not len(array):
            return 0
        start, end = array.offsets[0].as_py(), array.offsets[-1].as_py()  # keys/items ignore a slice's offset
        entries = (array.keys.slice(start, end - start), array.items.slice(start, end - start))
        return 8 * len(array) + sum(decoded_nbytes(child) for child in entries)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return 8 * len(array) + decoded_nbytes(array.flatten())
    if pa.types.is_struct(kind):
        return len(array) // 8 + 1 + sum(decoded_nbytes(child) for child in array.flatten())
    if _holds_dictionary(kind):  # its nbytes would count a dictionary once, however many rows refer to it
        raise InvalidArgument(
            f"a Parquet column of type {clip(str(kind), 100)} cannot be read within a size bound; send its values "
            "as strings, numbers, lists, maps or structs of them"
        )
    return int(array.nbytes)


def _holds_dictionary(kind: pa.DataType) -> bool:
    """Whether `kind` is, or holds at any depth, a dictionary type."""
    if pa.types.is_dictionary(kind):
        return True
    return any(_holds_dictionary(kind.field(i).type) for i in range(kind.num_fields))


# --- streaming passes --------------------------------------------------------------------------------


class LongLabel(NamedTuple):
    """A label longer than MAX_LABEL_CHARS, counted by its digest so that the counts stay small in memory."""

    start: str
    digest: bytes


@dataclass
class LabelCounts:
    """Rows seen and, unless there were too many distinct values, how often each value occurred."""

    rows: int = 0
    counts: dict[Any, int] | None = None
    too_many: bool = False

    def add(self, column: pa.Array | pa.ChunkedArray | None, length: int) -> None:
        self.rows += length
        if column is None or self.too_many:
            return
        counts = {} if self.counts is None else self.counts
        for entry in pc.value_counts(column).to_pylist():
            value, count = entry["values"], entry["counts"]
            if isinstance(value, float) and value != value:  # NaN is missing, as for pandas
                value = None
            elif isinstance(value, (str, bytes)) and len(value) > MAX_LABEL_CHARS:
                whole = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
                value = LongLabel(str(value[: MAX_LABEL_CHARS - 3]), hashlib.blake2b(whole, digest_size=16).digest())
            counts[value] = counts.get(value, 0) + count
        if len(counts) > MAX_TRACKED_LABELS:
            self.counts, self.too_many = None, True
        else:
            self.counts = counts

    def top(self, limit: int) -> tuple[tuple[str | None, int], ...]:
        ranked = sorted((self.counts or {}).items(), key=lambda item: -item[1])[:limit]
        return tuple((None if value is None else _shown_label(value), count) for value, count in ranked)


def _shown_label(value: Any) -> str:
    text = value.start + "..." if isinstance(value, LongLabel) else str(value)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 3] + "..."


def count_parquet(path: Path, label: str | None, max_bytes: int, ref: str | None = None) -> LabelCounts:
    """Rows from the metadata; label counts from batches of that one column, within `max_bytes` as a Parquet body
    is read (read_parquet_bounded): the column's page headers walked first (bounded_columns: what its pages
    decompress to, before any is; a DELTA_BYTE_ARRAY column refused), then its batches' decoded size added up as they
    come, a string column whose pages do not bound it read as a dictionary (a dictionary page of one long value and
    many indices to it, a few hundred bytes in a file under the root, is counted by its values' lengths, not
    decoded): InvalidArgument past the bound (max_parquet_uncompressed_bytes)."""
    result = LabelCounts()
    ref = ref or str(path)
    with path.open("rb") as handle:
        parquet = parquet_file(handle, ref)
        metadata = parquet.metadata
        if label is None:
            result.rows = metadata.num_rows
            return result
        counted = f"dataset {clip(ref)}: its label column {clip(label, 60)} is too large to count"
        advice = "count a smaller file"
        try:  # its page headers walked, a DELTA_BYTE_ARRAY column refused, before any page is decompressed
            as_dictionaries = bounded_columns(
                handle, parquet, max_bytes, ref, leaves_of(metadata, [label]), None, counted, advice
            )
        except ValueError as error:
            raise InvalidArgument(f"dataset {clip(ref)} cannot be read: {error}") from None
        bounded = pq.ParquetFile(handle, metadata=metadata, read_dictionary=as_dictionaries or None)
        total = 0
        past = f"{counted}: it reads back as more than {max_bytes:,} bytes (setting max_parquet_uncompressed_bytes)"
        for batch in _batches(bounded, by_row_group=bool(as_dictionaries), columns=[label]):
            total = add_decoded(total, batch, max_bytes, past)
            column = batch.column(0)
            result.add(column, batch.num_rows)
    return result


def label_text(values: pd.Series) -> pa.Array:
    """A label column's values as text, as LabelCounts counts them: missing (None, NaN) as null, text as it is,
    anything else (a number or a flag in a JSON record) as `str` says it."""
    try:
        return pa.array(values, type=pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        shown = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in values.tolist()]
        return pa.array(shown, type=pa.string())
