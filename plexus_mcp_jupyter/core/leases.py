"""LeaseKeeper: the heartbeat that holds this server's RUNNING tasks, and notices servers that stopped beating.

A server claims a task with a lease (TaskManager's claim sets `lease_expires_at`, in the same conditional
UPDATE that moves it to RUNNING). Every `heartbeat` seconds this keeper extends the lease of every task
the server holds, in one UPDATE, and counts the RUNNING tasks of other servers whose lease has run out:
their server died (kill -9, a lost machine) or lost the store for longer than `lease` seconds. If there
are any, it asks the TaskManager to recover them, which is restart recovery (failed, or re-queued where
the task type is idempotent), each task taken over by exactly one server (Store.take_over).

It runs on a thread of its own: a busy event loop must not let this server's leases run out while its
workers are still running their tasks. Clocks: leases compare wall-clock times written by different
servers, so their clocks must agree to well within `lease` (NTP does).

A lease can be overridden by a process-id check only where the holder is provably on this machine, in this
process-id namespace (`MACHINE`, recorded in every claim): two containers sharing a store with one host name
and PID 1 each would otherwise each take the other's live tasks over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from .models import now
from .store import Store

log = logging.getLogger("plexus_mcp_jupyter")


def machine_identity(
    boot_id_path: str = "/proc/sys/kernel/random/boot_id", pid_namespace_path: str = "/proc/self/ns/pid"
) -> str:
    """Who can check this process's process ids: the running kernel (its boot id: another machine, a VM or a
    reboot has another) and the process-id namespace (its inode: each container has its own, sharing the host's
    kernel), as a short hash. Empty where either cannot be read (not Linux, a restricted /proc): then no claim is
    provably from here, and leases alone decide whether a server is gone."""
    try:
        with open(boot_id_path, encoding="ascii") as file:
            boot_id = file.read().strip()
        namespace = os.readlink(pid_namespace_path)
    except (OSError, ValueError):
        return ""
    if not boot_id or not namespace:
        return ""
    return hashlib.sha256(f"{boot_id}|{namespace}".encode()).hexdigest()[:12]


# This process's machine and process-id namespace, as recorded in its claims (TaskManager's server id).
MACHINE = machine_identity()


def lease_problem(heartbeat: float, lease: float) -> str | None:
    """What is wrong with this heartbeat and lease together, if anything (each is checked by its setting)."""
    if not 0 < heartbeat * 2 <= lease:
        return (
            f"server_lease_seconds ({lease:g}) must be at least twice server_heartbeat_seconds ({heartbeat:g}, "
            "above 0): a lease must outlive a late heartbeat"
        )
    return None


class LeaseKeeper:
    """Renews this server's leases and triggers recovery of the tasks of servers whose leases ran out."""

    def __init__(self, store: Store, *, heartbeat: float, lease: float, on_expired: Callable[[], None]) -> None:
        problem = lease_problem(heartbeat, lease)
        if problem:
            raise ValueError(problem)
        self.store = store
        self.heartbeat = heartbeat
        self.lease = lease
        self.on_expired = on_expired  # called on the loop
        self.server_id = ""
        self.held = 0  # RUNNING tasks this server held at the last heartbeat
        self.last_beat: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop, server_id: str) -> None:
        if self._thread is not None:
            return
        self._loop, self.server_id = loop, server_id
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="plexus-lease-keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def status(self) -> dict[str, Any]:
        return {
            "heartbeat_seconds": self.heartbeat,
            "lease_seconds": self.lease,
            "running_held": self.held,
            "last_heartbeat_age_seconds": None if self.last_beat is None else round(now() - self.last_beat, 3),
        }

    def beat(self) -> int:
        """One heartbeat: renew this server's leases; returns how many tasks of gone servers await recovery."""
        at = now()
        self.held = self.store.renew_leases(self.server_id, at + self.lease)
        self.last_beat = at
        return self.store.expired_lease_count(self.server_id, at)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat):
            try:
                expired = self.beat()
                failing = False
            except Exception:
                if not failing:
                    log.exception("Plexus: the lease heartbeat could not reach the store; retrying")
                failing = True
                continue
            loop = self._loop
            if expired and loop is not None and not loop.is_closed():
                log.warning(
                    "Plexus: %d running tasks of a server that stopped renewing its leases: recovering", expired
                )
                with contextlib.suppress(RuntimeError):  # the loop closed: this server is stopping
                    loop.call_soon_threadsafe(self.on_expired)
