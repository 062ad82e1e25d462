"""Whether the servers sharing a store share their item files' directory (evaluation_items_dir).

An evaluation's items are written by whichever server's worker runs it and read by whichever server a client
asks: with several servers on one PostgreSQL, the directory must be one they all reach. Each server writes a
marker file `{items_dir}/.plexus-servers/{key}` and records it in the store (`plexus_meta`, key
`items-marker:{key}`, with the time it last checked); every CHECK_SECONDS, on a thread of its own, it looks for
the markers of the other servers that checked lately. One it cannot see means that server writes its items
somewhere this one cannot read: health is degraded, saying so, and a warning is logged once per server.

With the Dask executor the evaluations run on the cluster's workers, which write the item files themselves:
`WorkerItemsCheck` asks every worker (`client.run`, on a thread of its own, at start, whenever the set of workers
changes and every CHECK_SECONDS) whether it sees this server's marker, with this server's id in it, and can write
in the directory. A worker that cannot makes health degraded, naming it, with one warning per worker and
reason, and an evaluation created meanwhile is refused at once with that reason (EvaluationService.create)
rather than failing on the worker, or worse, writing files this server never sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..core.store import meta_table

log = logging.getLogger("plexus_mcp_jupyter")

CHECK_SECONDS = 60.0  # how often each server records itself and looks for the others' markers
LIVE_SECONDS = 3 * CHECK_SECONDS  # a server that has not checked for this long is gone: not looked for
PREFIX = "items-marker:"
MARKERS = ".plexus-servers"
WORKER_POLL_SECONDS = 2.0  # how often the worker check looks (in memory) whether the cluster's workers changed
MAX_WORKERS_NAMED = 5  # workers named in a problem (the count says how many more)


def write_marker(root: Path, key: str, server_id: str) -> Path:
    """This server's marker in the items directory: `{root}/.plexus-servers/{key}`, holding its id."""
    folder = root / MARKERS
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / key
    marker.write_text(server_id, encoding="utf-8")
    return marker


def worker_sees(root: str, key: str, server_id: str) -> str | None:
    """Run on a Dask worker (by `client.run`): None when it sees the server's marker, with the server's id in it, in
    `root` and can write there; else what it sees instead, in a few words."""
    folder = Path(root)
    marker = folder / MARKERS / key
    try:
        held = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"no {marker}: it sees another directory at {root}, or none"
    except OSError as exc:
        return f"cannot read {marker}: {exc.strerror or type(exc).__name__}"
    if held != server_id:
        return f"{marker} is not this server's: it sees another directory at {root}"
    probe = folder / MARKERS / f".probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"cannot write in {root}: {exc.strerror or type(exc).__name__}"
    return None


class _Checking:
    """A check of this server's items directory run on a thread of its own (`_run`), its problem in `problem`."""

    thread_name = "plexus-items-check"

    def __init__(self, root: Path, server_id: str) -> None:
        self.root, self.server_id = Path(root), server_id
        self.key = hashlib.sha256(server_id.encode()).hexdigest()[:16]
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError


