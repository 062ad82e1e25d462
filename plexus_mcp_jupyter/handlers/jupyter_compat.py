"""Where Plexus leans on Jupyter Server's internals (and those of the tornado under it): the only module that may.

Everything else uses public surfaces (tests/test_compat_contracts.py checks it, and checks each adapter's
assumption against the installed Jupyter Server and tornado, so a release that changes one fails there with
the adapter's name). docs/architecture.md lists the adapters with the upstream change that would retire each.

- `set_request_user` and `mark_token_authenticated`: the two markers Jupyter's own `prepare()` and identity
  provider leave on a handler, which `PlexusHandler.prepare` (it replaces Jupyter's, to answer 401 instead of
  redirecting and to admit API keys) must leave the same way for Jupyter's XSRF check and `token_authenticated`.
- `server_token_user`: the Jupyter token checked the way Jupyter's identity provider checks it, without its
  browser work (see the function).
- `response_finished`: whether tornado's `finish()` has run.
- `SkippableRequestLog`: a handler may skip the access log line tornado writes when it finishes.
- `CachedDateHeader`: a handler whose `Date` header is formatted once per second, not once per request.
- `route_first`: an extension's routes matched before those of the extensions loaded before it.
- `record_request_metrics`: what Jupyter's `prometheus_log_method` records for a request, its labelled series
  looked up once per (method, handler class, status).
- `token_user`, `json_response_headers`, `record_request_duration`, `mark_api_activity`, `route_through`: what the
  plain MCP route (handlers/mcp_plain.py) needs to answer a request the way the MCP handler would, without one.
- `pending_read`: which read a tornado stream is waiting on (a request's headers, its body, or none), for the
  connection timeouts' sweep (security/connections.py).
"""

from __future__ import annotations

import functools
import hmac
import time
from datetime import datetime, timezone
from typing import Any

import tornado
from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider, User
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.prometheus.log_functions import HTTP_REQUEST_DURATION_SECONDS
from tornado import httputil
from tornado.web import Application, RequestHandler

NOTEBOOK_USER = "jupyter"
# Jupyter's own providers: one notebook user, authenticated by the server's token or password.
SINGLE_USER_PROVIDERS = (IdentityProvider, PasswordIdentityProvider)
_TOKEN_USER = User(username=NOTEBOOK_USER, name="Jupyter token", display_name="Jupyter token")
_ANONYMOUS_USER = User(username=NOTEBOOK_USER, name="Anonymous (auth disabled)", display_name="Anonymous")


PENDING_HEADERS = "headers"
PENDING_BODY = "body"


def pending_read(stream: Any) -> tuple[Any, str] | None:
    """The read a tornado `IOStream` is waiting on: (the read's future, PENDING_HEADERS or PENDING_BODY), or None
    when it is not reading (between a request's body and the next request, or while a response is written).

    Relies on: `IOStream._read_future` (the pending read's future, None when there is none) and
    `IOStream._read_regex` (set only while the pending read is `read_until_regex`, which `HTTP1Connection` uses
    for a request's headers and for nothing else; a body is read with `read_bytes` or `read_until`). Checked on a
    real tornado server in tests/test_connection_sweep.py.
    """
    future = stream._read_future
    if future is None or future.done():
        return None
    return future, PENDING_HEADERS if stream._read_regex is not None else PENDING_BODY


def set_request_user(handler: JupyterHandler, user: User | None) -> None:
    """Make `user` the request's user, as `JupyterHandler.prepare` does.

    Relies on: `JupyterHandler._jupyter_current_user`, which Jupyter's `check_xsrf_cookie` and
    `IdentityProvider.get_user` read to know that authentication already ran, beside tornado's public
    `current_user`.
    """
    handler.current_user = handler._jupyter_current_user = user


def mark_token_authenticated(handler: RequestHandler) -> None:
    """Record that the request came with a header credential, as `IdentityProvider.get_user` does for the token.

    Relies on: `handler._token_authenticated`, which `IdentityProvider.is_token_authenticated` (and so the
    handler's `token_authenticated`) reads: such a request needs no XSRF token.
    """
    handler._token_authenticated = True  # type: ignore[attr-defined]


