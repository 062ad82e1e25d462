"""Builds and runs one Plexus core plus its MCP endpoint: used by the extension and the CLI alike."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import PlexusSettings, SettingsError
from .core.errors import InvalidArgument, NotFound
from .core.events import EventBus
from .core.executors import Executor, ExecutorUnavailable, LocalExecutor
from .core.executors.local import stop_early_forkserver
from .core.leases import LeaseKeeper, lease_problem
from .core.manager import TaskManager
from .core.models import TaskStatus
from .core.relay import EventRelay, Groups
from .core.resources import parse_positive_numbers, parse_resources
from .core.retention import RetentionPolicy
from .core.store import Store, default_db_url
from .core.store_calls import StoreCalls, StoreUnavailable
from .endpoint.server import build_mcp_server
from .endpoint.sessions import SessionLimits
from .endpoint.transport import MCPEndpoint
from .evaluations.datasets import DatasetCatalog
from .evaluations.file_reads import ReadBounds
from .evaluations.item_files import ItemFiles
from .evaluations.items_check import SharedItemsCheck, WorkerItemsCheck
from .evaluations.kernel_scorers import KernelScorerRegistry
from .evaluations.limits import EvaluationLimits
from .evaluations.service import EvaluationService
from .evaluations.store import EvaluationStore
from .evaluations.task_type import register_evaluation_task_type
from .evaluations.uploads import DatasetUploads
from .security.audit import AuditLog
from .security.identity import Principal, Role
from .security.keys import CACHE_SECONDS, ApiKey, KeyStore
from .security.ratelimit import RateLimited, RateLimiter
from .security.redaction import scrub_logs

log = logging.getLogger("plexus_mcp_jupyter")
HEALTH_STORE_TIMEOUT = 5.0  # most seconds health waits for the store (db_pool_timeout_seconds if less)


def make_executor(settings: PlexusSettings) -> Executor:
    """The executor the settings name. A Dask cluster is connected (or a LocalCluster started) here: raises
    ExecutorUnavailable (a clear message) when that fails; `executor_with_fallback` applies dask_fallback."""
    if settings.executor == "local":
        return _local_executor(settings)
    if settings.executor == "dask":
        from .core.executors.dask import DaskExecutor

        return DaskExecutor(
            settings.dask_scheduler_address,
            local_workers=settings.dask_local_workers,
            local_threads=settings.dask_local_threads,
            local_memory_mb=settings.dask_local_memory_mb,
            worker_resources=parse_resources(settings.dask_worker_resources, "dask_worker_resources"),
            connect_timeout=settings.dask_connect_timeout,
            message_interval=settings.dask_message_interval,
        )
    raise ValueError(f"unknown executor {settings.executor!r}; expected 'local' or 'dask'")


def executor_with_fallback(settings: PlexusSettings) -> tuple[Executor, str | None]:
    """The configured executor, or (dask_fallback=local) the local one and why: a Dask scheduler that does not
    answer at start must not leave the server without tasks. With dask_fallback=refuse, ExecutorUnavailable."""
    try:
        return make_executor(settings), None
    except ExecutorUnavailable as exc:
        if settings.executor != "dask" or settings.dask_fallback == "refuse":
            raise ExecutorUnavailable(f"executor=dask: {exc} (dask_fallback=refuse)") from None
        problem = f"executor=dask: {exc}; tasks run on the local executor instead (dask_fallback=local)"
        log.error("Plexus: %s", problem)
        return _local_executor(settings), problem


def _local_executor(settings: PlexusSettings) -> LocalExecutor:
    # The pool's size is the manager's max_concurrency (Executor.size_for).
    return LocalExecutor(
        reuse=settings.worker_reuse,
        max_tasks_per_worker=settings.worker_max_tasks,
        max_worker_memory_mb=settings.worker_max_memory_mb,
        nice=settings.worker_nice,
    )


class PlexusRuntime:
    """The store, event bus, task manager and MCP endpoint of one server process."""

    def __init__(self, settings: PlexusSettings, *, data_dir: str, root_dir: str | None = None) -> None:
        problem = lease_problem(settings.server_heartbeat_seconds, settings.server_lease_seconds)
        if problem:
            raise SettingsError([problem])
        self.settings = settings
        self.store = Store(
            settings.db_url or default_db_url(data_dir),
            pool_size=settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout_seconds,
            statement_timeout=settings.db_statement_timeout_seconds,
        )
        # Store calls made from async code off the loop (core/store_calls.py): one thread per pooled connection.
        self.store_calls = StoreCalls(settings.db_pool_size, settings.db_pool_timeout_seconds)
        self.root_dir = Path(root_dir or os.getcwd()).resolve()
        registered_dir = Path(data_dir) / "plexus_mcp" / "datasets"
        items_dir = Path(settings.evaluation_items_dir or Path(data_dir) / "plexus_mcp" / "items").resolve()
        self.bus = EventBus()
        # The evaluations package's task type, known to the core before its executor starts (which preloads it).
        register_evaluation_task_type()
        try:
            # Why the configured executor is not the one running tasks (dask_fallback=local), for health.
            self.executor, self.executor_problem = executor_with_fallback(settings)
            if not (isinstance(self.executor, LocalExecutor) and self.executor.start_method == "forkserver"):
                # A forkserver started ahead for a local executor (plexus_mcp_jupyter._start_workers_early) that
                # will not use it: ended.
                stop_early_forkserver()
            self._assemble(settings, registered_dir, items_dir)
        except BaseException:
            self._release_unstarted()
            raise
        # While Jupyter finishes starting (its other extensions, its web application): not after it is ready,
        # where the rehearsal competed with the first create_evaluation for the CPU and the GIL.
        self.evaluations.warm_up_soon()
        self.catalog.start_threads()

    def _release_unstarted(self) -> None:
        """What __init__ built before a step failed: a LocalCluster's processes, the store's connections."""
        executor = getattr(self, "executor", None)
        if executor is not None:
            executor.close()
        self.store_calls.close()
        self.store.close()

    def _assemble(self, settings: PlexusSettings, registered_dir: Path, items_dir: Path) -> None:
        """The rest of __init__, once the store and the executor exist (`_release_unstarted` if it fails)."""
        self.items_dir = items_dir
        # Several servers on one networked store must share the item files (items_check.py); SQLite is one machine.
        self.items_check: SharedItemsCheck | None = None
        # And the Dask workers, which write an evaluation's item files, must see it too (WorkerItemsCheck).
        self.worker_items_check: WorkerItemsCheck | None = None
        self.kernel_scorers = KernelScorerRegistry(max_per_owner=settings.max_kernel_scorers_per_owner)
        self.manager = TaskManager(
            self.store,
            self.bus,
            self.executor,
            max_concurrency=settings.max_concurrency,
            max_concurrency_per_owner=settings.max_concurrency_per_owner,
            key_slot_share=settings.key_slot_share,
            max_priority_by_role={Role.OPERATOR.value: settings.max_priority_operator},
            cancel_grace_seconds=settings.cancel_grace_seconds,
            progress_write_interval=settings.progress_write_interval,
            max_page_size=settings.max_page_size,
            max_output_bytes=settings.max_output_bytes,
            poll_interval=settings.poll_interval,
            # What every worker is told besides its task's parameters (never stored or shown to clients).
            worker_environment={
                "db_url": self.store.url,
                "root_dir": str(self.root_dir),
                "registered_dir": str(registered_dir),
                "redact_columns": settings.redact_columns,
                "items_dir": str(items_dir),
                "max_evaluation_items": settings.max_evaluation_items,
                "max_parquet_uncompressed_bytes": settings.max_parquet_uncompressed_bytes,
            },
            calls=self.store_calls,
            request_handlers={"kernel_score": self._kernel_score},
            max_unfinished_per_key=settings.max_tasks_per_key,
            max_batch_size=settings.max_batch_size,
            # Several servers on one store (docs/scale-out.md): leases with a heartbeat, and the others' events.
            lease_seconds=settings.server_lease_seconds,
        )
        self.catalog = DatasetCatalog(
            self.root_dir,
            registered_dir,
            threads=settings.dataset_threads,
            bounds=ReadBounds(header_bytes=settings.max_dataset_header_bytes, columns=settings.max_dataset_columns),
        )
        self.catalog.max_registered_bytes = settings.max_registered_bytes_per_principal
        self.catalog.max_parquet_uncompressed_bytes = settings.max_parquet_uncompressed_bytes
        self.uploads = DatasetUploads(self.catalog, max_bytes=settings.max_dataset_upload_bytes)
        self.keys = KeyStore(self.store.engine)
        self._streams: dict[str, set[Callable[[], None]]] = {}
        # Event-stream WebSockets open per API key (handlers/events.py holds each key to max_event_streams_per_key)
        self.event_streams: collections.Counter[str] = collections.Counter()
        self.max_event_streams_per_key = settings.max_event_streams_per_key
        self._key_watch: asyncio.Task[None] | None = None
        self.audit = AuditLog(self.store.engine, retention_seconds=settings.audit_retention_days * 86_400.0)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        # Bytes of large bodies per caller (MCP and REST bodies as they are read, event WebSocket messages).
        self.body_budget = RateLimiter(
            settings.request_bytes_rate, max(settings.request_bytes_burst, settings.max_request_bytes)
        )
        self.manager.configure_queue(
            type_caps=parse_resources(settings.max_concurrency_by_type, "max_concurrency_by_type"),
            fairness=settings.queue_fairness,
            role_weights=parse_positive_numbers(settings.queue_role_weights, "queue_role_weights"),
            resources=parse_resources(settings.executor_resources),
        )
        self.manager.configure_retention(
            RetentionPolicy.from_settings(
                settings.task_retention_seconds, settings.task_retention_by_type, settings.max_task_ttl_seconds
            ),
            interval=settings.retention_interval_seconds,
            batch=settings.retention_batch_size,
        )
        self.leases = LeaseKeeper(
            self.store,
            heartbeat=settings.server_heartbeat_seconds,
            lease=settings.server_lease_seconds,
            on_expired=self.manager.recover_soon,
        )
        self.relay = EventRelay(
            self.store,
            self.bus,
            mode=settings.event_relay,
            interval=settings.event_relay_interval,
            progress_interval=settings.progress_write_interval,
            keep_seconds=settings.event_relay_keep_seconds,
            on_remote=self._on_remote_events,
        )
        self.evaluations = EvaluationService(
            self.manager,
            EvaluationStore(self.store.engine, ItemFiles(items_dir)),
            self.catalog,
            self.kernel_scorers,
            settings.scorer_modules.split(","),
            settings.redact_columns.split(","),
            EvaluationLimits(
                max_scorecard_bytes=settings.max_scorecard_bytes,
                max_scorecard_scores=settings.max_scorecard_scores,
                max_evaluation_items=settings.max_evaluation_items,
            ),
        )
        self.mcp = build_mcp_server(
            self.manager, self.evaluations, self.audit, session_count=lambda: self.endpoint.session_count
        )
        self.endpoint = MCPEndpoint(
            self.mcp,
            limits=SessionLimits(
                max_sessions=settings.max_sessions,
                per_key=settings.max_sessions_per_key,
                reserved_share=settings.reserved_session_share,
                idle_timeout=settings.session_idle_timeout,
            ),
            max_request_body_size=settings.max_request_bytes,
            max_json_values=settings.max_json_values,
            event_store_size=settings.event_store_size,
            event_store_bytes=settings.event_store_bytes,
            on_first_request=self.evaluations.client_came,
        )
        self._started = False
        self._stores_closed = False
        self._log_scrubbers: list[Callable[[], None]] = []  # detach functions (see protect_secret)

    def _workers_items_problem(self) -> str | None:
        return self.worker_items_check.problem if self.worker_items_check is not None else None

    def _on_remote_events(self, events: list[tuple[str, str | None]], groups: Groups) -> None:
        """Tasks another server queued on the shared store ((kind, status) of its events, and the queue groups of
        the tasks they created): plan a start now, not at the next maintenance tick; the queue's head this server
        read is kept when only new tasks of groups it shows came, none older than a task it shows of its group
        (`TaskManager.queued_elsewhere`)."""
        queued = {kind for kind, status in events if kind == "task.created" or status == TaskStatus.QUEUED.value}
        if queued == {"task.created"}:
            self.manager.queued_elsewhere(groups)
        elif queued:  # a task queued again (its place in its group is its old one): read the queue again
            self.manager.queue_changed()

    async def _kernel_score(self, task: Any, payload: Any) -> dict[str, Any]:
        """A worker's request to score a chunk with a notebook kernel's scorer."""
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
            raise InvalidArgument("a kernel_score request is {scorer, inputs: [...]}")
        return await self.kernel_scorers.score(str(payload.get("scorer")), payload["inputs"], owner=task.owner)

    def protect_secret(
        self, secret: str | None, loggers: tuple[str, ...] = (), exempt_files: tuple[str, ...] = ()
    ) -> None:
        """A server credential (Jupyter's token, the standalone token) that must never reach the server log
        or the audit log, wherever a client puts it (a query string, a tool argument, a key's name); the
        records logged from `exempt_files` (the server's own startup lines) are left as they are."""
        self.audit.scrubber.add(secret)
        self._log_scrubbers.append(scrub_logs(self.audit.scrubber, loggers, exempt_files))

    # -- API keys ----------------------------------------------------------------------------------

    def admit_key(self, credential: str) -> Principal:
        """The principal of an API key, if it is valid and within its rate limit.

        Raises KeyRejected (401: unknown, malformed, expired or revoked) or RateLimited (429), whose
        messages are safe to show: they never contain the credential.
        """
        key = self.keys.verify(credential)
        wait = self.limiter.take(key.id, key.rate_limit)
        if wait:
            raise RateLimited(wait, key.rate_limit or self.limiter.rate, self.limiter.burst)
        return key.principal()

    # -- API keys: open streams end when their key does ----------------------------------------------

    def track_stream(self, principal: Principal, close: Callable[[], None]) -> Callable[[], None]:
        """Remember a long-lived stream (event WebSocket, MCP SSE) of an API key; returns the forget function."""
        if principal.key_id is None:
            return lambda: None
        key_id = principal.key_id
        self._streams.setdefault(key_id, set()).add(close)

        def forget() -> None:
            closers = self._streams.get(key_id)
            if closers is not None:
                closers.discard(close)
                if not closers:  # the watcher checks only keys with open streams
                    del self._streams[key_id]

        return forget

    def revoke_key(self, key_id: str, by: Principal | None = None) -> ApiKey:
        """Revoke a key: its next request is refused, its open streams and MCP sessions are closed now."""
        key = self.keys.revoke(key_id)
        self._close_streams(key.id)
        self.audit.record(by, "key.revoke", target=key.id)
        return key

    def _close_streams(self, key_id: str) -> None:
        self.endpoint.session_manager.end_sessions_of_key(key_id)
        for close in list(self._streams.pop(key_id, ())):
            try:
                close()
            except Exception:
                log.debug("Plexus: a stream of key %s could not be closed", key_id, exc_info=True)

    async def _watch_keys(self) -> None:
        """Keys revoked or expired elsewhere (the CLI, another server on the store) end their streams and sessions
        too."""
        while True:
            await asyncio.sleep(CACHE_SECONDS)
            for key_id in set(self._streams) | self.endpoint.session_manager.key_ids():
                try:
                    key = await asyncio.to_thread(self.keys.get, key_id)
                    active = key.status() == "active"
                except NotFound:
                    active = False
                except Exception:
                    continue  # the store is unreachable: try again later
                if not active:
                    self._close_streams(key_id)

    async def start(self, *, sessions_required: bool = True) -> None:
        """Start the task manager, the lease heartbeat and the event relay (docs/scale-out.md), the MCP session
        manager, the evaluation service and the checks and watches (idempotent, cheap once started); `stop`
        stops them all. The HTTP servers serve through the SDK's session manager: its failure to start raises.
        A stdio server (`sessions_required=False`) only rehearses through it: without it, it serves all the
        same (logged)."""
        if self._started:
            return
        self._started = True
        try:
            await self._start(sessions_required)
        except BaseException:  # what started stops; a later start() tries again instead of returning half-started
            try:
                await self._stop_services()
            except Exception:
                log.debug("Plexus: stopping after a failed start failed too", exc_info=True)
            finally:  # only now: a start() meanwhile would have started what this stops
                self._started = False
            raise

    async def _start(self, sessions_required: bool) -> None:
        await self.manager.start()
        loop = asyncio.get_running_loop()
        self.relay.start(loop, self.manager.server_id)
        self.leases.start(loop, self.manager.server_id)
        try:
            await self.endpoint.start()
        except RuntimeError:  # (logged by the endpoint)
            if sessions_required:
                raise
            log.debug("Plexus: served without the MCP session manager (no start-up rehearsals)", exc_info=True)
        self.evaluations.start()
        if self.store.engine.dialect.name != "sqlite":
            self.items_check = SharedItemsCheck(self.store.engine, self.items_dir, self.manager.server_id)
            self.items_check.start()
        run_on_workers = getattr(self.executor, "run_on_workers", None)
        if run_on_workers is not None:
            self.worker_items_check = WorkerItemsCheck(
                run_on_workers,
                self.executor.worker_addresses,  # type: ignore[attr-defined]  # the Dask executor's, with run_on_workers
                self.items_dir,
                self.manager.server_id,
            )
            self.evaluations.items_problem = self._workers_items_problem
            self.worker_items_check.start()
        self._key_watch = asyncio.get_running_loop().create_task(self._watch_keys(), name="plexus-key-watch")
        log.info("Plexus MCP %s ready; store %s, executor %s", __version__, self.store.safe_url, self.executor.name)

    async def stop(self) -> None:
        if self.mcp.telemetry is not None:
            _close_logged("telemetry", self.mcp.telemetry.close)
        for detach in self._log_scrubbers:
            _close_logged("a log scrubber", detach)
        self._log_scrubbers.clear()
        try:
            if self._started:
                self._started = False
                self.manager.begin_stop()  # first: MCP calls the endpoint cuts short must not cancel their tasks
                if self.mcp.resource_watch is not None:
                    self.mcp.resource_watch.close()
                await self._stop_services()
        finally:  # whatever failed above (or a start that failed, or none), the audit log writes its last records
            self._close_stores()  # and the store closes

    def _close_stores(self) -> None:
        """The services the runtime made at its construction, closed once (a stop after a failed start too)."""
        if self._stores_closed:
            return
        self._stores_closed = True
        # Each on its own: one that fails (an upload's file that cannot be removed) leaves the others to close,
        # the audit log's last records and the store last.
        for what, close in (
            ("evaluation service", self.evaluations.close),
            ("uploads", self.uploads.close),
            ("dataset catalog", self.catalog.close),
            ("audit log", self.audit.close),
            ("store calls", self.store_calls.close),
            ("store", self.store.close),
        ):
            _close_logged(what, close)

    async def _stop_services(self) -> None:
        """What `start` started (all of it, or what it had started when it failed), the stores left open."""
        self.manager.begin_stop()
        if self._key_watch is not None:
            self._key_watch.cancel()
        await self.endpoint.stop()
        await self.manager.stop()
        await asyncio.to_thread(self.leases.stop)
        await asyncio.to_thread(self.relay.stop)  # after the manager: the final states it recorded go out
        self.evaluations.stop()  # (a failed start's too: a later start submits its rehearsals and pruning anew)
        if self.items_check is not None:
            await asyncio.to_thread(self.items_check.stop)
            self.items_check = None
        if self.worker_items_check is not None:
            await asyncio.to_thread(self.worker_items_check.stop)
            self.worker_items_check = None

    async def health(self) -> dict[str, Any]:
        """The server's state for admins; "degraded" (with why) while the store does not answer. The store is
        read off the event loop, within HEALTH_STORE_TIMEOUT: health answers even when the database does not."""
        counts: dict[str, int] | None = None
        try:
            counts = await self.store_calls.run(
                self.manager.counts, timeout=min(HEALTH_STORE_TIMEOUT, self.store_calls.timeout)
            )
            store_status = "ok"
        except StoreUnavailable as exc:
            store_status = str(exc)
        except Exception as exc:  # reported, not raised: health must answer
            store_status = f"error: {type(exc).__name__}"
        items_problem = self.items_check.problem if self.items_check is not None else None
        workers_problem = self.worker_items_check.problem if self.worker_items_check is not None else None
        items = {
            "dir": str(self.items_dir),
            **({"problem": items_problem} if items_problem else {}),
            **({"workers_problem": workers_problem} if workers_problem else {}),
        }
        return {
            "status": "ok"
            if store_status == "ok" and items_problem is None and workers_problem is None
            else "degraded",
            "version": __version__,
            "store": {"status": store_status, "url": self.store.safe_url},
            "executor": {
                **self.executor.status(),
                **({"problem": self.executor_problem} if self.executor_problem else {}),
            },
            "tasks": counts,
            "mcp": {"sessions": self.endpoint.session_count},
            # This process among the servers sharing the store (docs/scale-out.md).
            "server": {"id": self.manager.server_id, "relay": self.relay.status(), "leases": self.leases.status()},
            "evaluation_items": items,
        }


def _close_logged(what: str, close: Callable[[], object]) -> None:
    """Close one part at a stop; a failure is logged and the stop goes on with the rest."""
    try:
        close()
    except Exception:
        log.exception("Plexus: closing the %s failed; the rest are closed", what)
