"""PlexusMCPExtension: the Jupyter Server extension. It only wires things together."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import sqlalchemy as sa
from jupyter_core.paths import jupyter_data_dir
from jupyter_server import serverapp as serverapp_module
from jupyter_server.extension.application import ExtensionApp

from ._version import __version__
from .config import PlexusSettings, SettingsError
from .core.executors import ExecutorUnavailable
from .core.store_calls import store_unavailable
from .handlers.clients import ClientsHandler
from .handlers.evaluations import (
    DatasetHandler,
    DatasetsHandler,
    DatasetUploadHandler,
    DatasetUploadsHandler,
    EvaluationHandler,
    EvaluationItemFilesHandler,
    EvaluationResultsHandler,
    EvaluationsHandler,
)
from .handlers.events import EventsHandler
from .handlers.health import AUTH_DISABLED_WARNING, HealthHandler, UnavailableHandler
from .handlers.jupyter_compat import route_first, route_through
from .handlers.keys import AuditHandler, KeyHandler, KeysHandler
from .handlers.mcp import MCPHandler
from .handlers.mcp_plain import PlainMCPRouter
from .handlers.rest import (
    BatchHandler,
    CancelTasksHandler,
    RetryTasksHandler,
    TaskCancelHandler,
    TaskHandler,
    TaskPriorityHandler,
    TasksHandler,
)
from .migrations import StoreRefused
from .runtime import PlexusRuntime
from .security.connections import ConnectionGuard

TASK_ID = r"(?P<task_id>[^/]+)"
EVALUATION_ID = r"(?P<evaluation_id>[^/]+)"
KEY_ID = r"(?P<key_id>[^/]+)"


class PlexusMCPExtension(ExtensionApp, PlexusSettings):
    """Serves the Plexus MCP endpoint and REST API on the Jupyter server's own port and auth."""

    name = "plexus_mcp_jupyter"
    description = "MCP endpoint for long-running tasks and evaluations"
    version = __version__
    load_other_extensions = True

    runtime: PlexusRuntime
    # Why the endpoint is not served (bad settings), one line each; empty when all is well.
    config_problems: list[str]

    def __init__(self, **kwargs: Any) -> None:
        self.config_problems = []
        self.problem_details: list[str] = []  # the same, with what only the notebook user may read
        super().__init__(**kwargs)

    def update_config(self, config: Any) -> None:
        """Load config, keeping the bad Plexus settings out and remembering them (see initialize_settings):
        traitlets would raise on the first, and Jupyter would then drop the extension with only a warning."""
        clean, problems = self.invalid_settings(config)
        self.config_problems.extend(p for p in problems if p not in self.config_problems)
        super().update_config(type(config)(clean) if problems else config)

    def _unavailable(self, public: str, detail: str) -> None:
        """A problem that keeps the endpoint from running: the 503 every Plexus route answers says `public`
        (it answers anyone: no host, port, user or database name), the server log says `detail`."""
        self.config_problems.append(f"{public} (the server log has the details)")
        self.problem_details.append(f"{public}: {detail}")
        logging.getLogger("plexus_mcp_jupyter").error("Plexus MCP is not served: %s: %s", public, detail)

    def initialize_settings(self) -> None:
        assert self.serverapp is not None  # set by Jupyter before it initializes an extension
        # The core logs to "plexus_mcp_jupyter"; inside Jupyter that goes through Jupyter's own logger.
        logging.getLogger("plexus_mcp_jupyter").parent = self.serverapp.log
        self.log = self.serverapp.log
        try:
            self.apply_env(protected=self._cli_settings())
        except SettingsError as exc:
            self.config_problems.extend(exc.problems)
        runtime = None
        if not self.config_problems:
            try:
                runtime = PlexusRuntime(self, data_dir=jupyter_data_dir(), root_dir=self.serverapp.root_dir)
            except SettingsError as exc:  # settings valid one by one, not together
                self.config_problems.extend(exc.problems)
            except ExecutorUnavailable as exc:  # dask_fallback=refuse: the endpoint does not run without its cluster
                self._unavailable("the Dask scheduler could not be reached (dask_fallback=refuse)", str(exc))
            except (StoreRefused, sa.exc.SQLAlchemyError) as exc:
                # A store migrated by a newer release or being migrated, or a database that cannot be reached.
                self._unavailable(
                    "the store could not be opened or migrated", str(store_unavailable(exc) or exc).splitlines()[0]
                )
        if runtime is None:
            # The endpoint does not half-exist: every Plexus route answers 503 with this (docs/architecture.md).
            logging.getLogger("plexus_mcp_jupyter").error(
                "Plexus MCP is not served: %s. Fix the setting and restart the server.", "; ".join(self.config_problems)
            )
            return
        self.runtime = runtime
        self.settings["plexus"] = self.runtime
        identity_provider = self.serverapp.identity_provider
        # Jupyter's startup lines ("is running at: http://...?token=...") are the URL its user logs in with.
        self.runtime.protect_secret(
            identity_provider.token, loggers=(self.serverapp.log.name,), exempt_files=(serverapp_module.__file__,)
        )
        if not identity_provider.auth_enabled:
            self.log.warning("Plexus MCP: %s", AUTH_DISABLED_WARNING)
        self.log.info(
            "Plexus MCP endpoint at %splexus/mcp (store: %s)", self.serverapp.base_url, self.runtime.store.safe_url
        )
        self.connection_file = write_connection_file(self.serverapp)

    def initialize(self) -> None:  # type: ignore[override]  # ExtensionApp's own signature
        super().initialize()  # adds the handlers below to the web application, after those of earlier extensions
        if self.serverapp is not None and not self.config_problems:
            # An MCP call is matched first, not after every pattern of the extensions loaded before this one.
            route_first(self.serverapp.web_app, MCPHandler)
            # A plain 2026-07-28 call is answered without a RequestHandler (handlers/mcp_plain.py).
            router = PlainMCPRouter(self.serverapp.web_app, MCPHandler)
            if route_through(self.serverapp.web_app, MCPHandler, router):
                self.serverapp.web_app.settings["plexus_mcp_plain"] = router

    def initialize_handlers(self) -> None:
        routes: list[tuple[str, type[Any]]] = [
            (r"/plexus/mcp/?", MCPHandler),
            (r"/plexus/api/health/?", HealthHandler),
            (r"/plexus/api/events/?", EventsHandler),
            (r"/plexus/api/tasks/?", TasksHandler),
            (r"/plexus/api/tasks/cancel/?", CancelTasksHandler),
            (r"/plexus/api/tasks/retry/?", RetryTasksHandler),
            (r"/plexus/api/tasks/priority/?", TaskPriorityHandler),
            (r"/plexus/api/batches/(?P<batch_id>[^/]+)/?", BatchHandler),
            (rf"/plexus/api/tasks/{TASK_ID}/cancel/?", TaskCancelHandler),
            (rf"/plexus/api/tasks/{TASK_ID}/?", TaskHandler),
            (r"/plexus/api/evaluations/?", EvaluationsHandler),
            (rf"/plexus/api/evaluations/{EVALUATION_ID}/results/?", EvaluationResultsHandler),
            (rf"/plexus/api/evaluations/{EVALUATION_ID}/items/manifest/?", EvaluationItemFilesHandler),
            (rf"/plexus/api/evaluations/{EVALUATION_ID}/?", EvaluationHandler),
            (r"/plexus/api/datasets/?", DatasetsHandler),
            (r"/plexus/api/datasets/uploads/?", DatasetUploadsHandler),
            (r"/plexus/api/datasets/uploads/(?P<upload_id>[0-9a-f]{32})/?", DatasetUploadHandler),
            (r"/plexus/api/datasets/(?P<ref>.+)", DatasetHandler),
            (r"/plexus/api/keys/?", KeysHandler),
            (rf"/plexus/api/keys/{KEY_ID}/?", KeyHandler),
            (r"/plexus/api/audit/?", AuditHandler),
            (r"/plexus/api/clients/?", ClientsHandler),
        ]
        if self.config_problems:
            message = f"Plexus MCP is not running: {'; '.join(self.config_problems)}. Fix the setting and restart."
            detail = (
                f"Plexus MCP is not running: {'; '.join(self.problem_details)}. Fix it and restart."
                if self.problem_details
                else message
            )
            self.handlers.append((r"/plexus(?:/.*)?", UnavailableHandler, {"message": message, "detail": detail}))
            return
        self.handlers.extend(routes)

    def _cli_settings(self) -> set[str]:
        """Names of settings given on the command line, which the environment must not override."""
        cli: Any = getattr(self.serverapp, "cli_config", None) or {}
        names: set[str] = set()
        for section in ("PlexusMCPExtension", "PlexusSettings"):
            if section in cli:
                names.update(cli[section].keys())
        return names

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.config_problems:
            return
        try:
            http_server = serverapp.http_server
        except AttributeError:  # embedded without a server of its own (tests that bring theirs)
            http_server = None
        if http_server is not None:
            ConnectionGuard.from_settings(self).install(http_server)
        await self.runtime.start()

    async def stop_extension(self) -> None:
        if self.config_problems:
            return
        remove_connection_file(self.connection_file)
        await self.runtime.stop()


CONNECTION_FILE_ENV = "PLEXUS_MCP_CONNECTION_FILE"


def write_connection_file(serverapp: Any) -> str | None:
    """Tell the kernels this server starts how to reach it, with no set-up in the notebook.

    The URL and token go to a file only the user can read (as Jupyter's own jpserver-<pid>.json), and its
    path to an environment variable that kernels launched by this server inherit; the token itself never
    enters the environment.
    """
    path = os.path.join(serverapp.runtime_dir, f"plexus-{os.getpid()}.json")
    try:
        os.makedirs(serverapp.runtime_dir, exist_ok=True)
        # Never through a symlink someone planted, and user-only even if the file was there before.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(
                {"url": serverapp.connection_url, "token": serverapp.identity_provider.token, "pid": os.getpid()},
                handle,
            )
    except OSError as exc:
        serverapp.log.warning(
            "Plexus MCP: could not write %s (%s); notebooks must call plexus.connect(url, token)", path, exc
        )
        return None
    os.environ[CONNECTION_FILE_ENV] = path
    return path


def remove_connection_file(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.remove(path)
        if os.environ.get(CONNECTION_FILE_ENV) == path:
            del os.environ[CONNECTION_FILE_ENV]
