"""The broker and a worker on a real Redis Cluster while the cluster changes under them.

The end-to-end, race and crash tests run on a cluster too (``pytest.mark.topologies``);
these are the cluster's own events: the namespace's slot (or one partition's) moving to
another node while cancel events flow.
"""

from __future__ import annotations

import anyio
import pytest

from sdk import Client
from sdk.connection import command_client
from sdk.keys import Keys
from sdk.partitions import PARTITIONS_ENV
from sdk.wire import encode_event
from tests.cluster import RedisClusterServer
from tests.processes import start_broker, start_worker
from tests.test_faults import assert_each_cancelled_once, start_runs

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.mark.parametrize("partitions", [1, 4])
async def test_cancels_sent_while_the_namespace_moves_to_another_node_all_land(
    redis_cluster: RedisClusterServer,
    namespace: str,
    partitions: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One partition: the whole namespace moves. Four: partition 1 moves, while the other
    partitions (and the namespace's shared keys, in partition 0's slot) stay."""
    monkeypatch.setenv(PARTITIONS_ENV, str(partitions))
    count = 300
    keys = Keys(namespace, partition=partitions - 1 and 1)
    slot = redis_cluster.slot_of(keys.events)  # every key of the partition: one hash tag
    source = redis_cluster.owner_of(slot).port
    target = next(m.port for m in redis_cluster.masters() if m.port != source)
    redis = command_client(redis_cluster.url)
    broker, _ = start_broker(redis_cluster.url, namespace)
    worker = start_worker(redis_cluster.url, namespace, concurrency="1000", shutdown_timeout="1")
    client = Client(redis_cluster.url, namespace=namespace)
    try:
        await start_runs(redis, namespace, count)
        placed = await redis.zcard(keys.active_runs)
        assert placed > 0 if partitions > 1 else placed == count

        async def send_cancels(first: int, last: int) -> None:
            for i in range(first, last):
                await client.send("report/cancel.requested", {"reportId": f"r{i}"})
                await anyio.sleep(0.002)

        # A third of the cancels before the move, a third while keys are half moved (the
        # source answers ASK or TRYAGAIN), a third after it.
        await send_cancels(0, count // 3)
        redis_cluster.begin_slot_migration(slot, target)
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_cancels, count // 3, 2 * count // 3)
            await anyio.to_thread.run_sync(redis_cluster.migrate_slot_keys, slot, source, target)
        await anyio.to_thread.run_sync(redis_cluster.finish_slot_migration, slot, target)
        await send_cancels(2 * count // 3, count)

        assert redis_cluster.owner_of(slot).port == target
        await assert_each_cancelled_once(redis, namespace, count, worker)
    finally:
        worker.terminate()
        broker.terminate()
        await client.aclose()
        await redis.aclose()
        if redis_cluster.owner_of(slot).port != source:
            await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, source)


async def test_a_node_that_forgot_the_scripts_still_applies_every_cancel(
    redis_cluster: RedisClusterServer, namespace: str
) -> None:
    """What a promoted replica or a restarted node looks like to the broker: no script in
    its cache. The broker's batch answers NOSCRIPT without running; it loads and resends."""
    count = 50
    keys = Keys(namespace)
    redis = command_client(redis_cluster.url)
    broker, _ = start_broker(redis_cluster.url, namespace)
    worker = start_worker(redis_cluster.url, namespace, shutdown_timeout="1")
    try:
        await start_runs(redis, namespace, count)
        for port in redis_cluster.ports:
            with redis_cluster.node(port) as node:
                node.script_flush()
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(count):
                body = encode_event("report/cancel.requested", {"reportId": f"r{i}"})
                pipe.xadd(keys.events, {"event": body})
            await pipe.execute()
        await assert_each_cancelled_once(redis, namespace, count, worker)
    finally:
        worker.terminate()
        broker.terminate()
        await redis.aclose()
