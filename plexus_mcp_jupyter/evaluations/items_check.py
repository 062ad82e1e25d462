"""Whether the servers sharing a store share their item files' directory (evaluation_items_dir).

An evaluation's items are written by whichever server's worker runs it and read by whichever server a client
asks: with several servers on one PostgreSQL, the directory must be one they all reach. Each server writes a
marker file `{items_dir}/.plexus-servers/{key}` and records it in the store (`plexus_meta`, key
`items-marker:{key}`, with the time it last checked); every CHECK_SECONDS, on a thread of its own, it looks for
the markers of the other servers that checked lately. One it cannot see means that server writes its items
somewhere this one cannot read: health is degraded, saying so, and a warning is logged once per server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..core.store import meta_table

log = logging.getLogger("plexus_mcp_jupyter")

CHECK_SECONDS = 60.0  # how often each server records itself and looks for the others' markers
LIVE_SECONDS = 3 * CHECK_SECONDS  # a server that has not checked for this long is gone: not looked for
PREFIX = "items-marker:"
MARKERS = ".plexus-servers"


class SharedItemsCheck:
    def __init__(self, engine: Engine, root: Path, server_id: str, *, interval: float = CHECK_SECONDS) -> None:
        self.engine, self.root, self.server_id, self.interval = engine, Path(root), server_id, interval
        self.key = hashlib.sha256(server_id.encode()).hexdigest()[:16]
        self.problem: str | None = None
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="plexus-items-check", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop checking, and withdraw this server's marker and record (others no longer look for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
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
        folder = self.root / MARKERS
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.key).write_text(self.server_id, encoding="utf-8")
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
