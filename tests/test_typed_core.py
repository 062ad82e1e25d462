"""The core's typed protocol: worker messages (core/messages.py) and the Dask executor's single end per task."""

from __future__ import annotations

import contextlib
import pickle
import threading
from typing import Any

import pytest

from plexus_mcp_jupyter.core import messages as m
from plexus_mcp_jupyter.core.executors.dask import DaskExecutor, _Run

EVERY_MESSAGE = [
    m.Stage("Scoring", 10, "chunk 1"),
    m.Progress(3, None),
    m.Log("a line", "warning"),
    m.Request(1, "kernel_score", {"inputs": [1, 2]}),
    m.Reply(1, True, [0.5]),
    m.Done({"answer": 42}, {"stdout": "out", "stderr": None}),
    m.Failed("boom", {"exception_type": "ValueError"}),
    m.Cancelled(None),
    m.Lost("the worker died", True),
    m.Placed("dask:tcp://127.0.0.1:1"),
    m.Exit(-9),
    m.Run(1, "t1", "pkg.mod:fn", {"n": 1}, 65_536, {"root_dir": "/"}),
    m.ToTask(1, m.Reply(2, False, "no")),
    m.Stop(),
    m.End(m.Done(None), 12.5),
    m.Batch([b"x"]),
    m.Started("tcp://127.0.0.1:2"),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda msg: type(msg).__name__)
def test_every_message_crosses_a_pickle_as_itself_and_stays_frozen(message):
    copy = pickle.loads(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
    assert type(copy) is type(message) and copy == message
    fields = type(message).__slots__
    if fields:
        with pytest.raises(AttributeError):
            setattr(message, fields[0], None)  # frozen: a receiver cannot change what another one sees
    assert not hasattr(message, "__dict__")  # slots: small in memory, as many cross per second


class _Meeting(list):
    """A deliveries list whose first addition waits (up to `wait` seconds) for a second thread to add too: two
    threads that both decided to deliver a task's end meet here, whatever the scheduling."""

    def __init__(self, barrier: threading.Barrier, wait: float) -> None:
        super().__init__()
        self.barrier = barrier
        self.wait = wait

    def _meet(self) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):  # nobody else came: the claim let one thread through
            self.barrier.wait(self.wait)

    def append(self, item: Any) -> None:
        self._meet()
        super().append(item)

    def extend(self, items: Any) -> None:
        self._meet()
        super().extend(items)


def _executor_with_a_finished_run() -> tuple[DaskExecutor, _Run, list[Any]]:
    """A DaskExecutor's bookkeeping with one run whose result arrived and whose batches all did: no cluster, the
    end-delivery logic alone (the threads that race on it are the reader, the collector and the monitor)."""
    executor = DaskExecutor.__new__(DaskExecutor)
    executor._lock = threading.Lock()
    executor._runs, executor._by_key, executor._losses, executor._release = {}, {}, {}, []
    received: list[Any] = []
    run = _Run("t1", "plexus-t1-1", received.append, (), ())
    run.result = ("tcp://127.0.0.1:1", [m.Progress(1)], 0, m.Done("out"))
    executor._runs[run.task_id] = run
    executor._by_key[run.key] = run
    return executor, run, received


def test_a_dask_task_end_is_delivered_once_when_its_threads_race():
    executor, run, _ = _executor_with_a_finished_run()
    barrier = threading.Barrier(2)
    lists = [_Meeting(barrier, 0.5), _Meeting(barrier, 0.5)]
    threads = [threading.Thread(target=executor._maybe_end, args=(run, deliveries)) for deliveries in lists]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    messages = [message for deliveries in lists for _, message in deliveries]
    assert [type(x).__name__ for x in messages] == ["Placed", "Progress", "Done", "Exit"], messages
    assert run.ended and not executor._runs and not executor._by_key


def test_a_lost_worker_counts_once_when_its_task_already_ended():
    executor, run, _ = _executor_with_a_finished_run()
    deliveries: list[Any] = []
    executor._maybe_end(run, deliveries)
    executor._lost(run, "tcp://127.0.0.1:1", deliveries)  # a late look that saw the worker gone
    assert [type(x).__name__ for _, x in deliveries] == ["Placed", "Progress", "Done", "Exit"]
    assert executor._losses == {}
