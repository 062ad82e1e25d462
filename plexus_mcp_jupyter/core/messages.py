"""The messages between task code, workers, executors and the TaskManager: one frozen dataclass per kind.

They cross process boundaries pickled (a local worker's pipe, a Dask queue or result), so each is small: a
message pickles as its class and its fields in order (`Message.__reduce__`), not as a dict of attributes.
Receivers match on the type (`match msg: case Done(output, tails): ...`), never on a position.

Who sends what:

- task code, through its TaskContext: Stage, Progress, Log, Request; the server answers a Request with a Reply;
- the worker, once per task, one final message: Done, Failed or Cancelled;
- the executor: Placed (where the task runs, when it only knows later), Lost (the worker died: a final
  message), and last of all Exit (after the final message, if any);
- the local executor's pool protocol (core/worker.py `pool_main`): Run, ToTask and Stop to a worker; End and
  Batch from it. Dask's worker side adds Started (core/executors/dask.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

Tails: TypeAlias = Mapping[str, "str | None"]  # the last characters of a task's stdout and stderr


class Message:
    """Base of every message: pickled as (class, fields in order), which is smaller and quicker to load than
    the default of a slots dataclass (a state dict set attribute by attribute), and works on Python 3.10."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        names: tuple[str, ...] = self.__slots__  # a dataclass(slots=True) subclass's: its fields, in order
        return type(self), tuple([getattr(self, name) for name in names])


# -- from task code (TaskContext) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stage(Message):
    """A new stage began (the previous one is complete), with `total` items to process if known."""

    name: str
    total: int | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Progress(Message):
    """The current stage's processed count (it never goes backwards on the server)."""

    processed: int
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Log(Message):
    """A line for the task's stderr tail, sent live to the clients following it at an MCP log `level`."""

    text: str
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Request(Message):
    """Task code asks the server for something only it can do (e.g. "kernel_score"); answered by a Reply."""

    request_id: int
    kind: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """The server's answer to Request `request_id`: `result` when `ok`, else the refusal's message."""

    request_id: int
    ok: bool
    result: Any


# -- how a task ended (exactly one, before Exit) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done(Message):
    """The task function returned: `output` is already bounded and plain JSON (core/output.py)."""

    output: Any
    tails: Tails | None = None


@dataclass(frozen=True, slots=True)
class Failed(Message):
    """The task function raised (or could not start): `message` says what went wrong."""

    message: str
    details: Mapping[str, Any] | None = None
    tails: Tails | None = None


@dataclass(frozen=True, slots=True)
class Cancelled(Message):
    """The task stopped at a cancellation check after a cancel request."""

    tails: Tails | None = None


@dataclass(frozen=True, slots=True)
class Lost(Message):
    """The worker running the task died (a Dask worker); `requeue`: a re-run is still allowed (TaskManager
    re-queues an idempotent task type)."""

    message: str
    requeue: bool


# -- from the executor -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placed(Message):
    """Where the task runs, known only once it started there (a Dask worker's address)."""

    worker: str


@dataclass(frozen=True, slots=True)
class Exit(Message):
    """The task is over for the executor: 0 once its final message came from a worker that lives on, else
    the exit code of the worker that died (-9: killed)."""

    exitcode: int | None


# -- the local executor's pool protocol (core/worker.py pool_main) ----------------------------------------


@dataclass(frozen=True, slots=True)
class Run(Message):
    """Server -> worker: run a task; `seq` names it in the cancellation flag and in ToTask."""

    seq: int
    task_id: str
    target: str
    params: dict[str, Any]
    max_output_bytes: int
    environment: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToTask(Message):
    """Server -> worker: a message for task `seq` (a Reply); dropped if that task has ended meanwhile."""

    seq: int
    message: Reply


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Server -> worker: exit."""


@dataclass(frozen=True, slots=True)
class End(Message):
    """Worker -> server: the task ended with `final`; the worker's resident memory now (its reuse depends on it)."""

    final: Final
    rss_mb: float


@dataclass(frozen=True, slots=True)
class Batch(Message):
    """Worker -> server: several messages, each pickled on its own (one that cannot be read costs only itself)."""

    items: list[bytes]


# -- Dask's worker side ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started(Message):
    """A Dask worker began the task (if this changes, Dask ran it again elsewhere: the first worker died)."""

    address: str


FromTask: TypeAlias = Stage | Progress | Log | Request
Final: TypeAlias = Done | Failed | Cancelled
Ending: TypeAlias = Done | Failed | Cancelled | Lost
ToManager: TypeAlias = Stage | Progress | Log | Request | Done | Failed | Cancelled | Lost | Placed | Exit
