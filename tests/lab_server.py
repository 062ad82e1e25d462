"""A real `jupyter lab` with the Plexus server extension and the built lab extension, and Debian's Chromium
driven by Playwright: shared by tests/test_lab_browser.py and benchmarks/bench_lab.py.

The lab extension is found through JUPYTER_PATH (a copy of the committed build under labextensions/), so
the tests exercise the build in this checkout even where an older version of the package is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
BUILT = ROOT / "plexus_mcp_jupyter" / "labextension"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabServer:
    """`python -m jupyterlab` in a subprocess, on its own port, token, data dir and SQLite store."""

    def __init__(
        self,
        workdir: Path,
        extra_args: tuple[str, ...] = (),
        launcher: tuple[str, ...] = ("-m", "jupyterlab"),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """`launcher` replaces `-m jupyterlab` (a benchmark's `-c` code that prepares, then runs jupyterlab)."""
        self.workdir = workdir
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.extra_args = extra_args
        self.launcher = launcher
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "jupyter.log"
        jupyter_path = workdir / "jupyter_path"
        installed = jupyter_path / "labextensions" / "plexus-mcp-jupyter"
        if not installed.exists():
            shutil.copytree(BUILT, installed)
        for name in ("root", "data", "config", "runtime", "settings", "workspaces"):
            (workdir / name).mkdir(exist_ok=True)
        news = workdir / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True, exist_ok=True)
        news.write_text(json.dumps({"fetchNews": "false"}))  # no "news?" prompt over the screenshots
        # The server extension is enabled here, whatever the environment's own config says.
        (workdir / "config" / "jupyter_server_config.json").write_text(
            json.dumps({"ServerApp": {"jpserver_extensions": {"plexus_mcp_jupyter": True}}})
        )
        self.env = {
            **os.environ,
            "JUPYTER_PATH": str(jupyter_path),
            "JUPYTER_DATA_DIR": str(workdir / "data"),
            "JUPYTER_CONFIG_DIR": str(workdir / "config"),
            "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            **(extra_env or {}),
        }

    def prefill(self, count: int, *, age_seconds: float = 600.0) -> None:
        """`count` finished demo tasks in the store, older than anything the tests start (before `start`)."""
        from plexus_mcp_jupyter.core.models import Task, TaskStatus
        from plexus_mcp_jupyter.core.store import Store

        store = Store(f"sqlite:///{self.workdir / 'plexus.db'}")
        base = time.time() - age_seconds
        try:
            store.create_tasks(
                [
                    Task(
                        id=f"old-{i:05d}",
                        type="demo",
                        status=TaskStatus.COMPLETED,
                        owner="jupyter",
                        created_at=base + i * 0.01,
                        started_at=base + i * 0.01,
                        completed_at=base + i * 0.01 + 0.005,
                    )
                    for i in range(count)
                ]
            )
        finally:
            store.close()

    def start(self, timeout: float = 90.0) -> None:
        args = [
            sys.executable,
            *self.launcher,
            "--no-browser",
            "--allow-root",
            f"--port={self.port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.workdir / 'root'}",
            f"--LabApp.user_settings_dir={self.workdir / 'settings'}",
            f"--LabApp.workspaces_dir={self.workdir / 'workspaces'}",
            f"--PlexusMCPExtension.db_url=sqlite:///{self.workdir / 'plexus.db'}",
            "--PlexusMCPExtension.progress_write_interval=0.1",
            *self.extra_args,
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if self.request("GET", "plexus/api/health").get("status") == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"jupyter lab did not answer within {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json", **(headers or {})},
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def set_theme(self, theme: str) -> None:
        """JupyterLab's theme setting, through its settings API (the page must be reloaded to see it)."""
        self.request(
            "PUT", "lab/api/settings/@jupyterlab/apputils-extension:themes", {"raw": json.dumps({"theme": theme})}
        )

    @property
    def mcp_url(self) -> str:
        return f"{self.url}plexus/mcp"


def launch_chromium(playwright: Any) -> Any:
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("Chromium is not installed: apt-get install -y chromium (.ci/run does it)")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)


def open_lab(browser: Any, server: LabServer, **context_args: Any) -> Any:
    """A page on the lab, logged in with the token, with the Plexus panel open on its Tasks tab."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, **context_args)
    page = context.new_page()
    page.goto(f"{server.url}lab?token={server.token}")
    open_panel(page)
    return page


def open_panel(page: Any, width: int = 640) -> None:
    """Open the Plexus sidebar (once the lab has loaded) and drag it to `width` pixels, as a user would."""
    page.wait_for_selector('.jp-SideBar [data-id="plexus-panel"]', timeout=60000)
    page.wait_for_selector("#plexus-panel[data-stream='open']", state="attached", timeout=30000)
    page.wait_for_selector("#jp-main-dock-panel", timeout=30000)  # the lab has restored its layout by now
    # ...and then activates its launcher, which takes the focus (closing a palette, leaving a tab): wait for that
    # before the panel is used; a layout that activates nothing never moves the focus, hence the bound.
    from playwright.sync_api import TimeoutError as PageTimeout

    with contextlib.suppress(PageTimeout):
        page.wait_for_function("() => !!document.activeElement?.closest('#jp-main-dock-panel')", timeout=15000)
    deadline = time.monotonic() + 30
    while not page.is_visible("#plexus-panel"):
        if time.monotonic() > deadline:
            raise AssertionError("the Plexus panel did not open")
        tab = page.locator('.jp-SideBar [data-id="plexus-panel"]')
        if tab.get_attribute("aria-selected") != "true":
            tab.click()
        page.wait_for_timeout(200)
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle").first
    box = handle.bounding_box()
    panel = page.locator("#plexus-panel").bounding_box()
    if box and panel and panel["width"] < width - 10:
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 200)
        page.mouse.down()
        page.mouse.move(panel["x"] + width, box["y"] + 200, steps=5)
        page.mouse.up()
