"""The code stays lint- and type-clean and formatted (ruff, mypy), as CI checks on every run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    result = run("ruff", "check", "plexus_mcp_jupyter", "tests", "benchmarks", "notebooks", "docs")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)  # a fresh clone has no mypy cache: a cold check takes about two minutes on 2 busy cores
def test_mypy_finds_nothing():
    result = run("mypy", "plexus_mcp_jupyter")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tree_is_formatted():
    # `ruff format` is the one layout (line length 120, pyproject.toml); CI fails on a file it would change.
    result = run("ruff", "format", "--check", "plexus_mcp_jupyter", "tests", "benchmarks", "notebooks", "docs")
    assert result.returncode == 0, result.stdout + result.stderr
