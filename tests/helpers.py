"""What tests share that is not a fixture: waiting for a condition, reading what runs and
brokers left in Redis, starting a run and waiting for its status. Plain functions, imported
by name (fixtures stay in ``conftest.py``)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from broker import EmbeddedRedis
from sdk import CancelOn, Client, RunContext, RunInfo, Worker
from sdk.keys import Keys
from sdk.partitions import PARTITIONS_ENV
from tests.cluster import RedisClusterServer

PARTITIONS = 4


def topology_url(request: pytest.FixtureRequest, topology: str) -> str:
    """The URL of the session's redis-server or Redis Cluster (for module fixtures too)."""
    if topology in ("cluster", "partitioned"):
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    return server.url


@asynccontextmanager
async def serving(start: Callable[..., Awaitable[Any]]) -> AsyncIterator[None]:
    """Run ``start`` (``broker.run``, ``worker.serve``) in this test's event loop until the
    block ends; the block begins once it reports that it is listening."""
    async with anyio.create_task_group() as tg:
        await tg.start(start)
        yield
        tg.cancel_scope.cancel()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.005
) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(interval)


async def count_keys(redis: Redis, pattern: str) -> int:
    return len([key async for key in redis.scan_iter(match=pattern, count=1000)])


def partition_keys(namespace: str) -> list[Keys]:
    """The keys of each partition the test's topology splits a namespace into."""
    count = int(os.environ.get(PARTITIONS_ENV) or 1)
    return [Keys(namespace, partition) for partition in range(count)]


async def count_run_keys(redis: Redis, namespace: str, pattern: str) -> int:
    """Keys matching ``pattern`` (``idx:*``) in every partition of the namespace."""
    return sum(
        [await count_keys(redis, keys.shard + pattern) for keys in partition_keys(namespace)]
    )


async def keys_of_run(redis: Redis, namespace: str, run_id: str) -> Keys:
    """The keys of the partition holding the run."""
    for keys in partition_keys(namespace):
        if await redis.exists(keys.run(run_id)):
            return keys
    raise AssertionError(f"run {run_id} is in no partition")


async def broker_drained(redis: Redis, namespace: str) -> bool:
    """The broker group has read every entry of every partition's events stream and
    acknowledged them all.

    (Compares ids rather than XINFO's ``lag``, which Redis 6.2 does not report.)
    """
    for keys in partition_keys(namespace):
        if not await redis.exists(keys.events):
            continue
        last_id = (await redis.xinfo_stream(keys.events))["last-generated-id"]
        groups = {group["name"]: group for group in await redis.xinfo_groups(keys.events)}
        group = groups.get("broker")
        # A group created the trigger lookback back on an empty stream starts after its
        # last id: caught up too.
        if group is None or group["pending"] or _id(group["last-delivered-id"]) < _id(last_id):
            return False
    return True


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


RULE = CancelOn(event="report/cancel.requested", match="data.reportId")


def report_worker(redis_url: str, namespace: str, **options: Any) -> Worker:
    """An in-process report worker; its runs take ``data.seconds`` (default 60)."""
    worker = Worker("reports", redis_url, namespace=namespace, **options)

    @worker.function(id="generate-report", trigger="report/generate.requested", cancel_on=[RULE])
    async def generate_report(ctx: RunContext) -> None:
        await anyio.sleep(float(ctx.event.data.get("seconds", 60)))

    return worker


async def run_of(client: Client, event_id: str) -> str:
    """The id of the run ``event_id`` started, once it is registered."""
    found: list[str] = []

    async def registered() -> bool:
        found[:] = [run.run_id for run in await client.runs_for_event(event_id)]
        return bool(found)

    await wait_until(registered)
    return found[0]


async def status_is(client: Client, run_id: str, status: str) -> bool:
    info = await client.get_run(run_id)
    return info is not None and info.status == status


# -- what a worker process observed (tests/apps record it in Redis) ------------------------


async def observed(redis: Redis, namespace: str, report_id: str) -> list[dict[str, Any]]:
    raw = await redis.lrange(f"{namespace}:test:observed:{report_id}", 0, -1)
    return [json.loads(item) for item in raw]


async def wait_for_observation(
    redis: Redis, namespace: str, report_id: str, what: str, timeout: float = 10.0
) -> dict[str, Any]:
    async def seen() -> bool:
        return any(o["what"] == what for o in await observed(redis, namespace, report_id))

    await wait_until(seen, timeout=timeout)
    return next(o for o in await observed(redis, namespace, report_id) if o["what"] == what)


async def wait_for_status(
    client: Client, run_id: str, status: str, timeout: float = 10.0
) -> RunInfo:
    async def reached() -> bool:
        info = await client.get_run(run_id)
        return info is not None and info.status == status

    await wait_until(reached, timeout=timeout)
    info = await client.get_run(run_id)
    assert info is not None
    return info
