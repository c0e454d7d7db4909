"""Broker throughput and scaling: cancel events per second with N active runs.

For each size N, a private redis-server holds N running runs registered directly in Redis
(one rule, ``report/cancel.requested`` matching ``data.reportId``), and a backlog of
cancel events, half of them naming one of those runs, half naming none. Then one
``cancel-broker run`` process starts and the clock runs until its consumer group has
acknowledged the whole backlog. Events per second, and the cost per event, at each size:
matching must not grow with the number of runs.

Every size does the same work: the matching half of the events names the same
``--targets`` runs (1,000 by default) whatever the size, so the first event for each run
signals it and the rest find it already cancelling; only the number of runs registered,
and so the size of the index and of Redis's keyspace, changes.

    python tests/benchmarks/throughput.py [--sizes 1000,10000,100000,1000000] [--events 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anyio
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from sdk.connection import command_client  # noqa: E402
from sdk.keys import BROKER_GROUP, EVENT_FIELD, PARTITION_FIELD, Keys  # noqa: E402
from sdk.partitions import partition_of_token  # noqa: E402
from sdk.rules import value_token  # noqa: E402
from sdk.wire import encode_event  # noqa: E402
from tests.benchmarks.registered import register_runs, report_id  # noqa: E402
from tests.processes import cpu_seconds, start_broker  # noqa: E402

BATCH = 1_000


async def publish_cancels(
    redis: Redis, keys: Keys, targets: int, n_events: int, *, partitions: int = 1
) -> dict[int, str]:
    """A backlog: even events name one of ``targets`` registered runs, odd ones no run;
    with several partitions, each in its partition (as ``Client.send`` places it).
    Returns the last entry id per partition written to."""
    last: dict[int, str] = {}
    for first in range(0, n_events, BATCH):
        placed = []
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(first, min(n_events, first + BATCH)):
                report = report_id((i // 2) % targets) if i % 2 == 0 else f"nobody{i}"
                body = encode_event("report/cancel.requested", {"reportId": report})
                fields: dict[FieldT, EncodableT] = {EVENT_FIELD: body}
                p = 0
                if partitions > 1:
                    p = partition_of_token(str(value_token(report)), partitions)
                    fields[PARTITION_FIELD] = str(p)
                pipe.xadd(keys.in_partition(p).events, fields)
                placed.append(p)
            for p, entry_id in zip(placed, await pipe.execute(), strict=True):
                last[p] = str(entry_id)
    return last


async def drained(redis: Redis, keys: Keys, last_id: str) -> bool:
    for group in await redis.xinfo_groups(keys.events):
        if group["name"] == BROKER_GROUP:
            return bool(group["last-delivered-id"] == last_id and group["pending"] == 0)
    return False


async def measure(url: str, size: int, n_events: int, targets: int) -> dict[str, float]:
    namespace = f"tp{size}"
    keys = Keys(namespace)
    redis = command_client(url)  # a blocking pool: a thousand registrations at once wait
    try:
        await redis.flushall()
        await redis.xgroup_create(keys.events, BROKER_GROUP, id="$", mkstream=True)
        cpu = await redis_cpu_s(redis)
        register_s = await register_runs(redis, keys, size)
        register_cpu = await redis_cpu_s(redis) - cpu
        memory = (await redis.info("memory"))["used_memory"]
        cpu = await redis_cpu_s(redis)
        (last_id,) = (await publish_cancels(redis, keys, min(targets, size), n_events)).values()
        publish_cpu = await redis_cpu_s(redis) - cpu
        broker, _ = start_broker(url, namespace)
        try:
            cpu = await redis_cpu_s(redis)
            broker_cpu = cpu_seconds(broker.process.pid)
            started = time.perf_counter()
            with anyio.fail_after(600):
                while not await drained(redis, keys, last_id):
                    await anyio.sleep(0.002)
            elapsed = time.perf_counter() - started
            broker_cpu = cpu_seconds(broker.process.pid) - broker_cpu
            # Includes the polling above (one XINFO per 2 ms): a slight overestimate.
            handling_cpu = await redis_cpu_s(redis) - cpu
        finally:
            broker.terminate()
        # What the events leave behind: their stream entries until trimmed, and a
        # tombstone per cancel event's key for the lookback (10 minutes by default).
        retained = (await redis.info("memory"))["used_memory"]
        await redis.xtrim(keys.events, maxlen=0)
        tombstones = (await redis.info("memory"))["used_memory"]
        cancelling = await redis.zcard(keys.cancelling_runs)
    finally:
        await redis.aclose()
    return {
        "runs": size,
        "events": n_events,
        "events_per_s": n_events / elapsed,
        "us_per_event": elapsed / n_events * 1e6,
        "cancelled": cancelling,
        "register_s": register_s,
        "memory_mb": memory / 1e6,
        "redis_us_per_event": handling_cpu / n_events * 1e6,
        "broker_us_per_event": broker_cpu / n_events * 1e6,
        "redis_us_per_run": register_cpu / size * 1e6,
        "redis_us_per_publish": publish_cpu / n_events * 1e6,
        "stream_bytes_per_event": (retained - tombstones) / n_events,
        "tombstone_bytes_per_event": (tombstones - memory) / n_events,
    }


async def redis_cpu_s(redis: Redis) -> float:
    """CPU seconds the Redis server has used (its main thread does the work)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| active runs | events | events/s | us per event | runs cancelled | Redis MB"
        " | Redis CPU us: publish, handle an event | broker CPU us per event"
        " | Redis CPU us per registration | stream B per event | tombstone B per event |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['runs']:,.0f} | {row['events']:,.0f} | {row['events_per_s']:,.0f}"
            f" | {row['us_per_event']:.1f} | {row['cancelled']:,.0f} | {row['memory_mb']:,.0f}"
            f" | {row['redis_us_per_publish']:.1f}, {row['redis_us_per_event']:.1f}"
            f" | {row['broker_us_per_event']:.1f}"
            f" | {row['redis_us_per_run']:.1f}"
            f" | {row['stream_bytes_per_event']:,.0f} | {row['tombstone_bytes_per_event']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--targets", type=int, default=1_000, help="distinct runs cancelled")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = []
    with EmbeddedRedis() as server:
        for size in sizes:
            rows.append(anyio.run(measure, server.url, size, args.events, args.targets))
            print(f"  {size:,} runs: {rows[-1]['events_per_s']:,.0f} events/s", flush=True)
    print(
        f"\nbroker throughput, one broker process ({args.events:,} cancel events, half"
        f" matching {args.targets:,} runs)"
    )
    print(table(rows))
    base = rows[0]["us_per_event"]
    for row in rows[1:]:
        change = (row["us_per_event"] / base - 1) * 100
        print(
            f"cost per event at {row['runs']:,.0f} runs vs {rows[0]['runs']:,.0f}: {change:+.1f}%"
        )


if __name__ == "__main__":
    main()
