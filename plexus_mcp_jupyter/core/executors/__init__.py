"""Executors run task code away from the server's event loop."""

from .base import Executor, MessageCallback
from .local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "MessageCallback"]
