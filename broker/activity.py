"""What the dashboard's charts show: per minute over the last half hour, how many runs
ended (and how many of them cancelled, or failed), and the cancel latency (p50, p99) of
the cancelled ones.

Read from the runs that ``{ns}:runs:finished`` still lists (the latest
``FINISHED_RUNS_KEPT`` of each partition, scored by when they ended): one bounded read
per request, by any broker replica, with nothing kept in memory. A namespace that ends
more runs than that in half an hour shows the most recent part of it (``oldest`` says
from when).
"""

from __future__ import annotations

import statistics
from typing import Final, cast

import msgspec

from sdk.connection import RedisClient, redis_now_ms
from sdk.partitions import Partitions

MINUTES: Final = 30
MINUTE_MS: Final = 60_000


class Minute(msgspec.Struct, frozen=True, kw_only=True):
    #: The minute's start (Unix ms).
    at: int
    ended: int = 0
    cancelled: int = 0
    failed: int = 0
    #: Cancel latency of the runs cancelled in this minute, None when none was.
    p50_ms: float | None = None
    p99_ms: float | None = None


class Activity(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: int
    minutes: list[Minute]
    #: When the oldest run read ended (None: none); earlier minutes may be incomplete.
    oldest: int | None = None


def _percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def activity(redis: RedisClient, partitions: Partitions) -> Activity:
    now = await redis_now_ms(redis)
    first = (now // MINUTE_MS - (MINUTES - 1)) * MINUTE_MS
    ended: dict[int, list[tuple[str, float | None]]] = {}
    oldest: int | None = None
    for keys in partitions.keys:
        pairs = cast(
            list[tuple[str, float]],
            await redis.zrangebyscore(keys.finished_runs, first, "+inf", withscores=True),
        )
        if not pairs:
            continue
        async with redis.pipeline(transaction=False) as pipe:
            for run_id, _ in pairs:
                pipe.hmget(keys.run(run_id), "status", "cancel_latency_ms")
            records = cast(list[list[str | None]], await pipe.execute())
        for (_, finished_at), (status, latency) in zip(pairs, records, strict=True):
            if status is None:
                continue  # its record expired meanwhile
            at = int(finished_at)
            oldest = at if oldest is None else min(oldest, at)
            minute = at // MINUTE_MS * MINUTE_MS
            ended.setdefault(minute, []).append((status, float(latency) if latency else None))
    minutes = []
    for minute in range(first, now + 1, MINUTE_MS):
        runs = ended.get(minute, [])
        latencies = sorted(lat for status, lat in runs if status == "cancelled" and lat is not None)
        minutes.append(
            Minute(
                at=minute,
                ended=len(runs),
                cancelled=sum(status == "cancelled" for status, _ in runs),
                failed=sum(status in ("failed", "lost") for status, _ in runs),
                p50_ms=_percentile(latencies, 50) if latencies else None,
                p99_ms=_percentile(latencies, 99) if latencies else None,
            )
        )
    return Activity(generated_at=now, minutes=minutes, oldest=oldest)
