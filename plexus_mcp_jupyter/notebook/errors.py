"""The notebook client's exceptions: each says what went wrong and how to fix it."""

from __future__ import annotations


class PlexusError(Exception):
    """Base of every error the notebook client raises."""


class PlexusConnectionError(PlexusError, ConnectionError):
    """No server is known, it cannot be reached, or it is not a Jupyter server with the Plexus extension."""


class PlexusAuthError(PlexusConnectionError):
    """The server refused the credential."""


class PlexusInputError(PlexusError, ValueError):
    """An argument is wrong; checked in the kernel before anything is sent."""


class PlexusAPIError(PlexusError):
    """The server answered with an error (the message is the server's, with the HTTP status)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class PlexusNotFound(PlexusAPIError, LookupError):
    """404: the task, evaluation or dataset does not exist."""


class PlexusConflict(PlexusAPIError):
    """409: a name is already taken."""


class PlexusTaskFailed(PlexusError):
    """A task or evaluation ended FAILED or CANCELLED where its result was asked for."""
