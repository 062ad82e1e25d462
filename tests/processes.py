"""Child processes the tests start (servers, workers): stopped, and told alive, the same way everywhere."""

from __future__ import annotations

import os
import subprocess


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, 20 s to exit, then SIGKILL; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(10)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (exited, waiting only to be reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
