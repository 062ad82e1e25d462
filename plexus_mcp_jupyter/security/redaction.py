"""Keeping secrets out of the server log and the audit log.

A secret reaches text in three ways: an API key anywhere (`plx_<id>_<secret>`), a credential in a URL's
query (`?token=...`, which Jupyter accepts, so tornado's warning and access lines would carry it), and the
value of a server token wherever a client put it (a tool argument, a key's name). `SecretScrubber` removes
all three; `LogScrubber` applies it to every record of the loggers that write URLs and messages for Plexus
routes, before any handler formats them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from urllib.parse import unquote_plus

from .keys import PREFIX as KEY_PREFIX
from .keys import without_secrets

REDACTED = "[redacted]"
# A query parameter as it appears in a URL (name and value still percent-encoded). A name never spans a
# '?': each position is then scanned from one delimiter only, so scrubbing is linear in the text (a name
# class with '?' in it took 10 s for 40 KB of '?', on the event loop, for an unauthenticated URL).
QUERY_PARAM = re.compile(r"([?&;])([^=&;?\s#]*)=([^&;\s#'\"]*)")
# Query parameters whose value is a credential, by name (Jupyter's own log scrubs the same names).
SECRET_PARAM_NAME = re.compile(r"token|auth|key|secret|password|xsrf|code|state", re.IGNORECASE)
MIN_SECRET_CHARS = 8  # shorter "secrets" (a test's "x") would scrub ordinary words
# Loggers that write request lines and errors: tornado's (access, warnings, uncaught errors), the event
# loop's (accept errors) and ours. Jupyter's own logger is added by the extension.
SERVER_LOGGERS = ("tornado.access", "tornado.application", "tornado.general", "asyncio", "plexus_mcp_jupyter")
# Packages whose modules log with loggers of their own (getLogger(__name__)) while serving Plexus routes: the
# MCP SDK's errors of a request. A logger's filter sees only its own records, so each is filtered.
PACKAGE_LOGGERS = ("mcp",)


class SecretScrubber:
    """Replaces known secret values, API keys and credential query parameters in text."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, secret: str | None) -> None:
        """A value that must never be shown (a server token)."""
        if secret and len(secret) >= MIN_SECRET_CHARS:
            self._values.add(secret)

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        if "=" not in text and KEY_PREFIX not in text:  # neither pattern can match (most audited values: ids, names)
            return text
        return without_secrets(QUERY_PARAM.sub(self._scrub_param, text))

    def _scrub_param(self, match: re.Match[str]) -> str:
        """A query parameter, its value redacted when its name or its value is a secret. Both are read
        percent-decoded, as the server reads them: `?%74oken=%61bc...` is Jupyter's token too."""
        separator, name, value = match.groups()
        plain = unquote_plus(value)
        if (
            SECRET_PARAM_NAME.search(unquote_plus(name))
            or without_secrets(plain) != plain
            or any(secret in plain for secret in self._values)
        ):
            return f"{separator}{name}={REDACTED}"
        return match.group(0)


class LogScrubber(logging.Filter):
    """A logger filter: the record's message and traceback with secrets scrubbed (it always passes).

    Records logged from `exempt_files` pass unchanged: Jupyter's own startup lines print the URL with its
    token for the user to copy (the server's own words, before any client could put anything in them)."""

    def __init__(self, scrubber: SecretScrubber, exempt_files: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.scrubber = scrubber
        self.exempt_files = exempt_files

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname in self.exempt_files:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed call ("%d" with a string): its handler reports it, as without us
            return True
        clean = self.scrubber.scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: a scrubbed one is what every handler prints.
            record.exc_text = self.scrubber.scrub(logging.Formatter().formatException(record.exc_info))
        return True


def scrub_logs(
    scrubber: SecretScrubber, extra_loggers: tuple[str, ...] = (), exempt_files: tuple[str, ...] = ()
) -> Callable[[], None]:
    """Attach a LogScrubber for `scrubber` to the server loggers (once per logger and scrubber), leaving the
    records logged from `exempt_files` alone; returns the function that detaches them again (a stopped
    server's secrets need no more scrubbing)."""
    exempt = frozenset(exempt_files)
    attached: list[tuple[logging.Logger, LogScrubber]] = []
    modules = sorted(name for name in logging.Logger.manager.loggerDict if name.split(".")[0] in PACKAGE_LOGGERS)
    for name in (*SERVER_LOGGERS, *extra_loggers, *modules):
        logger = logging.getLogger(name)
        if not any(isinstance(f, LogScrubber) and f.scrubber is scrubber for f in logger.filters):
            scrub_filter = LogScrubber(scrubber, exempt)
            logger.addFilter(scrub_filter)
            attached.append((logger, scrub_filter))

    def detach() -> None:
        for logger, scrub_filter in attached:
            logger.removeFilter(scrub_filter)

    return detach
