"""Store calls from async code, off the event loop, and what a gone database looks like to a client.

A local SQLite file answers in microseconds, so most store calls still run on the loop; a networked database
that stops answering would stall it for the connect timeout. `StoreCalls.run` runs a store call in a bounded
pool of threads (as many as the store's connection pool: more threads would only wait for a connection) and
gives up after a timeout. `store_unavailable` recognises the errors that mean "the database is unreachable"
(not "this statement is wrong") so that faces answer 503 with a clear message, and health says degraded,
instead of a 500 with a traceback. Recovery needs nothing here: SQLAlchemy discards the pooled connections a
restart closed, and the next call reconnects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from .errors import PlexusError
from .pools import start_one_thread

T = TypeVar("T")
RETRY_AFTER_SECONDS = 5  # what a 503 for an unavailable store suggests to the client


class StoreUnavailable(PlexusError):
    """The store's database did not answer (down, unreachable, out of connections, too slow)."""


def store_unavailable(exc: BaseException) -> StoreUnavailable | None:
    """A StoreUnavailable for an error that means the database is unreachable; None for any other error."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection came free in time
        return StoreUnavailable(f"the store is unavailable: every connection is busy ({_first_line(exc)})")
    if isinstance(exc, sa.exc.DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
    ):
        # The driver's message says what failed (refused, timed out, terminated) and where, never a password.
        return StoreUnavailable(f"the store is unavailable: {_first_line(exc.orig or exc)}")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class StoreCalls:
    """A bounded pool of threads for store calls made from async code, each with a timeout."""

    def __init__(self, size: int, timeout: float) -> None:
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix="plexus-store")
        start_one_thread(self._pool)  # not in the first call

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """`fn(*args)` on a pool thread; StoreUnavailable when the database is unreachable or slower than
        `timeout` (the call itself goes on in its thread until the database or the driver gives up)."""
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._pool, fn, *args), limit)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"the store is unavailable: no answer within {limit:g} s") from None
        except Exception as exc:
            unavailable = store_unavailable(exc)
            if unavailable is None:
                raise
            raise unavailable from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
