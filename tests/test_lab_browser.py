"""The lab face in a real Chromium against a real `jupyter lab`: the Plexus panel connects an assistant, mints
and revokes keys, shows tasks started by an MCP SDK client live, cancels, opens an evaluation's confusion
matrix, and resumes after a reload and after a server restart. One JupyterLab for the module.

Screenshots of each step (light and dark) are written to $PLEXUS_LAB_ARTIFACTS (default
tests/artifacts/lab/, not committed); docs/images/lab-*.png are chosen from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import open_client
from .lab_server import LabServer, launch_chromium, open_lab, open_panel

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
pytestmark = [
    pytest.mark.skipif(
        shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)"
    ),
    pytest.mark.timeout(180),
]

PREFILLED = 10_000
ARTIFACTS = Path(os.environ.get("PLEXUS_LAB_ARTIFACTS", Path(__file__).parent / "artifacts" / "lab"))


@pytest.fixture
def jp_asyncio_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """pytest-jupyter's autouse loop fixture closes the thread's current loop, which is Playwright's here."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def jp_server_cleanup() -> None:
    """No in-process Jupyter server here: the lab runs in a subprocess."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[LabServer]:
    server = LabServer(tmp_path_factory.mktemp("lab"))
    server.prefill(PREFILLED)  # every test runs with a big store: the fault "10,000 tasks" is the normal case here
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(lab, browser) -> Iterator[Any]:
    page = open_lab(browser, lab, permissions=["clipboard-read", "clipboard-write"])
    yield page
    page.context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def wait_for(fn: Callable[[], Any], predicate: Callable[[Any], bool], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if predicate(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


def run_from_palette(page: Any, label: str, done: Callable[[], bool], attempts: int = 6) -> None:
    """Open the command palette with its key, search `label` (the label alone: not every release matches the
    category) and run it until `done()`. The lab activates its launcher once its layout is restored, which can be after
    the panel opened; the modal palette closes when it loses focus, so a palette closed by that is opened again."""
    palette = page.locator(".jp-ModalCommandPalette .lm-CommandPalette-input")
    item = page.locator(".jp-ModalCommandPalette .lm-CommandPalette-item", has_text=label).first
    for attempt in range(attempts):
        page.keyboard.press("Control+Shift+C")
        try:
            palette.wait_for(state="visible", timeout=10000)
            palette.fill(label, timeout=10000)
            item.wait_for(timeout=10000)
            palette.press("Enter", timeout=10000)
            wait_for(done, bool, timeout=10)
            return
        except (sync_api.TimeoutError, AssertionError):
            if attempt == attempts - 1:
                raise


def start_with_mcp(lab: LabServer, **arguments: Any) -> str:
    """Start a demo task as an assistant does: the official MCP SDK client over HTTP with the token."""

    async def run() -> str:
        async with open_client(lab.mcp_url, lab.token) as client:
            result = await client.call_tool("run_demo_task", arguments)
            assert not result.is_error, result
            return str(result.structured_content["task_id"])

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=60)


def row(page: Any, task_id: str) -> Any:
    return page.locator(f'.plexus-row[data-task-id="{task_id}"]')


def percent(page: Any, task_id: str) -> float | None:
    value = row(page, task_id).locator(".plexus-progress").get_attribute("data-percent", timeout=10000)
    return float(value) if value else None


def shown(page: Any, task_id: str) -> tuple[str, float | None, str]:
    """A row's stage, bar and status, read in one go. The bar shows the current stage's progress, so a percentage
    means little without its stage; read one by one, a redraw between them paired the new stage with the previous
    stage's percentage."""
    stage, value, status = row(page, task_id).evaluate(
        "r => [r.querySelector('.plexus-col-stage').innerText,"
        " r.querySelector('.plexus-progress').getAttribute('data-percent'), r.getAttribute('data-status')]",
        timeout=10000,
    )
    return str(stage), float(value) if value else None, str(status)


