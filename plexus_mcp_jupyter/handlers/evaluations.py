"""`{base_url}plexus/api/evaluations` and `.../datasets`: the REST face of EvaluationService.

Same arguments, filters, cursors and error messages as the MCP tools. `POST .../datasets` receives a
DataFrame from a kernel (the notebook client's `register_dataset`) as Parquet, or as JSON records.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pandas as pd
from tornado import web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import StreamClosedError

from ..core.errors import InvalidArgument, NotFound, PlexusError, bounded
from ..core.requests import paged
from ..evaluations.datasets import BODY_QUOTA_FACTOR
from ..evaluations.item_files import ARROW_STREAM_TYPE as ARROW_STREAM
from ..evaluations.item_files import ArrowStream
from ..evaluations.requests import (
    BeginUpload,
    CreateEvaluation,
    DescribeDataset,
    GetEvaluation,
    GetEvaluationResults,
    ListDatasets,
    ListEvaluations,
    RegisterDataset,
    UploadPart,
)
from ..security.http import BadJSON, parse_json_in_pieces
from ..security.identity import Principal
from ..security.ratelimit import RateLimiter
from .base import BodyHandler, BodylessHandler, PlexusHandler, http_error
from .jupyter_compat import response_finished
from .request_body import StreamedBody, declared_length

PARQUET_TYPES = ("application/vnd.apache.parquet", "application/x-parquet", "application/octet-stream")


def _results_request(handler: PlexusHandler, evaluation_id: str) -> GetEvaluationResults:
    """A results request from the query string (?only_mismatches=&label=&score=&limit=&cursor=), pages bounded
    by the server's max_page_size: the pages, the Arrow stream and the item files' manifest read it alike."""
    return handler.query_request(
        paged(GetEvaluationResults, handler.runtime.manager.max_page_size), evaluation_id=evaluation_id
    )


async def _may_register(handler: PlexusHandler, name: str, replace: bool) -> bool:
    """Whether the caller may register `name` now: False once a 409 is answered (taken, and not `replace`);
    403 when it is another caller's dataset (replacing it would change what their evaluations score). The
    registered directory is read in the catalog's threads (it holds as many files as datasets were registered)."""
    catalog = handler.runtime.catalog

    def taken_by() -> tuple[bool, str | None]:
        taken = name in catalog.registered_names()
        return taken, catalog.owner_of(name) if taken else None

    taken, owner = await catalog.run(taken_by)
    if not replace and taken:
        handler.reply(
            {
                "message": f"a dataset named {name!r} is already registered: pass replace=true to replace it, "
                "or choose another name"
            },
            status=409,
        )
        return False
    if taken and not handler.principal.is_admin and owner != handler.principal.owner:
        raise web.HTTPError(
            403,
            f"permission denied: dataset {name!r} was registered by "
            f"{owner or 'the notebook user'}; only they or an admin may replace it",
        )
    return True


