"""plexus-mcp-jupyter: an MCP endpoint inside Jupyter Server for long-running tasks and evaluations."""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import PlexusMCPExtension

    return [{"module": "plexus_mcp_jupyter", "app": PlexusMCPExtension}]
