"""The lab panel's speed in Debian's Chromium (Playwright) against a real JupyterLab with the extension.

1. Progress latency: a demo task runs on the server; for every progress event of its Processing stage,
   the time from the event's publication on the server (its `at`, same machine and clock) to the change
   of the task's progress bar in the page (a MutationObserver on the bar's `data-percent`). p50/p99/max
   over at least `--updates` updates. Goal: p99 < 100 ms.
2. Load: `--tasks` RUNNING tasks whose progress advances `--rounds` times (benchmarks/_lab_load.py publishes
   their events on the server's bus: the real stream, without a thousand worker processes); the browser's
   long tasks (> 50 ms, PerformanceObserver 'longtask') while the panel draws them. Goal: none.

    python benchmarks/bench_lab.py [--updates 1000] [--tasks 1000] [--rounds 50] [--interval 0.2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.lab_server import LabServer, launch_chromium, open_lab  # noqa: E402

# Installed before the lab's own scripts: taps the panel's event socket and watches its progress bars.
PROBE = """
window.__plexus = { events: new Map(), dom: new Map(), long: [], received: 0, mutations: 0 };
const Original = window.WebSocket;
window.WebSocket = class extends Original {
  constructor(url, protocols) {
    super(url, protocols);
    if (String(url).includes('plexus/api/events')) {
      this.addEventListener('message', e => {
        const m = JSON.parse(e.data);
        if (m.type !== 'event') return;
        window.__plexus.received++;
        const p = m.data && m.data.progress;
        if (p && p.stage === 'Processing' && p.percent !== null) {
          const key = m.data.task_id + '|' + p.percent;
          if (!window.__plexus.events.has(key)) window.__plexus.events.set(key, Date.parse(m.at));
        }
      });
    }
  }
};
new MutationObserver(records => {
  const t = performance.timeOrigin + performance.now();
  for (const r of records) {
    const bar = r.target;
    window.__plexus.mutations++;
    if (!bar.dataset || !bar.dataset.percent) continue;
    const row = bar.closest('.plexus-row');
    if (!row || row.querySelector('.plexus-col-stage')?.textContent !== 'Processing') continue;
    const key = row.dataset.taskId + '|' + bar.dataset.percent;
    if (!window.__plexus.dom.has(key)) window.__plexus.dom.set(key, t);
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-percent'] });
new PerformanceObserver(list => {
  for (const e of list.getEntries()) window.__plexus.long.push(e.duration);
}).observe({ type: 'longtask', buffered: true });
"""

COLLECT = """() => {
  const out = [];
  for (const [key, at] of window.__plexus.events) {
    const seen = window.__plexus.dom.get(key);
    if (seen !== undefined) out.push(seen - at);
  }
  return out;
}"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def progress_latency(page: Any, lab: LabServer, updates: int) -> list[float]:
    latencies: list[float] = []
    while len(latencies) < updates:
        task = lab.request("POST", "plexus/api/tasks", {"type": "demo", "params": {"items": 1000, "item_delay_ms": 20}})
        deadline = time.monotonic() + 180
        while lab.request("GET", f"plexus/api/tasks/{task['task_id']}")["status"] not in ("COMPLETED", "FAILED"):
            if time.monotonic() > deadline:
                raise RuntimeError("the demo task did not finish within 180 s")
            time.sleep(0.5)
        time.sleep(0.5)
        latencies = page.evaluate(COLLECT)
        print(f"  {len(latencies)} progress updates matched so far", flush=True)
    return latencies


def load(page: Any, lab: LabServer, load_dir: Path, tasks: int, rounds: int, interval: float) -> dict[str, Any]:
    page.evaluate("() => { window.__plexus.long = []; window.__plexus.received = 0; window.__plexus.mutations = 0; }")
    (load_dir / "go").write_text(json.dumps({"tasks": tasks, "rounds": rounds, "interval": interval}))
    deadline = time.monotonic() + rounds * interval + 120
    while not (load_dir / "done").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the synthetic load did not finish")
        time.sleep(0.2)
    page.wait_for_function(
        f"() => document.querySelector('.plexus-summary')?.textContent.includes('{tasks} running')", timeout=60000
    )
    time.sleep(1.0)
    return page.evaluate(
        "() => ({ long: window.__plexus.long, received: window.__plexus.received, "
        "mutations: window.__plexus.mutations })"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
        workdir = Path(tmp)
        load_dir = workdir / "load"
        load_dir.mkdir()
        launcher = (
            "-c",
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import _lab_load; _lab_load.install(); "
            "from jupyterlab.labapp import main; sys.argv[0] = 'jupyter-lab'; sys.exit(main())",
        )
        lab = LabServer(workdir, launcher=launcher, extra_env={"PLEXUS_LAB_LOAD_DIR": str(load_dir)})
        lab.start()
        try:
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                context_page = open_lab(browser, lab)
                page = context_page
                page.add_init_script(PROBE)
                page.reload()
                from tests.lab_server import open_panel

                open_panel(page)
                print(f"1. progress event -> progress bar, {args.updates}+ updates of demo tasks:", flush=True)
                latencies = progress_latency(page, lab, args.updates)
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                print(
                    f"   n={len(latencies)} p50={p50:.1f} ms p99={p99:.1f} ms max={max(latencies):.1f} ms "
                    f"mean={statistics.fmean(latencies):.1f} ms; p99 / goal (100 ms) = {p99 / 100:.2f}"
                )
                print(
                    f"2. {args.tasks} running tasks x {args.rounds} progress rounds every {args.interval}s:", flush=True
                )
                result = load(page, lab, load_dir, args.tasks, args.rounds, args.interval)
                long_tasks = [d for d in result["long"] if d > 50]
                published = args.tasks * args.rounds
                print(
                    f"   events published {published}, received by the page {result['received']} (the stream "
                    f"coalesces per task for a slow reader), progress-bar changes drawn {result['mutations']}"
                )
                print(
                    f"   long tasks > 50 ms: {len(long_tasks)}"
                    + (f" (max {max(long_tasks):.0f} ms)" if long_tasks else "")
                    + "; goal: 0"
                )
                browser.close()
        finally:
            lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