class SharedItemsCheck(_Checking):
    def __init__(self, engine: Engine, root: Path, server_id: str, *, interval: float = CHECK_SECONDS) -> None:
        super().__init__(root, server_id)
        self.engine, self.interval = engine, interval
        self._warned: set[str] = set()

    def stop(self) -> None:
        """Stop checking, and withdraw this server's marker and record (others no longer look for it)."""
        super().stop()
        with contextlib.suppress(Exception):  # the store or the directory is gone: the record ages out
            (self.root / MARKERS / self.key).unlink(missing_ok=True)
            with self.engine.begin() as conn:
                conn.execute(sa.delete(meta_table).where(meta_table.c.key == PREFIX + self.key))

    def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # the store is unreachable, say: the next check tries again
                log.debug("Plexus: the shared item directory check failed", exc_info=True)
            if self._stop.wait(self.interval):
                return

    def check(self) -> str | None:
        """Record this server (its marker file, its row), then look for the live others' markers; the problem
        found, if any (also in `problem`)."""
        folder = write_marker(self.root, self.key, self.server_id).parent
        at = time.time()
        mine = json.dumps({"server": self.server_id, "dir": str(self.root), "at": at})
        with self.engine.begin() as conn:
            conn.execute(sa.delete(meta_table).where(meta_table.c.key == PREFIX + self.key))
            conn.execute(sa.insert(meta_table).values(key=PREFIX + self.key, value=mine))
            rows = conn.execute(
                sa.select(meta_table.c.key, meta_table.c.value).where(meta_table.c.key.startswith(PREFIX))
            ).all()
        unseen = []
        for key, value in rows:
            other = key.removeprefix(PREFIX)
            try:
                record = json.loads(value)
            except ValueError:
                continue
            if other == self.key or at - float(record.get("at", 0)) > LIVE_SECONDS:
                continue
            if not (folder / other).exists():
                unseen.append(record)
        self.problem = None
        if unseen:
            self.problem = (
                f"evaluation_items_dir is not shared: {len(unseen)} other server(s) on this store write item files "
                f"this server cannot see ({', '.join(str(r.get('dir')) for r in unseen[:3])}, vs. {self.root} here); "
                "their evaluations' results cannot be read here. Set evaluation_items_dir to one path every server "
                "(and every Dask worker) reaches"
            )
            fresh = [r for r in unseen if r.get("server") not in self._warned]
            if fresh:
                self._warned.update(str(r.get("server")) for r in fresh)
                log.warning("Plexus: %s", self.problem)
        return self.problem


class WorkerItemsCheck(_Checking):
    """Whether every Dask worker sees this server's items directory (see the module's docstring).

    `workers()` is the executor's set of worker addresses as last refreshed (no scheduler call); `run(fn, *args)`
    runs `fn` on every worker and returns {address: result or exception}. Both are called only from this thread."""

    def __init__(
        self,
        run: Callable[..., Mapping[str, Any]],
        workers: Callable[[], frozenset[str]],
        root: Path,
        server_id: str,
        *,
        interval: float = CHECK_SECONDS,
        poll: float = WORKER_POLL_SECONDS,
    ) -> None:
        super().__init__(root, server_id)
        self.run, self.workers, self.interval, self.poll = run, workers, interval, poll
        self.checks = 0  # completed checks
        self._warned: set[tuple[str, str]] = set()

    def _run(self) -> None:
        checked: frozenset[str] | None = None
        at = 0.0
        while not self._stop.is_set():
            current = self.workers()
            if current != checked or time.monotonic() - at >= self.interval:
                try:
                    self.check()
                    checked, at = current, time.monotonic()
                except Exception:  # the scheduler is unreachable, say: the next look tries again
                    log.debug("Plexus: the Dask workers' item directory check failed", exc_info=True)
            if self._stop.wait(self.poll):
                return

    def check(self) -> str | None:
        """Write this server's marker, ask every worker whether it sees it; the problem found, if any."""
        write_marker(self.root, self.key, self.server_id)
        answers = self.run(worker_sees, str(self.root), self.key, self.server_id)
        blind: dict[str, str] = {}
        for address, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):
                blind[address] = f"the check failed: {type(answer).__name__}: {answer}"
            elif answer is not None:
                blind[address] = str(answer)
        problem = None
        if blind:
            named = "; ".join(f"{address}: {why}" for address, why in list(blind.items())[:MAX_WORKERS_NAMED])
            more = len(blind) - MAX_WORKERS_NAMED
            problem = (
                f"{len(blind)} of {len(answers)} Dask worker(s) cannot use evaluation_items_dir {self.root} "
                f"({named}{f'; and {more} more' if more > 0 else ''}); evaluations are refused until every worker "
                "sees it: set evaluation_items_dir to a path every worker reaches (a shared mount), or start the "
                "workers where it is"
            )
            fresh = [(address, why) for address, why in blind.items() if (address, why) not in self._warned]
            if fresh:
                self._warned.update(fresh)
                log.warning("Plexus: %s", problem)
        self.problem = problem
        self.checks += 1
        return problem
