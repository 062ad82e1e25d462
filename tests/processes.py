"""Child processes the tests start (servers, workers): stopped the same way everywhere."""

from __future__ import annotations

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
