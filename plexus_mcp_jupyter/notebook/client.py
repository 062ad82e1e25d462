"""PlexusClient: the kernel's connection to its Jupyter server's Plexus API (REST + one event stream).

Where the server is, in order: the arguments of `connect(url, token)`; the environment variables
`PLEXUS_MCP_URL` and `PLEXUS_MCP_TOKEN`; the JSON file named by `PLEXUS_MCP_CONNECTION_FILE` (keys `url`
and `token`, written by the server readable only by the user). REST calls use one `requests` session
with timeouts; events come from one WebSocket read by a daemon thread (stream.py) and feed the TaskState
mirrors (mirror.py) and the listeners registered with `on_event`. Nothing blocks the kernel's main thread
except the REST call it asked for.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import requests

from ..core.errors import InvalidArgument
from ..core.requests import BulkRequest, RequestModel
from .errors import (
    PlexusAPIError,
    PlexusAuthError,
    PlexusConflict,
    PlexusConnectionError,
    PlexusError,
    PlexusInputError,
    PlexusNotFound,
)
from .mirror import TaskState, parse_time
from .scoring import KernelScorer, answer, check_scorer
from .stream import EventStream

log = logging.getLogger("plexus_mcp_jupyter.notebook")

ENV_URL = "PLEXUS_MCP_URL"
ENV_TOKEN = "PLEXUS_MCP_TOKEN"
ENV_CONNECTION_FILE = "PLEXUS_MCP_CONNECTION_FILE"
# Where the kernel sees the server's item files when not at the server's own paths (a container mounting the
# same volume elsewhere): "server prefix=kernel prefix".
ENV_ITEMS_PATH_MAP = "PLEXUS_MCP_ITEMS_PATH_MAP"
DEFAULT_TIMEOUT = 30.0
STREAM_WAIT = 10.0  # seconds to wait for the event stream when something needs it
RECENT = 1000  # tasks whose latest event is kept, so a mirror made late starts from it
HOW_TO_CONNECT = (
    "call plexus.connect(url, token) with the Jupyter server's URL (e.g. http://localhost:8888/) "
    "and token (`jupyter server list` shows both), or set PLEXUS_MCP_URL and PLEXUS_MCP_TOKEN"
)

EventListener = Callable[[dict[str, Any]], None]


R = TypeVar("R", bound=RequestModel)


def request_of(model: type[R], fields: dict[str, Any]) -> R:
    """The server's request model, built in the kernel: a bad argument is refused at once (PlexusInputError), in
    the server's words, before anything is sent."""
    try:
        return model.parse(fields)
    except InvalidArgument as exc:
        raise PlexusInputError(str(exc)) from None


