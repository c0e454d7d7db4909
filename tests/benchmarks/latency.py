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
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from broker.output import progress_bar  # noqa: E402
from sdk import Client  # noqa: E402
from tests.processes import start_broker, start_worker  # noqa: E402

NAMESPACE = "bench"
MISS_AFTER_S = 5.0


@dataclass(frozen=True)
class Seen:
    """A cancellation the run's body saw: seconds from ``Client.send`` to the body, and the
    observation it recorded (``tests/apps/reports.py``)."""

    latency: float
    record: dict[str, Any]


async def trial(
    client: Client,
    redis: Redis,
    report_id: str,
    workload: str,
    *,
    max_pause: float = 0.05,
    by_id: bool = False,
) -> Seen | None:
    """One run started, then cancelled after a random 0-``max_pause`` s pause; None is a miss.

    The cancel is the event ``report/cancel.requested`` the run's rule matches, or with
    ``by_id`` a ``Client.cancel`` of the run's id (no matching: one script signals it)."""
    observed = f"{NAMESPACE}:test:observed:{report_id}"
    await client.send(
        "report/generate.requested", {"reportId": report_id, "seconds": 60, "mode": workload}
    )
    started = await redis.blpop([observed], timeout=MISS_AFTER_S)
    if started is None or (first := json.loads(started[1]))["what"] != "started":
        return None
    # A random phase, so any periodic behaviour (a poll, a step boundary) is sampled fairly.
    await anyio.sleep(random.uniform(0, max_pause))
    sent = time.monotonic()
    if by_id:
        await client.cancel(first["run_id"])
    else:
        await client.send("report/cancel.requested", {"reportId": report_id})
    seen = await redis.blpop([observed], timeout=MISS_AFTER_S)
    if seen is None:
        return None
    record: dict[str, Any] = json.loads(seen[1])
    if record["what"] != "cancelled":
        return None
    return Seen(float(record["monotonic"]) - sent, record)


@contextmanager
def serving(redis_url: str) -> Iterator[None]:
    """`cancel-broker run` and the report worker as separate processes, for the block."""
    broker, _http = start_broker(redis_url, NAMESPACE)
    try:
        worker = start_worker(redis_url, NAMESPACE, shutdown_timeout="0.5")
        try:
            yield
        finally:
            worker.terminate()
    finally:
        broker.terminate()


@asynccontextmanager
async def connected(redis_url: str) -> AsyncIterator[tuple[Client, Redis]]:
    """The client that sends the events, and a connection that reads the observations."""
    async with Client(redis_url, namespace=NAMESPACE) as client:
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            yield client, redis
        finally:
            await redis.aclose()


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
    async with connected(redis_url) as (client, redis):
        for workload in workloads:
            latencies: list[float] = []
            misses = 0
            with progress_bar(f"{workload} trials") as tick:
                for i in range(runs):
                    seen = await trial(client, redis, f"{workload}-{i}", workload)
                    if seen is None:
                        misses += 1
                    else:
                        latencies.append(seen.latency)
                    tick(i + 1, runs)
            rows.append(summary(workload, latencies, misses))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workload", choices=["sleep", "steps", "both"], default="both")
    args = parser.parse_args()
    workloads = ["sleep", "steps"] if args.workload == "both" else [args.workload]

    with EmbeddedRedis() as server, serving(server.url):
        rows = anyio.run(measure, server.url, args.runs, workloads)
    print(f"cancel latency, Client.send -> body sees cancellation ({args.runs} runs each)")
    print("| workload | runs | p50 ms | p90 ms | p99 ms | max ms | mean ms | misses |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
