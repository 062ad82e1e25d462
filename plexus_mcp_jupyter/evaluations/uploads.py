"""A large DataFrame registered in parts: the notebook sends it as Arrow IPC record batches, a bounded request
each, instead of one Parquet body refused above the server's request limit.

`begin` opens an upload for a caller (a random id, the name and whether to replace, checked now and again at
the end); each `append` parses one part (an Arrow IPC stream, in the catalog's threads, never on the event loop)
and writes it to a Parquet file under the registered directory's `.uploads/` as a row group; `commit` closes the
file and renames it into place atomically (`DatasetCatalog.place`), so a reader never sees half a dataset; an
upload aborted, failed, or left idle past `idle_seconds` is deleted. Parts come in order (`part` counts from 0;
a part sent again after a lost answer is refused, saying which part is expected), all with the first part's
schema, the upload's total bytes are bounded (`max_bytes`: the max_dataset_upload_bytes setting), and a caller
has at most MAX_OPEN_PER_CALLER uploads in progress. Only the caller who began an upload can see it: another
caller's id answers as an unknown one.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.errors import InvalidArgument, NotFound, one_line
from .datasets import DatasetCatalog, DatasetInfo
from .file_reads import check_columns

MAX_OPEN_PER_CALLER = 4  # uploads in progress per caller: each may reach max_bytes on disk


@dataclass
class _Upload:
    id: str
    name: str
    replace: bool
    owner: str | None
    path: Path
    touched: float
    lock: threading.Lock = field(default_factory=threading.Lock)  # one part at a time
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    part: int = 0  # the next part expected
    rows: int = 0
    bytes: int = 0
    closed: bool = False


class DatasetUploads:
    """The uploads in progress on this server (in memory: an upload is one client's, to one server)."""

    def __init__(self, catalog: DatasetCatalog, *, max_bytes: int, idle_seconds: float = 900.0) -> None:
        self.catalog, self.max_bytes, self.idle_seconds = catalog, max_bytes, idle_seconds
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        return self.catalog.registered_dir / ".uploads"

    def begin(self, name: str, *, replace: bool, owner: str | None, declared: int | None = None) -> str:
        """A new upload's id (the caller checked the name is theirs to use; without `replace`, its being free is
        checked again at commit). `declared`: the frame's size as the client knows it, checked against the
        caller's quota of registered bytes now (the file's own size is checked at commit)."""
        self.catalog.check_registered_name(name)
        self.catalog.check_quota(owner, name, declared or 1)
        self.expire()
        self.directory.mkdir(parents=True, exist_ok=True)
        upload_id = secrets.token_hex(16)
        upload = _Upload(upload_id, name, replace, owner, self.directory / f"{upload_id}.parquet", time.monotonic())
        with self._lock:
            if sum(u.owner == owner for u in self._uploads.values()) >= MAX_OPEN_PER_CALLER:
                raise InvalidArgument(
                    f"you have {MAX_OPEN_PER_CALLER} uploads in progress already: finish (commit) or abandon "
                    "(DELETE) one first; an idle one expires after 15 minutes"
                )
            self._uploads[upload_id] = upload
        return upload_id

    def append(self, upload_id: str, owner: str | None, part: int, body: bytes) -> dict[str, Any]:
        """Add one part (an Arrow IPC stream of record batches); the upload's rows and bytes so far."""
        upload = self._get(upload_id, owner)
        with upload.lock:
            if upload.closed:
                raise NotFound(f"upload {upload_id!r} is over (committed, aborted or expired)")
            if part != upload.part:
                raise InvalidArgument(
                    f"upload {upload_id!r} expects part {upload.part}, not {part}: parts are sent in order from 0, "
                    "once each"
                )
            self._check_size(upload, len(body))
            try:
                refuse_compressed_ipc(body, part)  # before any batch is read: decompressing is the bomb
                table = pa.ipc.open_stream(pa.BufferReader(body)).read_all()
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise InvalidArgument(f"part {part} is not an Arrow IPC stream: {one_line(exc)}") from None
            if upload.schema is None:
                check_columns(table.schema.names, self.catalog.bounds, f"registered:{upload.name}")
                if len(set(table.schema.names)) != len(table.schema.names):
                    raise InvalidArgument(f"the DataFrame for {upload.name!r} has duplicate column names")
                upload.schema = table.schema.remove_metadata()
                upload.writer = pq.ParquetWriter(upload.path, upload.schema)
            elif not table.schema.remove_metadata().equals(upload.schema):
                raise InvalidArgument(
                    f"part {part} has the columns {_shown(table.schema)}, not those of part 0 ({_shown(upload.schema)})"
                )
            assert upload.writer is not None
            upload.writer.write_table(table.replace_schema_metadata(None))
            upload.part += 1
            upload.rows += table.num_rows
            upload.bytes += len(body)
            upload.touched = time.monotonic()
            return {"upload_id": upload_id, "parts": upload.part, "rows": upload.rows, "bytes": upload.bytes}

    def admit_part(self, upload_id: str, owner: str | None, declared: int | None) -> int:
        """What the upload `upload_id` of `owner` may still take (max_bytes less its parts'), checked before a part is
        read: NotFound as for a part when it is not theirs or is over, and a part whose `declared` size (None: not
        known, a chunked body) passes max_bytes discards the upload (InvalidArgument), as `append` does."""
        upload = self._get(upload_id, owner)
        with upload.lock:
            if upload.closed:
                raise NotFound(f"upload {upload_id!r} is over (committed, aborted or expired)")
            self._check_size(upload, declared or 0)
            return self.max_bytes - upload.bytes

    def _check_size(self, upload: _Upload, adding: int) -> None:
        if upload.bytes + adding > self.max_bytes:
            self._drop(upload)
            raise InvalidArgument(
                f"the upload passed {self.max_bytes / 2**20:,.0f} MiB (the max_dataset_upload_bytes setting) "
                "and was discarded: keep only the columns the evaluation needs, or write the frame as Parquet "
                "under the Jupyter root and evaluate that path"
            )

    def commit(self, upload_id: str, owner: str | None) -> DatasetInfo:
        """The registered dataset made of the parts sent (renamed into place whole)."""
        upload = self._get(upload_id, owner)
        with upload.lock:
            if upload.closed:
                raise NotFound(f"upload {upload_id!r} is over (committed, aborted or expired)")
            try:
                if upload.writer is None or upload.rows == 0:
                    raise InvalidArgument(f"upload {upload_id!r} has no rows: send at least one part with rows")
                upload.writer.close()
                upload.writer = None
                return self.catalog.admit(upload.path, upload.name, owner=upload.owner, replace=upload.replace)
            finally:
                self._drop(upload)

    def abort(self, upload_id: str, owner: str | None) -> None:
        upload = self._get(upload_id, owner)
        with upload.lock:
            self._drop(upload)

    def expire(self) -> None:
        """Drop uploads idle for longer than `idle_seconds` (a notebook that died mid-upload)."""
        now = time.monotonic()
        with self._lock:
            stale = [u for u in self._uploads.values() if now - u.touched > self.idle_seconds]
        for upload in stale:
            with upload.lock:
                self._drop(upload)

    def close(self) -> None:
        with self._lock:
            uploads = list(self._uploads.values())
        for upload in uploads:
            with upload.lock:
                self._drop(upload)

    def close_upload(self, upload_id: str, owner: str | None) -> bool:
        """Discard the upload (a part read past what it has left) under its lock, so a part or commit under way ends
        first and one after it is refused as for an upload over. False when it is not theirs or was over already
        (a commit that held the lock registered it)."""
        try:
            upload = self._get(upload_id, owner)
        except NotFound:
            return False
        with upload.lock:
            if upload.closed:
                return False
            self._drop(upload)
            return True

    def _get(self, upload_id: str, owner: str | None) -> _Upload:
        with self._lock:
            upload = self._uploads.get(upload_id)
        if upload is None or upload.owner != owner:  # another caller's upload is as good as unknown
            raise NotFound(f"no upload {upload_id!r} in progress (it may have expired, been aborted or committed)")
        return upload

    def _drop(self, upload: _Upload) -> None:
        """Forget an upload and delete its file (under its lock)."""
        upload.closed = True
        with self._lock:
            self._uploads.pop(upload.id, None)
        if upload.writer is not None:
            with contextlib.suppress(pa.ArrowException, OSError):
                upload.writer.close()
            upload.writer = None
        upload.path.unlink(missing_ok=True)


# Arrow's IPC metadata (format/Message.fbs), read by hand: pyarrow decompresses a batch's body as it reads it, and
# says whether it was compressed only then. Field numbers in their tables:
_MESSAGE_HEADER_TYPE, _MESSAGE_HEADER = 1, 2  # Message.header_type (a ubyte), Message.header (the union's table)
_DICTIONARY_BATCH, _RECORD_BATCH = 2, 3  # MessageHeader values
_DICTIONARY_DATA = 1  # DictionaryBatch.data: its RecordBatch
_RECORD_BATCH_COMPRESSION = 3  # RecordBatch.compression: a BodyCompression table, absent when uncompressed


def _field_position(meta: bytes, table: int, index: int) -> int | None:
    """Where field `index` of the flatbuffer table at `table` is stored, or None when it is absent."""
    vtable = table - int.from_bytes(meta[table : table + 4], "little", signed=True)
    vtable_size = int.from_bytes(meta[vtable : vtable + 2], "little")
    if 4 + 2 * index + 2 > vtable_size:
        return None
    offset = int.from_bytes(meta[vtable + 4 + 2 * index : vtable + 6 + 2 * index], "little")
    return table + offset if offset else None


def _subtable(meta: bytes, table: int, index: int) -> int | None:
    at = _field_position(meta, table, index)
    return None if at is None else at + int.from_bytes(meta[at : at + 4], "little")


def body_compressed(metadata: bytes) -> bool:
    """Whether an Arrow IPC message (its flatbuffer metadata) is a record or dictionary batch with a compressed
    body (LZ4 or ZSTD buffers). Malformed metadata raises ValueError or IndexError."""
    root = int.from_bytes(metadata[0:4], "little")
    kind_at = _field_position(metadata, root, _MESSAGE_HEADER_TYPE)
    kind = metadata[kind_at] if kind_at is not None else 0
    batch = _subtable(metadata, root, _MESSAGE_HEADER)
    if batch is None or kind not in (_RECORD_BATCH, _DICTIONARY_BATCH):
        return False
    if kind == _DICTIONARY_BATCH:
        batch = _subtable(metadata, batch, _DICTIONARY_DATA)
        if batch is None:
            return False
    return _field_position(metadata, batch, _RECORD_BATCH_COMPRESSION) is not None


def refuse_compressed_ipc(body: bytes, part: int) -> None:
    """InvalidArgument when an upload's part holds a batch with a compressed body: a few kilobytes of ZSTD can
    claim gigabytes, and pyarrow allocates them as it reads (a decompression bomb). Only the messages' metadata
    is read here; the notebook client sends its parts uncompressed."""
    for message in pa.ipc.MessageReader.open_stream(pa.BufferReader(body)):
        try:
            compressed = body_compressed(message.metadata.to_pybytes())
        except (ValueError, IndexError):
            raise InvalidArgument(
                f"part {part} is not an Arrow IPC stream: a message's metadata is malformed"
            ) from None
        if compressed:
            raise InvalidArgument(
                f"part {part} has a compressed record batch (LZ4 or ZSTD IPC body compression), which this server "
                "does not read (its size is known only once decompressed): send the batches uncompressed "
                "(pyarrow.ipc.new_stream without IpcWriteOptions(compression=...)); the request is bounded anyway"
            )


def _shown(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in list(schema)[:20]) + (" ..." if len(schema) > 20 else "")
