"""Health latency while API keys flood the server: sessions, scorecards, slow clients, big files (issue 11).

Starts a real `jupyter server` with the extension (or, with --standalone, `plexus mcp serve --transport http`)
on a SQLite store and a root dir in a temporary folder, creates a viewer key and an operator key with the
`plexus keys create` CLI on the same store, and then measures `plexus/api/health` (standalone: `/health`),
anonymously, from a separate process (so the flooding client's event loop and GIL cannot delay it):

- keep-alive: a GET every --probe-ms on one kept-alive connection (reconnecting after a failure);
- new connection: a GET every --fresh-ms on a new connection, which is what a slow-client flood takes away.

A probe that gets no answer within --probe-timeout counts as a timeout and is recorded at that value; one
that fails otherwise (refused, reset) counts as an error, recorded at the same value.

The phases, one after another on the same server (each flood bounded in count and in time, --flood-s; the
sessions, scorecards and bigfiles floods repeat their requests for at least --min-flood-s, 5 s, so that a
flood the server refuses in a fraction of a second still meets a few hundred probes; the server is given
time to recover, up to 60 s, between them):

1. idle: nothing but the probes (--idle-s);
2. sessions: the viewer key POSTs MCP `initialize` (no DELETE) --sessions times, --session-concurrency at once;
3. scorecards: the operator key creates an evaluation from a ~1 MiB inline YAML scorecard (--card-kib; many
   scores, the last one a duplicate name, so it is refused only after the whole card is parsed and checked
   and no evaluation runs), two at a time, --scorecards in all: REST `POST plexus/api/evaluations`
   (standalone: MCP tools/call create_evaluation);
4. slow: --slow connections from another loopback address (--slow-from, 127.0.0.2) that send half a request
   header and then nothing, held --slow-hold-s, counted by what the server does with them (answers by
   status, closed, still open). The server's soft limit on open files is set to --server-fds (1024,
   Linux's usual default soft limit) so that the flood replays the exhaustion of file descriptors the
   issue saw; this process raises its own to its hard limit and caps --slow below it;
5. bigfiles (Jupyter only): a --big-mb MB file under the root with a single line and no newline, then the
   viewer key GETs `plexus/api/datasets` and `plexus/api/datasets/<file>`, --big-requests in all, four at
   once; the server's RSS before and after and the sizes of the answers are printed;
6. bodies: the viewer key POSTs 2026-07-28 MCP tools/call bodies of --body-kib KiB (4000) of small JSON objects,
   --body-concurrency (3) at once, --bodies in all: each is parsed (off the event loop, in pieces) and refused by the
   tool; past the key's byte budget (request_bytes_rate, --body-rate sets it: 0 keeps the server's 2 MiB/s) they are
   429s;
7. idle again (--idle-s / 2): has the server recovered?

Keys get --key-rate requests/s (default 10,000, the most a key may have) so that floods are bounded by the
server, not by the key's token bucket; `--key-rate 20` replays them at the default rate limit. Answers are
counted by HTTP status (and, for MCP tools/call, whether the tool refused): a flood the server starts
refusing with 4xx is still a flood.

    python benchmarks/bench_abuse.py [--quick] [--only sessions,scorecards,slow,bigfiles] [--standalone]
        [--port N] [--big-mb 50] [--slow 3000] [--server-fds 1024] [--body-kib 4000] [--body-rate 0] ...

Printed per phase: the kept-alive probe's count, p50, p99, max, timeouts, errors, longest time without an
answer ("stall s": timeouts cap the latencies, not this) and p99 / idle p99; the new-connection probe's p99,
failures and p99 / idle p99; the server's CPU seconds, RSS and peak RSS; the flood's answers; then notes
(first refusal, counts, sizes) and a PASS/FAIL line per flood.

Goal (issue 11): health p99 during any flood <= 5 x idle p99 (on both probes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import quote

import _common
import httpx2
from _common import (
    INITIALIZE,
    MCP_HEADERS,
    TOKEN,
    LeanSession,
    cpu_seconds,
    jupyter_server,
    memory_kib,
    pin_client,
    standalone_server,
    tempdir,
)

ROOT = Path(__file__).resolve().parent.parent
FLOODS = ("sessions", "scorecards", "slow", "bigfiles", "bodies")
STANDALONE_FLOODS = ("sessions", "scorecards", "slow", "bodies")  # the standalone server serves no datasets over REST
GOAL = 5.0  # health p99 during a flood <= GOAL x idle p99
FD_MARGIN = 256  # files this process keeps for itself beside the slow connections
Sample = tuple[float, float, str]  # (monotonic time the probe started, seconds, outcome: status, timeout, error)


# -- the server ------------------------------------------------------------------------------------------


@dataclass
class Target:
    """The server under test: where it answers and who may call it."""

    kind: str  # "jupyter" or "standalone"
    mcp_url: str
    pid: int
    root: Path
    db_url: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> secret

    @property
    def base(self) -> str:
        return self.mcp_url.removesuffix("plexus/mcp").removesuffix("mcp")

    @property
    def port(self) -> int:
        return int(self.base.rstrip("/").rsplit(":", 1)[1])

    @property
    def health_path(self) -> str:
        return "/plexus/api/health" if self.kind == "jupyter" else "/health"

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def create_key(db_url: str, role: str, rate: float) -> str:
    """A key made with the `plexus keys create` CLI on the server's store; returns its secret."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "plexus_mcp_jupyter.cli",
            "keys",
            "create",
            f"abuse-{role}",
            f"--role={role}",
            f"--rate-limit={rate:g}",
            f"--db-url={db_url}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"plexus keys create failed: {done.stderr.strip()}")
    return str(json.loads(done.stdout)["secret"])


