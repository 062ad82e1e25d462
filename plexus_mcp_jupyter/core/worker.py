"""What runs inside a worker process: load the task function, run it, report back.

Messages sent to the server (core/messages.py, pickled over a pipe): Stage, Progress, Log and Request from
the task's context, and exactly one final message: Done, Failed or Cancelled. The executor adds Exit when the
task has ended (0 once its final message arrived from a worker that lives on; the process's exit code when the
worker died).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from .context import CancelFlag, TaskCancelled, TaskContext
from .errors import PlexusError
from .messages import Batch, Cancelled, Done, End, Failed, Final, FromTask, Log, Message, Run, Stop, ToTask
from .output import bounded_output
from .tasks import load_target

TAIL_CHARS = 4000


class Tail(io.TextIOBase):
    """A write-only text stream that keeps only the last `limit` characters."""

    def __init__(self, limit: int = TAIL_CHARS) -> None:
        self.limit = limit
        self._text = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._text = (self._text + s)[-self.limit :]
        return len(s)

    def getvalue(self) -> str | None:
        return self._text or None


def run_task(
    task_id: str,
    target: str,
    params: dict[str, Any],
    send: Any,
    cancel_flag: CancelFlag,
    max_output_bytes: int = 65_536,
    environment: dict[str, Any] | None = None,
    receive: Any = None,
) -> Final:
    """Run one task function with a context; return its final message (not sent).

    The output is bounded here, in the worker, so a huge result never crosses to the server.
    """
    stdout, stderr = Tail(), Tail()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr

    def send_msg(msg: FromTask) -> None:
        if isinstance(msg, Log):
            stderr.write(msg.text.rstrip("\n") + "\n")
        send(msg)

    def show_warning(
        message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        # The task's warnings go live to the clients following it (and into its stderr tail), not to the worker.
        send_msg(Log(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})", "warning"))

    ctx = TaskContext(task_id, send_msg, cancel_flag, environment=environment, receive=receive)
    with warnings.catch_warnings():  # restored when the task ends: the worker runs many tasks
        warnings.showwarning = show_warning
        try:
            fn = load_target(target)
            output = fn(ctx, **params)
            ctx.flush()
            return Done(bounded_output(output, max_output_bytes), _tails(stdout, stderr))
        except TaskCancelled:
            ctx.flush()
            return Cancelled(_tails(stdout, stderr))
        except BaseException as exc:  # the task's own failure, reported, never raised to the pool
            ctx.flush()
            details = {"exception_type": type(exc).__name__, "traceback": traceback.format_exc()[-TAIL_CHARS:]}
            # Plexus's own errors already say what was wrong and what is allowed; others are named by their type.
            message = str(exc) if isinstance(exc, PlexusError) else f"{type(exc).__name__}: {exc}"
            return Failed(message, details, _tails(stdout, stderr))
        finally:
            sys.stdout, sys.stderr = saved


class Outbox:
    """A worker's messages to the server, coalesced: the first message after a quiet spell waits `delay`
    seconds for the ones that follow, then they all leave in one pipe write (a small task's stage changes
    and its end are one write, not five: each costs a system call, a wake-up and an unpickle on the
    server). A flusher thread sends what waits once the delay has passed; `flush()` sends at once (a
    task's end, a request whose answer the task waits for). One lock keeps the messages in order.

    The delay is a kernel timer (`_Alarm`): the first message arms it, a flush disarms it, and the flusher
    sleeps on it, so a task that ends within the delay (most of them) never wakes the flusher: one system
    call to arm and one to disarm, where a thread woken to sleep the delay cost two wake-ups a task and the
    interpreter's lock handed back and forth with the task's thread.

    Each message is pickled on its own (a messages.Batch of bytes), so one that cannot be pickled here, or
    unpickled on the server, costs only itself (a log line), never the task's end beside it.
    """

    def __init__(self, conn: Any, delay: float = 0.002) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._pending: list[Message] = []
        self._alarm = _alarm(delay)
        self.thread = threading.Thread(target=self._run, name="plexus-outbox", daemon=True)
        self.thread.start()

    def send(self, msg: Message) -> None:
        with self._lock:
            self._pending.append(msg)
            if len(self._pending) == 1:
                self._alarm.arm()

    def flush(self, last: Message | None = None) -> None:
        """Send what waits, and `last` after it, now. `last` that cannot be pickled raises (nothing is sent)."""
        self._flush(last, disarm=True)

    def _flush(self, last: Message | None, disarm: bool) -> None:
        with self._lock:
            tail = [pickle.dumps(last, pickle.HIGHEST_PROTOCOL)] if last is not None else []
            batch, self._pending = self._pending, []
            if batch and disarm:  # armed while messages wait, and only then
                self._alarm.disarm()
            if batch or tail:
                # pickle's own dumps: the batch is bytes (multiprocessing's send would build a ForkingPickler and a
                # buffer for it, ~1 us a task); the server reads it with recv, i.e. pickle.loads.
                self._conn.send_bytes(pickle.dumps(Batch([_pickled(m) for m in batch] + tail), pickle.HIGHEST_PROTOCOL))

    def _run(self) -> None:
        while True:
            self._alarm.wait()
            try:
                self._flush(None, disarm=False)  # the alarm rang: nothing left to disarm
            except (OSError, EOFError, ValueError):  # the server's end closed: the worker is going away
                return
            except Exception:  # never let the flusher die: the next tasks on this worker would report nothing
                traceback.print_exc()


class _Alarm(Protocol):
    """Wakes the outbox's flusher `delay` seconds after `arm()`, unless `disarm()` came first. `arm` and
    `disarm` are called under the outbox's lock, `wait` by the flusher alone."""

    def arm(self) -> None: ...

    def disarm(self) -> None: ...

    def wait(self) -> None: ...


class _TimerAlarm:
    """A Linux timerfd: arming and disarming are one system call each and wake no thread; the flusher blocks in
    a read that returns when the timer expires. (A disarm that races the expiry at worst wakes the flusher to
    find nothing waiting.)"""

    def __init__(self, fd: int, arm: Callable[[], None], disarm: Callable[[], None]) -> None:
        self._fd = fd
        self.arm = arm
        self.disarm = disarm

    def wait(self) -> None:
        os.read(self._fd, 8)  # the count of expiries since the last read; blocks while the timer is unexpired


class _SleepAlarm:
    """Where there is no timerfd: arming wakes the flusher, which sleeps the delay; a disarm cannot stop it (it
    wakes to find nothing waiting)."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._cond = threading.Condition()
        self._armed = False

    def arm(self) -> None:
        with self._cond:
            self._armed = True
            self._cond.notify()

    def disarm(self) -> None:
        pass

    def wait(self) -> None:
        with self._cond:
            while not self._armed:
                self._cond.wait()
            self._armed = False
        time.sleep(self._delay)


def _alarm(delay: float) -> _Alarm:
    timer = _timerfd(delay)
    return _SleepAlarm(delay) if timer is None else _TimerAlarm(*timer)


def _timerfd(delay: float) -> tuple[int, Callable[[], None], Callable[[], None]] | None:
    """A monotonic one-shot timerfd, a function arming it `delay` seconds from now and one disarming it, or None
    where there is none: os.timerfd_* from Python 3.13, libc's through ctypes before it (Linux)."""
    if sys.version_info >= (3, 13) and hasattr(os, "timerfd_create"):
        fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_CLOEXEC)
        return fd, functools.partial(os.timerfd_settime, fd, initial=delay), functools.partial(os.timerfd_settime, fd)
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class Itimerspec(ctypes.Structure):
        _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

    clock_monotonic, tfd_cloexec = 1, 0o2000000
    fd = create(clock_monotonic, tfd_cloexec)
    if fd < 0:
        return None

    def setter(seconds: float) -> Callable[[], None]:
        # Built once and passed by reference: a setting is one foreign call, no structure filled per call.
        whole = int(seconds)
        spec = Itimerspec(it_value=Timespec(whole, int((seconds - whole) * 1e9)))
        ref = ctypes.byref(spec)  # holds the structure

        def set_timer() -> None:
            if settime(fd, 0, ref, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

        return set_timer

    return fd, setter(delay), setter(0.0)


def _pickled(msg: Message) -> bytes:
    try:
        return pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        text = f"plexus: a {type(msg).__name__} message could not be sent: {type(exc).__name__}: {exc}"
        return pickle.dumps(Log(text), pickle.HIGHEST_PROTOCOL)


class _TaskCancelFlag:
    """Cancellation of one task on a reused worker: set when the server writes that task's number.

    A worker runs many tasks, so a flag that stays set would cancel the next one; a number names the task.
    """

    def __init__(self, cancel_seq: Any, seq: int) -> None:
        self._cancel_seq = cancel_seq
        self._seq = seq

    def is_set(self) -> bool:
        return bool(self._cancel_seq.value == self._seq)


class _ResidentMemory:
    """This process's resident memory in MB, read at each task's end: /proc/self/statm (Linux), opened once and
    read again in place (one system call; opening it each time cost nine and a file object), else the peak
    (ru_maxrss, KiB on Linux and BSD)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
            self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, AttributeError):
            self._fd = None

    def __call__(self) -> float:
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 256, 0).split()[1]) * self._page_mb
            except (OSError, ValueError, IndexError):
                pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pool_main(conn: Any, cancel_seq: Any, nice: int = 0, environ: dict[str, str] | None = None) -> None:
    """Entry point of a local-executor worker process: run the tasks the server sends, one at a time.

    Protocol (core/messages.py, pickled on the duplex pipe). Server -> worker: Run, and ToTask, an answer to a
    request of task `seq` (answers for another task, which ended meanwhile, are dropped). Worker -> server:
    the task's messages (module docstring), then End; they come as Batch of messages pickled one by one
    (Outbox). The worker exits on Stop or when the server's end closes. `environ`: the server's environment
    when it started this worker, which its tasks see.
    """
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    # The server may speak MCP over its stdout (stdio mode): a worker must never write there.
    os.dup2(2, 1)
    # Ctrl-C in the server's terminal is the server's to handle; it stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Below the server's priority, so that a busy worker never slows the server's answers much. Once per
    # process: os.nice adds to the current value.
    if nice:
        with contextlib.suppress(OSError):
            os.nice(int(nice))
    outbox = Outbox(conn)
    rss_mb = _ResidentMemory()
    _exit_with_the_server(conn)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(msg, Stop):
                return
            if not isinstance(msg, Run):
                continue  # a late answer to a task that already ended
            seq = msg.seq

            def receive(timeout: float, seq: int = seq) -> Any:
                outbox.flush()  # the request this task waits on must have left
                while conn.poll(timeout):
                    incoming = conn.recv()
                    if isinstance(incoming, ToTask) and incoming.seq == seq:
                        return incoming.message
                    timeout = 0  # drained a stale message: look again without waiting
                return None

            final = run_task(
                msg.task_id,
                msg.target,
                msg.params,
                outbox.send,
                _TaskCancelFlag(cancel_seq, seq),
                msg.max_output_bytes,
                msg.environment,
                receive,
            )
            try:
                outbox.flush(End(final, rss_mb()))
            except Exception as exc:  # e.g. an output that cannot be pickled
                failed = Failed(f"the task's result could not be sent back: {exc}", None, final.tails)
                outbox.flush(End(failed, rss_mb()))
    finally:
        conn.close()


def _exit_with_the_server(conn: Any) -> None:
    """End this worker when the server's end of its pipe closes, even in the middle of a task.

    Idle, the worker sees that end at once (EOF on recv); running a task it did not look, so a task that outlived a
    server killed with SIGKILL ran on, its reports going nowhere (a long one for minutes; an evaluation writing to
    the store beside its re-run), and kept the forkserver alive too (every worker holds a copy of its lifeline).
    A thread waits for the hang-up (Linux's POLLRDHUP: no data is read, the pipe stays the main thread's).
    """
    rdhup = getattr(select, "POLLRDHUP", None)
    if rdhup is None:
        return
    watch = select.poll()
    watch.register(conn.fileno(), rdhup)

    def wait() -> None:
        while True:
            try:
                if watch.poll():  # the server hung up, or the worker closed the pipe on its way out
                    os._exit(0)
            except InterruptedError:
                continue

    threading.Thread(target=wait, name="plexus-server-watch", daemon=True).start()


def _tails(stdout: Tail, stderr: Tail) -> dict[str, str | None]:
    return {"stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