@contextlib.contextmanager
def explained(page: Any, lab: LabServer, task_id: str) -> Iterator[None]:
    """On a failure, say what the server and the panel knew: the task, the panel's stream and rows, the server log."""
    try:
        yield
    except Exception as error:
        task = lab.request("GET", f"plexus/api/tasks/{task_id}")
        known = {k: task.get(k) for k in ("status", "stage", "progress", "updated_at")}
        stream = page.get_attribute("#plexus-panel", "data-stream")
        rows = page.locator(".plexus-row").count()
        tail = lab.log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"{error}; task {known}, stream {stream}, {rows} rows; server log:\n{tail}") from None


def test_the_panel_copies_a_client_configuration_and_tests_the_connection(page, lab):
    page.click(".plexus-tab-connect")
    page.wait_for_selector(".plexus-config-claude-code")
    assert lab.mcp_url.replace("127.0.0.1", "") in page.inner_text(".plexus-endpoint").replace("127.0.0.1", "")
    page.click(".plexus-config-claude-code summary")
    page.click(".plexus-copy-claude-code")
    page.wait_for_selector(".plexus-config-claude-code .plexus-copied:has-text('Copied')")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("claude mcp add --transport http plexus ") and lab.token in copied
    page.click(".plexus-test")
    page.wait_for_selector(".plexus-test-result:has-text('Connected to')", timeout=20000)
    assert "run_demo_task" in page.inner_text(".plexus-test-result")
    page.click(".plexus-config-claude-code summary")  # folded again: the screenshot shows no token
    shot(page, "connect-light")


def test_a_key_is_minted_for_a_client_and_revoked(page, lab):
    page.click(".plexus-tab-connect")
    page.fill(".plexus-pane-connect .plexus-key-name", "lab browser key")
    page.select_option(".plexus-pane-connect .plexus-key-role", "viewer")
    page.click(".plexus-pane-connect .plexus-mint")
    secret = page.inner_text(".plexus-pane-connect .plexus-secret-value", timeout=10000).strip()
    assert secret.startswith("plx_")
    assert "shown only once" in page.inner_text(".plexus-pane-connect .plexus-secret")
    page.wait_for_selector(".plexus-note:has-text('the key you just minted')")
    page.click(".plexus-config-vscode summary")
    assert secret in page.inner_text(".plexus-config-vscode pre") and lab.token not in page.inner_text(
        ".plexus-configs"
    )
    page.click(".plexus-test")
    page.wait_for_selector(".plexus-test-result:has-text('Connected to')", timeout=20000)  # the key works
    shot(page, "mint-key-light")

    key = next(k for k in lab.request("GET", "plexus/api/keys")["keys"] if k["name"] == "lab browser key")
    page.click(".plexus-tab-keys")
    key_row = page.locator(f'.plexus-keys tr[data-key="{key["id"]}"]')
    page.once("dialog", lambda dialog: dialog.accept())
    key_row.locator(".plexus-revoke").click()
    page.wait_for_selector(f'.plexus-keys tr[data-key="{key["id"]}"][data-status="revoked"]')
    assert key_row.locator(".plexus-revoke").is_disabled()
    shot(page, "keys-light")
    # The audit log, filtered: the key's creation and revocation by the notebook user.
    page.click(".plexus-tab-audit")
    page.fill("input[aria-label='Filter by action']", "key.*")
    page.click("form[aria-label='Audit filters'] button[type='submit']")
    actions = page.locator(".plexus-audit tbody tr")
    wait_for(
        lambda: set(actions.evaluate_all("rows => rows.map(r => r.dataset.action)")),
        lambda seen: seen == {"key.create", "key.revoke"},
    )
    shot(page, "audit-light")
    # The revoked key no longer passes: the panel's test connection says so.
    page.click(".plexus-tab-connect")
    page.click(".plexus-test")
    page.wait_for_selector(".plexus-test-result:has-text('Failed: initialize: 401')", timeout=20000)