def start_server(stack: ExitStack, args: argparse.Namespace) -> Target:
    tmp = Path(stack.enter_context(tempdir()))
    env = {"PYTHONPATH": str(ROOT)}
    if args.body_rate:
        env["PLEXUS_MCP_REQUEST_BYTES_RATE"] = str(args.body_rate)
    if args.standalone:
        url, pid = stack.enter_context(standalone_server(tmp, env, port=args.port))
        db_url = f"sqlite:///{tmp / 'standalone.db'}"
    else:
        url, pid = stack.enter_context(jupyter_server(tmp, env, port=args.port))
        db_url = f"sqlite:///{tmp / 'jupyter.db'}"
    target = Target("standalone" if args.standalone else "jupyter", url, pid, tmp, db_url)
    for role in ("viewer", "operator"):
        target.keys[role] = create_key(db_url, role, args.key_rate)
    if args.server_fds:
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(args.server_fds, hard), hard))
    return target


def raise_own_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def server_memory_mib(pid: int, peak: bool = False) -> float:
    """RSS (or its peak so far) of the server process, with psutil when installed, else from /proc."""
    if not peak:
        try:
            import psutil

            return float(psutil.Process(pid).memory_info().rss) / 2**20
        except ImportError:
            pass
    return memory_kib(pid, "VmHWM" if peak else "VmRSS") / 1024


# -- the health probes (a separate process) -------------------------------------------------------------


def probe_once(
    conn: http.client.HTTPConnection | None, port: int, path: str, timeout: float, keep_alive: bool
) -> tuple[http.client.HTTPConnection | None, str]:
    """One GET; returns the connection to reuse (None after a failure or without keep-alive) and the outcome.

    A kept-alive connection the server has closed since the last probe is reopened and the GET sent
    again, as any HTTP client does; that is not a failure."""
    for attempt in (0, 1):
        reused = conn is not None
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path, headers={} if keep_alive else {"Connection": "close"})
            response = conn.getresponse()
            response.read()
            outcome = str(response.status)
        except TimeoutError:
            conn.close()
            return None, "timeout"
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            conn.close()
            conn = None
            if reused and attempt == 0:
                continue
            return None, "error"
        except (OSError, http.client.HTTPException):
            conn.close()
            return None, "error"
        if not keep_alive or response.will_close:
            conn.close()
            conn = None
        return conn, outcome
    return None, "error"


def probe_loop(
    port: int, path: str, interval: float, timeout: float, keep_alive: bool, stop: Any, out: list[Sample]
) -> None:
    """GET `path` every `interval` until `stop` (a multiprocessing Event) is set; a failed probe is recorded at
    `timeout`."""
    conn: http.client.HTTPConnection | None = None
    next_at = time.monotonic()
    while not stop.is_set():
        t0 = time.monotonic()
        conn, outcome = probe_once(conn if keep_alive else None, port, path, timeout, keep_alive)
        elapsed = time.monotonic() - t0
        out.append((t0, timeout if outcome in ("timeout", "error") else elapsed, outcome))
        next_at += interval
        now = time.monotonic()
        if next_at < now:
            next_at = now  # behind (a slow answer): probe again now, never in a burst
        stop.wait(next_at - now)
    if conn is not None:
        conn.close()


