"""The core's typed protocol: worker messages (core/messages.py) and the Dask executor's single end per task."""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from plexus_mcp_jupyter.core import messages as m
from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.core.executors.dask import DaskExecutor, _Run
from plexus_mcp_jupyter.core.tasks import TaskType

from .conftest import registered_task_types

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


def test_the_core_imports_no_evaluation_module_and_knows_the_evaluation_type_only_once_registered():
    """The core names no module of the evaluations package: that package registers its task type when the
    runtime is built (a fresh interpreter, so no other test's imports count)."""
    code = (
        "import sys\n"
        "from plexus_mcp_jupyter.core import TaskManager, tasks\n"
        "from plexus_mcp_jupyter.core.executors import LocalExecutor\n"
        "from plexus_mcp_jupyter.core.executors import dask\n"
        "assert not [n for n in sys.modules if n.startswith('plexus_mcp_jupyter.evaluations')], sys.modules\n"
        "assert tasks.task_type_names() == ['demo'] and tasks.preload_modules() == []\n"
        "from plexus_mcp_jupyter.evaluations.task_type import register_evaluation_task_type\n"
        "register_evaluation_task_type()\n"
        "t = tasks.get_task_type('evaluation')\n"
        "assert t.internal and t.isolated and t.idempotent and t.preload\n"
        "assert tasks.preload_modules() == ['plexus_mcp_jupyter.evaluations.runner']\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("target", ["no_colon", "module:", ":function", ""])
def test_a_task_type_with_a_target_a_worker_cannot_import_is_refused_at_once(target):
    with pytest.raises(InvalidArgument, match=r"target must be 'package.module:function', not"):
        TaskType("broken", target, "never runs")


def test_an_internal_task_type_names_the_tools_that_create_it_when_dispatched_directly(tmp_path):
    from plexus_mcp_jupyter.core import EventBus, Store, TaskManager
    from plexus_mcp_jupyter.core.executors import LocalExecutor

    store = Store(f"sqlite:///{tmp_path / 'internal.db'}")
    manager = TaskManager(store, EventBus(), LocalExecutor())
    internal = TaskType("made_elsewhere", "tests.task_functions:stubborn", "x", internal=True, created_by="make_it")
    try:
        with registered_task_types(internal), pytest.raises(InvalidArgument) as refused:
            manager.dispatch("made_elsewhere", {})
    finally:
        store.close()
    assert str(refused.value) == "made_elsewhere tasks are created by make_it, not dispatched directly"


def test_a_dask_task_end_never_overtakes_the_messages_it_sent_before_it():
    """The reader hands a batch's messages to the loop before it counts the batch as received: the collector,
    looking at that moment (simulated here), waits, and the end follows the messages."""
    executor, run, _ = _executor_with_a_finished_run()
    run.result = ("tcp://127.0.0.1:1", [], 1, m.Done("out"))  # one batch put before the end: not received yet
    run.result_at = time.monotonic()  # just now: the end waits for that batch (FINAL_WAIT)
    handed: list[Any] = []  # what reached the loop, in order
    executor._deliver = lambda deliveries: handed.extend(message for _, message in deliveries)
    reader_messages = executor._messages

    def collector_looks_meanwhile(run_: _Run, messages: list[Any], deliveries: list[Any]) -> None:
        collected: list[Any] = []
        executor._maybe_end(run_, collected)  # the collector thread, between the reader's steps
        executor._deliver(collected)
        reader_messages(run_, messages, deliveries)

    executor._messages = collector_looks_meanwhile
    executor._take([pickle.dumps([(run.task_id, [m.Started("tcp://127.0.0.1:1"), m.Progress(1)])])])
    assert [type(x).__name__ for x in handed] == ["Placed", "Progress", "Done", "Exit"], handed
