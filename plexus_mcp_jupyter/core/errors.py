"""Errors the core raises; every face (MCP, REST, CLI) maps them to its own error form.

Each message says what was wrong and what is allowed, so it can go to a client as it is.
"""

from __future__ import annotations


class PlexusError(Exception):
    """Base class of errors that are safe to show to a client."""


class InvalidArgument(PlexusError, ValueError):
    """An argument was malformed or out of range."""


class NotFound(PlexusError, LookupError):
    """The named entity does not exist (or is not visible to the caller)."""


class Expired(NotFound):
    """The entity existed but was pruned by retention (core/retention.py): the message says when and why."""