def prober_main(
    port: int, path: str, probe_s: float, fresh_s: float, timeout: float, stop: Any, results: Connection
) -> None:
    """The prober process: both probes in threads until `stop` is set, then the samples back to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # how the parent stops it (the parent's handler is inherited)
    kept: list[Sample] = []
    fresh: list[Sample] = []
    threads = [
        threading.Thread(target=probe_loop, args=(port, path, probe_s, timeout, True, stop, kept)),
        threading.Thread(target=probe_loop, args=(port, path, fresh_s, timeout, False, stop, fresh)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.send((kept, fresh))
    results.close()


@contextlib.contextmanager
def probing(target: Target, args: argparse.Namespace) -> Iterator[Callable[[], tuple[list[Sample], list[Sample]]]]:
    """Run the prober process for the block; yields a function that stops it and returns its samples."""
    context = multiprocessing.get_context("fork")  # before any event loop or thread of this process
    stop = context.Event()
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(
        target=prober_main,
        daemon=True,
        args=(
            target.port,
            target.health_path,
            args.probe_ms / 1000,
            args.fresh_ms / 1000,
            args.probe_timeout,
            stop,
            sending,
        ),
    )
    process.start()
    sending.close()

    def collect() -> tuple[list[Sample], list[Sample]]:
        stop.set()
        samples: tuple[list[Sample], list[Sample]] = receiving.recv()
        process.join(10)
        return samples

    try:
        yield collect
    finally:
        if process.is_alive():
            process.terminate()
            process.join(5)
        receiving.close()


# -- phases ----------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One window of the run: what the flood sent and got, and how the server fared."""

    name: str
    start: float = 0.0
    end: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    rss_mib: float = 0.0
    peak_mib: float = 0.0


async def answer(request: Awaitable[httpx2.Response]) -> tuple[str, httpx2.Response | None]:
    """An HTTP request's outcome as a label for the answers count: its status, or how it failed."""
    try:
        response = await request
    except httpx2.TimeoutException:
        return "timeout", None
    except httpx2.TransportError as error:
        return type(error).__name__, None
    return str(response.status_code), response


def mcp_outcome(response: httpx2.Response) -> tuple[str, str]:
    """An MCP tools/call answer (JSON or an SSE stream): the label for the answers count (its HTTP status, and
    for 200 whether the tool or JSON-RPC refused the call) and the text of the refusal."""
    if response.status_code != 200:
        return str(response.status_code), response.text
    lines = response.text.splitlines()
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line[5:] for line in lines if line.startswith("data:") and line[5:].strip().startswith("{")]
    message = json.loads(lines[-1]) if lines else {}
    if "error" in message:
        return "200 rpc error", str(message["error"].get("message"))
    result = message.get("result", {})
    if result.get("isError"):
        return "200 tool error", " ".join(str(c.get("text")) for c in result.get("content", []))
    return "200", ""


def first_refusal(phase: Phase, label: str, text: str) -> None:
    """Keep the first refusal's message (shortened) as a note: what the server said to the flood."""
    if label == "200" or any(n.startswith("first refusal") for n in phase.notes):
        return
    text = " ".join(text.split())
    phase.notes.append(f"first refusal: {label}: {text[:160]}{'...' if len(text) > 160 else ''}")


