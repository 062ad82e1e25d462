"""Who may open an MCP session and who may use it: a per-key cap, room kept for admins, sessions bound to their opener.

A 2025-11-25 session is opened by a request without `Mcp-Session-Id` that the SDK answers below 400 (an
`initialize`, even one refused by a JSON-RPC error) and lives until DELETE, the idle timeout or a crash. The SDK's
StreamableHTTPSessionManager registers a session synchronously, under its creation lock, and forgets it whichever
way it ends, including an opening request it refused; sdk_compat.AdmittingSessionManager turns those two private
points into hooks. `PlexusSessionManager` counts sessions per holder at exactly those two points, so admission is
exact under concurrent requests and a slot can never leak (tests/test_hardening_sessions.py). The 2026-07-28 era
serves each request on its own and opens no session: it is not counted.

Binding uses the SDK's public mechanism: the handler puts an `AuthenticatedUser` naming the principal on
the request's scope (`session_user`), and the SDK answers a request for a session opened by another
principal exactly as one for an unknown session (404 "Session not found"), for POST, GET and DELETE.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, AuthorizationContext
from mcp.server.auth.provider import AccessToken

from ..core.ownership import KEY_OWNER_PREFIX, is_key_owner, key_owner
from ..security.identity import Principal, Role
from .sdk_compat import AdmittingSessionManager


@dataclass(frozen=True)
class SessionLimits:
    """The session settings (max_sessions, max_sessions_per_key, reserved_session_share, session_idle_timeout)."""

    max_sessions: int = 1000
    per_key: int = 20
    reserved_share: float = 0.1
    idle_timeout: float | None = 1800.0

    @property
    def key_sessions(self) -> int:
        """Most sessions viewer and operator keys may hold together: the rest is kept for admins."""
        return self.max_sessions - math.ceil(self.max_sessions * self.reserved_share)

    def how_to_free(self) -> str:
        idle = (
            f", or wait until one has been idle for session_idle_timeout={self.idle_timeout:g} s"
            if (self.idle_timeout is not None)
            else ""
        )
        return f"end one with DELETE and its Mcp-Session-Id header{idle}"


class SessionRefused(Exception):
    """A request that would open a session over a limit: its HTTP status and a message naming the setting."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def session_user(principal: Principal) -> AuthenticatedUser:
    """The principal as the SDK's session owner: a session answers only requests of the principal that opened it.

    A key is itself (its id); anyone else is its owner and role (the notebook user, the server's token, a
    JupyterHub user). The role rides in `subject` so admission knows it; no credential is put here.
    """
    client_id = key_owner(principal.key_id) if principal.key_id is not None else f"user:{principal.owner}"
    return _session_user(client_id, principal.role.value)


@functools.lru_cache(maxsize=1024)
def _session_user(client_id: str, role: str) -> AuthenticatedUser:
    # Made once per caller, not per request (two pydantic models each time); nothing changes it once made.
    return AuthenticatedUser(AccessToken(token="", client_id=client_id, scopes=[], subject=role))


@dataclass(frozen=True)
class _Holder:
    """Who holds a session, as admission sees it (decoded from the SDK's requestor, see `session_user`)."""

    id: str
    is_key: bool
    is_admin: bool

    @classmethod
    def of(cls, requestor: AuthorizationContext | None) -> _Holder:
        if requestor is None:  # no user on the scope: only stdio-like local callers, who are admins
            return cls("user:None", is_key=False, is_admin=True)
        client_id = requestor["client_id"]
        return cls(client_id, is_key_owner(client_id), requestor["subject"] == Role.ADMIN.value)

    @property
    def in_key_share(self) -> bool:
        """Viewer and operator keys share what the admins' reserve leaves."""
        return self.is_key and not self.is_admin


class PlexusSessionManager(AdmittingSessionManager):
    """The SDK's session manager, admitting a new session only within the per-key cap and the keys' share."""

    def __init__(self, app: Any, *, limits: SessionLimits, **kwargs: Any) -> None:
        super().__init__(app, max_sessions=limits.max_sessions, session_idle_timeout=limits.idle_timeout, **kwargs)
        self.limits = limits
        self._holders: dict[str, _Holder] = {}  # open session id -> its holder
        self._held: Counter[str] = Counter()  # holder id -> sessions open
        self._key_share_used = 0
        self._ending: set[asyncio.Task[None]] = set()

    def key_ids(self) -> set[str]:
        """The API keys that hold sessions (the key watcher checks them for revocation)."""
        return {holder.id.removeprefix(KEY_OWNER_PREFIX) for holder in self._holders.values() if holder.is_key}

    def end_sessions_of_key(self, key_id: str) -> None:
        """End every session of a key now (it was revoked): nobody can use them, and their slots are free at once."""
        holder_id = key_owner(key_id)
        for session_id in [s for s, holder in self._holders.items() if holder.id == holder_id]:
            ending = self.end_session(session_id)
            self.session_closed(session_id)
            if ending is not None:
                task = asyncio.get_running_loop().create_task(ending)
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)

    def check_admission(self, requestor: AuthorizationContext | None) -> None:
        self._check(_Holder.of(requestor))

    def session_opened(self, session_id: str, requestor: AuthorizationContext | None) -> None:
        holder = _Holder.of(requestor)
        self._holders[session_id] = holder
        self._held[holder.id] += 1
        self._key_share_used += holder.in_key_share

    def session_closed(self, session_id: str) -> None:
        # Called once or twice per session (DELETE, then its server task's end): counted down only once.
        holder = self._holders.pop(session_id, None)
        if holder is not None:
            self._held[holder.id] -= 1
            if not self._held[holder.id]:
                del self._held[holder.id]
            self._key_share_used -= holder.in_key_share

    def _check(self, holder: _Holder) -> None:
        limits = self.limits
        if self.session_count >= limits.max_sessions:
            raise SessionRefused(
                503,
                f"too many MCP sessions: the server has max_sessions={limits.max_sessions} "
                f"open; try again when one ends (a client may {limits.how_to_free()})",
            )
        held = self._held[holder.id]
        if holder.is_key and held >= limits.per_key:
            key_id = holder.id.removeprefix(KEY_OWNER_PREFIX)
            raise SessionRefused(
                429,
                f"too many MCP sessions: key {key_id} has {held} MCP sessions open, the most "
                f"one key may have (max_sessions_per_key={limits.per_key}); "
                f"{limits.how_to_free()}",
            )
        if holder.in_key_share and self._key_share_used >= limits.key_sessions:
            raise SessionRefused(
                503,
                f"too many MCP sessions: viewer and operator keys hold {self._key_share_used}, "
                f"all that max_sessions={limits.max_sessions} leaves them beside "
                f"reserved_session_share={limits.reserved_share:g} for admins; try again "
                f"when one ends (a client may {limits.how_to_free()})",
            )
