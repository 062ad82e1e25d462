"""The code stays lint- and type-clean and formatted (ruff, mypy), as CI checks on every run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parent.parent
MYPY = ("mypy", "plexus_mcp_jupyter")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


class Background:
    """A check started in the background when the session's tests are collected, read by its test.

    mypy takes ~45 s of one core while the rest of the suite mostly waits on servers and subprocesses: started at
    collection (conftest.py) at low priority, it runs on the machine's other core, and its test, run later in
    file order, only reads the result. Started at the test itself when the test runs alone."""

    def __init__(self, args: tuple[str, ...]) -> None:
        self.output: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop, at session end)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, stdout=self.output, stderr=subprocess.STDOUT, text=True
        )
        with contextlib.suppress(OSError, AttributeError):  # lower priority: the tests' servers come first
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 10)

    def result(self, timeout: float) -> tuple[int, str]:
        returncode = self.proc.wait(timeout)
        self.output.seek(0)
        return returncode, self.output.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.output.close()


BACKGROUND: dict[tuple[str, ...], Background] = {}


def start_in_background(args: tuple[str, ...] = MYPY) -> None:
    if args not in BACKGROUND:
        BACKGROUND[args] = Background(args)


def stop_background() -> None:
    while BACKGROUND:
        BACKGROUND.popitem()[1].stop()


def test_ruff_finds_nothing():
    result = run("ruff", "check", "plexus_mcp_jupyter", "tests", "benchmarks", "notebooks", "docs")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)  # a fresh clone has no mypy cache: a cold check takes about two minutes on 2 busy cores
def test_mypy_finds_nothing():
    start_in_background(MYPY)  # unless the session started it already
    returncode, output = BACKGROUND[MYPY].result(timeout=590)
    assert returncode == 0, output


def test_the_tree_is_formatted():
    # `ruff format` is the one layout (line length 120, pyproject.toml); CI fails on a file it would change.
    result = run("ruff", "format", "--check", "plexus_mcp_jupyter", "tests", "benchmarks", "notebooks", "docs")
    assert result.returncode == 0, result.stdout + result.stderr
