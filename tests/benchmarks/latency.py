"""Cancel latency, end to end, across processes.

For every trial: start a report run (broker and worker are separate processes), wait
until its body is inside its long call, then measure from the moment ``Client.send``
of the cancel event is called to the moment the run's own code sees the cancellation.
Both instants are CLOCK_MONOTONIC (``time.monotonic``), which is system-wide on Linux.

    python tests/benchmarks/latency.py [--runs 200] [--workload sleep|steps|both]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import anyio
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from sdk import Client  # noqa: E402
from tests.processes import start_broker, start_worker  # noqa: E402

NAMESPACE = "bench"
MISS_AFTER_S = 5.0


async def trial(client: Client, redis: Redis, report_id: str, workload: str) -> float | None:
    observed = f"{NAMESPACE}:test:observed:{report_id}"
    await client.send(
        "report/generate.requested", {"reportId": report_id, "seconds": 60, "mode": workload}
    )
    started = await redis.blpop([observed], timeout=MISS_AFTER_S)
    if started is None or json.loads(started[1])["what"] != "started":
        return None
    # A random phase, so any periodic behaviour (a poll, a step boundary) is sampled fairly.
    await anyio.sleep(random.uniform(0, 0.05))
    sent = time.monotonic()
    await client.send("report/cancel.requested", {"reportId": report_id})
    seen = await redis.blpop([observed], timeout=MISS_AFTER_S)
    if seen is None or json.loads(seen[1])["what"] != "cancelled":
        return None
    return float(json.loads(seen[1])["monotonic"]) - sent


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summary(workload: str, latencies: list[float], misses: int) -> str:
    ms = sorted(value * 1000 for value in latencies)
    if not ms:
        return f"| {workload} | 0 | - | - | - | - | - | {misses} |"
    return (
        f"| {workload} | {len(ms)} | {percentile(ms, 0.5):.2f} | {percentile(ms, 0.9):.2f}"
        f" | {percentile(ms, 0.99):.2f} | {ms[-1]:.2f} | {statistics.fmean(ms):.2f} | {misses} |"
    )


async def measure(redis_url: str, runs: int, workloads: list[str]) -> list[str]:
    rows = []
    async with Client(redis_url, namespace=NAMESPACE) as client:
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            for workload in workloads:
                latencies: list[float] = []
                misses = 0
                for i in range(runs):
                    latency = await trial(client, redis, f"{workload}-{i}", workload)
                    if latency is None:
                        misses += 1
                    else:
                        latencies.append(latency)
                rows.append(summary(workload, latencies, misses))
        finally:
            await redis.aclose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workload", choices=["sleep", "steps", "both"], default="both")
    args = parser.parse_args()
    workloads = ["sleep", "steps"] if args.workload == "both" else [args.workload]

    with EmbeddedRedis() as server:
        broker, _http = start_broker(server.url, NAMESPACE)
        worker = start_worker(server.url, NAMESPACE, shutdown_timeout="0.5")
        try:
            rows = anyio.run(measure, server.url, args.runs, workloads)
        finally:
            worker.terminate()
            broker.terminate()
    print(f"cancel latency, Client.send -> body sees cancellation ({args.runs} runs each)")
    print("| workload | runs | p50 ms | p90 ms | p99 ms | max ms | mean ms | misses |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
