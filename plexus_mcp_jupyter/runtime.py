"""Builds and runs one Plexus core plus its MCP endpoint: used by the extension and the CLI alike."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import PlexusSettings
from .core.errors import InvalidArgument, NotFound
from .core.events import EventBus
from .core.executors import Executor, LocalExecutor
from .core.manager import TaskManager
from .core.resources import parse_positive_numbers, parse_resources
from .core.retention import RetentionPolicy
from .core.store import Store, default_db_url
from .endpoint.server import build_mcp_server
from .endpoint.sessions import SessionLimits
from .endpoint.transport import MCPEndpoint
from .evaluations.datasets import DatasetCatalog
from .evaluations.file_reads import ReadBounds
from .evaluations.kernel_scorers import KernelScorerRegistry
from .evaluations.limits import EvaluationLimits
from .evaluations.service import EvaluationService
from .evaluations.store import EvaluationStore
from .security.audit import AuditLog
from .security.identity import Principal, Role
from .security.keys import CACHE_SECONDS, ApiKey, KeyStore
from .security.ratelimit import RateLimited, RateLimiter
from .security.redaction import scrub_logs

log = logging.getLogger("plexus_mcp_jupyter")


def make_executor(settings: PlexusSettings) -> Executor:
    if settings.executor == "local":
        # The pool's size is the manager's max_concurrency (Executor.size_for).
        return LocalExecutor(reuse=settings.worker_reuse, max_tasks_per_worker=settings.worker_max_tasks,
                             max_worker_memory_mb=settings.worker_max_memory_mb, nice=settings.worker_nice)
    raise ValueError(f"unknown executor {settings.executor!r}; expected 'local'")


class PlexusRuntime:
    """The store, event bus, task manager and MCP endpoint of one server process."""

    def __init__(self, settings: PlexusSettings, *, data_dir: str, root_dir: str | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.db_url or default_db_url(data_dir))
        self.root_dir = Path(root_dir or os.getcwd()).resolve()
        registered_dir = Path(data_dir) / "plexus_mcp" / "datasets"
        self.bus = EventBus()
        self.executor = make_executor(settings)
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
            worker_environment={"db_url": self.store.url, "root_dir": str(self.root_dir),
                                "registered_dir": str(registered_dir), "redact_columns": settings.redact_columns,
                                "max_evaluation_items": settings.max_evaluation_items},
        )
        self.catalog = DatasetCatalog(
            self.root_dir, registered_dir, threads=settings.dataset_threads,
            bounds=ReadBounds(header_bytes=settings.max_dataset_header_bytes, columns=settings.max_dataset_columns))
        self.kernel_scorers = KernelScorerRegistry()
        self.keys = KeyStore(self.store.engine)
        self._streams: dict[str, set[Callable[[], None]]] = {}
        self._key_watch: asyncio.Task[None] | None = None
        self.audit = AuditLog(self.store.engine)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.manager.max_unfinished_per_key = settings.max_tasks_per_key
        self.manager.configure_queue(
            type_caps=parse_resources(settings.max_concurrency_by_type, "max_concurrency_by_type"),
            fairness=settings.queue_fairness,
            role_weights=parse_positive_numbers(settings.queue_role_weights, "queue_role_weights"),
            resources=parse_resources(settings.executor_resources),
        )
        self.manager.configure_retention(
            RetentionPolicy.from_settings(settings.task_retention_seconds, settings.task_retention_by_type,
                                          settings.max_task_ttl_seconds),
            interval=settings.retention_interval_seconds, batch=settings.retention_batch_size,
        )
        self.manager.max_batch_size = settings.max_batch_size
        self.manager.request_handlers["kernel_score"] = self._kernel_score
        self.evaluations = EvaluationService(self.manager, EvaluationStore(self.store.engine), self.catalog,
                                             self.kernel_scorers, settings.scorer_modules.split(","),
                                             settings.redact_columns.split(","), EvaluationLimits(
                                                 max_scorecard_bytes=settings.max_scorecard_bytes,
                                                 max_scorecard_scores=settings.max_scorecard_scores,
                                                 max_evaluation_items=settings.max_evaluation_items))
        self.mcp = build_mcp_server(self.manager, self.evaluations, self.audit)
        self.endpoint = MCPEndpoint(
            self.mcp,
            limits=SessionLimits(max_sessions=settings.max_sessions, per_key=settings.max_sessions_per_key,
                                 reserved_share=settings.reserved_session_share,
                                 idle_timeout=settings.session_idle_timeout),
            max_request_body_size=settings.max_request_bytes,
            event_store_size=settings.event_store_size,
            event_store_bytes=settings.event_store_bytes,
        )
        telemetry = getattr(self.mcp, "telemetry", None)
        if telemetry is not None:
            telemetry.sessions = lambda: self.endpoint.session_count
        self._started = False
        self._log_scrubbers: list[Callable[[], None]] = []  # detach functions (see protect_secret)

    async def _kernel_score(self, task: Any, payload: Any) -> dict[str, Any]:
        """A worker's request to score a chunk with a notebook kernel's scorer."""
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
            raise InvalidArgument("a kernel_score request is {scorer, inputs: [...]}")
        return await self.kernel_scorers.score(str(payload.get("scorer")), payload["inputs"], owner=task.owner)

    def protect_secret(self, secret: str | None, loggers: tuple[str, ...] = (),
                       exempt_files: tuple[str, ...] = ()) -> None:
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

    async def start(self) -> None:
        """Start the task manager and the MCP session manager (idempotent, cheap once started)."""
        if self._started:
            return
        self._started = True
        await self.manager.start()
        await self.endpoint.start()
        self.evaluations.start()
        self._key_watch = asyncio.get_running_loop().create_task(self._watch_keys(), name="plexus-key-watch")
        log.info("Plexus MCP %s ready; store %s, executor %s", __version__, self.store.safe_url, self.executor.name)

    async def stop(self) -> None:
        telemetry = getattr(self.mcp, "telemetry", None)
        if telemetry is not None:
            telemetry.close()
        for detach in self._log_scrubbers:
            detach()
        self._log_scrubbers.clear()
        if not self._started:
            return
        self._started = False
        self.manager.begin_stop()  # first: MCP calls the endpoint cuts short must not cancel their tasks
        if self._key_watch is not None:
            self._key_watch.cancel()
        watch = getattr(self.mcp, "resource_watch", None)
        if watch is not None:
            watch.close()
        await self.endpoint.stop()
        await self.manager.stop()
        self.evaluations.close()
        self.catalog.close()
        self.audit.close()
        self.store.close()

    def health(self) -> dict[str, Any]:
        try:
            self.store.ping()
            store_status = "ok"
        except Exception as exc:  # reported, not raised: health must answer
            store_status = f"error: {type(exc).__name__}"
        return {
            "status": "ok" if store_status == "ok" else "degraded",
            "version": __version__,
            "store": {"status": store_status, "url": self.store.safe_url},
            "executor": self.executor.status(),
            "tasks": self.manager.counts(),
            "mcp": {"sessions": self.endpoint.session_count},
        }
