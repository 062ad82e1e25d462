"""The example notebooks (notebooks/*.ipynb) executed by nbval against a real Jupyter server with the extension.

Each notebook gets a fresh `jupyter server` subprocess (its own data, runtime directory and SQLite store),
and nbval runs in a `python -m pytest` subprocess whose kernel finds that server the way kernels launched
by the extension do: through the connection file the server writes (PLEXUS_MCP_CONNECTION_FILE). Outputs
are compared with the committed ones after notebooks/nbval-sanitize.cfg has replaced ids, timestamps and
durations.

Regenerate the committed outputs (same server set-up, executed with nbconvert):

    python tests/test_notebooks.py                      # every notebook
    python tests/test_notebooks.py notebooks/01-quickstart.ipynb
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

CHECKOUT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((CHECKOUT / "notebooks").glob("*.ipynb"))
SANITIZE = CHECKOUT / "notebooks" / "nbval-sanitize.cfg"
TOKEN = "notebooks-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(workdir: Path) -> dict[str, str]:
    """The environment of the server and the kernels: this checkout first on the path, a private data
    and runtime directory, and no Plexus connection settings inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_MCP_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
    env["JUPYTER_DATA_DIR"] = str(workdir / "jdata")
    env["JUPYTER_RUNTIME_DIR"] = str(workdir / "jrun")
    env["PLEXUS_MCP_DB_URL"] = f"sqlite:///{workdir / 'plexus.db'}"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # no debugger warning on stderr from the kernels
    return env


@contextmanager
def jupyter(
    workdir: Path,
    *,
    app: str = "server",
    root_dir: Path | None = None,
    port: int | None = None,
    token: str = TOKEN,
    timeout: float = 60.0,
) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `jupyter server` (or `jupyter lab`) with the extension enabled.

    Yields (server URL, environment for kernels): the environment names the connection file the server
    wrote, exactly what a kernel the server launched would inherit."""
    port = port or free_port()
    env = clean_env(workdir)
    log = (workdir / f"jupyter-{app}.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            app,
            f"--port={port}",
            "--ip=127.0.0.1",
            "--no-browser",
            "--allow-root",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root_dir or workdir}",
            "--ServerApp.jpserver_extensions=plexus_mcp_jupyter=True",
            "--ServerApp.log_level=WARN",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    runtime = workdir / "jrun"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"jupyter {app} exited with {proc.returncode}:\n"
                    + (workdir / f"jupyter-{app}.log").read_text(errors="replace")
                )
            files = sorted(runtime.glob("plexus-*.json"))
            try:
                healthy = (
                    files
                    and requests.get(
                        url + "plexus/api/health", timeout=1, headers={"Authorization": f"token {token}"}
                    ).ok
                )
            except requests.RequestException:
                healthy = False
            if healthy:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter {app} did not come up within {timeout:g} s")
            time.sleep(0.1)
        yield url, {**env, "PLEXUS_MCP_CONNECTION_FILE": str(files[0])}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.mark.timeout(300)
def test_the_notebooks_outputs_match(tmp_path: Path) -> None:
    """All notebooks, in order, in one nbval run against one server (a server start costs ~8 s); each
    notebook's checked outputs depend only on what it did itself."""
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    with jupyter(tmp_path) as (_url, env):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--nbval",
                "--nbval-current-env",
                "--nbval-sanitize-with",
                str(SANITIZE),
                "-p",
                "no:cacheprovider",
                "-v",
                *(str(nb.relative_to(CHECKOUT)) for nb in NOTEBOOKS),
            ],
            cwd=CHECKOUT,
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
        )
    output = run.stdout + run.stderr
    # exit 5 (no test collected) is a failure too
    assert run.returncode == 0, f"nbval failed (exit {run.returncode}):\n{output}"
    for notebook in NOTEBOOKS:  # every notebook was collected and its cells passed
        assert re.search(rf"{re.escape(notebook.stem)}\S*::Cell 0 PASSED", output), output


def test_there_are_notebooks() -> None:
    names = [nb.name for nb in NOTEBOOKS]
    assert names[:3] == ["01-quickstart.ipynb", "02-evaluate-a-dataframe.ipynb", "03-assistant-in-the-loop.ipynb"]


def execute_in_place(notebook: Path) -> None:
    """Run a notebook against a fresh server and store its outputs (what nbval compares with)."""
    with tempfile.TemporaryDirectory() as tmp, jupyter(Path(tmp)) as (_url, env):
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "jupyter",
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--inplace",
                "--ExecutePreprocessor.timeout=120",
                str(notebook),
            ],
            env=env,
            check=True,
        )
        print(f"{notebook.name}: {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    for path in sys.argv[1:] or NOTEBOOKS:
        execute_in_place(Path(path).resolve())
