"""A bounded soak: one router process on loopback at a steady request rate against the fake backend.

    .venv/bin/python bench/router_soak.py [--minutes 10] [--rate 200] [--long-every 10]

Starts the fast fake backend of router_overhead.py and `python -m loraserve.router` with a static topology
and an API key, then sends `--rate` requests per second, open loop (on schedule, whatever the answers do),
for `--minutes`: short SSE chat streams, and every `--long-every`-th one a 256-token stream. Prints, per
minute: requests, errors, p50 / p90 / p99 / max latency (to `data: [DONE]`); at the end the router's RSS at
the start and at the end, and the totals. Exits 1 if any request failed. Everything stays on 127.0.0.1 and
is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import router_overhead as ro  # a sibling script, not a package


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def soak(port: int, model: str, rate: float, seconds: float, long_every: int) -> tuple[list[dict], int]:
    short = ro.request_bytes(port, model)
    long = ro.request_bytes(port, model, ro.LONG_TOKENS)
    idle: list[ro.ClientConn] = []
    opened = 0
    minutes: list[dict] = []
    start = time.perf_counter()

    def bucket(t: float) -> dict:
        i = int((t - start) // 60)
        while len(minutes) <= i:
            minutes.append({"requests": 0, "errors": 0, "latencies": [], "error_kinds": {}})
        return minutes[i]

    async def one(i: int) -> None:
        nonlocal opened
        conn = None
        while idle:
            c = idle.pop()
            if not c.lost:
                conn = c
                break
        t = time.perf_counter()
        b = bucket(t)
        b["requests"] += 1
        try:
            if conn is None:
                conn = await ro._connect(port)
                opened += 1
            status = await asyncio.wait_for(conn.request(long if long_every and i % long_every == 0 else short), 30)
            if status != 200:
                raise RuntimeError(f"status {status}")
            b["latencies"].append(time.perf_counter() - t)
            idle.append(conn)
        except (OSError, RuntimeError, TimeoutError, ConnectionError) as exc:
            b["errors"] += 1
            kind = type(exc).__name__ + (f": {exc}" if isinstance(exc, RuntimeError) else "")
            b["error_kinds"][kind] = b["error_kinds"].get(kind, 0) + 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * seconds)
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    for c in idle:
        if c.transport is not None:
            c.transport.close()
    return minutes, opened


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=200.0, help="requests per second")
    p.add_argument("--long-every", type=int, default=10, help="every Nth request is a 256-token stream (0: none)")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="router-soak-"))
    ns = argparse.Namespace(
        vllm_router=None, production_stack_router=None, only="loraserve (uvloop)", install_references=False
    )
    try:
        with ro.targets(ns, workdir) as (started, _backend):
            router = next(t for t in started if t.proc is not None)
            assert router.proc is not None
            rss0 = rss_kib(router.proc.pid)
            print(
                f"soak: {args.rate:g} req/s for {args.minutes:g} min through {router.name} "
                f"(every {args.long_every}th a {ro.LONG_TOKENS}-token stream); "
                f"router RSS at start {rss0 / 1024:.1f} MiB",
                flush=True,
            )
            minutes, opened = asyncio.run(
                soak(router.port, router.model, args.rate, args.minutes * 60, args.long_every)
            )
            rss1 = rss_kib(router.proc.pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| minute | requests | errors | p50 ms | p90 ms | p99 ms | max ms |")
    print("|--------|----------|--------|--------|--------|--------|--------|")
    requests = errors = 0
    for i, m in enumerate(minutes):
        lat = m["latencies"]
        requests += m["requests"]
        errors += m["errors"]
        print(
            f"| {i + 1:6d} | {m['requests']:8d} | {m['errors']:6d} | {pct(lat, 0.5) * 1000:6.2f} | "
            f"{pct(lat, 0.9) * 1000:6.2f} | {pct(lat, 0.99) * 1000:6.2f} | {max(lat, default=0) * 1000:6.2f} |"
        )
        if m["error_kinds"]:
            print(f"  errors: {json.dumps(m['error_kinds'])}")
    print(
        f"total: {requests} requests, {errors} errors, {opened} client connections opened; "
        f"router RSS start {rss0 / 1024:.1f} MiB, end {rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 1024:+.1f} MiB)"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
