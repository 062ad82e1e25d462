"""plexus-mcp-jupyter: an MCP endpoint inside Jupyter Server for long-running tasks and evaluations."""

from __future__ import annotations

import os
import sys
from typing import Any

from ._version import __version__

__all__ = ["__version__", "plexus"]

# The task modules the local executor's forkserver imports (task types with `preload`): the evaluation runner's,
# once the runtime registered its type (tests/test_eval_warm_start.py checks that they agree).
EARLY_PRELOAD = ("plexus_mcp_jupyter.evaluations.runner",)


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    _start_workers_early()
    from .app import PlexusMCPExtension

    return [{"module": "plexus_mcp_jupyter", "app": PlexusMCPExtension}]


def _start_workers_early() -> None:
    """When a Jupyter server is starting (not `jupyter server extension list`), start the local executor's
    forkserver now: its imports (pandas, pyarrow, SQLAlchemy) then run beside the server's own import of this
    extension (app.py, a second or more) instead of after the server is ready, where the first evaluation waited
    for them. The runtime stops it if its executor turns out not to want it (executor=dask)."""
    serverapp = sys.modules.get("jupyter_server.serverapp")
    if serverapp is None or not serverapp.ServerApp.initialized():
        return
    start_workers_early()


def start_workers_early() -> None:
    """Start the local executor's forkserver (EARLY_PRELOAD) before the server's own imports, unless
    PLEXUS_MCP_EXECUTOR names another executor: Jupyter's start (`_start_workers_early`) and `plexus mcp serve`'s
    (cli.cmd_serve). Only a head start: a failure is logged at debug and the executor starts it as before."""
    if os.environ.get("PLEXUS_MCP_EXECUTOR", "local").strip().lower() not in ("", "local"):
        return
    try:
        from .core.executors.local import start_forkserver_early

        start_forkserver_early(EARLY_PRELOAD)
    except Exception:  # only a head start: the executor starts it as before
        import logging

        logging.getLogger("plexus_mcp_jupyter").debug("Plexus: the early forkserver start failed", exc_info=True)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The prebuilt lab extension (labextension/ built into the package), for `jupyter labextension develop`."""
    return [{"src": "labextension", "dest": "plexus-mcp-jupyter"}]


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext plexus_mcp_jupyter`: put `plexus` (the notebook client, connecting on first use) in the namespace."""
    from .notebook import plexus

    ipython.push({"plexus": plexus})


def __getattr__(name: str) -> Any:
    # `from plexus_mcp_jupyter import plexus` without making `import plexus_mcp_jupyter` (the server's
    # import too) pay for the notebook client.
    if name == "plexus":
        from .notebook import plexus

        return plexus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