def resolve_connection(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """The server's URL (ending in '/') and token: arguments, else environment, else the connection file."""
    if url is None:
        url = os.environ.get(ENV_URL) or None
        if url is not None and token is None:
            token = os.environ.get(ENV_TOKEN) or None
    if url is None and os.environ.get(ENV_CONNECTION_FILE):
        path = os.environ[ENV_CONNECTION_FILE]
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
            url, token = info["url"], token or info.get("token")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlexusConnectionError(
                f"cannot read the Plexus connection file {path!r} ({ENV_CONNECTION_FILE}): {exc}; {HOW_TO_CONNECT}"
            ) from None
    if url is None:
        raise PlexusConnectionError(f"no Plexus server is known to this kernel: {HOW_TO_CONNECT}")
    if not url.startswith(("http://", "https://")):
        raise PlexusConnectionError(
            f"the server URL must start with http:// or https://, not {url!r}; {HOW_TO_CONNECT}"
        )
    return (url if url.endswith("/") else url + "/"), token


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return response.text[:500]


def _path_map(value: str | None) -> tuple[str, str] | None:
    """ENV_ITEMS_PATH_MAP's value as (server prefix, kernel prefix); None when unset or not of that form."""
    server, sep, kernel = (value or "").partition("=")
    if not sep or not server.strip() or not kernel.strip():
        if value:
            log.warning("%s=%r is not 'server prefix=kernel prefix': ignored", ENV_ITEMS_PATH_MAP, value)
        return None
    return server.strip(), kernel.strip()


class PlexusClient:
    """REST calls and the event stream of one Jupyter server. Create it with `connect()`."""

    def __init__(self, url: str, token: str | None, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"token {token}"
        self.server_info: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._listeners: list[EventListener] = []
        self._mirrors: dict[str, TaskState] = {}
        self._recent: OrderedDict[str, tuple[dict[str, Any], int | None, float | None]] = OrderedDict()
        self._scorers: dict[str, KernelScorer] = {}
        self._replies: deque[tuple[str, threading.Event, list[dict[str, Any]]]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._stream: EventStream | None = None
        # (server prefix, kernel prefix) of the item files' paths; see ENV_ITEMS_PATH_MAP and local_items.
        self.items_path_map: tuple[str, str] | None = _path_map(os.environ.get(ENV_ITEMS_PATH_MAP))
        if check:
            self.check()

    def __repr__(self) -> str:
        state = "events connected" if self._stream and self._stream.connected.is_set() else "events not connected"
        return f"<PlexusClient {self.url} ({state})>"

    # -- REST -------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call `{url}plexus/api/{path}` and return the JSON answer; errors become PlexusError subclasses."""
        url = self.url + "plexus/api/" + path
        try:
            response = self.session.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except requests.ConnectionError as exc:
            raise PlexusConnectionError(
                f"cannot reach the Plexus server at {self.url} ({exc.__class__.__name__}): "
                f"is Jupyter running there? {HOW_TO_CONNECT}"
            ) from None
        except requests.Timeout:
            raise PlexusConnectionError(
                f"the Plexus server at {self.url} did not answer {method} {path} within {timeout or self.timeout:g} s"
            ) from None
        if response.status_code < 400:
            return response.json() if response.content else None
        self._fail(response)

    def _fail(self, response: requests.Response) -> NoReturn:
        """Raise the PlexusError of an error answer (what it says, by status)."""
        message = _message(response)
        status = response.status_code
        if status == 401:
            raise PlexusAuthError(f"the server at {self.url} refused the token ({message}); {HOW_TO_CONNECT}")
        if status == 404:
            raise PlexusNotFound(message, status)
        if status == 409:
            raise PlexusConflict(message, status)
        raise PlexusAPIError(f"{message} (HTTP {status})", status)

    def arrow_stream(self, path: str, params: dict[str, Any]) -> Any:
        """GET `plexus/api/{path}` as an Arrow IPC stream: a pyarrow RecordBatchStreamReader reading the answer
        as it arrives (batch by batch, so an export of millions of items holds one batch)."""
        import pyarrow as pa

        from ..evaluations.item_files import ARROW_STREAM_TYPE

        url = self.url + "plexus/api/" + path
        query = {k: v for k, v in params.items() if v is not None}
        try:
            response = self.session.get(
                url, params=query, headers={"Accept": ARROW_STREAM_TYPE}, stream=True, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise PlexusConnectionError(
                f"cannot read {path} from the Plexus server at {self.url} "
                f"({exc.__class__.__name__}): is Jupyter running there?"
            ) from None
        if response.status_code >= 400:
            self._fail(response)
        if not response.headers.get("Content-Type", "").startswith(ARROW_STREAM_TYPE):
            raise PlexusAPIError(
                f"the server answered {path} with {response.headers.get('Content-Type')!r}, not "
                "Arrow: is it an older Plexus?",
                response.status_code,
            )
        response.raw.decode_content = True
        return pa.ipc.open_stream(response.raw)

    def local_items(self, evaluation_id: str, params: dict[str, Any]) -> Any:
        """An evaluation's items (results' filters in `params`) read from its Parquet files straight from this
        kernel's disk, when it sees them as the server listed them (path, size, mtime); None otherwise (another
        machine, another caller's evaluation, an older server), and the caller reads them over REST."""
        from ..evaluations.item_files import read_listed

        query = {k: v for k, v in params.items() if v is not None}
        try:
            manifest = self.request("GET", f"evaluations/{evaluation_id}/items/manifest", params=query)
        except PlexusAPIError as exc:
            if exc.status not in (403, 404, 405):  # not listed to this caller, or not here: the Arrow stream then
                raise
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != "parquet":
            return None
        import pyarrow as pa

        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest["schema"])))
        files = [entry | {"path": self._local_path(entry["path"])} for entry in manifest["files"]]
        flt = manifest["filter"]
        return read_listed(files, only_mismatches=flt["only_mismatches"], label=flt["label_class"], schema=schema)

    def _local_path(self, path: str) -> str:
        if self.items_path_map is not None:
            server, kernel = self.items_path_map
            if path == server or path.startswith(server.rstrip("/") + "/"):
                return kernel.rstrip("/") + path[len(server.rstrip("/")) :]
        return path

    def check(self) -> dict[str, Any]:
        """Check that the server is reachable, runs the Plexus extension and accepts the token."""
        try:
            info = self.request("GET", "health", timeout=min(self.timeout, 10.0))
        except PlexusNotFound:
            raise PlexusConnectionError(
                f"{self.url} answers, but has no Plexus API (plexus/api/health is 404): "
                "is the plexus_mcp_jupyter server extension enabled there? "
                "(`jupyter server extension list`)"
            ) from None
        if not isinstance(info, dict) or "version" not in info:
            raise PlexusAuthError(
                f"the server at {self.url} did not accept the token "
                f"({'none given' if not self.token else 'wrong token'}); {HOW_TO_CONNECT}"
            )
        self.server_info = info
        return info

    def get_task(self, task_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.request("GET", f"tasks/{task_id}")
        return data

    # -- batches (REST plexus/api/tasks, tasks/{cancel,retry,priority}, batches/{id}) --------------------

    def dispatch_batch(self, specs: list[dict[str, Any]]) -> dict[str, Any]:
        """Dispatch many tasks in one call: {batch_id, task_ids}; nothing is dispatched if a spec is bad."""
        data: dict[str, Any] = self.request("POST", "tasks", json={"tasks": specs})
        return data

    def bulk(self, request: BulkRequest) -> dict[str, Any]:
        """Cancel, retry or re-prioritise the tasks a request selects (core/requests.py: CancelTasks, RetryTasks,
        SetTaskPriority, the models the server parses the body with): POST tasks/{cancel,retry,priority}."""
        data: dict[str, Any] = self.request("POST", f"tasks/{request.route}", json=request.arguments())
        return data

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A batch's counts by status, aggregated progress and estimated end."""
        data: dict[str, Any] = self.request("GET", f"batches/{batch_id}")
        return data

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task: the outcome (`cancelled`, `cancelling`, `already_finished`)."""
        data: dict[str, Any] = self.request("POST", f"tasks/{task_id}/cancel")
        return data

    def pages(
        self, path: str, key: str, params: dict[str, Any], limit: int | None, page_size: int = 100
    ) -> list[dict[str, Any]]:
        """Follow `next_cursor` until `limit` rows (None: all) are read."""
        rows: list[dict[str, Any]] = []
        cursor = None
        while limit is None or len(rows) < limit:
            size = page_size if limit is None else min(page_size, limit - len(rows))
            query = {k: v for k, v in params.items() if v is not None}
            query["limit"] = size
            if cursor:
                query["cursor"] = cursor
            page = self.request("GET", path, params=query)
            rows.extend(page[key])
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return rows

    # -- events -----------------------------------------------------------------------------------------

    @property
    def stream(self) -> EventStream:
        """The event stream, started on first use."""
        with self._lock:
            if self._stream is None:
                self._stream = EventStream(self.url, self.token, self._on_message, self._on_open)
                self._stream.start()
            return self._stream

    def ensure_stream(self, timeout: float = STREAM_WAIT) -> EventStream:
        """The event stream, connected; PlexusConnectionError if it cannot connect within `timeout`."""
        stream = self.stream
        if not stream.wait_connected(timeout):
            raise PlexusConnectionError(
                f"the event stream did not connect within {timeout:g} s "
                f"({stream.last_error or 'no answer'}); it keeps retrying"
            )
        return stream

    def on_event(self, callback: EventListener) -> Callable[[], None]:
        """Call `callback(message)` on the event thread for every message; returns a function that stops it.

        Messages are the stream's (`{"type": "event", "seq", "at", "kind", "entity_id", "data"}`), plus
        `{"type": "refresh", "tasks": [...]}` after the client re-read state by REST (after a gap).
        Callbacks must be quick and must not block: they run on the thread that reads the socket.
        """
        with self._lock:
            self._listeners.append(callback)
        self.stream.start()

        def remove() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def mirror(self, task_id: str, summary: dict[str, Any] | None = None) -> TaskState:
        """The live TaskState of a task (one per task per client), seeded from `summary` and the latest event."""
        with self._lock:
            state = self._mirrors.get(task_id)
            if state is None:
                state = self._mirrors[task_id] = TaskState(task_id)
                if summary is not None:
                    state.offer(summary)
                recent = self._recent.get(task_id)
                if recent is not None:
                    state.offer(*recent)
        self.stream.start()
        return state

    def _on_open(self, hello: dict[str, Any], reconnected: bool) -> None:
        # Lost events need nothing here: a resumed stream replays them, or the server says "gap".
        if reconnected and self._scorers:
            self._executor().submit(self._reregister)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "event":
            if message.get("entity_type") == "task":
                task_id = message["entity_id"]
                entry = (message["data"], message["seq"], parse_time(message.get("at")))
                with self._lock:
                    self._recent[task_id] = entry
                    self._recent.move_to_end(task_id)
                    if len(self._recent) > RECENT:
                        self._recent.popitem(last=False)
                    state = self._mirrors.get(task_id)
                if state is not None:
                    state.offer(*entry)
            self._notify(message)
        elif kind == "gap":
            self._executor().submit(self.refresh)
        elif kind == "score_request":
            scorer = self._scorers.get(str(message.get("scorer")))
            self._executor().submit(self._score, scorer, message)
        elif kind in ("scorer_registered", "error"):
            self._reply(message)

    def _notify(self, message: dict[str, Any]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(message)
            except Exception:
                log.exception("Plexus: an event listener failed")

    def refresh(self) -> None:
        """Re-read the tasks the mirrors follow by REST (after events were lost), and tell the listeners."""
        with self._lock:
            open_states = [s for s in self._mirrors.values() if not s.final]
        tasks = []
        for state in open_states:
            try:
                summary = self.get_task(state.task_id)
            except PlexusError as exc:
                log.warning("Plexus: cannot refresh task %s: %s", state.task_id, exc)
                continue
            state.offer(summary)
            tasks.append(summary)
        self._notify({"type": "refresh", "tasks": tasks})

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plexus-scorer")
            return self._pool

    # -- kernel scorers ---------------------------------------------------------------------------------

    def register_scorer(
        self, name: str, fn: Callable[..., Any], batch: bool = True, timeout: float = STREAM_WAIT
    ) -> str:
        """Serve `fn` as the scorer `kernel:<name>` from this kernel (see scoring.py); returns the spec."""
        scorer = check_scorer(name, fn, batch)
        self.ensure_stream(timeout)
        with self._lock:  # before the server knows it: a score request may follow the registration at once
            previous = self._scorers.get(name)
            self._scorers[name] = scorer
        try:
            reply = self._ask({"type": "register_scorer", "name": name, "batch": scorer.batch}, name, timeout)
        except BaseException:
            self._restore(name, previous)
            raise
        if reply.get("type") == "error":
            self._restore(name, previous)
            raise PlexusInputError(f"the server refused scorer {name!r}: {reply.get('message')}")
        return f"kernel:{name}"

    def _restore(self, name: str, previous: Any) -> None:
        with self._lock:
            if previous is None:
                self._scorers.pop(name, None)
            else:
                self._scorers[name] = previous

    def unregister_scorer(self, name: str) -> None:
        with self._lock:
            if self._scorers.pop(name, None) is None:
                raise PlexusInputError(
                    f"no scorer {name!r} is registered in this kernel; registered: "
                    f"{', '.join(sorted(self._scorers)) or 'none'}"
                )
        self.stream.send({"type": "unregister_scorer", "name": name})

    @property
    def scorers(self) -> list[str]:
        return sorted(self._scorers)

    def _ask(self, message: dict[str, Any], name: str, timeout: float) -> dict[str, Any]:
        done, box = threading.Event(), list[dict[str, Any]]()
        entry = (name, done, box)
        with self._lock:
            self._replies.append(entry)
        try:
            if not self.stream.send(message):
                raise PlexusConnectionError(
                    f"the event stream is not connected ({self.stream.last_error}); try again in a moment"
                )
            if not done.wait(timeout):
                raise PlexusConnectionError(
                    f"the server did not answer {message['type']} {name!r} within "
                    f"{timeout:g} s: is its Plexus extension recent enough?"
                )
            return box[0]
        finally:
            with self._lock:
                if entry in self._replies:
                    self._replies.remove(entry)

    def _reply(self, message: dict[str, Any]) -> None:
        # Replies carry the scorer's name (scorer_registered) or only the kind they answer (error): the
        # oldest registration waiting gets an error, the one of that name a confirmation.
        if message.get("type") == "error" and message.get("in_reply_to") not in (None, "register_scorer"):
            log.warning("Plexus: the server answered %s: %s", message.get("in_reply_to"), message.get("message"))
            return
        with self._lock:
            waiting = [e for e in self._replies if message.get("type") == "error" or e[0] == message.get("name")]
            if not waiting:
                if message.get("type") == "error":
                    log.warning("Plexus: the server said: %s", message.get("message"))
                return
            entry = waiting[0]
            self._replies.remove(entry)
        entry[2].append(message)
        entry[1].set()

    def _reregister(self) -> None:
        """After a reconnect the server has forgotten this kernel's scorers (they belonged to the old socket)."""
        for scorer in list(self._scorers.values()):
            delay = 0.5
            for _ in range(8):
                try:
                    reply = self._ask(
                        {"type": "register_scorer", "name": scorer.name, "batch": scorer.batch},
                        scorer.name,
                        STREAM_WAIT,
                    )
                except PlexusConnectionError as exc:
                    log.warning("Plexus: cannot re-register scorer %r: %s", scorer.name, exc)
                    return
                if reply.get("type") != "error":
                    break
                # The server may not have noticed yet that the old socket is gone.
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                log.warning("Plexus: scorer %r could not be registered again: %s", scorer.name, reply.get("message"))

    def _score(self, scorer: KernelScorer | None, request: dict[str, Any]) -> None:
        if not self.stream.send(answer(scorer, request)):
            log.warning("Plexus: could not send the answer to score request %s", request.get("request_id"))

    # -- lifecycle --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the event stream and the scorer threads (registered scorers go with the stream)."""
        with self._lock:
            stream, self._stream = self._stream, None
            pool, self._pool = self._pool, None
        if stream is not None:
            stream.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()
