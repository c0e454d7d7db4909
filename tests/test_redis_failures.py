"""Redis's own failure modes, on real redis-servers of each test's own, with the broker
and workers as separate processes.

- An evicting ``maxmemory-policy``: refused at start by default; with ``warn``, run
  degraded and said everywhere (log, gauge, ``/readyz``, the dashboard).
- A connection that dies without a reset (a TCP proxy that goes silent): the signal
  reader notices within about 2 s, and the cancels of the cut land within 1 s of its end.
- Refused writes (``noeviction`` at ``maxmemory``: OOM): a batch whose handling fails for
  a reason that is not its own is handled again as it was read, never counted toward
  poison; once writes return, every cancel and trigger of it is applied, once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from broker import EmbeddedRedis
from sdk import Client
from sdk.keys import Keys
from sdk.streams import MAX_DELIVERIES
from tests.helpers import observed, run_of, wait_for_observation, wait_for_status, wait_until
from tests.processes import BROKER, ProcessHandle, start_broker, start_worker
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

#: The longest Redis refuses writes in these tests; they give writes back as soon as the
#: consumer holding the batch has failed to handle it more than MAX_DELIVERIES times.
REFUSED_S = 30.0


async def handled_again_and_again(handle: ProcessHandle, event: str, **where: str) -> None:
    """Until the process has failed to handle the batch it holds more than MAX_DELIVERIES
    times in a row (its ``event`` log lines, those with the fields ``where``, count the
    attempts): had a failed handling counted as a delivery, the batch would be poison by
    now."""

    def attempts() -> int:
        lines = [
            line
            for line in handle.logs(event)
            if all(line.get(key) == value for key, value in where.items())
        ]
        return max((int(line["attempt"]) for line in lines), default=0)

    async def often_enough() -> bool:
        return attempts() > MAX_DELIVERIES

    await wait_until(often_enough, timeout=REFUSED_S, interval=0.05)


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def admin(server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url, decode_responses=True)
    yield client
    await client.config_set("maxmemory", 0)
    await client.aclose()


@contextmanager
def paused(handle: ProcessHandle) -> Iterator[None]:
    """SIGSTOP a process for the block: it holds what it read, and reads nothing new."""
    os.kill(handle.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(handle.process.pid, signal.SIGCONT)


async def test_cancels_held_while_writes_are_refused_are_applied_once_when_they_return(
    server: EmbeddedRedis, admin: Redis
) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    keys = Keys(namespace)
    broker, _ = start_broker(server.url, namespace)
    worker = start_worker(server.url, namespace, shutdown_timeout="0.2")
    try:
        # The broker's own handling is what is under test: the publisher leaves the cancels
        # to it (Client.send would otherwise signal the runs itself, sdk/early_match.py).
        async with Client(server.url, namespace=namespace, match_on_publish=False) as client:
            reports = [f"oom-{i}" for i in range(20)]
            runs = {
                report: await run_of(
                    client, await client.send("report/generate.requested", {"reportId": report})
                )
                for report in reports
            }
            for report in reports:
                await wait_for_observation(admin, namespace, report, "started")
            # The broker reads the batch of cancels while Redis refuses every write.
            with paused(broker):
                cancels = {
                    report: await client.send("report/cancel.requested", {"reportId": report})
                    for report in reports
                }
                await admin.config_set("maxmemory-policy", "noeviction")
                await admin.config_set("maxmemory", 1)
            await handled_again_and_again(broker, "stream.retrying", stream=keys.events)
            # Read once, handled again and again: not one more delivery counted.
            assert await deliveries(admin, keys.events, "broker") == {1}
            await admin.config_set("maxmemory", 0)
            started = time.monotonic()
            for report, run_id in runs.items():
                info = await wait_for_status(client, run_id, "cancelled", timeout=15)
                assert info.cancelled_by == cancels[report]
            recovered = time.monotonic() - started
            assert await admin.xlen(keys.dead_letters) == 0  # none set aside as poison
            decided = [
                line["event_id"]
                for line in broker.logs("cancel.decided")
                if line["event_id"] in set(cancels.values())
            ]
            assert sorted(decided) == sorted(cancels.values())  # each decided once
            for report in reports:
                whats = [o["what"] for o in await observed(admin, namespace, report)]
                assert whats == ["started", "cancelled"]
            print(f"20 of 20 cancels applied {recovered:.2f} s after writes returned")
    finally:
        worker.terminate()
        broker.terminate()


async def test_triggers_held_while_writes_are_refused_start_once_when_they_return(
    server: EmbeddedRedis, admin: Redis
) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    keys = Keys(namespace)
    broker, _ = start_broker(server.url, namespace)
    worker = start_worker(server.url, namespace)
    try:
        async with Client(server.url, namespace=namespace) as client:
            with paused(worker):
                triggers = [
                    await client.send(
                        "report/generate.requested", {"reportId": f"t{i}", "seconds": 0}
                    )
                    for i in range(10)
                ]
                await admin.config_set("maxmemory-policy", "noeviction")
                await admin.config_set("maxmemory", 1)
            await handled_again_and_again(
                worker, "triggers.start.retrying", function_id="generate-report"
            )
            assert await deliveries(admin, keys.events, "fn:reports/generate-report") == {1}
            await admin.config_set("maxmemory", 0)
            for event_id in triggers:
                run_id = await run_of(client, event_id)
                await wait_for_status(client, run_id, "completed", timeout=15)
                assert len(await client.runs_for_event(event_id)) == 1
            assert await admin.xlen(keys.dead_letters) == 0
            for i in range(10):
                whats = [o["what"] for o in await observed(admin, namespace, f"t{i}")]
                assert whats == ["started", "completed"]
        await wait_until(lambda: _no_lost(admin, keys), timeout=1)
    finally:
        worker.terminate()
        broker.terminate()


async def deliveries(admin: Redis, stream: str, group: str) -> set[int]:
    """How many times each entry pending for ``group`` was delivered."""
    pending = await admin.xpending_range(stream, group, "-", "+", 1000)
    assert pending, "nothing is pending: the batch was not held"
    return {int(entry["times_delivered"]) for entry in pending}


async def _no_lost(admin: Redis, keys: Keys) -> bool:
    stats = await admin.hgetall(keys.finished_stats)
    return not any(field.endswith("/lost") for field in stats)


# -- an evicting maxmemory-policy ----------------------------------------------------------


async def evicting(admin: Redis) -> None:
    await admin.config_set("maxmemory", 20 * 2**20)
    await admin.config_set("maxmemory-policy", "allkeys-lru")


async def test_a_broker_and_a_worker_refuse_to_start_on_an_evicting_redis(
    server: EmbeddedRedis, admin: Redis
) -> None:
    """allkeys-lru with a maxmemory: long runs' records go first, and their cancels do
    nothing. Refusing is the default: one line that says why and what to set."""
    await evicting(admin)
    namespace = f"t{uuid.uuid4().hex[:12]}"
    broker = await anyio.run_process(
        [*BROKER, "run", "--redis-url", server.url, "--namespace", namespace, "--http-port", "0"],
        check=False,
    )
    assert broker.returncode == 2
    line = broker.stderr.decode().strip().splitlines()[-1]  # after its log lines
    assert line.startswith("cancel-broker: error: ")
    assert "evicts keys when full (allkeys-lru with maxmemory 20 MiB)" in line
    assert "set maxmemory-policy noeviction" in line
    assert "CANCEL_BROKER_ON_EVICTING_REDIS=warn" in line
    worker = ProcessHandle([sys.executable, "-m", "tests.apps.reports", server.url, namespace])
    assert worker.process.wait(30) != 0
    assert "EvictingRedisError" in worker.output
    assert not await admin.exists(Keys(namespace).workers)  # it never registered


async def test_with_warn_they_run_degraded_and_say_so_everywhere(
    server: EmbeddedRedis, admin: Redis
) -> None:
    """The operator's choice: run on it anyway. An error line, the gauge, /readyz and the
    dashboard's banner say so; a policy changed while they run is found within seconds."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    # Read again every 0.5 s rather than 5 s: the test waits for two changes to be found.
    warn = {"CANCEL_BROKER_ON_EVICTING_REDIS": "warn", "CANCEL_BROKER_EVICTION_CHECK": "0.5s"}
    broker, base = start_broker(server.url, namespace, env=warn)
    worker = start_worker(server.url, namespace, **{k.lower(): v for k, v in warn.items()})
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            ready = (await http.get("/readyz")).json()
            assert ready == {"status": "ready", "reason": "ready"}
            await evicting(admin)  # while they run

            async def degraded() -> bool:
                return (await http.get("/readyz")).json()["status"] == "degraded"

            await wait_until(degraded, timeout=15, interval=0.2)
            readyz = await http.get("/readyz")
            assert readyz.status_code == 200  # degraded, not out of service
            assert "evicts keys when full" in readyz.json()["reason"]
            assert "cancel_broker_redis_evicting 1.0" in (await http.get("/metrics")).text
            (warning,) = (await http.get("/v1/functions")).json()["warnings"]
            assert "set maxmemory-policy noeviction" in warning
            assert broker.wait_for_log("redis.evicting")["problem"] == warning
            assert "evicts keys when full" in worker.wait_for_log("redis.evicting")["problem"]
            # Fixed: it says so, and the warning goes.
            await admin.config_set("maxmemory-policy", "noeviction")

            async def healthy() -> bool:
                return (await http.get("/readyz")).json()["status"] == "ready"

            await wait_until(healthy, timeout=15, interval=0.2)
            assert (await http.get("/v1/functions")).json()["warnings"] == []
    finally:
        worker.terminate()
        broker.terminate()


