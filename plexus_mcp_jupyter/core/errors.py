"""Errors the core raises; every face (MCP, REST, CLI) maps them to its own error form.

Each message says what was wrong and what is allowed, so it can go to a client as it is.
"""

from __future__ import annotations

import re

MAX_QUOTED_CHARS = 300
MAX_MESSAGE_CHARS = 500
_LONG_QUOTED = re.compile(r"'([^'\n]{77})[^'\n]{4,}'")


def one_line(text: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` (an error, say) on one line, whitespace runs collapsed, cut to `limit` characters with "...":
    how a message quotes what a client sent or a file holds, which may be megabytes."""
    line = " ".join(str(text)[: 16 * limit].split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A core error's message as a face sends it (a tool error, a REST error body, the log line with it): one
    line, long quoted values cut, at most `limit` characters. Core messages quote what was sent."""
    cut = message[: 16 * limit]
    if len(cut) < len(message) and cut.count("'") % 2:
        cut += "'"  # the cut took a quoted value's closing quote: close it, so the value is cut short below
    text = _LONG_QUOTED.sub(lambda m: f"'{m.group(1)}...'", " ".join(cut.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PlexusError(Exception):
    """Base class of errors that are safe to show to a client."""


class InvalidArgument(PlexusError, ValueError):
    """An argument was malformed or out of range."""


class NotFound(PlexusError, LookupError):
    """The named entity does not exist (or is not visible to the caller)."""


class Forbidden(PlexusError, PermissionError):
    """The caller may see the entity but not this about it (REST: 403); the message says who may."""


class Expired(NotFound):
    """The entity existed but was pruned by retention (core/retention.py): the message says when and why."""
