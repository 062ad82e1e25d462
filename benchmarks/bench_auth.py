"""tools/call on ONE Jupyter server: the Jupyter token vs an API key (authentication + rate limiting).

One real `jupyter server` with the extension. An admin key (and an operator key, whose listings also
go through the visibility filter) is created over REST with the token, with a per-key rate limit high
enough (10,000/s, the most a key may have) that the bucket is checked on every request but never
refuses one. The same calls are then timed with each credential, in alternating rounds so that machine
noise hits them alike; the server is pinned to one core and the client to the others (taskset).

1. the official SDK client (one session, sequential calls): calls/s, p50, p99, and server CPU per call;
2. a lean keep-alive client (benchmarks/_common.py LeanSession): latency that is mostly the server's;
3. in process, without a server: the microseconds a key adds to a request (cached verification, the
   token bucket, the principal), which no machine noise blurs.

    python benchmarks/bench_auth.py [--calls 300] [--rounds 8]

Goal (issue #7): authentication and rate limiting add at most 10%: key calls/s >= 0.9 x token calls/s.
"""

from __future__ import annotations

import argparse
import asyncio
import timeit
from pathlib import Path

import httpx2
from _common import TOKEN, jupyter_server, med, pin_client, tempdir
from bench_tools_call import TOOLS, lean_round, sdk_round, seed

KEY_RATE = 10_000  # requests per second: the largest per-key rate_limit the key store accepts


async def create_key(mcp_url: str, role: str) -> str:
    """An API key made over REST with the Jupyter token; returns its secret."""
    keys_url = mcp_url.removesuffix("plexus/mcp") + "plexus/api/keys"
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        reply = await http.post(keys_url, json={"name": f"bench-{role}", "role": role, "rate_limit": KEY_RATE})
    assert reply.status_code == 201, reply.text
    return str(reply.json()["secret"])


def in_process_cost(tmp: Path, n: int = 20_000) -> dict[str, float]:
    """Microseconds per request of what a key adds in the server: verification (cached) and the bucket."""
    from plexus_mcp_jupyter.core.store import Store
    from plexus_mcp_jupyter.security.keys import KeyStore
    from plexus_mcp_jupyter.security.ratelimit import RateLimiter

    store = Store(f"sqlite:///{tmp / 'micro.db'}")
    keys, limiter = KeyStore(store.engine), RateLimiter(20.0, 40)
    key, secret = keys.create("micro", "admin", rate_limit=KEY_RATE)
    keys.verify(secret)  # fills the cache, as a busy client does
    out = {
        "verify": timeit.timeit(lambda: keys.verify(secret), number=n) / n * 1e6,
        "rate limit": timeit.timeit(lambda: limiter.take(key.id, KEY_RATE), number=n) / n * 1e6,
        "principal": timeit.timeit(key.principal, number=n) / n * 1e6,
    }
    store.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--no-operator", action="store_true", help="time only the token and the admin key")
    args = parser.parse_args()
    pin_client()
    with tempdir() as tmp:
        micro = in_process_cost(Path(tmp))
    with tempdir() as tmp, jupyter_server(Path(tmp)) as (url, pid):
        credentials = {"jupyter token": TOKEN, "admin key": await create_key(url, "admin")}
        if not args.no_operator:
            credentials["operator key"] = await create_key(url, "operator")
        task_id = await seed(url, TOKEN)  # the notebook user's tasks: visible to every key
        names = list(credentials)
        sdk: dict[str, list[dict]] = {name: [] for name in names}
        lean: dict[str, list[dict]] = {name: [] for name in names}
        for round_no in range(args.rounds):
            order = names if round_no % 2 == 0 else list(reversed(names))
            for name in order:
                sdk[name].append(await sdk_round(url, credentials[name], pid, task_id, args.calls, args.warmup))
                lean[name].append(await lean_round(url, credentials[name], task_id, args.calls, args.warmup))

    print(
        f"tools/call on one Jupyter server: {args.calls} sequential calls per tool, median of {args.rounds} "
        "alternating rounds"
    )
    header = ("client", "tool", "credential", "calls/s", "p50 ms", "p99 ms", "srv CPU us")
    print("{:<6} {:<11} {:<14} {:>8} {:>7} {:>7} {:>10}".format(*header))
    for label, runs in (("sdk", sdk), ("lean", lean)):
        for tool in TOOLS:
            for name in names:
                cpu = f"{med(runs[name], tool, 'server_cpu_us'):>10.0f}" if label == "sdk" else f"{'':>10}"
                print(
                    f"{label:<6} {tool:<11} {name:<14} {med(runs[name], tool, 'calls_per_s'):>8.0f} "
                    f"{med(runs[name], tool, 'p50_ms'):>7.2f} {med(runs[name], tool, 'p99_ms'):>7.2f} {cpu}"
                )
    print("ratios key / token (throughput: goal >= 0.90; p50 and server CPU/call: lower is better)")
    failed = False
    for name in names[1:]:
        for tool in TOOLS:
            sdk_ratio = med(sdk[name], tool, "calls_per_s") / med(sdk[names[0]], tool, "calls_per_s")
            lean_ratio = med(lean[name], tool, "calls_per_s") / med(lean[names[0]], tool, "calls_per_s")
            p50_ratio = med(sdk[name], tool, "p50_ms") / med(sdk[names[0]], tool, "p50_ms")
            cpu_ratio = med(sdk[name], tool, "server_cpu_us") / med(sdk[names[0]], tool, "server_cpu_us")
            failed |= name == "admin key" and min(sdk_ratio, lean_ratio) < 0.9
            print(
                f"  {name:<13} {tool:<11} sdk throughput {sdk_ratio:.2f}  lean throughput {lean_ratio:.2f}  "
                f"sdk p50 {p50_ratio:.2f}  server CPU/call {cpu_ratio:.2f}"
            )
    print(
        "in-process cost of a key per request (us): "
        + ", ".join(f"{k} {v:.1f}" for k, v in micro.items())
        + f", total {sum(micro.values()):.1f}"
    )
    print("goal (admin key >= 0.90 x token):", "NOT MET" if failed else "met")


if __name__ == "__main__":
    asyncio.run(main())