def server_token_user(handler: JupyterHandler) -> User | None:
    """Fast path for Jupyter's own identity providers: the server's token in the header, or no auth.

    The token check is the one the provider makes (its `auth_header_pat`, its `token`; constant-time here),
    without what the provider adds for browsers: a fresh anonymous user and a signed login cookie on every
    response, which API clients never use, which cost a sizeable share of each MCP call, and which would make a
    cookie-keeping client look like a browser (and so need an XSRF token) from its second request. With auth
    disabled, the same applies to the anonymous user. Any other provider, or a request without that header,
    returns None: the caller goes through `identity_provider.get_user()` unchanged.

    Relies on: `IdentityProvider.get_user_token` accepting exactly the server's `token` as group 2 of
    `auth_header_pat` in the Authorization header, and `auth_enabled` meaning "no authentication at all" when
    false; a token-authenticated request is marked as the provider marks it (`mark_token_authenticated`).
    """
    user = token_user(handler.identity_provider, handler.request.headers)
    if user is _TOKEN_USER:
        mark_token_authenticated(handler)
    return user


def token_user(provider: Any, headers: httputil.HTTPHeaders) -> User | None:
    """`server_token_user`'s check on a request's headers alone (no handler): the token's user, the anonymous user
    with auth disabled (and no cookie), or None."""
    if type(provider) not in SINGLE_USER_PROVIDERS:
        return None
    if not provider.auth_enabled:
        return None if "Cookie" in headers else _ANONYMOUS_USER
    if not provider.token:
        return None
    match = provider.auth_header_pat.match(headers.get("Authorization", ""))
    if match is None or not hmac.compare_digest(match.group(2).encode(), provider.token.encode()):
        return None
    return _TOKEN_USER


def response_finished(handler: RequestHandler) -> bool:
    """Whether the handler's response is finished (`finish()` ran), so nothing more may be written or flushed.

    Relies on: tornado's `RequestHandler._finished`, set by `finish()` (tornado has no public reading of it).
    """
    return bool(handler._finished)


class SkippableRequestLog(RequestHandler):
    """A handler that may skip the access log line tornado writes when the response finishes.

    Relies on: tornado's `RequestHandler._log()`, which `finish()` calls to hand the request to the
    application's `log_request` (Jupyter's `log_function` setting). Override `skip_request_log`.
    """

    def skip_request_log(self) -> bool:
        """True to write no access log line for this request (whatever must still be recorded is the
        handler's to record)."""
        return False

    def _log(self) -> None:
        if not self.skip_request_log():
            super()._log()


_REQUEST_SERIES: dict[tuple[Any, type, int], Any] = {}
MAX_REQUEST_SERIES = 256


def record_request_metrics(handler: RequestHandler) -> None:
    """Record the request's duration in Jupyter's `http_request_duration_seconds`, as `prometheus_log_method` does
    (same histogram, same labels, same value), with the labelled series kept per (method, handler class, status):
    `labels()` builds and checks the label values and takes the metric's lock on every call.

    Relies on: `jupyter_server.prometheus.log_functions.prometheus_log_method` being only
    `HTTP_REQUEST_DURATION_SECONDS.labels(method=..., handler="<module>.<class>", status_code=...)
    .observe(request.request_time())`, and prometheus_client returning the same child for the same label values
    while it is not removed (Jupyter never removes one).
    """
    record_request_duration(handler.request, type(handler), handler.get_status())


def record_request_duration(request: httputil.HTTPServerRequest, handler_class: type, status: int) -> None:
    """`record_request_metrics` for a request answered without a handler, in the series of `handler_class`."""
    key = (request.method, handler_class, status)
    series = _REQUEST_SERIES.get(key)
    if series is None:
        cls = key[1]
        series = HTTP_REQUEST_DURATION_SECONDS.labels(
            method=key[0], handler=f"{cls.__module__}.{cls.__name__}", status_code=key[2]
        )
        if len(_REQUEST_SERIES) < MAX_REQUEST_SERIES:
            _REQUEST_SERIES[key] = series
    series.observe(request.request_time())


