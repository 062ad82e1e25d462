"""Several real `jupyter server` processes on one store, for tests/test_multi_server.py and
benchmarks/bench_multi_server.py: the servers, a throwaway PostgreSQL cluster, and the task types they run.

The task types are registered in each server process by the bootstrap that starts it (`BOOT`): every run
appends the task's id to a file shared by the servers, so a test counts the runs of each task whichever
server ran it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.core.store import Store
from plexus_mcp_jupyter.core.tasks import TaskType, register_task_type
from plexus_mcp_jupyter.evaluations.store import EvaluationStore
from plexus_mcp_jupyter.security.audit import AuditLog
from plexus_mcp_jupyter.security.keys import KeyStore

from .processes import stop_process

REPO = Path(__file__).resolve().parent.parent


def record_run(ctx: Any, runs: str, hold: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """Append this task's id to `runs` (one O_APPEND write: whole lines from any number of processes), then
    sleep `seconds`, or hold until the file `hold` exists."""
    fd = os.open(runs, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{ctx.task_id}\n".encode())
    finally:
        os.close(fd)
    ctx.stage("Holding" if hold else "Working", 1)
    if hold:
        while not Path(hold).exists():
            time.sleep(0.05)
            ctx.check_cancelled()
    elif seconds:
        time.sleep(seconds)
    ctx.advance()
    return {"pid": os.getpid()}


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(params.get("runs"), str):
        raise InvalidArgument("runs must be the path of the file that records the runs")
    return {"runs": params["runs"], "hold": str(params.get("hold", "")), "seconds": float(params.get("seconds", 0))}


def register() -> None:
    """`recorded` (safe to retry: re-queued when its server dies) and `recorded_once` (failed instead)."""
    target = "tests.multi_server:record_run"
    register_task_type(TaskType("recorded", target, "records its run", _params, idempotent=True))
    register_task_type(TaskType("recorded_once", target, "records its run; never retried", _params))


# -- servers -------------------------------------------------------------------------------------------

BOOT = (
    "import sys; from tests.multi_server import register; register(); "
    "from jupyter_server.serverapp import main; sys.exit(main())"
)


_GIVEN: set[int] = set()  # ports handed out by this process: servers started at once never share one


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@dataclass
class Server:
    """One running `jupyter server` with the extension."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "plexus/api/events"

    def health(self) -> dict[str, Any]:
        answer = requests.get(self.url + "plexus/api/health", headers=self.headers, timeout=10)
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if len(text) <= 8000 else text[:4000] + "\n...\n" + text[-4000:]

    def kill(self) -> None:
        """kill -9, as a crash or a lost machine would. Not reaped here: see the kill test."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        stop_process(self.proc)


def start_servers(workdir: Path, db_url: str, settings_by_name: Mapping[str, Mapping[str, Any]]) -> list[Server]:
    """Start servers on one store at once, {name: settings} (a start takes seconds). If one fails, those that
    started are stopped before the error is raised."""
    with ThreadPoolExecutor(len(settings_by_name)) as pool:
        futures = [
            pool.submit(start_server, workdir, name, db_url, **settings) for name, settings in settings_by_name.items()
        ]
        wait(futures)
    up = [future.result() for future in futures if future.exception() is None]
    failed = [future.exception() for future in futures if future.exception() is not None]
    if failed:
        for server in up:
            server.stop()
        raise failed[0]  # type: ignore[misc]
    return up


def create_store(db_url: str) -> str:
    """Create the store's tables before servers start at once on it (two first starts on an empty PostgreSQL
    database race to create the same tables); returns the URL."""
    store = Store(db_url)
    try:
        EvaluationStore(store.engine)
        KeyStore(store.engine)
        AuditLog(store.engine).close()
    finally:
        store.close()
    return db_url


def start_server(workdir: Path, name: str, db_url: str, **settings: Any) -> Server:
    """A real `jupyter server` with the extension on `db_url` (settings as PLEXUS_MCP_* variables), up and
    answering health once this returns. A port taken meanwhile by another program: a new one, twice."""
    for attempt in range(3):
        try:
            return _start_server(workdir, name, db_url, **settings)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(AssertionError):
    pass


def _start_server(workdir: Path, name: str, db_url: str, **settings: Any) -> Server:
    port, token = free_port(), secrets.token_hex(16)
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_MCP_")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "rt"),
        JUPYTER_CONFIG_DIR=str(home / "cfg"),
        PLEXUS_MCP_DB_URL=db_url,
    )
    env.update({f"PLEXUS_MCP_{key.upper()}": str(value) for key, value in settings.items()})
    log_path = home / "jupyter.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                BOOT,
                "--no-browser",
                "--allow-root",
                f"--port={port}",
                "--ServerApp.ip=127.0.0.1",
                f"--IdentityProvider.token={token}",
                "--ServerApp.jpserver_extensions=plexus_mcp_jupyter=True",
                f"--ServerApp.root_dir={workdir}",
                "--ServerApp.log_level=WARN",
                "--ServerApp.port_retries=0",  # never another port: the URL below must be this server's
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
    server = Server(name, proc, f"http://127.0.0.1:{port}/", token, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if "already in use" in server.log():
                raise PortTaken(f"port {port} is taken")
            raise AssertionError(f"server {name} exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(requests.RequestException, ValueError):
            answer = requests.get(server.url + "plexus/api/health", headers=server.headers, timeout=2)
            if answer.ok and "server" in answer.json():  # the details: this server, which knows our token
                return server
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"server {name} did not start within 90 s:\n{server.log()}")


# -- a throwaway PostgreSQL cluster ----------------------------------------------------------------------


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be started here (not installed, or initdb/pg_ctl failed): the message says why."""


@dataclass
class PostgresCluster:
    port: int
    data_dir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database of this cluster; returns its SQLAlchemy URL."""
        import psycopg

        name = f"multi_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _program(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise PostgresUnavailable(f"{name} not found (install Debian's postgresql package)")
    return str(found)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """initdb in a directory directly under the system temp dir, pg_ctl start on a free port of 127.0.0.1
    (trust authentication), then stop and remove it. As root the programs run as the postgres user."""
    initdb, pg_ctl = _program("initdb"), _program("pg_ctl")
    data_dir = Path(tempfile.mkdtemp(prefix="plexus-multi-pg-", dir=tempfile.gettempdir()))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(args[:2])} failed: {(done.stderr or done.stdout)[-2000:]}")

    try:
        run(initdb, "-D", str(data_dir), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        run(
            pg_ctl,
            "-D",
            str(data_dir),
            "-l",
            str(data_dir / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            "start",
        )
        yield PostgresCluster(port, data_dir)
    finally:
        with contextlib.suppress(Exception):
            run(pg_ctl, "-D", str(data_dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(data_dir, ignore_errors=True)
