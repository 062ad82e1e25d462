"""The kernel side of Plexus: `plexus` (api.py), its client, live widgets and pandas views.

Imports nothing of the server: a kernel needs only requests, websocket-client, traitlets, and (when
asked for tables or widgets) pandas and ipywidgets.
"""

from .api import Plexus, plexus
from .client import PlexusClient, resolve_connection
from .errors import (
    PlexusAPIError,
    PlexusAuthError,
    PlexusConflict,
    PlexusConnectionError,
    PlexusError,
    PlexusInputError,
    PlexusNotFound,
    PlexusTaskFailed,
)
from .handles import EvaluationHandle, TaskHandle

__all__ = [
    "EvaluationHandle",
    "Plexus",
    "PlexusAPIError",
    "PlexusAuthError",
    "PlexusClient",
    "PlexusConflict",
    "PlexusConnectionError",
    "PlexusError",
    "PlexusInputError",
    "PlexusNotFound",
    "PlexusTaskFailed",
    "TaskHandle",
    "plexus",
    "resolve_connection",
]