async def flood_sessions(target: Target, args: argparse.Namespace, phase: Phase) -> None:
    """The viewer key opens MCP sessions as fast as the server takes them, and never closes one."""
    body = json.dumps(INITIALIZE).encode()
    deadline = time.monotonic() + args.flood_s
    min_end = time.monotonic() + min(args.min_flood_s, args.flood_s)
    sent = itertools.count()
    limits = httpx2.Limits(max_connections=args.session_concurrency)
    async with httpx2.AsyncClient(
        headers={**MCP_HEADERS, **target.auth("viewer")}, timeout=args.flood_s, limits=limits
    ) as http:

        async def worker() -> None:
            while flooding(sent, args.sessions, deadline, min_end):
                label, response = await answer(http.post(target.mcp_url, content=body))
                phase.answers[label] += 1
                if response is not None:
                    first_refusal(phase, label, response.text)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.session_concurrency)))
        elapsed = time.monotonic() - t0
        # The harm the issue saw beyond latency: the notebook user locked out of new sessions.
        label, response = await answer(
            http.post(target.mcp_url, content=body, headers={"Authorization": f"Bearer {TOKEN}"})
        )
        if response is not None and "mcp-session-id" in response.headers:
            await http.delete(
                target.mcp_url,
                headers={"Authorization": f"Bearer {TOKEN}", "Mcp-Session-Id": response.headers["mcp-session-id"]},
            )
    phase.notes.append(
        f"{sum(phase.answers.values())} initialize POSTs in {elapsed:.1f} s, "
        f"{args.session_concurrency} at once; then the token's own initialize: {label}"
    )


def flooding(sent: Iterator[int], count: int, deadline: float, min_end: float) -> bool:
    """A flood goes on until it has sent `count` requests and lasted `min_end` (so that its health figures rest on
    enough probes, however fast the server refuses it), and never past `deadline`."""
    now = time.monotonic()
    return now < deadline and (next(sent) < count or now < min_end)


def scorecard_text(kib: int) -> str:
    """A scorecard of just under `kib` KiB: thousands of scores, the last a duplicate name, so the server
    refuses it only once it has parsed and checked the whole card (no evaluation is dispatched)."""
    head = "name: flood\ndataset: example:topics\ninput_column: text\nlabel_column: label\nscores:\n"
    line = '  - {{name: "score {:06d}", scorer: "column:prediction"}}\n'
    count = (kib * 1024 - len(head) - 2 * len(line.format(0))) // len(line.format(0))
    return head + "".join(line.format(n) for n in range(count)) + line.format(0)


async def flood_scorecards(target: Target, args: argparse.Namespace, phase: Phase) -> None:
    """The operator key creates evaluations from a big inline scorecard, two requests at a time."""
    card = scorecard_text(args.card_kib)
    deadline = time.monotonic() + args.flood_s
    min_end = time.monotonic() + min(args.min_flood_s, args.flood_s)
    sent = itertools.count()
    seconds: list[float] = []
    sessions: list[LeanSession] = []  # MCP (standalone): two sessions of the operator key
    async with httpx2.AsyncClient(headers=target.auth("operator"), timeout=max(60.0, args.flood_s)) as http:
        if target.kind == "jupyter":
            url = f"{target.base}plexus/api/evaluations"
            body = json.dumps({"type": "accuracy", "scorecard": card}).encode()

            async def post() -> str:
                label, response = await answer(
                    http.post(url, content=body, headers={"Content-Type": "application/json"})
                )
                if response is not None:
                    first_refusal(phase, label, response.text)
                return label

        else:
            for _ in range(2):
                sessions.append(await LeanSession(target.mcp_url, target.keys["operator"]).__aenter__())
            call = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "create_evaluation", "arguments": {"type": "accuracy", "scorecard": card}},
            }
            body = json.dumps(call).encode()
            turn = itertools.cycle(sessions)

            async def post() -> str:
                session = next(turn)
                label, response = await answer(session.http.post(session.url, content=body))
                if response is not None:
                    label, text = mcp_outcome(response)
                    first_refusal(phase, label, text)
                return label

        async def worker() -> None:
            while flooding(sent, args.scorecards, deadline, min_end):
                t0 = time.monotonic()
                phase.answers[await post()] += 1
                seconds.append(time.monotonic() - t0)

        try:
            await asyncio.gather(worker(), worker())
        finally:
            for session in sessions:
                await session.__aexit__(None, None, None)
    if seconds:
        phase.notes.append(
            f"{len(seconds)} requests with a {len(card.encode()) / 1024:.0f} KiB card "
            f"({card.count('- {name')} scores), answered in {min(seconds):.1f} to "
            f"{max(seconds):.1f} s each"
        )


