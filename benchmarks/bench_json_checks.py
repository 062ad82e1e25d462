"""CPU per call of the checks every client JSON gets before it is parsed (security/http.py `json_refusal`: nesting
past MAX_JSON_DEPTH, values past max_json_values), beside `json.loads` of the same text.

Bodies: a small MCP tools/call (few brackets: two byte counts), one with 100 nested lists (the nesting is
measured), one with escaped quotes in its strings, and 1.1 MB of dataset records (counted and measured). Each figure
is the least of --rounds rounds of process CPU time per call, the two alternating; say the load (`uptime`) with it.

    PYTHONPATH=. python benchmarks/bench_json_checks.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from plexus_mcp_jupyter.security.http import MAX_JSON_DEPTH, json_depth, json_refusal


def bodies() -> dict[str, tuple[bytes, int, int]]:
    call = {"name": "list_tasks", "arguments": {"status": ["RUNNING", "QUEUED"], "type": ["demo"], "limit": 20}}
    lists = {"name": "cancel_tasks", "arguments": {"task_ids": [[f"t{i:04d}"] for i in range(100)]}}
    escaped = {"records": [{"label": 'a"b', "n": [i]} for i in range(100)]}
    records = {"records": [{"label": "a", "prediction": "b", "text": "x, [y] {z}"} for _ in range(20000)]}

    def rpc(params: dict) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).encode()

    return {
        "small tools/call": (rpc(call), 20000, 100_000),
        "100 nested lists": (rpc(lists), 5000, 100_000),
        "escaped quotes": (json.dumps(escaped).encode(), 5000, 100_000),
        "20k dataset records, max_dataset_json_values": (json.dumps(records).encode(), 5, 1_000_000),
        "20k dataset records, counted exactly (max 100,000)": (json.dumps(records).encode(), 5, 100_000),
    }


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}")
    for name, (body, calls, values) in bodies().items():
        check, depth, parse = [], [], []
        for _ in range(args.rounds):
            check.append(per_call(lambda b=body, v=values: json_refusal(b, v), calls))
            depth.append(per_call(lambda b=body: json_depth(b, MAX_JSON_DEPTH), calls))
            parse.append(per_call(lambda b=body: json.loads(b), calls))
        print(
            f"{name} ({len(body):,} B): json_refusal {min(check):.2f} us (json_depth alone {min(depth):.2f} us), "
            f"json.loads {min(parse):.2f} us"
        )
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
