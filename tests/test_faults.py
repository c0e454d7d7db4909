"""Faults injected for real against real processes: kill -9, a stopped redis-server, SIGTERM.

Each test asserts that no cancel was lost and none was applied twice.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from broker import Broker, EmbeddedRedis
from sdk import Client
from sdk.keys import Keys
from sdk.streams import create_group
from sdk.wire import encode_event
from tests.helpers import partition_keys, run_of, status_is, wait_until
from tests.processes import ProcessHandle, start_broker, start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.topologies]

CLAIM_FAST = ("--claim-idle", "1s")


async def start_runs(redis: Redis, namespace: str, count: int) -> None:
    """``count`` report runs, r0 ... r{count-1}, all running (registered by the worker)."""
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            body = encode_event("report/generate.requested", {"reportId": f"r{i}", "seconds": 300})
            pipe.xadd(f"{Keys(namespace).prefix}events", {"event": body})
        await pipe.execute()

    async def all_running() -> bool:
        return await active_runs(redis, namespace) == count

    await wait_until(all_running, timeout=60)


async def send_cancels(redis: Redis, namespace: str, count: int) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            body = encode_event("report/cancel.requested", {"reportId": f"r{i}"})
            pipe.xadd(f"{Keys(namespace).prefix}events", {"event": body})
        return [str(entry_id) for entry_id in await pipe.execute()]


async def active_runs(redis: Redis, namespace: str) -> int:
    return sum([await redis.zcard(keys.active_runs) for keys in partition_keys(namespace)])


async def broker_delivered(redis: Redis, namespace: str) -> tuple[int, int]:
    """(last delivered id's milliseconds in the stream publishers write, pending entries
    in every partition) of the broker group."""
    delivered = pending = 0
    for keys in partition_keys(namespace):
        if not await redis.exists(keys.events):
            continue
        for group in await redis.xinfo_groups(keys.events):
            if group["name"] == "broker":
                pending += int(group["pending"])
                if keys.partition == 0:
                    delivered = int(group["last-delivered-id"].split("-")[0])
    return delivered, pending


async def past(redis: Redis, namespace: str, entry_id: str) -> bool:
    delivered, _ = await broker_delivered(redis, namespace)
    return delivered >= int(entry_id.split("-")[0])


async def assert_each_cancelled_once(
    redis: Redis, namespace: str, count: int, worker: ProcessHandle
) -> None:

    async def all_finished() -> bool:
        return await active_runs(redis, namespace) == 0

    await wait_until(all_finished, timeout=60)
    statuses: collections.Counter[str] = collections.Counter()
    for keys in partition_keys(namespace):
        async for key in redis.scan_iter(match=f"{keys.shard}run:*", count=1000):
            statuses[await redis.hget(key, "status")] += 1
    assert statuses == {"cancelled": count}
    # What the worker applied: each run's cancel, by its signal or by the step backstop
    # (when the run's first step began after the cancel); no signal applied twice. A
    # worker slower than the resend interval (2 s, under load) is sent its signals again,
    # and the stream's length cap may trim originals it had not read yet: the copy sent
    # again is then the one it applies.
    signals = worker.logs("run.cancel_received")
    originals = collections.Counter(line["run_id"] for line in signals if not line["resent"])
    received = {line["run_id"] for line in signals}
    seen_at_step = {line["run_id"] for line in worker.logs("run.cancel_seen_at_step")}
    assert set(originals.values()) <= {1}
    assert len(received | seen_at_step) == count
    finished = collections.Counter(
        line["run_id"] for line in worker.logs("run.finished") if line["outcome"] == "cancelled"
    )
    assert len(finished) == count
    assert set(finished.values()) == {1}


@pytest.fixture
async def worker(redis_url: str, namespace: str) -> AsyncIterator[ProcessHandle]:
    handle = start_worker(redis_url, namespace, concurrency="6000", shutdown_timeout="1")
    yield handle
    handle.terminate()


async def test_a_broker_killed_mid_burst_loses_and_repeats_nothing(
    redis_url: str, namespace: str, redis: Redis, worker: ProcessHandle
) -> None:
    count = 5_000
    first, _ = start_broker(redis_url, namespace, "--consumer", "first", *CLAIM_FAST)
    try:
        await start_runs(redis, namespace, count)
        cancel_ids = await send_cancels(redis, namespace, count)
        await wait_until(lambda: past(redis, namespace, cancel_ids[count // 5]), timeout=30)
    finally:
        first.kill()  # kill -9 with a batch in hand
    _, pending = await broker_delivered(redis, namespace)
    second, _ = start_broker(redis_url, namespace, "--consumer", "second", *CLAIM_FAST)
    try:
        await assert_each_cancelled_once(redis, namespace, count, worker)
        assert second.logs("stream.claimed") or pending == 0
    finally:
        assert second.terminate() == 0


async def test_a_broker_reads_with_two_readers_and_a_restart_under_its_name_resumes_both(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    """Two readers per partition (one decodes while the other waits for Redis), each a
    consumer of the group; a broker restarted under its name (a pod's) reads what either
    left pending at once, not after another broker's --claim-idle (30 s here)."""
    stream = Keys(namespace).events
    broker, _ = start_broker(redis_url, namespace, "--consumer", "pod-0")
    try:
        cancel_ids = await send_cancels(redis, namespace, 3_000)
        await wait_until(lambda: past(redis, namespace, cancel_ids[600]), timeout=30)
    finally:
        broker.kill()
    consumers = await redis.xinfo_consumers(stream, "broker")
    assert sorted(c["name"] for c in consumers) == ["pod-0", "pod-0#1"]

    restarted, _ = start_broker(redis_url, namespace, "--consumer", "pod-0")

    async def all_handled() -> bool:
        delivered, pending = await broker_delivered(redis, namespace)
        return pending == 0 and delivered >= int(cancel_ids[-1].split("-")[0])

    await wait_until(all_handled, timeout=15)
    assert not restarted.logs("stream.claimed")
    assert restarted.terminate() == 0
    assert await redis.xinfo_consumers(stream, "broker") == []  # a clean stop: both left


async def test_a_surviving_broker_finishes_the_work_of_a_killed_one(
    redis_url: str, namespace: str, redis: Redis, worker: ProcessHandle
) -> None:
    count = 2_000
    survivor, _ = start_broker(redis_url, namespace, "--consumer", "survivor", *CLAIM_FAST)
    doomed, _ = start_broker(redis_url, namespace, "--consumer", "doomed", *CLAIM_FAST)
    try:
        await start_runs(redis, namespace, count)
        cancel_ids = await send_cancels(redis, namespace, count)
        await wait_until(lambda: past(redis, namespace, cancel_ids[count // 4]), timeout=30)
        doomed.kill()
        await assert_each_cancelled_once(redis, namespace, count, worker)

        # What the dead broker read and never acknowledged (it may have applied it: handling
        # again changes nothing) is claimed by the survivor once idle for --claim-idle.
        async def claimed() -> bool:
            for keys in partition_keys(namespace):
                consumers = await redis.xinfo_consumers(keys.events, "broker")
                if any(c["pending"] for c in consumers if c["name"].startswith("doomed")):
                    return False
            return True

        await wait_until(claimed, timeout=15)
    finally:
        doomed.kill()
        assert survivor.terminate() == 0


async def test_broker_sigterm_acknowledges_what_it_read_and_exits_quickly(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    broker, _ = start_broker(redis_url, namespace)
    await send_cancels(redis, namespace, 3_000)
    await anyio.sleep(0.05)
    started = time.monotonic()
    code = await anyio.to_thread.run_sync(broker.terminate)
    assert code == 0, broker.output
    assert time.monotonic() - started < 5
    _, pending = await broker_delivered(redis, namespace)
    assert pending == 0  # the batch in hand was finished and acknowledged
    assert broker.logs("broker.stopped")


async def test_redis_outage_is_survived_and_runs_stay_cancellable(namespace: str) -> None:
    server = EmbeddedRedis(appendonly=True, extra_args=("--appendfsync", "always"))
    server.start()
    broker: ProcessHandle | None = None
    worker: ProcessHandle | None = None
    try:
        broker, http = start_broker(server.url, namespace)
        worker = start_worker(server.url, namespace, heartbeat_interval="1")
        async with Client(server.url, namespace=namespace) as client:
            run_id = await run_of(
                client, await client.send("report/generate.requested", {"reportId": "r1"})
            )

            await anyio.to_thread.run_sync(server.stop)
            async with httpx.AsyncClient(base_url=http, timeout=10) as web:
                await anyio.sleep(2)
                assert (await web.get("/healthz")).status_code == 200
                not_ready = await web.get("/readyz")
                assert not_ready.status_code == 503
                assert "unreachable" in not_ready.json()["reason"]
                await anyio.sleep(3)  # five seconds of outage in all
                assert broker.process.poll() is None
                assert worker.process.poll() is None
                await anyio.to_thread.run_sync(server.start)

                async def ready() -> bool:
                    return (await web.get("/readyz")).status_code == 200

                await wait_until(ready, timeout=20, interval=0.2)

            # The run registered before the outage is still there, and still cancellable.
            info = await client.get_run(run_id)
            assert info is not None
            assert info.status == "running"
            await client.send("report/cancel.requested", {"reportId": "r1"})

            await wait_until(lambda: status_is(client, run_id, "cancelled"), timeout=20)
        # A clear line each way, and backoff rather than a busy loop.
        for handle in (broker, worker):
            await anyio.to_thread.run_sync(handle.wait_for_log, "stream.recovered")
            retries = handle.logs("stream.retrying")
            assert retries, handle.output
            # Five seconds of outage at pauses that double from 50 ms to 1 s: about nine
            # retries per reader of a stream; a busy loop would make thousands.
            per_stream = collections.Counter((line["stream"], line["consumer"]) for line in retries)
            assert max(per_stream.values()) <= 15, per_stream
    finally:
        for handle in (worker, broker):
            if handle is not None:
                handle.terminate()
        server.close()


async def test_an_entry_that_keeps_failing_is_dead_lettered_as_poison(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    stream = f"{Keys(namespace).prefix}events"
    await create_group(redis, stream, "broker")
    entry_id = await redis.xadd(stream, {"event": json.dumps({"name": "x/cancelled", "data": {}})})
    # A broker took it and crashed with it, again and again (delivered seven times).
    await redis.xreadgroup("broker", "crashing", {stream: ">"})
    for _ in range(6):
        await redis.xreadgroup("broker", "crashing", {stream: "0"})
    await anyio.sleep(0.3)
    broker = Broker(redis_url, namespace=namespace, claim_idle_ms=200)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)

        async def parked() -> bool:
            return await redis.xlen(f"{Keys(namespace).prefix}events:dead") == 1

        await wait_until(parked, timeout=10)
        tg.cancel_scope.cancel()
    ((_, letter),) = await redis.xrange(f"{Keys(namespace).prefix}events:dead")
    assert (letter["reason"], letter["entry_id"]) == ("poison", entry_id)
    assert broker.metrics.dead_letters.labels(reason="poison")._value.get() == 1
    assert broker.metrics.events.labels(result="ignored")._value.get() == 0  # never handled