def mark_api_activity(settings: dict[str, Any]) -> None:
    """Record an authenticated API request's activity, as `APIHandler.finish` does (what idle culling reads).

    Relies on: `APIHandler.update_api_activity` setting `settings["api_last_activity"]` to `jupyter_server._tz.utcnow()`
    (a timezone-aware UTC datetime) for an authenticated request without a `no_track_activity` argument.
    """
    settings["api_last_activity"] = datetime.now(timezone.utc)


class CachedDateHeader(RequestHandler):
    """A handler whose `Date` header is formatted once per second: `email.utils.formatdate`, which tornado calls
    for every request, was ~3% of an MCP call. RFC 1123 dates have no unit finer than the second, so the bytes are
    tornado's.

    Relies on: tornado's `RequestHandler.clear()` (run when a handler is made, and before an error page) setting
    the Server, Content-Type and Date headers, then `set_default_headers()`, an empty write buffer and status 200,
    and nothing else; this does the same.
    """

    def clear(self) -> None:
        self._headers = httputil.HTTPHeaders(
            {"Server": _SERVER_HEADER, "Content-Type": "text/html; charset=UTF-8", "Date": _http_date(int(time.time()))}
        )
        self.set_default_headers()
        self._write_buffer: list[bytes] = []
        self._status_code = 200
        self._reason = httputil.responses[200]


_SERVER_HEADER = f"TornadoServer/{tornado.version}"


def json_response_headers(default_headers: dict[str, str], body: bytes) -> httputil.HTTPHeaders:
    """The headers a `CachedDateHeader` API handler (Jupyter's `APIHandler`) sends with a JSON body it finishes,
    for a response written without a handler: `clear()`'s, then `default_headers` (what the handler's
    `set_default_headers` sets), `APIHandler.finish`'s Content-Type, then tornado's Content-Length, in that order.

    Relies on: what `CachedDateHeader.clear` relies on, `APIHandler.finish` setting Content-Type to
    `application/json`, and `RequestHandler.finish` adding Content-Length last.
    """
    headers = httputil.HTTPHeaders(
        {"Server": _SERVER_HEADER, "Content-Type": "text/html; charset=UTF-8", "Date": _http_date(int(time.time()))}
    )
    for name, value in default_headers.items():
        headers[name] = value
    headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    return headers


@functools.lru_cache(maxsize=4)
def _http_date(second: int) -> str:
    return httputil.format_timestamp(second)


def route_through(app: Application, handler_class: type[RequestHandler], router: Any) -> bool:
    """Make `router` (a tornado `Router`) the target of the route that serves `handler_class`: the router is
    given each request the route matches (it chooses the delegate that serves it, the handler's or its own).
    True when the route was found.

    Relies on: what `route_first` relies on (each extension's rule's target a router whose `rules` hold the
    `Rule`s targeting its handler classes), and tornado's `RuleRouter.get_target_delegate` calling
    `find_handler(request, **target_params)` on a `Router` target.
    """
    for rule in app.default_router.rules:
        for inner in getattr(rule.target, "rules", ()):
            if getattr(inner, "target", None) is handler_class:
                inner.target = router
                return True
    return False


def route_first(app: Application, handler_class: type[RequestHandler]) -> bool:
    """Match the routes of the extension that serves `handler_class` before any other extension's.

    Each Jupyter extension's handlers are one rule of the application's router, in the order the extensions were
    loaded, and tornado tries every pattern of every rule before until one matches: under jupyterlab, jupyter_lsp,
    the terminals and notebook_shim, that was ~20 regular expressions per MCP call (~3% of it). Only paths no other
    extension serves are affected (the extension's own prefix). True when the rule was found.

    Relies on: tornado's `Application.default_router.rules`, the list `add_handlers` inserts each extension's
    `Rule` into (before the last rule, Jupyter's own handlers), each rule's `target` a router whose `rules` hold
    `Rule`s targeting handler classes.
    """
    rules = app.default_router.rules
    for index, rule in enumerate(rules):
        inner_targets = (getattr(inner, "target", None) for inner in getattr(rule.target, "rules", ()))
        if any(
            target is handler_class or getattr(target, "handler_class", None) is handler_class
            for target in inner_targets
        ):
            if index:
                rules.insert(0, rules.pop(index))
            return True
    return False
