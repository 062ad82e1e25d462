"""The worker's Outbox (core/worker.py): messages sent within its delay leave as one Batch, in order, the
flushed end last; one left alone leaves once the delay has passed; and a task that ends within the delay
never wakes the flusher (Linux: its timerfd). Against a pipe stand-in that records what leaves and when."""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time

import pytest

from plexus_mcp_jupyter.core import worker
from plexus_mcp_jupyter.core.messages import Batch, Log, Message, Stage

from .conftest import poll

DELAY = 0.05  # long enough that a busy machine does not split the bursts below


class Pipe:
    """Records each write: when it left and its messages."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, list[Message]]] = []
        self.lock = threading.Lock()

    def send(self, batch: Batch) -> None:
        with self.lock:
            self.writes.append((time.monotonic(), [pickle.loads(item) for item in batch.items]))

    def send_bytes(self, data: bytes) -> None:  # what the outbox writes: a Batch, pickled
        self.send(pickle.loads(data))

    def messages(self) -> list[list[Message]]:
        with self.lock:
            return [messages for _, messages in self.writes]


@pytest.fixture(params=["timerfd", "sleep"])
def outbox_of(request, monkeypatch):
    if request.param == "timerfd" and not sys.platform.startswith("linux"):
        pytest.skip("timerfd is Linux's")
    if request.param == "sleep":
        monkeypatch.setattr(worker, "_timerfd", lambda delay: None)

    def make(pipe: Pipe) -> worker.Outbox:
        box = worker.Outbox(pipe, DELAY)
        kind = type(box._alarm).__name__  # which alarm this run tests
        assert kind == {"timerfd": "_TimerAlarm", "sleep": "_SleepAlarm"}[request.param]
        return box

    return make


async def test_messages_within_the_delay_leave_in_one_write_in_order_with_the_end_last(outbox_of):
    pipe = Pipe()
    box = outbox_of(pipe)
    box.send(Stage("Setup", 2))
    box.send(Log("one"))
    box.send(Stage("Work", 2))
    box.flush(Log("end"))
    assert pipe.messages() == [[Stage("Setup", 2), Log("one"), Stage("Work", 2), Log("end")]]
    box.flush()  # nothing waits: nothing leaves
    time.sleep(2 * DELAY)  # nor later, from the flusher
    assert len(pipe.messages()) == 1


async def test_a_message_left_alone_leaves_once_the_delay_has_passed_and_again_after_the_alarm_rang(outbox_of):
    pipe = Pipe()
    box = outbox_of(pipe)
    for burst in range(3):
        sent = time.monotonic()
        box.send(Stage(f"Stage {burst}", 1))
        box.send(Log(f"log {burst}"))
        await poll(lambda: len(pipe.writes), lambda n, burst=burst: n == burst + 1, timeout=10)
        left, messages = pipe.writes[-1]
        assert messages == [Stage(f"Stage {burst}", 1), Log(f"log {burst}")]
        assert left - sent >= DELAY * 0.9  # waited for the messages that might follow


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="a thread's context switches are read in /proc")
async def test_a_task_that_ends_within_the_delay_never_wakes_the_flusher(monkeypatch):
    """Each burst is flushed before its delay passes, as a small task's end is: the flusher sleeps through
    them all (a flusher woken by the first message, to sleep the delay, woke twice a burst)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("timerfd is Linux's")
    pipe = Pipe()
    box = worker.Outbox(pipe, 1.0)
    bursts = 100

    def switches() -> int:
        with open(f"/proc/self/task/{box.thread.native_id}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))

    await poll(switches, lambda n: n >= 0, timeout=5)  # the flusher has started and sleeps
    time.sleep(0.05)
    before = switches()
    for i in range(bursts):
        box.send(Stage("Work", 1))
        box.flush(Log(f"end {i}"))
        time.sleep(0.002)  # the worker waits for its next task
    woke = switches() - before
    assert len(pipe.messages()) == bursts and woke <= bursts // 10, woke


def test_a_timer_that_cannot_be_set_raises_an_oserror_rather_than_losing_messages_silently():
    made = worker._timerfd(0.01)
    if made is None:
        pytest.skip("no timerfd here")
    fd, arm, disarm = made
    os.close(fd)
    for call in (arm, disarm):
        with pytest.raises(OSError):
            call()