# -- a connection that dies without a reset -------------------------------------------------


async def test_a_silent_cut_is_noticed_within_seconds_and_cancels_land_once_it_returns(
    server: EmbeddedRedis, redis: Redis
) -> None:
    """A link that goes silent (no reset, no error: a load balancer forgetting the flow)
    between a worker and Redis, for 5 s, while a cancel for one of its runs is published:
    the worker notices within about 2 s, and the cancel lands within 1 s of the link
    returning (it waited up to 15 s before)."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    broker, _ = start_broker(server.url, namespace)
    with TcpProxy(server.port) as proxy:
        worker = start_worker(proxy.url, namespace, shutdown_timeout="0.2")
        try:
            async with (
                Client(server.url, namespace=namespace) as client,
                Redis.from_url(server.url, decode_responses=True) as direct,
            ):
                run_id = await run_of(
                    client, await client.send("report/generate.requested", {"reportId": "cut"})
                )
                await wait_for_observation(direct, namespace, "cut", "started")
                proxy.cut()
                cut_at = time.monotonic()
                await anyio.sleep(0.5)
                await client.send("report/cancel.requested", {"reportId": "cut"})
                noticed = await anyio.to_thread.run_sync(
                    lambda: worker.wait_for_log("signals.retrying", timeout=10)
                )
                noticed_s = time.monotonic() - cut_at
                assert "Timeout" in noticed["error"]
                assert noticed_s < 2.5
                await anyio.sleep(max(0.0, 5.0 - (time.monotonic() - cut_at)))
                proxy.restore()
                restored_at = time.monotonic()
                seen = await wait_for_observation(direct, namespace, "cut", "cancelled", 10)
                landed_s = seen["monotonic"] - restored_at
                assert landed_s < 1.0
                await wait_for_status(client, run_id, "cancelled")
                print(
                    f"cut noticed after {noticed_s:.2f} s; cancel landed {landed_s:.2f} s"
                    " after the link returned"
                )
        finally:
            worker.terminate()
            broker.terminate()


# -- a restart without the data -------------------------------------------------------------


async def test_a_redis_restart_without_its_data_keeps_the_runs_and_their_cancels(
    server: EmbeddedRedis,
) -> None:
    """SHUTDOWN NOSAVE and a restart on the same port: everything is gone. The worker
    says so, keeps its runs and registers them again with their triggers; cancels
    published after the restart stop theirs, the others go on; a trigger published at once
    after the restart runs."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    fast = {"heartbeat_interval": "1", "shutdown_timeout": "0.2"}
    broker, base = start_broker(server.url, namespace)
    worker = start_worker(server.url, namespace, **fast)
    try:
        async with Client(server.url, namespace=namespace) as client:
            reports = [f"rs-{i}" for i in range(10)]
            runs = {}
            async with Redis.from_url(server.url, decode_responses=True) as admin:
                for report in reports:
                    event = await client.send("report/generate.requested", {"reportId": report})
                    runs[report] = await run_of(client, event)
                for report in reports:
                    await wait_for_observation(admin, namespace, report, "started")
                await admin.shutdown(nosave=True)
            server.stop()
            server.start()
            restarted = time.monotonic()
            early = await client.send(
                "report/generate.requested", {"reportId": "after", "seconds": 0}
            )
            line = await anyio.to_thread.run_sync(
                lambda: worker.wait_for_log("worker.rebuilt_after_data_loss", timeout=15)
            )
            assert line["runs_registered_again"] == 10
            rebuilt_s = time.monotonic() - restarted
            assert worker.logs("redis.data_lost")
            assert not worker.logs("worker.declared_lost")  # not the false reason of before
            for run_id in runs.values():
                assert (await client.get_run(run_id)).status == "running"  # type: ignore[union-attr]
            async with Redis.from_url(server.url, decode_responses=True) as admin:
                for report in reports[:5]:
                    await client.send("report/cancel.requested", {"reportId": report})
                for report in reports[:5]:
                    info = await wait_for_status(client, runs[report], "cancelled")
                    assert info.cancel_reason == "cancel event report/cancel.requested"
                for report in reports[5:]:
                    assert (await client.get_run(runs[report])).status == "running"  # type: ignore[union-attr]
                    assert "cancelled" not in [
                        o["what"] for o in await observed(admin, namespace, report)
                    ]
            await wait_for_status(client, await run_of(client, early), "completed")
            async with httpx.AsyncClient(base_url=base) as http:

                async def counted() -> bool:
                    text = (await http.get("/metrics")).text
                    return "cancel_broker_redis_data_lost_total 1.0" in text

                await wait_until(counted, timeout=10)
            print(f"10 of 10 runs registered again {rebuilt_s:.2f} s after the restart")
    finally:
        worker.terminate()
        broker.terminate()


