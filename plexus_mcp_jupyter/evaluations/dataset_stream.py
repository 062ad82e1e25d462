"""A dataset read for an evaluation: pyarrow, in batches, only the columns the evaluation needs.

Loading a whole file into pandas held every column of every row at once (a 10M-row CSV: gigabytes) and parsed
it row by row. A worker reads instead with pyarrow's streaming readers: `pyarrow.csv.open_csv`, a Parquet
file's `iter_batches` and `pyarrow.json.read_json` over blocks of whole lines, each told the columns to keep
before it reads, so a worker holds the selected columns of one batch (a few MiB) and what the metrics keep.

- Columns compared as text (labels, a prediction column, ids) are read from a CSV file as strings: a label
  column of "1", "2" and "yes" is three classes, not a conversion error in the 900th block. Any other column
  whose values change type after the first block (pyarrow infers types from it) fails with the column's name.
- The file must not change while it is read: its size and mtime, taken when the stream is made, are checked
  after each batch and at the end of every pass, and a change fails the evaluation saying so (its items
  would mix two versions).
- Each batch becomes a DataFrame (text columns stay Arrow-backed) whose index is the rows' positions in the
  file, so an item's default id is its row number whatever the batch.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from ..core.errors import InvalidArgument, one_line
from .file_reads import (
    KEEP_DATES,
    ReadBounds,
    clip,
    decoded_nbytes,
    leaves_of,
    parquet_batches_bounded,
    parquet_file,
    parquet_rows,
    unreadable,
)
from .limits import DEFAULT_MAX_PARQUET_BYTES

BATCH_BYTES = 8 << 20  # a CSV or JSON Lines block read at once (and a Parquet batch of about this many rows)
PARQUET_BATCH_ROWS = 131_072
_CSV_COLUMN = re.compile(r"In CSV column #(\d+)")


class DatasetStream:
    """The rows of one dataset file, as DataFrames of `columns`, batch by batch (see the module doc).

    `names` are the file's column names as the catalog reports them (pandas' names for a CSV, so that a
    duplicated header means the same column here); `text_columns` are read as strings from a CSV. `rows` is
    known in advance for Parquet only (its metadata); None otherwise.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        ref: str,
        names: Sequence[str],
        columns: Sequence[str],
        text_columns: Sequence[str] = (),
        bounds: ReadBounds | None = None,
        batch_bytes: int = BATCH_BYTES,
        max_parquet_bytes: int = DEFAULT_MAX_PARQUET_BYTES,
    ) -> None:
        self.path, self.fmt, self.ref = path, fmt, ref
        self.names, self.columns = list(names), list(dict.fromkeys(columns))
        self.text_columns = [c for c in dict.fromkeys(text_columns) if c in self.columns]
        self.bounds = bounds or ReadBounds()
        self.batch_bytes = batch_bytes  # a block read at once (at least a line's bound, for CSV and JSON Lines)
        self.max_parquet_bytes = max_parquet_bytes  # what a Parquet row group reads back as (parquet_batches_bounded)
        self.version = _version(path)
        self.rows: int | None = None
        if fmt == "parquet":
            with path.open("rb") as handle:
                # its row groups' rows, which must add up to its footer's (the rows its stream yields)
                metadata = parquet_file(handle, ref).metadata
                self.rows = parquet_rows(metadata, ref, leaves_of(metadata, self.columns))

    def estimated_rows(self) -> int:
        """The rows, exact for Parquet; for CSV and JSON Lines the lines counted (more than the rows when a
        quoted value holds a newline or a line is blank): a total for progress, not a bound."""
        if self.rows is not None:
            return self.rows
        lines = count_lines(self.path)
        return max(0, lines - 1) if self.fmt == "csv" else lines

    def exact_rows(self) -> int:
        """The rows, counted exactly (CSV, JSON Lines: a pass of this stream over one of its columns, the rows its
        passes yield; a sample's draw, a bound's check near its limit). The count reads the file as a pass does, its
        blocks, its errors and its change check (the version this stream was made at): a count of its own had read
        1 MiB blocks (a 2 MiB row failed the count, not the stream), a CSV's first column whatever the evaluation
        reads, and a JSON Lines file's lines (two records on one line, or records split by a bare CR, counted one)."""
        if self.rows is not None:
            return self.rows
        counter = copy.copy(self)
        counter.columns = (self.text_columns or self.columns or self.names)[:1]
        counter.text_columns = [c for c in self.text_columns if c in counter.columns]
        return sum(len(frame) for frame in counter)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        version = self.version  # every pass reads the version the first one read
        start = 0
        batches = {"csv": self._csv, "parquet": self._parquet, "jsonl": self._jsonl}[self.fmt]()
        while True:
            try:
                frame = next(batches, None)
            except InvalidArgument:
                self._check_unchanged(version)
                raise
            except (pa.ArrowException, ValueError, TypeError, OSError, UnicodeDecodeError) as error:
                # (TypeError: pandas' JSON reader given a line that is not an object, `[1, 2]`)
                self._check_unchanged(version)  # a file cut short mid-read says "changed", not "malformed"
                raise InvalidArgument(unreadable(self.ref, self.fmt, error)) from None
            self._check_unchanged(version)
            if frame is None:
                return
            frame.index = pd.RangeIndex(start, start + len(frame))
            start += len(frame)
            if self.rows is not None and start > self.rows:  # (parquet_rows: a writer's row groups say how many)
                raise InvalidArgument(f"dataset {clip(self.ref)} holds more rows than its Parquet footer says")
            if len(frame):
                yield frame

    def _check_unchanged(self, version: tuple[int, int]) -> None:
        try:
            now = _version(self.path)
        except FileNotFoundError:
            raise InvalidArgument(f"dataset {clip(self.ref)} was deleted while it was being read") from None
        if now != version:
            raise InvalidArgument(
                f"dataset {clip(self.ref)} changed while it was being read (size {version[0]:,} -> {now[0]:,} bytes, "
                "modified time changed): its items would mix two versions of the file; evaluate it again once it "
                "is no longer being written, or evaluate a copy"
            )

    def _csv(self) -> Iterator[pd.DataFrame]:
        reader = pa_csv.open_csv(
            self.path,
            # One thread: a worker is one of several, and a quoted-newline-aware parse on threads is five times
            # slower on one core (2.1 s against 0.4 s for a 1M-row, 57 MiB file, measured).
            read_options=pa_csv.ReadOptions(
                column_names=self.names,
                skip_rows=1,
                use_threads=False,
                block_size=max(self.batch_bytes, self.bounds.block_bytes),
            ),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(
                include_columns=self.columns,
                column_types={c: pa.string() for c in self.text_columns},
                strings_can_be_null=True,
            ),
        )
        with reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as error:
                    raise InvalidArgument(self._csv_problem(str(error))) from None
                yield batch.to_pandas()

    def _csv_problem(self, message: str) -> str:
        match = _CSV_COLUMN.search(message)
        if "conversion error" in message and match and int(match[1]) < len(self.names):
            column = self.names[int(match[1])]
            return (
                f"dataset {clip(self.ref)}: column {clip(column)} holds values of more than one type "
                f"({one_line(message.split(': ', 1)[-1])}); its type is inferred from the first rows, so make "
                "the column one type (or save the file as Parquet with the column as text)"
            )
        if "straddl" in message:
            block = max(self.batch_bytes, self.bounds.block_bytes)  # (what the reader was given: _csv)
            return (
                f"dataset {clip(self.ref)}: a row is longer than {block:,} bytes, the block a CSV file is read in "
                "(the max_dataset_header_bytes setting when larger)"
            )
        return f"cannot read dataset {clip(self.ref)} as CSV: {one_line(message)}"

    def _parquet(self) -> Iterator[pd.DataFrame]:
        # Its footer bounded, as for a listing, and each row group's selected columns within max_parquet_bytes: their
        # page headers before a page is decompressed, their decoded size as they are read (a dictionary page of one
        # long string and many indices to it, a few hundred bytes, had been decoded whole, gigabytes).
        with self.path.open("rb") as handle:
            rows = max(1, PARQUET_BATCH_ROWS * self.batch_bytes // BATCH_BYTES)
            batches = parquet_batches_bounded(handle, self.max_parquet_bytes, self.ref, self.columns, rows)
            # Batches that do not span row groups (a row group with a column read as dictionaries is read alone:
            # a legacy LZ4 file of 1,000-row groups gave 1,000 frames) are joined while their rows fit in a batch and
            # their decoded size in max_parquet_bytes, as _row_group_runs joins row groups. The batches held are
            # yielded once past half of it: the next batch is decoded while they are held (they had been held up to
            # the whole bound, and the next, up to the bound too, beside them).
            pending: list[pa.RecordBatch] = []
            held = size = 0
            for batch in batches:
                batch_size = sum(decoded_nbytes(column) for column in batch.columns)
                if pending and (held + batch.num_rows > rows or size + batch_size > self.max_parquet_bytes):
                    yield pa.Table.from_batches(pending).to_pandas()
                    pending, held, size = [], 0, 0
                pending.append(batch)
                held, size = held + batch.num_rows, size + batch_size
                if size > self.max_parquet_bytes // 2:
                    yield pa.Table.from_batches(pending).to_pandas()
                    pending, held, size = [], 0, 0
            if pending:
                yield pa.Table.from_batches(pending).to_pandas()

    def _jsonl(self) -> Iterator[pd.DataFrame]:
        """Blocks of whole lines, each parsed by pyarrow; a block pyarrow refuses (a field that changes type
        between records), or whose text columns it typed otherwise (a date-like label as a timestamp, integers
        with a null as floats: the same label would read differently from block to block), is parsed by pandas
        instead, its values kept as they are, as before."""
        # A line may be as long as a block wherever it is (a longest line of bounds.block_bytes had held only for the
        # line across a block's end: a 2 MiB record passed inside a block and failed across one), as for a CSV row.
        size = max(self.batch_bytes, self.bounds.block_bytes)
        for block in _line_blocks(self.path, size, size):
            try:
                table = pa_json.read_json(io.BytesIO(block))
            except pa.ArrowInvalid:
                table = None
            if table is not None and all(_as_text(table, column) for column in self.text_columns):
                frame = table.to_pandas()
            else:
                frame = self._text_kept(block, pd.read_json(io.BytesIO(block), lines=True, dtype=False, **KEEP_DATES))
            for column in self.columns:  # a field no record of this block has
                if column not in frame.columns:
                    frame[column] = None
            yield frame[self.columns]

    def _text_kept(self, block: bytes, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` (pandas' read of `block`) with its text columns that pandas read as floats (integers with a null:
        1.0, 0.0) taken as the file writes them: 1 -> "1" (as a CSV's are read, and pyarrow's blocks)."""
        floats = [c for c in self.text_columns if c in frame.columns and pd.api.types.is_float_dtype(frame[c].dtype)]
        if not floats:
            return frame
        records = [json.loads(line) for line in block.splitlines() if line.strip()]
        if len(records) != len(frame):  # (not one record a line: pandas' values kept)
            return frame
        for column in floats:
            values = [record.get(column) if isinstance(record, dict) else None for record in records]
            texts = [value if value is None or isinstance(value, str) else json.dumps(value) for value in values]
            frame[column] = pd.Series(texts, index=frame.index, dtype=object)
        return frame


def _as_text(table: pa.Table, column: str) -> bool:
    """Whether pyarrow read `column` as text (or found it absent or all null), as a text column must be."""
    if column not in table.column_names:
        return True
    kind = table.schema.field(column).type
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind))


def count_lines(path: Path) -> int:
    """Lines in a file (a last line without a newline counted too): one pass at the speed of the disk."""
    count = 0
    last = b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _version(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _line_blocks(path: Path, size: int, longest: int) -> Iterator[bytes]:
    """The file in blocks of about `size` bytes, each ending at a line's end; ValueError for a line (its bytes
    without its newline) longer than `longest`, wherever it is: each line is checked, not the block's end only (a
    9 MiB record had passed at one offset and been refused 100 kB earlier)."""
    too_long = ValueError(
        f"a line is longer than {longest:,} bytes, the block a JSON Lines file is read in (the "
        "max_dataset_header_bytes setting when larger)"
    )
    with path.open("rb") as handle:
        rest = b""
        while chunk := handle.read(size):
            data = rest + chunk
            end = data.rfind(b"\n") + 1
            rest = data[end:]
            if len(rest) > longest or _longer_line(data, end, longest):
                raise too_long
            if data[:end].strip():
                yield data[:end]
        if rest.strip():
            yield rest


def _longer_line(data: bytes, end: int, longest: int) -> bool:
    """Whether a line of data[:end] (whole lines) is longer than `longest` bytes: from each line's start, the last
    newline within `longest` bytes ends the lines checked so far (a few steps a block, not one a line)."""
    start = 0
    while end - 1 - start > longest:  # (the line from `start` may be longer: a newline within its reach?)
        newline = data.rfind(b"\n", start, start + longest + 1)
        if newline < 0:
            return True
        start = newline + 1
    return False
