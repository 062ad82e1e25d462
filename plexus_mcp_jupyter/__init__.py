"""plexus-mcp-jupyter: an MCP endpoint inside Jupyter Server for long-running tasks and evaluations."""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__", "plexus"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import PlexusMCPExtension

    return [{"module": "plexus_mcp_jupyter", "app": PlexusMCPExtension}]


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