class EvaluationsHandler(BodyHandler):
    async def get(self) -> None:
        """List evaluations: ?status=COMPLETED,RUNNING&type=accuracy&limit=20&cursor=... (ListEvaluations)."""
        service = self.runtime.evaluations
        try:
            request = self.query_request(paged(ListEvaluations, self.runtime.manager.max_page_size))
            views, next_cursor = await service.list_evaluations(request, viewer=self.principal.viewer)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply({"evaluations": views, "next_cursor": next_cursor})

    async def post(self) -> None:
        """Create an evaluation (the arguments of create_evaluation as a JSON object): 201 with it."""
        self.require("evaluate")
        body = await self.json_body()
        try:
            request = CreateEvaluation.parse(body)  # a refused body: 400 naming each bad field
            view, _task = await self.runtime.evaluations.create(
                request, owner=self.identity, trusted=self.principal.is_admin, role=self.principal.role.value
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.set_header("Location", self.request.path.rstrip("/") + "/" + view["evaluation_id"])
        self.reply(view, status=201)


class EvaluationHandler(BodylessHandler):
    async def get(self, evaluation_id: str) -> None:
        try:
            request = self.query_request(GetEvaluation, evaluation_id=evaluation_id)
            self.reply(await self.runtime.evaluations.get(request.evaluation_id, self.principal.viewer))
        except PlexusError as exc:
            raise http_error(exc) from None


class EvaluationResultsHandler(BodylessHandler):
    async def get(self, evaluation_id: str) -> None:
        """Per-item results: ?only_mismatches=true&label=...&score=...&limit=20&cursor=...; with
        `Accept: application/vnd.apache.arrow.stream`, every item (no limit, no cursor) as an Arrow IPC stream."""
        service = self.runtime.evaluations
        as_arrow = ARROW_STREAM in (self.request.headers.get("Accept") or "")
        try:
            request = _results_request(self, evaluation_id)
            # item files are read off the loop, in the catalog's threads
            if as_arrow:
                stream = await service.catalog.run(service.item_stream, request, self.principal.viewer)
            else:
                items, next_cursor, asked = await service.catalog.run(service.results, request, self.principal.viewer)
        except PlexusError as exc:
            raise http_error(exc) from None
        if as_arrow:
            await self._arrow(stream)
            return
        self.reply({**asked, "items": items, "next_cursor": next_cursor})

    async def _arrow(self, stream: ArrowStream) -> None:
        """The items as Arrow IPC, a row group at a time, each piece read and encoded in the catalog's threads and
        flushed before the next: bounded memory, the loop free, whatever the evaluation's size."""
        service = self.runtime.evaluations
        started = False
        while True:
            try:
                piece = await service.catalog.run(stream.next)
            except PlexusError as exc:  # an item file that cannot be read (item_files.DamagedItems)
                if not started:
                    raise http_error(exc) from None
                self.log.warning("an Arrow stream of items cut short: %s", bounded(str(exc)))
                connection = self.request.connection
                if isinstance(connection, HTTP1Connection):  # the client sees the response cut, not an end
                    connection.close()
                return
            if piece is None:
                return
            if not started:
                self.set_header("Content-Type", ARROW_STREAM)
                started = True
            self.write(piece)
            try:
                await self.flush()
            except StreamClosedError:  # the client went away: stop reading for it
                return


class EvaluationItemFilesHandler(BodylessHandler):
    async def get(self, evaluation_id: str) -> None:
        """Where the items are (?only_mismatches=...&label=...&score=..., as results): the chunk files' absolute
        paths, sizes and mtimes, the filter as applied, the Arrow schema; for a kernel on the same disk, which
        reads them itself. Only the evaluation's owner or an admin (403 otherwise; 404 if it cannot see it)."""
        service = self.runtime.evaluations
        try:
            request = _results_request(self, evaluation_id)
            manifest = await service.catalog.run(  # lists and stats the chunk files: off the loop
                service.item_files, request, self.principal.viewer, self.principal.owner
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply(manifest)


class DatasetHandler(BodylessHandler):
    async def get(self, ref: str) -> None:
        """One dataset: rows, columns, and the label distribution (?label_column=...; default 'label')."""
        try:
            label_column = self.query_request(DescribeDataset, ref=ref).label_column
            if label_column in self.runtime.evaluations.redacted:
                raise InvalidArgument(f"column {label_column!r} is redacted (redact_columns): its values are not shown")
            info = await self.runtime.catalog.run(self.runtime.catalog.describe, ref, label_column)
        except PlexusError as exc:
            raise http_error(exc) from None
        data = info.to_dict()
        if data.get("label_column") in self.runtime.evaluations.redacted:  # the default `label` column
            data["label_distribution"] = None
        self.reply(data)

    async def delete(self, ref: str) -> None:
        """Delete a registered dataset (`registered:<name>`): its owner or an admin; 204. Frees its bytes from
        its owner's quota (max_registered_bytes_per_principal)."""
        self.require("register")
        catalog = self.runtime.catalog
        try:
            if not ref.startswith("registered:"):
                raise InvalidArgument(
                    f"only registered datasets can be deleted (registered:<name>), not {ref[:100]!r}: files under "
                    "the Jupyter root are the user's, and examples ship with the package"
                )
            name = catalog.check_registered_name(ref.removeprefix("registered:"))
            owner = await catalog.run(catalog.owner_of, name)
            if name not in await catalog.run(catalog.registered_names) or not self.principal.sees_owner(owner):
                raise NotFound(f"no registered dataset {name!r}")  # another key's is as good as unknown
            if not self.principal.is_admin and owner != self.principal.owner:
                raise web.HTTPError(
                    403,
                    f"permission denied: dataset {name!r} was registered by {owner or 'the notebook user'}; only "
                    "they or an admin may delete it",
                )
            await catalog.run(catalog.unregister, name)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.set_status(204)
        self.finish()


class DatasetBodyHandler(StreamedBody, PlexusHandler):  # type: ignore[misc]  # (prepare: as BodyHandler's)
    """A handler taking a DataFrame's bytes (Parquet, JSON records, an Arrow IPC part): read only once `prepare` has
    admitted the sender (handlers/request_body.py), so an unauthenticated body is refused unread, and so is one its
    sender may not register (403: the role, or the quota of registered bytes) or one over max_dataset_upload_bytes
    (413; `admit_request`, from the headers). Not charged to the byte budget, and bounded by Jupyter's max_body_size
    (tornado's) too."""

    _limit: int | None = None  # what `admit_request` found this request may send (None: max_dataset_upload_bytes)

    def body_limit(self) -> int:
        return self.upload_limit()

    def upload_limit(self) -> int:
        """What max_dataset_upload_bytes lets this request send (a part: what its upload has left of it)."""
        return int(self.runtime.uploads.max_bytes) if self._limit is None else self._limit

    def _too_large(self, size: int) -> web.HTTPError:
        if self._bodyless():
            return super()._too_large(size)
        return web.HTTPError(413, self.too_large_message(size))

    def too_large_message(self, size: int) -> str:
        return (
            f"the request body is {size:,} bytes, more than the {self.upload_limit():,} a dataset may have (the "
            "max_dataset_upload_bytes setting)"
        )

    def body_budget(self) -> RateLimiter | None:
        return None

    def body_sender(self) -> Principal | None:
        return None


class DatasetsHandler(DatasetBodyHandler):
    body_methods = ("POST",)  # (a registration)
    _registration: RegisterDataset | None = None  # the query, read once (admit_request) for the body's method
    _quota: tuple[int, int] | None = None  # the sender's registered bytes and datasets, when a quota applies

    async def admit_request(self) -> None:
        """A registration's role, arguments and quota, before its body is read: the role (403), the query (400), and
        the caller's quota of registered bytes: 403 for a caller already at it, or whose body's declared size is more
        than BODY_QUOTA_FACTOR times what it has left (a chunked body once past that, `_too_large`). What is stored
        decides (`admit`, once the body is parsed and written: JSON records are several times their Parquet, and a
        Parquet body is re-encoded), so a body is refused unread only that far past it: what a sender near its quota
        can make the server parse is 16 x what it has left."""
        self.require("register")
        declared = declared_length(self.request.headers)
        try:
            self._registration = request = self.query_request(RegisterDataset)
            self._quota = await self.runtime.catalog.run(self._quota_for, request.name, declared)
        except PlexusError as exc:
            raise http_error(exc) from None

    def _quota_for(self, name: str, declared: int | None) -> tuple[int, int] | None:
        """The sender's use of its quota (None: none applies), once it has some left and its body's declared size is
        within BODY_QUOTA_FACTOR x that."""
        catalog = self.runtime.catalog
        use = catalog.quota_use(self.principal.owner, name)
        if use is not None:
            left = catalog.max_registered_bytes - use[0]
            if left <= 0 or (declared is not None and declared > BODY_QUOTA_FACTOR * left):
                raise catalog.quota_refusal(name, declared or 0, *use, sent=True)
        return use

    def body_limit(self) -> int:
        """max_dataset_upload_bytes, or less: BODY_QUOTA_FACTOR x what the sender's quota of registered bytes has
        left."""
        if self._quota is None:
            return self.upload_limit()
        left = max(0, self.runtime.catalog.max_registered_bytes - self._quota[0])
        return min(self.upload_limit(), BODY_QUOTA_FACTOR * left)

    def _too_large(self, size: int) -> web.HTTPError:
        quota, registration = self._quota, self._registration
        if self._bodyless() or quota is None or registration is None or size > self.upload_limit():
            return super()._too_large(size)
        # (a chunked body past BODY_QUOTA_FACTOR x what its sender's quota has left: refused as a declared one is)
        refusal = self.runtime.catalog.quota_refusal(registration.name, size, *quota, sent=True)
        return web.HTTPError(403, bounded(str(refusal)))

    async def get(self) -> None:
        """Datasets: examples, registered and files under the root (?include_files=false to skip files)."""
        try:
            request = self.query_request(ListDatasets)
            datasets = await self.runtime.catalog.run(
                self.runtime.evaluations.datasets, include_files=request.include_files
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply({"datasets": datasets})

    async def post(self) -> None:
        """Register a DataFrame: ?name=<name>[&replace=true], body Parquet, or JSON {"records": [...]}.

        201 with the dataset's description; 409 when the name is taken (unless replace=true).
        """
        self.require("register")
        request = self._registration
        assert request is not None  # (admit_request read it before the body, or the request was refused)
        try:
            name, replace = request.name, request.replace  # the name as sent: one with a control character is refused
            catalog = self.runtime.catalog
            owner = self.principal.owner
            # Parsing and writing Parquet take a while for a big frame: off the event loop, in the catalog's threads.
            frame = await catalog.run(self._frame, name, self.body)
            if not await _may_register(self, name, replace):
                return
            info = await catalog.run(catalog.register, name, frame, replace=replace, owner=owner)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply(info.to_dict(), status=201)

    def _frame(self, name: str, body: bytes) -> pd.DataFrame:
        content_type = (self.request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if not body:
            raise InvalidArgument("the request has no body: send the DataFrame as Parquet or JSON records")
        if content_type in PARQUET_TYPES:  # its footer's sizes checked first, its decoded size as it is read
            return self.runtime.catalog.read_parquet_body(body, name)
        if content_type == "application/json":
            try:  # in a thread already (see post), a piece at a time (up to ServerApp.max_body_size: 512 MiB)
                data: Any = parse_json_in_pieces(
                    body, self.runtime.settings.max_dataset_json_values, "max_dataset_json_values"
                )
            except BadJSON as exc:
                hint = "; send a larger DataFrame as Parquet" if "max_dataset_json_values" in str(exc) else ""
                raise InvalidArgument(f"the request body is {exc}{hint}") from None
            if not isinstance(data, dict):
                raise InvalidArgument("the request body must be a JSON object")
            records = data.get("records")
            if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
                raise InvalidArgument('JSON bodies are {"records": [{column: value, ...}, ...]} with at least one row')
            return pd.DataFrame.from_records(records)
        raise InvalidArgument(
            f"unsupported Content-Type {content_type or '(none)'!r}; send "
            "application/vnd.apache.parquet or application/json"
        )


class DatasetUploadsHandler(BodylessHandler):
    async def post(self) -> None:
        """Begin registering a DataFrame in parts: ?name=<name>[&replace=true]; 201 {"upload_id", "max_bytes"}.

        Then PUT each part (an Arrow IPC stream) to `datasets/uploads/{upload_id}?part=N` (N from 0, in order),
        and POST to `datasets/uploads/{upload_id}` to register the whole (DELETE to abandon it)."""
        self.require("register")
        try:
            request = self.query_request(BeginUpload)
            if not await _may_register(self, request.name, request.replace):
                return
            uploads = self.runtime.uploads
            upload_id = await self.runtime.catalog.run(
                uploads.begin,
                request.name,
                replace=request.replace,
                owner=self.principal.owner,
                declared=request.bytes,  # the frame's size, if the client says: checked now
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply({"upload_id": upload_id, "max_bytes": uploads.max_bytes}, status=201)


class DatasetUploadHandler(DatasetBodyHandler):
    body_methods = ("PUT",)  # (a commit or an abort reads none: past 64 KiB, refused unread)
    _discarded: bool | None = None  # (a chunked part past what its upload has left: `data_received`)
    _part: UploadPart | None = None  # the query, read once (admit_request) for a PUT

    async def admit_request(self) -> None:
        """A part's role, arguments and upload, before its body is read: 403 for a role that may not register, 400
        for a bad part number, 404 for an upload that is not the caller's (or is over), 413 for a declared size past
        what the upload has left of max_dataset_upload_bytes (the upload discarded, as when a part read passes it); a
        chunked part is bounded by what is left as it arrives."""
        self.require("register")
        try:  # a bad argument is a 400 naming it, whatever the upload (as the part's own handling says)
            self._part = self.query_request(UploadPart, upload_id=self.path_kwargs["upload_id"])
        except PlexusError as exc:
            raise http_error(exc) from None
        uploads, declared = self.runtime.uploads, declared_length(self.request.headers)
        try:
            self._limit = await self.runtime.catalog.run(
                uploads.admit_part, self.path_kwargs["upload_id"], self.principal.owner, declared
            )
        except InvalidArgument as exc:
            raise web.HTTPError(413, bounded(str(exc))) from None
        except PlexusError as exc:
            raise http_error(exc) from None

    def too_large_message(self, size: int) -> str:
        over = (
            "was over already (committed or aborted while the part arrived)"
            if self._discarded is False
            else "was discarded"
        )
        return (
            f"the part is more than the {self.body_limit():,} bytes this upload has left of "
            f"{self.runtime.uploads.max_bytes:,} (the max_dataset_upload_bytes setting), and the upload {over}: keep "
            "only the columns the evaluation needs, or write the frame as Parquet under the Jupyter root and evaluate "
            "that path"
        )

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        """A chunked part whose chunk passes what the upload has left (a declared one is refused, and its upload
        discarded, by `admit_request`) discards its upload in the catalog's threads under the upload's lock (a part
        or commit under way ends first; one sent after is refused 404), the chunk and the rest unread meanwhile,
        then is answered 413: the discard had been queued, or the upload marked over without its lock, while the 413
        said "discarded" (a commit already past its check could still register it)."""
        if (
            self._discarded is None
            and self._refusal is None
            and not self._bodyless()
            and not response_finished(self)
            and self._received + len(chunk) > self._bound()
        ):
            return self._discard_then(chunk)
        return super().data_received(chunk)

    async def _discard_then(self, chunk: bytes) -> None:
        uploads = self.runtime.uploads
        try:
            self._discarded = await self.runtime.catalog.run(
                uploads.close_upload, self.path_kwargs["upload_id"], self.principal.owner
            )
        except Exception:
            self._discarded = False
            self.log.exception("discarding an upload past its bound")
        super().data_received(chunk)

    async def put(self, upload_id: str) -> None:
        """One part: ?part=N, the body an Arrow IPC stream of record batches (parsed in the catalog's threads)."""
        self.require("register")
        request = self._part
        assert request is not None  # (admit_request read it before the body, or the request was refused)
        try:
            uploads = self.runtime.uploads
            progress = await self.runtime.catalog.run(
                uploads.append, request.upload_id, self.principal.owner, request.part, self.body
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply(progress)

    async def post(self, upload_id: str) -> None:
        """Register the parts sent as one dataset (renamed into place whole): 201 with its description."""
        self.require("register")
        try:
            uploads = self.runtime.uploads
            info = await self.runtime.catalog.run(uploads.commit, upload_id, self.principal.owner)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply(info.to_dict(), status=201)

    async def delete(self, upload_id: str) -> None:
        """Abandon an upload (its parts are deleted)."""
        self.require("register")
        try:
            await self.runtime.catalog.run(self.runtime.uploads.abort, upload_id, self.principal.owner)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.set_status(204)
        self.finish()