async def flood_slow(target: Target, args: argparse.Namespace, phase: Phase) -> None:
    """Connections that send half a request header and then nothing, held open, then closed."""
    room = raise_own_fd_limit() - open_files() - FD_MARGIN
    count = max(0, min(args.slow, room))
    if count < args.slow:
        phase.notes.append(f"--slow {args.slow} capped at {count} by this process's limit on open files")
    partial = f"GET {target.health_path} HTTP/1.1\r\nHost: 127.0.0.1:{target.port}\r\nX-Slow: ".encode()
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.Task[str]] = []
    # Connects wait at most a second: once the server stops accepting, its backlog fills and a connect
    # hangs in SYN retries, which would otherwise make opening the flood take longer than holding it.
    gate = asyncio.Semaphore(512)
    deadline = time.monotonic() + min(args.flood_s, args.slow_hold_s + 15)

    async def watch(reader: asyncio.StreamReader) -> str:
        """What the server does with a half-sent request: answers it (status), closes it, or waits."""
        data = await reader.read(64)
        if not data:
            return "closed by server"
        parts = data.split(b" ", 2)
        return parts[1].decode(errors="replace") if data.startswith(b"HTTP/") and len(parts) > 1 else "garbage"

    async def connect() -> None:
        async with gate:
            if time.monotonic() >= deadline:
                phase.answers["not opened (time)"] += 1
                return
            try:
                opening = asyncio.open_connection("127.0.0.1", target.port, local_addr=(args.slow_from, 0))
                reader, writer = await asyncio.wait_for(opening, 1)
                writer.write(partial)
                await writer.drain()
            except (TimeoutError, asyncio.TimeoutError):
                phase.answers["connect timeout"] += 1
                return
            except OSError as error:
                phase.answers[f"connect {type(error).__name__}"] += 1
                return
            writers.append(writer)
            readers.append(asyncio.ensure_future(watch(reader)))

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(connect() for _ in range(count)))
        opened = time.monotonic() - t0
        hold = max(0.0, min(args.slow_hold_s, deadline - time.monotonic()))
        await asyncio.sleep(hold)
        for task in readers:
            if task.done():
                phase.answers[task.result() if task.exception() is None else "reset by server"] += 1
            else:
                phase.answers["held open, no answer"] += 1
        phase.notes.append(f"{len(writers)} of {count} connections opened in {opened:.1f} s, held {hold:.1f} s")
    finally:
        for task in readers:
            task.cancel()
        for writer in writers:
            writer.close()
        await asyncio.gather(*readers, return_exceptions=True)


async def flood_bigfiles(target: Target, args: argparse.Namespace, phase: Phase) -> None:
    """The viewer key lists datasets and describes one file with a single huge line, four requests at once."""
    name = "big.csv"
    sizes: dict[str, list[int]] = {"listing": [], "describe": []}
    listing = f"{target.base}plexus/api/datasets"
    urls = {"listing": listing, "describe": f"{listing}/{quote(name)}"}
    kinds = itertools.cycle(("listing", "describe"))
    deadline = time.monotonic() + args.flood_s
    min_end = time.monotonic() + min(args.min_flood_s, args.flood_s)
    sent = itertools.count()
    rss_before = server_memory_mib(target.pid)
    async with httpx2.AsyncClient(headers=target.auth("viewer"), timeout=max(60.0, args.flood_s)) as http:

        async def worker() -> None:
            while flooding(sent, args.big_requests, deadline, min_end):
                kind = next(kinds)
                label, response = await answer(http.get(urls[kind]))
                phase.answers[label] += 1
                if response is not None:
                    first_refusal(phase, label, response.text)
                    sizes[kind].append(len(response.content))

        await asyncio.gather(*(worker() for _ in range(4)))
    shown = ", ".join(f"{kind} {max(s) / 2**20:.1f} MiB (x{len(s)})" for kind, s in sizes.items() if s)
    phase.notes.append(f"file {name}: {args.big_mb} MB, one line; answers: {shown or 'none'}")
    phase.notes.append(
        f"server RSS {rss_before:.0f} MiB before, {server_memory_mib(target.pid):.0f} MiB after, "
        f"peak so far {server_memory_mib(target.pid, peak=True):.0f} MiB"
    )


def write_big_file(path: Path, megabytes: int) -> None:
    """One line of `megabytes` MB and no newline: a CSV header that never ends."""
    block = b"x" * 2**20
    with path.open("wb") as handle:
        for _ in range(megabytes):
            handle.write(block)


