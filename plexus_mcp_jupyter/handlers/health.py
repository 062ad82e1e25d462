"""`{base_url}plexus/api/health`: liveness for anyone, details for authenticated callers; and the 503 that
every Plexus route answers while the extension's settings are invalid."""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler
from tornado import web

from .._version import __version__
from ..security.bodies import JSON_ON_LOOP_BYTES
from .base import BodylessHandler
from .jupyter_compat import response_finished
from .request_body import HTTP_METHODS, declared_length

AUTH_DISABLED_WARNING = (
    "Jupyter authentication is disabled, so the MCP endpoint accepts anyone who can reach this server. "
    "Set a token or password to protect it."
)


class HealthHandler(BodylessHandler):
    require_auth = False

    @allow_unauthenticated  # also with ServerApp.allow_unauthenticated_access=False: liveness needs no credential
    async def get(self) -> None:
        if self.current_user is None:
            self.reply({"status": "ok"})
            return
        if not self.principal.is_admin:
            # Details (the store, counts of everyone's tasks) are for the notebook user and admin keys.
            self.reply(
                {"status": "ok", "authenticated": True, "version": __version__, "role": self.principal.role.value}
            )
            return
        details = await self.runtime.health()
        details["role"] = self.principal.role.value  # the lab disables what the caller may not do
        details["auth"] = {"enabled": bool(self.identity_provider.auth_enabled)}
        if not self.identity_provider.auth_enabled:
            details["auth"]["warning"] = AUTH_DISABLED_WARNING
        self.reply(details)


@web.stream_request_body
class UnavailableHandler(APIHandler):
    """Every Plexus route while the extension cannot run: 503 naming the setting, for anyone.

    `message` holds only setting names, values and what is allowed, which say nothing about the data; `detail`
    adds what only the notebook user may read (a database's or a scheduler's address, a store's revisions):
    it is shown to a caller Jupyter authenticates.

    Its body is never kept (tornado's `stream_request_body`: without it tornado read a whole body, up to Jupyter's
    max_body_size, before the 503): one declared over 64 KiB is answered once its headers are in and never read
    (`Connection: close`, as a StreamedBody's), a chunked one once more than 64 KiB of it has come; a smaller one is
    read and dropped, then answered, so the connection stays open and a client that writes its whole body before it
    reads sees the 503."""

    _answer: str | None = None
    _received = 0

    def initialize(self, message: str, detail: str | None = None) -> None:  # type: ignore[override]
        self.message = message
        self.detail = detail or message

    async def prepare(self) -> None:  # type: ignore[override]
        try:
            await super().prepare()  # Jupyter resolves who is asking (or refuses, e.g. a bad XSRF token)
            authenticated = bool(self.current_user)
        except Exception:
            authenticated = False
        self._answer = self.detail if authenticated else self.message
        if (declared_length(self.request.headers) or 0) > JSON_ON_LOOP_BYTES:  # (a chunked one: data_received)
            self._unavailable(unread=True)

    def data_received(self, chunk: bytes) -> None:  # (dropped: a 503 reads nothing of it)
        self._received += len(chunk)
        if self._received > JSON_ON_LOOP_BYTES and not response_finished(self):
            self._unavailable(unread=True)

    def _unavailable(self, *, unread: bool = False) -> None:
        if response_finished(self):
            return
        self.clear()
        self.set_status(503)
        self.set_header("Content-Type", "application/json")
        if unread:
            self.set_header("Connection", "close")  # tornado ends the connection: the rest of the body is not read
        self.finish(json.dumps({"error": {"status": 503, "message": self._answer or self.message}}))

    def _answer_any_method(self, *args: Any, **kwargs: Any) -> None:
        self._unavailable()


for _method in HTTP_METHODS:
    setattr(UnavailableHandler, _method, UnavailableHandler._answer_any_method)
