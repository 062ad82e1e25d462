"""The generated docs match the code, and the README's commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

from plexus_mcp_jupyter.docs import PAGES, main

ROOT = Path(__file__).resolve().parent.parent


def test_generated_pages_are_up_to_date():
    assert main(["--check"]) == 0, "run `python -m plexus_mcp_jupyter.docs` and commit the result"
    for name in PAGES:
        assert (ROOT / "docs" / name).read_text().startswith("# ")


def test_every_setting_and_tool_is_documented():
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    for env in ("PLEXUS_MCP_DB_URL", "PLEXUS_MCP_MAX_CONCURRENCY", "PLEXUS_MCP_CANCEL_GRACE_SECONDS"):
        assert env in configuration
    tools = (ROOT / "docs" / "tools.md").read_text()
    for tool in ("run_demo_task", "list_tasks", "get_task", "cancel_tasks"):
        assert f"## `{tool}`" in tools


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    # `|| exit $?`: under `set -e` a failure before the last command of an && list would not stop the script
    command = command.strip().removesuffix("|| exit $?").strip()
    assert command in readme