async def flood_bodies(target: Target, args: argparse.Namespace, phase: Phase) -> None:
    """The viewer key POSTs 2026-07-28 tools/call bodies of --body-kib KiB of small objects (list_tasks with an
    argument it refuses once the body is parsed), --body-concurrency at once."""
    items = [{"k": n, "v": f"{n:x}"} for n in range(args.body_kib * 1024 // 28)]
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "bench_abuse", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    headers = {
        **MCP_HEADERS,
        **target.auth("viewer"),
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "list_tasks",
    }
    deadline = time.monotonic() + args.flood_s
    min_end = time.monotonic() + min(args.min_flood_s, args.flood_s)
    sent = itertools.count()
    seconds: list[float] = []
    async with httpx2.AsyncClient(headers=headers, timeout=max(60.0, args.flood_s)) as http:

        async def worker(number: int) -> None:
            call = {
                "jsonrpc": "2.0",
                "id": number,
                "method": "tools/call",
                "params": {"name": "list_tasks", "arguments": {"junk": items}, "_meta": meta},
            }
            body = json.dumps(call).encode()
            while flooding(sent, args.bodies, deadline, min_end):
                t0 = time.monotonic()
                label, response = await answer(http.post(target.mcp_url, content=body))
                if response is not None:
                    label, text = mcp_outcome(response)
                    first_refusal(phase, label, text)
                phase.answers[label] += 1
                seconds.append(time.monotonic() - t0)

        await asyncio.gather(*(worker(n) for n in range(args.body_concurrency)))
    if seconds:
        phase.notes.append(
            f"{len(seconds)} bodies of {args.body_kib} KiB ({len(items):,} objects), answered in "
            f"{min(seconds):.2f} to {max(seconds):.2f} s each"
        )


FLOOD_RUNS: dict[str, Callable[[Target, argparse.Namespace, Phase], Awaitable[None]]] = {
    "sessions": flood_sessions,
    "scorecards": flood_scorecards,
    "slow": flood_slow,
    "bigfiles": flood_bigfiles,
    "bodies": flood_bodies,
}


async def settle(target: Target, limit: float = 60.0) -> float:
    """Wait until health answers within half a second again (at most `limit` s), then a second more; returns the
    seconds until it did."""
    t0 = time.monotonic()
    async with httpx2.AsyncClient(timeout=2.0) as http:
        while time.monotonic() - t0 < limit:
            t1 = time.monotonic()
            with contextlib.suppress(httpx2.TransportError):
                if (await http.get(f"{target.base}{target.health_path.lstrip('/')}")).status_code == 200 and (
                    time.monotonic() - t1 < 0.5
                ):
                    break
            await asyncio.sleep(0.2)
    waited = time.monotonic() - t0
    await asyncio.sleep(1.0)
    return waited


async def run_phases(target: Target, args: argparse.Namespace, floods: list[str]) -> list[Phase]:
    phases: list[Phase] = []

    async def measured(name: str, body: Callable[[Phase], Awaitable[None]]) -> None:
        phase = Phase(name)
        cpu0 = cpu_seconds(target.pid)
        phase.start = time.monotonic()
        await body(phase)
        phase.end = time.monotonic()
        phase.cpu_s = cpu_seconds(target.pid) - cpu0
        phase.rss_mib = server_memory_mib(target.pid)
        phase.peak_mib = server_memory_mib(target.pid, peak=True)
        phases.append(phase)

    def idle(seconds: float) -> Callable[[Phase], Awaitable[None]]:
        return lambda phase: asyncio.sleep(seconds)

    await asyncio.sleep(1.0)  # the prober's first connection
    await measured("idle", idle(args.idle_s))
    for name in floods:
        if name == "bigfiles":
            write_big_file(target.root / "big.csv", args.big_mb)
        await measured(name, lambda phase, name=name: FLOOD_RUNS[name](target, args, phase))
        phases[-1].notes.append(f"health back under 0.5 s {await settle(target):.1f} s after the flood")
        if name == "bigfiles":
            (target.root / "big.csv").unlink()
    await measured("idle after", idle(args.idle_s / 2))
    return phases


# -- the report ------------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Figures:
    """One probe's figures over one phase, in milliseconds."""

    count: int
    p50: float
    p99: float
    max: float
    timeouts: int
    errors: int
    other: Counter[str]  # answers other than 200 (e.g. 429 or 503 to health itself)
    stall: float  # the longest time, in seconds, without an answer (timeouts cap the latencies, not this)

    @classmethod
    def of(cls, samples: list[Sample], phase: Phase) -> Figures:
        inside = [s for s in samples if phase.start <= s[0] < phase.end]
        ms = [1000 * s[1] for s in inside]
        outcomes = Counter(s[2] for s in inside)
        other = Counter({k: v for k, v in outcomes.items() if k not in ("200", "timeout", "error")})
        answered = [
            phase.start,
            *sorted(t + seconds for t, seconds, outcome in inside if outcome not in ("timeout", "error")),
            phase.end,
        ]
        median = statistics.median(ms) if ms else float("nan")
        return cls(
            len(ms),
            median,
            quantile(ms, 0.99),
            max(ms, default=float("nan")),
            outcomes["timeout"],
            outcomes["error"],
            other,
            max(b - a for a, b in itertools.pairwise(answered)),
        )


def counts(counter: Counter[str]) -> str:
    return ", ".join(f"{label} x{n}" for label, n in counter.most_common()) or "-"


def report(
    target: Target, args: argparse.Namespace, phases: list[Phase], kept: list[Sample], fresh: list[Sample]
) -> bool:
    """Print the table and the verdicts; returns whether every flood met the goal."""
    pin = f"pinned to CPU {_common.SERVER_CPU}" if _common.pinned() else "not pinned"
    server = "jupyter server" if target.kind == "jupyter" else "plexus mcp serve --transport http"
    fds = args.server_fds or "inherited"
    print(
        f"\n{server} (extension on SQLite, {pin}, soft limit on open files {fds}); keys at {args.key_rate:g} "
        f"req/s; GET {target.health_path} every {args.probe_ms:g} ms kept alive and every {args.fresh_ms:g} ms "
        f"on a new connection, timeout {args.probe_timeout:g} s; load average {args.load:.1f} at the start "
        f"({os.cpu_count()} CPUs)"
    )
    print(
        f"{'phase':<11} {'secs':>5} | {'probes':>6} {'p50 ms':>7} {'p99 ms':>8} {'max ms':>8} {'t/o':>4} "
        f"{'err':>4} {'stall s':>7} {'p99/idle':>8} | {'new-conn p99':>12} {'fails':>5} {'x idle':>6} | "
        f"{'srv CPU':>7} {'RSS MiB':>7} {'peak':>6} | answers"
    )
    idle = phases[0]
    idle_kept, idle_fresh = Figures.of(kept, idle), Figures.of(fresh, idle)
    verdicts: list[tuple[str, float, float]] = []
    for phase in phases:
        k, f = Figures.of(kept, phase), Figures.of(fresh, phase)
        ratio, fresh_ratio = k.p99 / idle_kept.p99, f.p99 / idle_fresh.p99
        if phase.name in FLOODS:
            verdicts.append((phase.name, ratio, fresh_ratio))
        print(
            f"{phase.name:<11} {phase.end - phase.start:>5.1f} | {k.count:>6} {k.p50:>7.2f} {k.p99:>8.2f} "
            f"{k.max:>8.1f} {k.timeouts:>4} {k.errors:>4} {k.stall:>7.2f} {ratio:>8.1f} | {f.p99:>12.2f} "
            f"{f.timeouts + f.errors:>5} {fresh_ratio:>6.1f} | {phase.cpu_s:>6.1f}s {phase.rss_mib:>7.0f} "
            f"{phase.peak_mib:>6.0f} | {counts(phase.answers)}"
        )
        for probe, figures in (("kept-alive", k), ("new-connection", f)):
            if figures.other:
                print(f"{'':<11}   health itself answered ({probe}): {counts(figures.other)}")
        for note in phase.notes:
            print(f"{'':<11}   {note}")
    met = True
    print(
        f"goal: health p99 during a flood <= {GOAL:g} x idle p99 (idle: kept-alive {idle_kept.p99:.2f} ms, "
        f"new connection {idle_fresh.p99:.2f} ms)"
    )
    for name, ratio, fresh_ratio in verdicts:
        ok = ratio <= GOAL and fresh_ratio <= GOAL
        met &= ok
        print(
            f"  {name:<11} {'PASS' if ok else 'FAIL'}  kept-alive p99 {ratio:.1f}x idle, new connection p99 "
            f"{fresh_ratio:.1f}x idle"
        )
    return met


# -- main ------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated floods to run, of {', '.join(FLOODS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller counts and shorter phases (about a minute)")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="run against `plexus mcp serve --transport http` (floods: sessions, scorecards, slow)",
    )
    parser.add_argument("--port", type=int, help="the server's port (default: a free one)")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds of the idle phase")
    parser.add_argument("--flood-s", type=float, default=30.0, help="most seconds a flood sends for")
    parser.add_argument(
        "--min-flood-s",
        type=float,
        default=5.0,
        help="least seconds the sessions, scorecards and bigfiles floods go on for: they repeat their "
        "requests until then, so that a flood the server refuses quickly still meets enough probes",
    )
    parser.add_argument("--sessions", type=int, default=800, help="MCP sessions the viewer key opens")
    parser.add_argument("--session-concurrency", type=int, default=8)
    parser.add_argument("--scorecards", type=int, default=6, help="create_evaluation requests, two at a time")
    parser.add_argument("--card-kib", type=int, default=1024, help="size of the inline scorecard (just under it)")
    parser.add_argument("--slow", type=int, default=3000, help="slow connections (capped below the fd limit)")
    parser.add_argument("--slow-hold-s", type=float, default=15.0, help="seconds the slow connections are held")
    parser.add_argument(
        "--slow-from",
        default="127.0.0.2",
        help="loopback address the slow connections come from: not the probes' 127.0.0.1, so that a "
        "cap per address tells the flood from everyone else, as on a network",
    )
    parser.add_argument(
        "--server-fds",
        type=int,
        default=1024,
        help="soft limit on the server's open files, set once it is up (0: keep the inherited one)",
    )
    parser.add_argument("--big-mb", type=int, default=50, help="size of the one-line file (the issue used 200)")
    parser.add_argument("--big-requests", type=int, default=8, help="dataset GETs (listing and describe), 4 at once")
    parser.add_argument("--bodies", type=int, default=60, help="MCP bodies the viewer key POSTs (the bodies flood)")
    parser.add_argument("--body-kib", type=int, default=4000, help="size of each body (under max_request_bytes)")
    parser.add_argument("--body-concurrency", type=int, default=3)
    parser.add_argument(
        "--body-rate",
        type=int,
        default=0,
        help="the server's request_bytes_rate, bytes/s (0: its default, 2 MiB/s; a large one shows the parse alone)",
    )
    parser.add_argument("--key-rate", type=float, default=10_000, help="requests/s of the keys (the key's limit)")
    parser.add_argument("--probe-ms", type=float, default=20.0, help="kept-alive health GET every this often")
    parser.add_argument("--fresh-ms", type=float, default=100.0, help="new-connection health GET every this often")
    parser.add_argument("--probe-timeout", type=float, default=2.0, help="seconds before a health GET is a timeout")
    args = parser.parse_args()
    if args.quick:
        args.idle_s, args.flood_s, args.sessions, args.scorecards = 5.0, 15.0, 200, 2
        args.slow, args.slow_hold_s, args.big_mb, args.big_requests = 1500, 6.0, 10, 4
        args.bodies = 20
    allowed = STANDALONE_FLOODS if args.standalone else FLOODS
    args.floods = [f.strip() for f in args.only.split(",")] if args.only else list(allowed)
    unknown = [f for f in args.floods if f not in allowed]
    if unknown:
        parser.error(f"unknown or unsupported flood(s) {unknown}; choose from {', '.join(allowed)}")
    return args


def main() -> int:
    args = parse_args()
    pin_client()
    args.load = os.getloadavg()[0]  # other work on the machine blurs the idle baseline: say how much there was
    # SIGTERM cleans up like Ctrl-C: the server is stopped and the temporary folder removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.monotonic()
    with ExitStack() as stack:
        target = start_server(stack, args)
        collect = stack.enter_context(probing(target, args))
        phases = asyncio.run(run_phases(target, args, args.floods))
        kept, fresh = collect()
    met = report(target, args, phases, kept, fresh)
    print(f"({time.monotonic() - t0:.0f} s in all)")
    return 0 if met else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: server stopped, temporary folder removed", file=sys.stderr)
        sys.exit(130)
