"""Builds and runs one Plexus core plus its MCP endpoint: used by the extension and the CLI alike."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import PlexusSettings
from .core.errors import InvalidArgument
from .core.events import EventBus
from .core.executors import Executor, LocalExecutor
from .core.manager import TaskManager
from .core.store import Store, default_db_url
from .endpoint.server import build_mcp_server
from .endpoint.transport import MCPEndpoint
from .evaluations.datasets import DatasetCatalog
from .evaluations.kernel_scorers import KernelScorerRegistry
from .evaluations.service import EvaluationService
from .evaluations.store import EvaluationStore
from .security.keys import KeyStore

log = logging.getLogger("plexus_mcp_jupyter")


def make_executor(name: str) -> Executor:
    if name == "local":
        return LocalExecutor()
    raise ValueError(f"unknown executor {name!r}; expected 'local'")


class PlexusRuntime:
    """The store, event bus, task manager and MCP endpoint of one server process."""

    def __init__(self, settings: PlexusSettings, *, data_dir: str, root_dir: str | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.db_url or default_db_url(data_dir))
        self.root_dir = Path(root_dir or os.getcwd()).resolve()
        registered_dir = Path(data_dir) / "plexus_mcp" / "datasets"
        self.bus = EventBus()
        self.executor = make_executor(settings.executor)
        self.manager = TaskManager(
            self.store,
            self.bus,
            self.executor,
            max_concurrency=settings.max_concurrency,
            max_concurrency_per_owner=settings.max_concurrency_per_owner,
            cancel_grace_seconds=settings.cancel_grace_seconds,
            progress_write_interval=settings.progress_write_interval,
            max_page_size=settings.max_page_size,
            max_output_bytes=settings.max_output_bytes,
            poll_interval=settings.poll_interval,
            # What every worker is told besides its task's parameters (never stored or shown to clients).
            worker_environment={"db_url": self.store.url, "root_dir": str(self.root_dir),
                                "registered_dir": str(registered_dir)},
        )
        self.catalog = DatasetCatalog(self.root_dir, registered_dir)
        self.kernel_scorers = KernelScorerRegistry()
        self.keys = KeyStore(self.store.engine)
        self.manager.request_handlers["kernel_score"] = self._kernel_score
        self.evaluations = EvaluationService(self.manager, EvaluationStore(self.store.engine), self.catalog,
                                             self.kernel_scorers)
        self.mcp = build_mcp_server(self.manager, self.evaluations)
        self.endpoint = MCPEndpoint(
            self.mcp,
            session_idle_timeout=settings.session_idle_timeout,
            max_sessions=settings.max_sessions,
            max_request_body_size=settings.max_request_bytes,
            event_store_size=settings.event_store_size,
            event_store_bytes=settings.event_store_bytes,
        )
        self._started = False

    async def _kernel_score(self, task: Any, payload: Any) -> dict[str, Any]:
        """A worker's request to score a chunk with a notebook kernel's scorer."""
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
            raise InvalidArgument("a kernel_score request is {scorer, inputs: [...]}")
        return await self.kernel_scorers.score(str(payload.get("scorer")), payload["inputs"])

    async def start(self) -> None:
        """Start the task manager and the MCP session manager (idempotent, cheap once started)."""
        if self._started:
            return
        self._started = True
        await self.manager.start()
        await self.endpoint.start()
        log.info("Plexus MCP %s ready; store %s, executor %s", __version__, self.store.safe_url, self.executor.name)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.manager.begin_stop()  # first: MCP calls the endpoint cuts short must not cancel their tasks
        watch = getattr(self.mcp, "resource_watch", None)
        if watch is not None:
            watch.close()
        await self.endpoint.stop()
        await self.manager.stop()
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
