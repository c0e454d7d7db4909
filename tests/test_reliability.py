"""No cancel lost: dead workers, lost signals, reconnects, and keys that must not pile up."""

from __future__ import annotations

import time
from datetime import timedelta

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from broker import Broker
from sdk import Client, Event, RunCancelled
from sdk.connection import blocking_client
from sdk.keys import Keys
from sdk.runner import BACKSTOP_INTERVAL_S
from tests.helpers import (
    count_run_keys,
    keys_of_run,
    partition_keys,
    report_worker,
    run_of,
    status_is,
    wait_until,
)
from tests.processes import start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.topologies]


@pytest.mark.e2e
async def test_runs_of_a_killed_worker_become_lost_within_three_heartbeats(
    redis_url: str, namespace: str, redis: Redis, client: Client, broker: Broker
) -> None:
    keys = Keys(namespace)
    interval = 1.0
    worker = start_worker(redis_url, namespace, heartbeat_interval=str(interval))
    try:
        run_id = await run_of(
            client, await client.send("report/generate.requested", {"reportId": "r1"})
        )
        info = await client.get_run(run_id)
        assert info is not None
        worker_id = info.worker_id
        run_keys = await keys_of_run(redis, namespace, run_id)
    finally:
        worker.kill()  # kill -9: no goodbye
    killed = time.monotonic()
    # A cancel sent to the dead worker: its signal goes nowhere, the run is "cancelling".
    await client.send("report/cancel.requested", {"reportId": "r1"})
    await wait_until(lambda: status_is(client, run_id, "cancelling"))
    assert await redis.exists(run_keys.signals(worker_id))
    await wait_until(lambda: status_is(client, run_id, "lost"), timeout=10)
    assert time.monotonic() - killed < 3 * interval
    lost = await client.get_run(run_id)
    assert lost is not None
    assert lost.error is not None
    assert f"worker {worker_id} stopped heartbeating" in lost.error
    # Nothing of the dead worker or its run is left to match, signal or count.
    assert await count_run_keys(redis, namespace, "idx:*") == 0
    assert await count_run_keys(redis, namespace, "fn-runs:*") == 0
    for part in partition_keys(namespace):
        assert await redis.zcard(part.active_runs) == 0
        for key in (part.worker_runs(worker_id), part.signals(worker_id)):
            assert not await redis.exists(key), key
    assert not await redis.exists(keys.worker(worker_id))
    assert await redis.zscore(keys.workers, worker_id) is None
    # A cancel for a lost run answers "lost", not silence.
    result = await client.cancel(run_id)
    assert (result.outcome, result.status) == ("lost", "lost")
    assert broker.metrics.runs_lost._value.get() == 1


async def test_an_unacknowledged_signal_is_sent_again(
    redis_url: str, namespace: str, redis: Redis, client: Client, broker: Broker
) -> None:
    async with report_worker(redis_url, namespace) as worker:
        with pytest.raises(RunCancelled):
            async with worker.run(
                "generate-report", Event(name="report/generate.requested", data={})
            ) as ctx:
                keys = await keys_of_run(redis, namespace, ctx.run_id)
                # The cancel was recorded but its signal never reached the worker (a trimmed
                # or deleted stream): what request_cancel.lua does, minus the XADD.
                await redis.hset(
                    keys.run(ctx.run_id),
                    mapping={"status": "cancelling", "cancel_reason": "lost in transit"},
                )
                await redis.zadd(keys.cancelling_runs, {ctx.run_id: 0})
                sent = time.monotonic()
                await anyio.sleep(60)
    assert time.monotonic() - sent < 5
    assert ctx.cancel_reason == "lost in transit"
    assert broker.metrics.signals_resent._value.get() >= 1
    assert await redis.zcard(keys.cancelling_runs) == 0


async def test_a_step_boundary_sees_a_cancel_whose_signal_never_came(
    redis_url: str, namespace: str, redis: Redis, client: Client
) -> None:
    steps = 0
    async with report_worker(redis_url, namespace) as worker:
        with pytest.raises(RunCancelled):
            async with worker.run(
                "generate-report", Event(name="report/generate.requested", data={})
            ) as ctx:
                keys = await keys_of_run(redis, namespace, ctx.run_id)
                await redis.hset(keys.run(ctx.run_id), "status", "cancelling")  # no signal
                cancelled_at = time.monotonic()
                for _ in range(1000):
                    await ctx.step.run("chunk", anyio.sleep, 0.01)
                    steps += 1
    # The backstop reads the status at most every BACKSTOP_INTERVAL_S, at a step boundary.
    assert 0 < steps < 1000
    assert time.monotonic() - cancelled_at < BACKSTOP_INTERVAL_S + 0.25
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_a_signal_sent_while_the_worker_reconnects_arrives(
    redis_url: str, namespace: str, redis: Redis, client: Client, broker: Broker
) -> None:
    async with report_worker(redis_url, namespace) as worker:
        with pytest.raises(RunCancelled):
            async with worker.run(
                "generate-report",
                Event(name="report/generate.requested", data={"reportId": "r1"}),
            ) as ctx:
                # Drop the worker's signal connection (the one blocked in XREAD)...
                for client_info in await redis.client_list():
                    if client_info.get("cmd") == "xread":
                        await redis.client_kill_filter(_id=client_info["id"])
                # ...and cancel while it reconnects.
                await client.send("report/cancel.requested", {"reportId": "r1"})
                await anyio.sleep(60)
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_ten_thousand_finished_runs_leave_no_keys_behind(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    worker = report_worker(redis_url, namespace, retention=timedelta(seconds=1))

    async def one(i: int) -> None:
        event = Event(name="report/generate.requested", data={"reportId": f"r{i}"})
        async with worker.run("generate-report", event):
            pass

    async with worker:
        for batch in range(100):
            async with anyio.create_task_group() as tg:
                for i in range(batch * 100, batch * 100 + 100):
                    tg.start_soon(one, i)
        assert await count_run_keys(redis, namespace, "idx:*") == 0
        assert await count_run_keys(redis, namespace, "fn-runs:*") == 0
        for keys in partition_keys(namespace):
            assert await redis.zcard(keys.active_runs) == 0
            assert await redis.scard(keys.worker_runs(worker.worker_id)) == 0
            assert await redis.hlen(keys.run_configs("reports")) == 0

        # Records outlive their runs by the retention (1 s) only: all gone within 2.1 s.
        async def expired() -> bool:
            return (
                await count_run_keys(redis, namespace, "run:*") == 0
                and await count_run_keys(redis, namespace, "event-runs:*") == 0
            )

        deadline = time.monotonic() + 2.1
        while not await expired() and time.monotonic() < deadline:
            await anyio.sleep(0.1)
        assert await expired()


async def test_blocking_reads_cannot_time_out_into_a_resent_read(redis_url: str) -> None:
    # redis-py's defaults (a 5 s socket timeout, retried) would re-send an XREADGROUP that
    # blocks longer: entries the server handed to the abandoned read sit unseen in the
    # pending list. Timing cannot show that race reliably, so check what prevents it: the
    # socket outlives the BLOCK, and the reader never retries by itself.
    for block_ms in (100, 5_000, 60_000):
        reader = blocking_client(redis_url, block_ms)
        try:
            if isinstance(reader, RedisCluster):  # the cluster client retries at its level
                options = reader.nodes_manager.connection_kwargs
                retries = reader.retry._retries if reader.retry else 0
            else:
                options = reader.connection_pool.connection_kwargs
                retries = options["retry"]._retries
            assert options["socket_timeout"] > block_ms / 1000
            assert retries == 0
        finally:
            await reader.aclose()
