"""An accuracy evaluation of a large CSV end to end, beside reading that CSV with pyarrow and computing accuracy.

Writes a --rows-row CSV (id, text, label, prediction; 5 classes with stray case/whitespace and a few missing
values, bench_evaluation_load.make_frame) under the root of a real `jupyter server` with the extension
(benchmarks/_common.py; SQLite store), then, in the same run:

1. the raw peer, in this process: `pyarrow.csv.read_csv` of the label and prediction columns + the normalised
   accuracy in pyarrow.compute, and the same read + `compute_metrics` (every metric the evaluation reports);
2. the evaluation as a user sees it: `create_evaluation` (accuracy, prediction_column) over MCP with the SDK
   client, then `get_evaluation` every 50 ms until it is final (after one small warm-up evaluation, so the
   server's first-use imports are not counted; that warm-up's time is printed too);
3. the store's growth per item: the SQLite file (and its WAL) plus the items directory
   ({data_dir}/plexus_mcp/items, evaluations/item_files.py), before and after;
4. `get_evaluation_results(only_mismatches=True)` page latency (p50 of --pages pages, following cursors).

Prints the end-to-end / raw ratio (goal: <= 5x the pyarrow read + compute_metrics) and bytes per item (goal:
<= 16). Runs against any checkout (PYTHONPATH picks the package), so before/after figures come from one script.

    python benchmarks/bench_columnar.py [--rows 1000000 | --quick] [--rounds 1] [--pages 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import _common
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from _common import client, jupyter_server, tempdir
from bench_evaluation_load import make_frame

from plexus_mcp_jupyter.evaluations.metrics import compute_metrics

FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


def normalised(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Labels as the metrics normalise them by default: trimmed, lower case, missing as "na"."""
    text = pc.utf8_lower(pc.utf8_trim_whitespace(column.cast(pa.string())))
    return pc.fill_null(pc.if_else(pc.equal(text, ""), None, text), "na")


def raw_accuracy(path: Path) -> tuple[float, float]:
    """(accuracy, seconds): read the two columns with pyarrow.csv, compare normalised labels."""
    t0 = time.perf_counter()
    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(include_columns=["label", "prediction"]))
    correct = pc.equal(normalised(table["label"]), normalised(table["prediction"]))
    accuracy = pc.mean(correct.cast(pa.int8())).as_py()
    return accuracy, time.perf_counter() - t0


def raw_metrics(path: Path) -> tuple[float, float]:
    """(accuracy, seconds): read the two columns with pyarrow.csv, then compute_metrics (every metric)."""
    t0 = time.perf_counter()
    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(include_columns=["label", "prediction"]))
    metrics = compute_metrics(
        table["label"].to_numpy(zero_copy_only=False), table["prediction"].to_numpy(zero_copy_only=False)
    )
    return metrics.accuracy, time.perf_counter() - t0


def disk_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


async def evaluate(session: Any, dataset: str) -> tuple[dict[str, Any], float]:
    """(the final evaluation, seconds from create_evaluation to seeing it final)."""
    t0 = time.perf_counter()
    made = await session.call_tool(
        "create_evaluation",
        {"type": "accuracy", "dataset": dataset, "label_column": "label", "prediction_column": "prediction"},
    )
    if made.is_error:
        raise RuntimeError(made.content[0].text)
    evaluation_id = made.structured_content["evaluation_id"]
    while True:
        got = (await session.call_tool("get_evaluation", {"evaluation_id": evaluation_id})).structured_content
        if got["status"] in FINAL:
            return got, time.perf_counter() - t0
        await asyncio.sleep(0.05)


async def stage_times(session: Any, task_id: str) -> str:
    """Where the evaluation's time went: from created to the worker starting, then each stage (get_task)."""
    task = (await session.call_tool("get_task", {"task_id": task_id})).structured_content

    def at(text: str | None) -> float:
        return datetime.fromisoformat(text).timestamp() if text else float("nan")

    parts = [f"start {at(task['started_at']) - at(task['created_at']):.2f} s"]
    parts += [f"{s['name']} {at(s['completed_at']) - at(s['started_at']):.2f} s" for s in task["stages"]]
    return ", ".join(parts)


async def page_latencies(session: Any, evaluation_id: str, pages: int) -> list[float]:
    out, cursor = [], None
    for _ in range(pages):
        t0 = time.perf_counter()
        arguments = {"evaluation_id": evaluation_id, "only_mismatches": True, "limit": 50}
        page = (
            await session.call_tool("get_evaluation_results", arguments | ({"cursor": cursor} if cursor else {}))
        ).structured_content
        out.append(time.perf_counter() - t0)
        cursor = page["next_cursor"]
        if not cursor:
            break
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 rows")
    parser.add_argument("--rounds", type=int, default=1, help="evaluations end to end (the median is reported)")
    parser.add_argument("--pages", type=int, default=20)
    args = parser.parse_args()
    rows = 100_000 if args.quick else args.rows
    _common.pin_client()
    with tempdir() as tmp:
        work = Path(tmp)
        make_frame(rows).to_csv(work / "eval.csv", index=False)
        make_frame(1000).to_csv(work / "warm.csv", index=False)
        print(f"{rows:,}-row CSV: {(work / 'eval.csv').stat().st_size / 2**20:.1f} MiB")
        store = [work / "jupyter.db", work / "jupyter.db-wal", work / "jdata"]
        with jupyter_server(work) as (url, _pid):
            async with client(url) as session:
                _warm, cold = await evaluate(session, "warm.csv")
                ends, grown, last = [], [], None
                for _ in range(args.rounds):
                    before = disk_bytes(*store)
                    last, seconds = await evaluate(session, "eval.csv")
                    if last["status"] != "COMPLETED":
                        raise RuntimeError(f"evaluation {last['status']}: {last['error_message']}")
                    ends.append(seconds)
                    grown.append(disk_bytes(*store) - before)
                assert last is not None
                stages = await stage_times(session, last["task_id"])
                latencies = await page_latencies(session, last["evaluation_id"], args.pages)
        arrow = [raw_accuracy(work / "eval.csv") for _ in range(3)]
        metrics = [raw_metrics(work / "eval.csv") for _ in range(3)]
    end = statistics.median(ends)
    raw_a = statistics.median(s for _, s in arrow)
    raw_m = statistics.median(s for _, s in metrics)
    served = last["metrics"]["score"]["accuracy"]
    print(f"first (warm-up) evaluation, 1,000 rows:     {cold:8.3f} s")
    print(f"end to end (create -> COMPLETED seen):     {end:8.3f} s   median of {len(ends)}")
    print(f"  of which (the last run): {stages}")
    print(f"raw: pyarrow.csv read + accuracy:          {raw_a:8.3f} s   ratio {end / raw_a:6.1f}x")
    print(f"raw: pyarrow.csv read + compute_metrics:   {raw_m:8.3f} s   ratio {end / raw_m:6.1f}x   (goal <= 5x)")
    print(f"accuracy: served {served:.6f}, pyarrow {arrow[0][0]:.6f}, compute_metrics {metrics[0][0]:.6f}")
    per_item = statistics.median(grown) / rows
    print(f"store growth: {statistics.median(grown) / 2**20:.1f} MiB, {per_item:.1f} bytes/item   (goal <= 16)")
    if latencies:
        print(
            f"get_evaluation_results(only_mismatches) p50 {statistics.median(latencies) * 1000:.1f} ms over "
            f"{len(latencies)} pages"
        )


if __name__ == "__main__":
    asyncio.run(main())
