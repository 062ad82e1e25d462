"""Take the screenshots in docs/notebook.md in a real browser: JupyterLab, a real kernel, real widgets.

    python docs/images/take_screenshots.py [--chromium /usr/bin/chromium]

Starts `jupyter lab` with the extension in a temporary root holding a small notebook, drives it with
Playwright (headless Chromium), runs the notebook and saves the output areas of two cells:
docs/images/progress.png (a running task's progress widget) and docs/images/dashboard.png (the live
dashboard with finished, failed, cancelled and running work). Needs `pip install playwright` and a
Chromium (Playwright's own, or the system's via --chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from tests.test_notebooks import jupyter  # noqa: E402  (the same server set-up as the notebook tests)

TOKEN = "screenshots"
CELLS = [
    "import time\n\nfrom plexus_mcp_jupyter import plexus",
    # 1: the progress widget of a running task
    'task = plexus.run_demo(items=3000, item_delay_ms=8, description="demo: 3000 items")\ntask',
    # 2: some history, then the dashboard
    'plexus.run_demo(items=200, item_delay_ms=2, description="nightly import").wait(30)\n'
    'flaky = plexus.run_demo(items=300, item_delay_ms=2, fail_at=120, description="flaky job")\n'
    "flaky.wait(30)\n"
    'reindex = plexus.run_demo(items=5000, item_delay_ms=5, description="reindex")\n'
    "time.sleep(1.5)\nreindex.cancel()\nreindex.wait(30)\n"
    "plexus.dashboard()",
    # 3: work that starts while the dashboard is on screen: an evaluation scored by this kernel
    "def slow_keywords(texts):\n"
    "    time.sleep(0.04 * len(texts))\n"
    '    return ["negative" if "not" in t.lower() or "broke" in t.lower() else "positive" for t in texts]\n\n\n'
    'evaluation = plexus.evaluate("example:sentiment", scorer=slow_keywords, label="label")',
]


def write_notebook(root: Path) -> str:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    notebook.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nbformat.write(notebook, root / "plexus.ipynb")
    # No news or update toasts over the notebook.
    settings = root.parent / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    return "plexus.ipynb"


def output_of(page: Page, cell: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(cell).locator(".jp-OutputArea-output").first


def run_all(page: Page) -> None:
    """Run > Run All Cells; answer JupyterLab's kernel dialog if it asks, and try again until cell 1 ran."""
    for _ in range(5):
        select = page.locator(".jp-Dialog button", has_text="Select")
        try:
            select.wait_for(timeout=2_000)
            select.click()
            time.sleep(2)
        except PlaywrightTimeout:
            pass
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            page.locator(".jp-InputPrompt", has_text="[1]").wait_for(timeout=10_000)
            return
        except PlaywrightTimeout:
            continue
    raise RuntimeError("JupyterLab did not run the notebook")


def take(chromium: str | None, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        name = write_notebook(root)
        os.environ["JUPYTERLAB_SETTINGS_DIR"] = str(Path(tmp) / "lab-settings")
        os.environ["JUPYTERLAB_WORKSPACES_DIR"] = str(Path(tmp) / "workspaces")
        with jupyter(Path(tmp), app="lab", root_dir=root, token=TOKEN) as (url, _env), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1180, "height": 1000}, device_scale_factor=2)
            page.goto(f"{url}lab/tree/{name}?token={TOKEN}&reset")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # The kernel is ready when its status (for screen readers) says Idle.
            page.get_by_text("Kernel status: Idle").first.wait_for(state="attached", timeout=60_000)
            # Room for the dashboard's columns: fold the file browser away.
            page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()
            run_all(page)
            progress = output_of(page, 1)
            try:
                progress.locator(".widget-hprogress").wait_for(timeout=60_000)
            except Exception:
                page.screenshot(path=str(Path(tmp).parent / "plexus-screenshot-failure.png"))
                raise
            time.sleep(4)  # the bar is well into Processing
            progress.screenshot(path=str(out / "progress.png"))
            dashboard = output_of(page, 2)
            dashboard.locator(".widget-hprogress").first.wait_for(timeout=90_000)
            time.sleep(3)  # the evaluation started after the dashboard appears and moves there
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(out / "dashboard.png"))
            browser.close()
    print("wrote", out / "progress.png", "and", out / "dashboard.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chromium",
        default="/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None,
        help="a Chromium executable (default: /usr/bin/chromium if present, else Playwright's)",
    )
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    take(args.chromium, args.out)


if __name__ == "__main__":
    main()