def test_a_task_started_by_an_mcp_client_runs_to_completed_with_its_bar_moving(page, lab):
    task_id = start_with_mcp(lab, items=150, item_delay_ms=20)
    row(page, task_id).wait_for(timeout=15000)
    seen: list[tuple[str, float]] = []  # (stage, percent): the bar shows the current stage's progress

    def sample() -> str:
        stage, value, status = shown(page, task_id)
        if value is not None and (not seen or seen[-1] != (stage, value)):
            seen.append((stage, value))
        return status

    wait_for(sample, lambda status: status == "COMPLETED", timeout=60)
    shot(page, "task-completed-light")
    wait_for(lambda: percent(page, task_id), lambda value: value == 100)  # the row's final state
    processing = [v for stage, v in seen if stage == "Processing"]
    assert processing == sorted(processing)
    assert len([v for v in processing if 0 < v < 100]) >= 2, f"the bar did not move while running: {seen}"
    status_bar = page.inner_text(".plexus-statusbar")
    assert "running" in status_bar and "queued" in status_bar


def test_the_status_bar_the_palette_and_the_keyboard_reach_the_panel(page, lab):
    page.click(".plexus-tab-connect")
    page.click(".plexus-statusbar")  # the status-bar item opens the Tasks tab
    assert page.get_attribute(".plexus-tab-tasks", "aria-selected") == "true"
    assert page.get_attribute(".plexus-statusbar", "aria-label").startswith("Plexus: ")
    run_from_palette(
        page, "Connect an Assistant", lambda: page.get_attribute(".plexus-tab-connect", "aria-selected") == "true"
    )
    page.focus(".plexus-tab-tasks")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute(".plexus-tab-evaluations", "aria-selected") == "true"
    assert page.evaluate("document.activeElement.textContent") == "Evaluations"
    unlabelled = page.evaluate(
        "() => [...document.querySelectorAll('#plexus-panel :is(button, input, select)')]"
        ".filter(e => e.offsetParent && !(e.getAttribute('aria-label') || e.textContent.trim()))"
        ".map(e => e.outerHTML)"
    )
    assert unlabelled == []


def test_a_running_task_is_cancelled_from_its_row(page, lab):
    task_id = start_with_mcp(lab, items=5000, item_delay_ms=10)
    wait_for(lambda: row(page, task_id).get_attribute("data-status", timeout=15000), lambda s: s == "RUNNING")
    row(page, task_id).locator(".plexus-cancel").click()
    wait_for(lambda: row(page, task_id).get_attribute("data-status"), lambda s: s == "CANCELLED", timeout=30)
    assert lab.request("GET", f"plexus/api/tasks/{task_id}")["status"] == "CANCELLED"
    assert row(page, task_id).locator(".plexus-cancel").is_disabled()


def test_the_task_detail_shows_stages_and_output(page, lab):
    task_id = start_with_mcp(lab, items=20, item_delay_ms=1)
    wait_for(lambda: row(page, task_id).get_attribute("data-status", timeout=15000), lambda s: s == "COMPLETED")
    row(page, task_id).locator(".plexus-open").click()
    detail = page.locator(f"#plexus-task-{task_id}")
    detail.locator("[data-status='COMPLETED']").wait_for(timeout=15000)
    stages = detail.locator("table[aria-label='Stages']").inner_text()
    assert "Setup" in stages and "Processing" in stages and "Finalizing" in stages
    assert detail.locator("pre[aria-label='Output']").inner_text() != "(none yet)"


