"""Executors run task code away from the server's event loop."""

from .base import Executor, ExecutorUnavailable, MessageCallback
from .local import LocalExecutor

__all__ = ["Executor", "ExecutorUnavailable", "LocalExecutor", "MessageCallback"]
