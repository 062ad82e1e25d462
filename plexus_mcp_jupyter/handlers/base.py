"""Authentication shared by every Plexus handler on Jupyter Server.

Jupyter's identity provider decides who is calling (its token in an `Authorization: token|Bearer`
header, or its login cookie). Unlike Jupyter's own API handlers, a missing or bad credential is
answered 401 with `WWW-Authenticate: Bearer` (what MCP clients and scripts expect), never a redirect
to the login page; a foreign Origin or Host is 403.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, TypeVar

from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..core.errors import Expired, Forbidden, NotFound, PlexusError, bounded
from ..core.executors import ExecutorUnavailable
from ..core.requests import RequestModel
from ..core.store_calls import RETRY_AFTER_SECONDS, store_unavailable
from ..runtime import PlexusRuntime
from ..security.http import (
    BadJSON,
    admit_key,
    bearer_credential,
    error_message,
    origin_allowed,
    parse_json_off_loop,
    reason_phrase,
    record_request,
    set_retry_after,
)
from ..security.identity import Principal, Role
from ..security.keys import looks_like_key
from ..security.ratelimit import RateLimiter
from .jupyter_compat import (
    NOTEBOOK_USER,
    SINGLE_USER_PROVIDERS,
    mark_token_authenticated,
    server_token_user,
    set_request_user,
)
from .request_body import StreamedBody

M = TypeVar("M", bound=RequestModel)
# A request attribute: the HTTPError of an API key the plain MCP route (mcp_plain.py) refused, answered here as is
# (admitting the key again would take a second token of its rate limit).
KEY_REFUSAL = "plexus_key_refused"
MAX_HOSTS_REMEMBERED = 64  # Host values whose check passed (see PlexusHandler.check_host)


class PlexusHandler(APIHandler):
    """Base of the Plexus handlers: JSON in and out, 401/403 rules, the runtime at hand."""

    auth_resource = "plexus"
    require_auth = True

    @property
    def runtime(self) -> PlexusRuntime:
        return self.settings["plexus"]  # type: ignore[no-any-return]

    _principal: Principal | None = None
    _audit_details: dict[str, Any] | None = None
    audit_mutations = True  # POST/PUT/DELETE are recorded in the audit log (MCP records its tool calls itself)

    def require(self, action: str) -> Principal:
        """The caller, if its role allows `action`; 403 saying what is needed otherwise."""
        principal = self.principal
        if not principal.may(action):
            raise web.HTTPError(403, principal.denial(action))
        return principal

    @property
    def audit_details(self) -> dict[str, Any]:
        """What this request's audit record adds (a batch operation: its filter and counts, never every id)."""
        if self._audit_details is None:
            self._audit_details = {}
        return self._audit_details

    def on_finish(self) -> None:
        status = self.get_status()
        method = self.request.method or "GET"
        denied = status in (401, 403, 429)
        runtime = self.settings.get("plexus")
        if runtime is not None and (denied or (self.audit_mutations and method in ("POST", "PUT", "PATCH", "DELETE"))):
            outcome = "denied" if denied else ("ok" if status < 400 else "error")
            record_request(runtime, self._principal, self.request, status, outcome, self._audit_details)
        super().on_finish()

    @property
    def principal(self) -> Principal:
        """Who is calling and with which role: an API key's, or the notebook user's (an admin)."""
        if self._principal is None:
            self._principal = Principal(owner=self._jupyter_owner(), role=Role.ADMIN)
        return self._principal

    @property
    def identity(self) -> str | None:
        """The owner recorded on what this caller creates."""
        return self.principal.owner

    def _jupyter_owner(self) -> str | None:
        """The owner of what the notebook user creates.

        With Jupyter's default identity provider there is one user (the notebook's), whose requests get
        a fresh anonymous name each time they come with the shared token: they are all "jupyter".
        Other providers (JupyterHub, custom ones) name real users.
        """
        user = self.current_user
        if user is None:
            return None
        if type(self.identity_provider) in SINGLE_USER_PROVIDERS:
            return NOTEBOOK_USER
        return f"jupyter:{user.username}"

    def check_host(self) -> bool:
        """Jupyter's Host check, its "allowed" answers remembered per Host value (at most MAX_HOSTS_REMEMBERED):
        the check parses the host as an IP address on every request, a measurable share of an MCP call, and its
        answer depends only on the Host and the server's settings. Refusals are not remembered: each is still
        checked, and logged, as Jupyter does."""
        host = self.request.host
        allowed_hosts = self.settings.setdefault("plexus_allowed_hosts", set())
        if host in allowed_hosts:
            return True
        allowed = super().check_host()
        if allowed and len(allowed_hosts) < MAX_HOSTS_REMEMBERED:
            allowed_hosts.add(host)
        return allowed

    def set_default_headers(self) -> None:
        # Jupyter's headers (nosniff, configured headers, its Content-Security-Policy), computed once
        # per application: rebuilding the policy string was a measurable share of every MCP call.
        headers = self.settings.get("plexus_default_headers")
        if headers is None:
            headers = {
                "X-Content-Type-Options": "nosniff",
                **self.settings.get("headers", {}),
                "Content-Security-Policy": self.content_security_policy,
            }
            self.settings["plexus_default_headers"] = headers
        for name, value in headers.items():
            self.set_header(name, value)

    async def prepare(self) -> None:  # type: ignore[override]
        """Jupyter's prepare, replaced (not extended): a missing credential is a 401, never a redirect to the
        login page; API keys are admitted; Jupyter's token skips the identity provider's browser work. What
        Jupyter's own prepare does is mirrored here (host, origin, user, XSRF, authorization, CORS), and
        tests/test_compat_contracts.py fails when a Jupyter Server release adds a step to it."""
        if self.request.method == "OPTIONS":
            # A CORS preflight carries no credentials; APIHandler.options() answers it.
            set_request_user(self, None)
            self.set_cors_headers()
            return
        if not self.check_host():
            raise web.HTTPError(403, "this Host is not allowed to reach the server (see ServerApp.allow_remote_access)")
        if not self.origin_allowed():
            raise web.HTTPError(
                403, "requests from this Origin are not allowed (see ServerApp.allow_origin and allow_origin_pat)"
            )
        credential = bearer_credential(self.request.headers.get("Authorization"))
        if credential is not None and looks_like_key(credential):
            await self._authenticate_key(credential)
            return
        user = server_token_user(self)
        if user is None:
            found = self.identity_provider.get_user(self)
            user = await found if inspect.isawaitable(found) else found
        set_request_user(self, user)
        if self.require_auth:
            if user is None:
                raise web.HTTPError(
                    401, "authentication required: send the Jupyter token as 'Authorization: Bearer <token>'"
                )
            if self.needs_xsrf_check():
                self.check_xsrf_cookie()
            if not self.authorizer.is_authorized(self, user, self.auth_action, self.auth_resource):
                raise web.HTTPError(403, f"user {user.username!r} may not {self.auth_action} {self.auth_resource}")
        if "Origin" in self.request.headers:
            self.set_cors_headers()
        await self.runtime.start()

    async def _authenticate_key(self, credential: str) -> None:
        """An API key in the Authorization header: its principal, checked on every request (revocation),
        then its rate limit (HTTP 429 with Retry-After)."""
        refused = getattr(self.request, KEY_REFUSAL, None)
        if refused is not None:
            raise refused
        self._principal = admit_key(self.runtime, credential, "the Jupyter token")
        set_request_user(self, User(username=self._principal.owner or "key"))
        mark_token_authenticated(self)  # a header credential: no XSRF check
        if "Origin" in self.request.headers:
            self.set_cors_headers()
        await self.runtime.start()

    def needs_xsrf_check(self) -> bool:
        """A cookie-authenticated write must carry Jupyter's XSRF token, as in Jupyter's own API.

        Header-authenticated clients (MCP, scripts) send no cookie: only a browser can be made to send
        a request with ambient credentials, and the cookie is what it sends.
        """
        return (
            self.request.method not in ("GET", "HEAD", "OPTIONS")
            and "Cookie" in self.request.headers
            and not self.token_authenticated
        )

    @property
    def auth_action(self) -> str:
        return "read" if self.request.method in ("GET", "HEAD", "OPTIONS") else "write"

    def origin_allowed(self) -> bool:
        """See security.http.origin_allowed: Jupyter's allow_origin settings, checked for every request."""
        headers = self.request.headers
        return origin_allowed(
            headers.get("Origin"), headers.get("Host"), self.request.protocol, self.allow_origin, self.allow_origin_pat
        )

    # -- JSON helpers --------------------------------------------------------------------------

    def query_request(self, model: type[M], **given: Any) -> M:
        """The operation's request model read from the query string (`RequestModel.from_query`: repeated or
        comma-separated values for a list, numbers and flags from their text), `given` taken from the path;
        InvalidArgument (400 through `http_error`) naming each bad argument and what is allowed.

        Values are decoded as sent: tornado's `get_argument` would turn control characters into spaces and strip
        the ends, so a name sent with them would silently name another."""
        query = self.request.query_arguments
        return model.from_query(
            {name: [self.decode_argument(v, name=name) for v in query[name]] for name in query}, **given
        )

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        """An unreachable store is logged as one line (it is answered 503, see write_error), not a traceback."""
        unavailable = store_unavailable(value) if value is not None else None
        if unavailable is not None:
            self.log.warning("%s %s: %s", self.request.method, self.request.path, unavailable)
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        unavailable = store_unavailable(exc) if exc is not None else None
        if unavailable is not None:  # the database is down or too slow: the client may try again shortly
            self.set_status(503)
            self.set_header("Retry-After", str(RETRY_AFTER_SECONDS))
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(self.error_body(503, str(unavailable))))
            return
        message = error_message(exc, reason_phrase(status_code, kwargs))
        if status_code == 401:
            # send_error() cleared the headers set in prepare(): the challenge goes here.
            self.set_header("WWW-Authenticate", 'Bearer realm="jupyter"')
        set_retry_after(self, kwargs.get("exc_info", (None, None, None))[1])
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.error_body(status_code, message)))

    def error_body(self, status_code: int, message: str) -> dict[str, Any]:
        return {"error": {"status": status_code, "message": message}}


