"""The local executor: one worker process per running task.

A process per task (bounded by the manager's max_concurrency) gives each task its own memory and
lets a forced stop kill exactly one task without disturbing the others. Processes start from a
forkserver that has pre-imported the worker module, so a start costs milliseconds and never forks
the threaded server process itself. Messages come back over a pipe, read by one thread per task
that hands them to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import sys
import threading
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .. import worker
from .base import Executor, MessageCallback


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without re-importing the server's `__main__` in it.

    multiprocessing (forkserver and spawn) makes each child re-import the parent's main module, which
    for Jupyter is the whole `jupyter server` entry point: measured 0.6 to 1 s before a task's first
    line. Workers import their task code by path and need nothing from `__main__`, so a bare module
    stands in for it while the child's preparation data is taken (synchronously, in start()).
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


@dataclass
class _Running:
    process: Any
    cancel_flag: Any
    reader: threading.Thread
    channel: Any  # our end of the duplex pipe: the pump thread reads it, reply() writes it


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, start_method: str | None = None) -> None:
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        self._mp: Any = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            # The evaluation runner too: pandas, pyarrow and SQLAlchemy cost 0.5-1.8 s to import in every worker.
            self._mp.set_forkserver_preload(["plexus_mcp_jupyter.core.worker", "plexus_mcp_jupyter.evaluations.runner"])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self.start_method == "forkserver":
            # Starting the forkserver (a fresh interpreter importing the worker module) takes most of a
            # second: do it now, off the event loop, rather than inside the first task's start.
            from multiprocessing import forkserver

            threading.Thread(target=forkserver.ensure_running, name="plexus-forkserver-warmup", daemon=True).start()

    def submit(
        self, task_id: str, target: str, params: dict[str, Any], on_message: MessageCallback, *,
        max_output_bytes: int = 65_536, environment: Mapping[str, Any] | None = None,
    ) -> str:
        if self._loop is None:
            raise RuntimeError("LocalExecutor.start(loop) must be called before submit()")
        # Duplex: the worker reports on it, and the server answers the worker's requests on it.
        receiver, sender = self._mp.Pipe(duplex=True)
        cancel_flag = self._mp.Event()
        process = self._mp.Process(
            target=worker.process_main,
            args=(task_id, target, params, sender, cancel_flag, max_output_bytes, dict(environment or {})),
            name=f"plexus-task-{task_id[:8]}",
            daemon=True,
        )
        with _main_module_hidden():
            process.start()
        sender.close()  # the child holds the only writer: EOF on our side means it is gone
        reader = threading.Thread(
            target=self._pump, args=(task_id, process, receiver, on_message), daemon=True,
            name=f"plexus-pump-{task_id[:8]}",
        )
        with self._lock:
            self._running[task_id] = _Running(process, cancel_flag, reader, receiver)
        reader.start()
        return f"pid={process.pid}"

    def _pump(self, task_id: str, process: Any, receiver: Any, on_message: MessageCallback) -> None:
        loop = self._loop
        assert loop is not None
        try:
            while True:
                try:
                    msg = receiver.recv()
                except (EOFError, OSError):
                    break
                except Exception as exc:  # an unpicklable message: report it, keep reading
                    msg = ("log", f"plexus: a message from the worker could not be read: {exc}")
                try:
                    loop.call_soon_threadsafe(on_message, msg)
                except RuntimeError:  # the loop closed during shutdown
                    break
        finally:
            receiver.close()
            process.join()
            with self._lock:
                self._running.pop(task_id, None)
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(on_message, ("exit", process.exitcode))

    def reply(self, task_id: str, message: tuple[Any, ...]) -> None:
        with self._lock:
            running = self._running.get(task_id)
        if running is not None:
            with contextlib.suppress(OSError, ValueError):  # the worker is gone: nobody waits for the answer
                running.channel.send(message)

    def request_cancel(self, task_id: str) -> None:
        with self._lock:
            running = self._running.get(task_id)
        if running is not None:
            running.cancel_flag.set()

    def kill(self, task_id: str) -> None:
        with self._lock:
            running = self._running.get(task_id)
        if running is not None and running.process.is_alive():
            running.process.kill()

    def pid(self, task_id: str) -> int | None:
        with self._lock:
            running = self._running.get(task_id)
        return running.process.pid if running else None

    async def shutdown(self, grace: float) -> None:
        with self._lock:
            ids = list(self._running)
        for task_id in ids:
            self.request_cancel(task_id)
        deadline = asyncio.get_running_loop().time() + grace
        while self._running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for task_id in list(self._running):
            self.kill(task_id)
        with self._lock:
            readers = [r.reader for r in self._running.values()]
        for reader in readers:
            await asyncio.to_thread(reader.join, 5)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = len(self._running)
        return {"name": self.name, "start_method": self.start_method, "running": running}