def test_an_evaluations_confusion_matrix_and_mismatches(browser, lab):
    created = lab.request(
        "POST",
        "plexus/api/evaluations",
        {"type": "accuracy", "dataset": "example:topics", "prediction_column": "prediction", "label_column": "label"},
    )
    evaluation_id = created["evaluation_id"]
    wait_for(
        lambda: lab.request("GET", f"plexus/api/evaluations/{evaluation_id}")["status"],
        lambda s: s == "COMPLETED",
        timeout=60,
    )
    for theme, name in (("JupyterLab Light", "light"), ("JupyterLab Dark", "dark")):
        lab.set_theme(theme)
        page = open_lab(browser, lab)
        try:
            page.click(".plexus-tab-evaluations")
            page.click(f".plexus-open-evaluation[aria-label='Open evaluation {evaluation_id}']")
            detail = page.locator(f"#plexus-evaluation-{evaluation_id}")
            matrix = detail.locator("table.plexus-matrix")
            matrix.wait_for(timeout=15000)
            headers = matrix.locator("thead th").all_inner_texts()
            assert len(headers) == 6 and "technical" in headers  # corner + five topics
            assert len(matrix.locator("tbody tr").all()) == 5
            detail.locator("table[aria-label='Mismatches'] tbody tr").first.wait_for(timeout=10000)
            assert detail.locator(".plexus-per-class tbody tr").count() == 5
            shot(page, f"evaluation-{name}")
            if name == "dark":
                page.click(".plexus-tab-tasks")
                shot(page, "tasks-dark")
        finally:
            page.context.close()
    lab.set_theme("JupyterLab Light")


def test_ten_thousand_tasks_are_paged_and_only_visible_rows_are_drawn(page, lab):
    summary = page.locator(".plexus-summary")
    wait_for(summary.inner_text, lambda text: text.startswith("1000 shown") or text.startswith("100"), timeout=30)
    wait_for(lambda: page.locator(".plexus-load-more").count(), lambda n: n == 1, timeout=30)
    loaded = int(summary.inner_text().split()[0])
    assert loaded >= 1000
    page.click(".plexus-load-more")
    wait_for(lambda: int(summary.inner_text().split()[0]), lambda n: n >= loaded + 1000, timeout=30)
    rows = page.locator(".plexus-rows .plexus-row").count()
    assert 0 < rows < 80, f"{rows} rows in the DOM: the table is not virtualised"
    page.locator(".plexus-viewport").evaluate("v => { v.scrollTop = v.scrollHeight; }")
    shown = int(summary.inner_text().split()[0])
    last = page.locator(".plexus-rows .plexus-row").last
    wait_for(lambda: last.get_attribute("aria-rowindex"), lambda index: index == str(shown))  # the end, drawn
    assert (last.get_attribute("data-task-id") or "").startswith("old-")
    assert page.locator(".plexus-rows .plexus-row").count() < 80
    page.select_option(".plexus-filter-status", "RUNNING")
    wait_for(lambda: page.locator(".plexus-rows .plexus-row").count(), lambda n: n == 0)


def test_open_in_notebook_inserts_the_plexus_call(page, lab):
    evaluation = lab.request(
        "POST",
        "plexus/api/evaluations",
        {
            "type": "accuracy",
            "dataset": "example:sentiment",
            "prediction_column": "prediction",
            "label_column": "label",
        },
    )
    notebook = {
        "cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [], "execution_count": None}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    lab.request("PUT", "api/contents/plexus.ipynb", {"type": "notebook", "format": "json", "content": notebook})
    page.goto(f"{lab.url}lab/tree/plexus.ipynb")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60000)
    if page.locator(".jp-Dialog").count():  # a kernel chooser, should the kernel spec be missing
        page.keyboard.press("Escape")
    open_panel(page)
    page.click(".plexus-tab-evaluations")
    page.click(f".plexus-open-evaluation[aria-label='Open evaluation {evaluation['evaluation_id']}']", timeout=20000)
    detail = page.locator(f"#plexus-evaluation-{evaluation['evaluation_id']}")
    detail.locator("button:has-text('Mismatches as DataFrame')").click()
    sources = page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor")
    wait_for(lambda: " ".join(sources.all_inner_texts()), lambda text: "only_mismatches=True" in text)
    text = " ".join(sources.all_inner_texts())
    assert f'plexus.evaluation("{evaluation["evaluation_id"]}").results(only_mismatches=True)' in text


