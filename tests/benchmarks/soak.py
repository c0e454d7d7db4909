"""Soak: steady runs and cancels for a long time; Redis memory and RSS must stay flat.

Broker and worker run as separate processes against a private redis-server. Every second
the load starts ``--rate`` runs (each lasting 0.2-2 s) and cancels half of them by event
while they run; run records expire after ``--retention`` seconds, as in production they
expire after their retention, and so do cancel events' tombstones (the broker's
``--tombstone-lookback``, 10 minutes in production, would otherwise outlast the soak).
Every ``--sample`` seconds it records Redis ``used_memory``, the number of keys and the
broker's and worker's RSS, and at the end compares the last samples with those taken
once the load reached its steady state.

    python tests/benchmarks/soak.py [--minutes 10] [--rate 50] [--retention 60]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import anyio
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from sdk.keys import Keys  # noqa: E402
from sdk.wire import encode_event  # noqa: E402
from tests.processes import ProcessHandle, start_broker, start_worker  # noqa: E402

NAMESPACE = "soak"


def rss_mb(handle: ProcessHandle) -> float:
    for line in Path(f"/proc/{handle.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(redis: Redis, seconds: float, rate: int, counter: list[int]) -> None:
    events = Keys(NAMESPACE).events
    deadline = time.monotonic() + seconds
    n = 0
    async with anyio.create_task_group() as tg:
        while time.monotonic() < deadline:
            tick = time.monotonic()
            batch = range(n, n + rate)
            n += rate
            async with redis.pipeline(transaction=False) as pipe:
                for i in batch:
                    data = {"reportId": f"s{i}", "seconds": random.uniform(0.2, 2), "quiet": 1}
                    pipe.xadd(events, {"event": encode_event("report/generate.requested", data)})
                await pipe.execute()

            async def cancel_later(ids: list[int]) -> None:
                await anyio.sleep(0.1)
                async with redis.pipeline(transaction=False) as pipe:
                    for i in ids:
                        body = encode_event("report/cancel.requested", {"reportId": f"s{i}"})
                        pipe.xadd(events, {"event": body})
                    await pipe.execute()

            tg.start_soon(cancel_later, list(batch)[::2])
            counter[0] = n
            await anyio.sleep(max(0.0, 1 - (time.monotonic() - tick)))


async def soak(
    url: str, args: argparse.Namespace, broker: ProcessHandle, worker: ProcessHandle
) -> list[tuple[float, ...]]:
    redis = Redis.from_url(url, decode_responses=True)
    samples: list[tuple[float, ...]] = []
    started = [0]
    begin = time.monotonic()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, redis, args.minutes * 60, args.rate, started)
            while time.monotonic() - begin < args.minutes * 60:
                await anyio.sleep(args.sample)
                info = await redis.info("memory")
                row = (
                    round(time.monotonic() - begin),
                    started[0],
                    info["used_memory"] / 2**20,
                    await redis.dbsize(),
                    rss_mb(broker),
                    rss_mb(worker),
                )
                samples.append(row)
                at, runs, memory, keys, broker_mb, worker_mb = row
                print(
                    f"{at:6.0f}s {runs:8.0f} runs  redis {memory:7.2f} MB  {keys:6.0f} keys"
                    f"  broker {broker_mb:6.1f} MB  worker {worker_mb:6.1f} MB",
                    flush=True,
                )
    finally:
        await redis.aclose()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=int, default=50, help="runs started per second")
    parser.add_argument("--retention", type=float, default=60, help="seconds records outlive runs")
    parser.add_argument("--sample", type=float, default=30, help="seconds between samples")
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        broker, _ = start_broker(
            server.url, NAMESPACE, "--tombstone-lookback", f"{args.retention}s"
        )
        worker = start_worker(
            server.url,
            NAMESPACE,
            retention=str(args.retention),
            concurrency="500",
            shutdown_timeout="1",
        )
        try:
            samples = anyio.run(soak, server.url, args, broker, worker)
        finally:
            worker.terminate()
            broker.terminate()
    # Steady state: once records start expiring (retention + the longest run) plus a margin.
    steady = [s for s in samples if s[0] >= args.retention + 2 * args.sample] or samples
    first, last = steady[0], steady[-1]
    print()
    print(f"soak: {args.minutes:g} min, {samples[-1][1]} runs ({args.rate}/s, half cancelled)")
    print("| measure | steady start | end | change |")
    print("|---|---|---|---|")
    for name, index in (
        ("Redis used_memory MB", 2),
        ("Redis keys", 3),
        ("broker RSS MB", 4),
        ("worker RSS MB", 5),
    ):
        change = (last[index] - first[index]) / first[index] * 100 if first[index] else 0.0
        print(f"| {name} | {first[index]:.2f} | {last[index]:.2f} | {change:+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
