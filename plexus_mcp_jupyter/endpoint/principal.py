"""The caller of the MCP request being served, for tools, resources and task methods alike.

The HTTP handler authenticates and puts the Principal on the ASGI scope; a server middleware (server.py,
`as_the_caller`) makes it the current principal for every request. Over stdio there is no scope: the
caller is whoever started the process (an admin).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from ..security.identity import LOCAL_ADMIN, Principal, Role

# The caller of the endpoint's own rehearsals after start (MCPEndpoint.rehearse), and of nothing else: no credential
# maps to it (only the endpoint puts it on a scope) and its calls are never audited. A viewer with an owner no key or
# user has: it sees what a viewer key sees (no key's work), and its answers go nowhere. Recognised by identity
# (`is`), never by its fields.
REHEARSAL = Principal(owner="plexus:rehearsal", role=Role.VIEWER, name="start-up rehearsal")

_current: ContextVar[Principal] = ContextVar("plexus_principal", default=LOCAL_ADMIN)


def principal_of(ctx: Any) -> Principal:
    """The principal of a low-level request context (its HTTP request's scope), else the local admin."""
    scope = getattr(getattr(ctx, "request", None), "scope", None)
    principal = scope.get("plexus.principal") if isinstance(scope, dict) else None
    return principal if isinstance(principal, Principal) else LOCAL_ADMIN


def current_principal() -> Principal:
    return _current.get()


@contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    token = _current.set(principal)
    try:
        yield principal
    finally:
        _current.reset(token)
