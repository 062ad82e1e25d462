"""Synthetic task events inside a benchmark's JupyterLab (benchmarks/bench_lab.py only).

A thousand tasks that really run at once would need a thousand worker processes; what the panel's frame rate
depends on is the stream of task events, so this publishes, on the server's own event bus and loop, the
events such tasks would produce: RUNNING summaries whose progress advances. They travel the real path
(bus -> WebSocket handler -> browser -> panel). Started by a file: `$PLEXUS_LAB_LOAD_DIR/go` holds
{"tasks": N, "rounds": R, "interval": seconds}; `done` is written when the last round is published.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


def _summary(i: int, step: int, rounds: int, started: str) -> dict[str, Any]:
    percent = round(100.0 * step / rounds, 1)
    return {
        "task_id": f"load-{i:04d}",
        "type": "demo",
        "status": "RUNNING",
        "priority": 0,
        "description": None,
        "created_at": started,
        "started_at": started,
        "completed_at": None,
        "estimated_completion_at": None,
        "current_stage": "Processing",
        "error_message": None,
        "owner": "jupyter",
        "batch_id": None,
        "progress": {"stage": "Processing", "processed": step, "total": rounds, "percent": percent},
    }


def _run(directory: Path) -> None:
    from jupyter_server.serverapp import ServerApp

    go = directory / "go"
    while not go.exists():
        time.sleep(0.1)
    spec = json.loads(go.read_text())
    app = ServerApp.instance()
    bus = app.web_app.settings["plexus"].bus
    loop = app.io_loop
    started = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    tasks, rounds, interval = int(spec["tasks"]), int(spec["rounds"]), float(spec["interval"])

    def publish(step: int) -> None:
        for i in range(tasks):
            bus.publish("task.updated", "task", f"load-{i:04d}", _summary(i, step, rounds, started))

    for step in range(1, rounds + 1):
        loop.add_callback(publish, step)
        time.sleep(interval)
    (directory / "done").write_text("done")


def install() -> None:
    directory = os.environ.get("PLEXUS_LAB_LOAD_DIR")
    if directory:
        threading.Thread(target=_run, args=(Path(directory),), daemon=True, name="plexus-lab-load").start()