# -- a blocked event loop -------------------------------------------------------------------


async def test_a_body_blocking_the_loop_is_named_and_its_worker_is_not_reaped(
    server: EmbeddedRedis,
) -> None:
    """`time.sleep(3)` in an async step, with a 1 s heartbeat: every cancel of the worker
    waits 3 s (the body's doing), but the worker says which run and step blocked it, and
    is not reaped (it was, and every run it held recorded lost)."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    broker, _ = start_broker(server.url, namespace)
    worker = start_worker(server.url, namespace, heartbeat_interval="1", shutdown_timeout="0.2")
    try:
        async with (
            Client(server.url, namespace=namespace) as client,
            Redis.from_url(server.url, decode_responses=True) as direct,
        ):
            others = []
            for i in range(5):
                event = await client.send("report/generate.requested", {"reportId": f"ok-{i}"})
                others.append(await run_of(client, event))
            for i in range(5):
                await wait_for_observation(direct, namespace, f"ok-{i}", "started")
            blocking = await run_of(
                client,
                await client.send(
                    "report/generate.requested",
                    {"reportId": "blocker", "mode": "block-loop", "seconds": 3},
                ),
            )
            line = await anyio.to_thread.run_sync(
                lambda: worker.wait_for_log("worker.loop_blocked", timeout=15)
            )
            assert (line["run_id"], line["step"]) == (blocking, "blocking")
            assert "in block_loop" in line["where"]
            assert line["blocked_s"] >= 2.5
            assert not broker.logs("worker.lost")
            for run_id in [*others, blocking]:
                assert (await client.get_run(run_id)).status == "running"  # type: ignore[union-attr]
            await client.send("report/cancel.requested", {"reportId": "ok-0"})
            await wait_for_status(client, others[0], "cancelled")
    finally:
        worker.terminate()
        broker.terminate()