def test_two_hundred_classes_are_summarised(browser, lab):
    labels = [f"class{i:03d}" for i in range(200)]
    rows = [f"{i},{labels[i % 200]},{labels[(i * 7) % 200] if i % 3 else labels[i % 200]}" for i in range(1000)]
    (lab.workdir / "root" / "many_classes.csv").write_text("id,label,prediction\n" + "\n".join(rows) + "\n")
    created = lab.request(
        "POST",
        "plexus/api/evaluations",
        {
            "type": "accuracy",
            "dataset": "many_classes.csv",
            "prediction_column": "prediction",
            "label_column": "label",
            "id_column": "id",
        },
    )
    evaluation_id = created["evaluation_id"]
    wait_for(
        lambda: lab.request("GET", f"plexus/api/evaluations/{evaluation_id}")["status"],
        lambda s: s == "COMPLETED",
        timeout=60,
    )
    page = open_lab(browser, lab)
    try:
        page.click(".plexus-tab-evaluations")
        page.click(f".plexus-open-evaluation[aria-label='Open evaluation {evaluation_id}']", timeout=20000)
        detail = page.locator(f"#plexus-evaluation-{evaluation_id}")
        detail.locator(".plexus-per-class").wait_for(timeout=15000)
        assert "200 classes: the 50 largest are shown" in detail.locator(".plexus-note").first.inner_text()
        assert detail.locator(".plexus-per-class tbody tr").count() == 50
        assert detail.locator("table.plexus-matrix").count() == 0
    finally:
        page.context.close()


def test_the_columns_setting_applies(browser, lab):
    lab.request(
        "PUT",
        "lab/api/settings/plexus-mcp-jupyter:plugin",
        {"raw": json.dumps({"columns": ["status", "progress", "owner"]})},
    )
    page = open_lab(browser, lab)
    try:
        wait_for(
            lambda: page.locator(".plexus-head [role=columnheader]").all_inner_texts(),
            lambda heads: (
                [h for h in heads if h.strip() and h not in ("Select", "Actions")] == ["Status", "Progress", "Owner"]
            ),
        )
    finally:
        lab.request("PUT", "lab/api/settings/plexus-mcp-jupyter:plugin", {"raw": "{}"})
        page.context.close()


def test_a_reload_mid_task_resumes_the_live_state(browser, lab):
    page = open_lab(browser, lab)
    try:
        task_id = start_with_mcp(lab, items=4000, item_delay_ms=20)  # 80 s, ample for a reload on a loaded machine

        # Percentages of the Processing stage: Setup's bar is at 100% once its last step is done, and a `before`
        # taken there waited for a Processing bar past 100 (CI, stop 23).
        def processing_past(floor: float) -> Callable[[tuple[str, float | None, str]], bool]:
            return lambda seen: seen[0] == "Processing" and seen[1] is not None and seen[1] > floor

        _, before, _ = wait_for(lambda: shown(page, task_id), processing_past(5), timeout=30)
        page.reload()
        open_panel(page)
        with explained(page, lab, task_id):
            _, after, _ = wait_for(lambda: shown(page, task_id), processing_past(before - 0.01), timeout=30)
            wait_for(lambda: shown(page, task_id), processing_past(after), timeout=30)  # still live
        shot(page, "reload-resumed-light")
    finally:
        lab.request("POST", f"plexus/api/tasks/{task_id}/cancel", {})
        page.context.close()


def test_a_server_restart_shows_the_banner_and_resumes(browser, lab):
    """Last in the module: it restarts the server (same port, token and store)."""
    page = open_lab(browser, lab)
    try:
        lab.stop()
        page.wait_for_selector(".plexus-banner:has-text('Disconnected')", timeout=20000)
        assert page.get_attribute("#plexus-panel", "data-stream") == "reconnecting"
        shot(page, "disconnected-light")
        lab.start()
        page.wait_for_selector("#plexus-panel[data-stream='open']", timeout=30000)
        assert page.is_hidden(".plexus-banner")
        task_id = start_with_mcp(lab, items=10, item_delay_ms=1)  # a new server start: events still arrive
        with explained(page, lab, task_id):  # a failure seen once under load
            wait_for(lambda: row(page, task_id).get_attribute("data-status", timeout=15000), lambda s: s == "COMPLETED")
    finally:
        page.context.close()