class BodyHandler(StreamedBody, PlexusHandler):  # type: ignore[misc]  # (prepare: without Jupyter's keyword)
    """A Plexus handler that takes a JSON body: read only once `prepare` has admitted its sender, within
    max_request_bytes and the sender's byte budget, and refused before it is read when it is over either
    (handlers/request_body.py)."""

    def body_limit(self) -> int:
        return int(self.runtime.settings.max_request_bytes)

    def body_budget(self) -> RateLimiter | None:
        return self.runtime.body_budget

    def body_sender(self) -> Principal | None:
        return None if self.request.method == "OPTIONS" else self.principal  # (a preflight is not authenticated)

    async def json_body(self) -> dict[str, Any]:
        """The body as a JSON object; 400 with a one-line reason for anything else (see parse_json). Its size and
        its charge to the byte budget were checked as it was read (413 above max_request_bytes: Jupyter lets a body
        reach 512 MiB, which parses into several GiB of objects)."""
        body = self.body
        if not body:
            return {}
        try:
            parsed = await parse_json_off_loop(body, self.runtime.settings.max_json_values)
        except BadJSON as exc:
            raise web.HTTPError(400, f"the request body is {exc}") from None
        if not isinstance(parsed, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return parsed


class BodylessHandler(BodyHandler):
    """A Plexus handler that reads no body (GET, DELETE, a POST of an action named by its URL): a StreamedBody all
    the same, so that tornado does not read a body of up to Jupyter's max_body_size (512 MiB) before `prepare` has
    admitted its sender; one past 64 KiB is refused unread, whatever the method (handlers/request_body.py)."""

    body_methods = ()


def http_error(exc: PlexusError) -> web.HTTPError:
    """Map a core error to the HTTP error of the same meaning, its message bounded as for a tool error (it
    quotes what the client sent, and tornado logs it with the URL)."""
    message = bounded(str(exc))
    if store_unavailable(exc) is not None:
        unavailable = web.HTTPError(503, message)
        unavailable.retry_after = RETRY_AFTER_SECONDS  # type: ignore[attr-defined]  # set_retry_after reads it
        return unavailable
    if isinstance(exc, ExecutorUnavailable):
        return web.HTTPError(503, message)  # the server cannot run it now (its executor or workers): not the request
    if isinstance(exc, Expired):
        return web.HTTPError(410, message)  # Gone: it existed, and retention removed it
    if isinstance(exc, NotFound):
        return web.HTTPError(404, message)
    if isinstance(exc, Forbidden):
        return web.HTTPError(403, message)
    return web.HTTPError(400, message)
