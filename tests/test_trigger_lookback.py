"""Triggers published before a function's first worker started are run, not dropped.

A first deploy where the web app is up before the workers, or a rolling deploy that adds
a function: its consumer group does not exist yet when its triggers are published. The
group is created the trigger lookback back (10 minutes), the broker's trimming keeps
that long of events, and a trigger's run id derives from its event id, so each is run
once whoever reads it. A trigger that no declared function will ever run is reported
(``unserved_trigger``, ``cancel_broker_events_total{result="unserved"}``).
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from broker import EmbeddedRedis
from sdk import Client, RunContext, Worker
from sdk.keys import Keys
from sdk.streams import trim_acknowledged
from tests.helpers import observed, run_of, wait_for_status, wait_until
from tests.processes import ProcessHandle, start_broker, start_worker, sync_status

pytestmark = pytest.mark.anyio

TRIGGER = "report/generate.requested"


async def sync_findings(url: str, namespace: str) -> tuple[int, list[dict[str, Any]]]:
    code, state = await sync_status(url, namespace)
    return code, state["findings"]


@pytest.mark.e2e
async def test_triggers_published_before_the_first_worker_run_once_each(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The web app publishes while no worker of the function ever started: the broker
    reports the triggers as unserved; the first worker runs each of them, once, and a
    second worker of the app runs none again."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    broker, base = start_broker(redis_server.url, namespace)
    workers: list[ProcessHandle] = []
    try:
        async with Client(redis_server.url, namespace=namespace) as client:
            published = [
                await client.send(TRIGGER, {"reportId": f"early-{i}", "seconds": 0})
                for i in range(3)
            ]

            async def unserved_reported() -> bool:
                code, findings = await sync_findings(redis_server.url, namespace)
                return code == 1 and any(f["kind"] == "unserved_trigger" for f in findings)

            await wait_until(unserved_reported, timeout=20, interval=0.2)
            (finding,) = [
                f
                for f in (await sync_findings(redis_server.url, namespace))[1]
                if f["kind"] == "unserved_trigger"
            ]
            assert finding["event_name"] == TRIGGER
            assert finding["details"]["count"] == 3
            async with httpx.AsyncClient(base_url=base) as http:
                metrics = (await http.get("/metrics")).text
            assert 'cancel_broker_events_total{result="unserved"} 3.0' in metrics

            workers.append(start_worker(redis_server.url, namespace))
            for i, event_id in enumerate(published):
                info = await wait_for_status(client, await run_of(client, event_id), "completed")
                assert info.event.id == event_id
                assert [o["what"] for o in await observed(redis, namespace, f"early-{i}")] == [
                    "started",
                    "completed",
                ]
            # A second worker of the app: the group exists, it reads nothing again.
            workers.append(start_worker(redis_server.url, namespace))
            await client.send(TRIGGER, {"reportId": "later", "seconds": 0})
            await wait_until(lambda: _observed_count(redis, namespace, "later", 2))
            for i, event_id in enumerate(published):
                assert len(await client.runs_for_event(event_id)) == 1
                assert len(await observed(redis, namespace, f"early-{i}")) == 2

            # Declared now: no longer reported.
            async def cleared() -> bool:
                _, findings = await sync_findings(redis_server.url, namespace)
                return not any(f["kind"] == "unserved_trigger" for f in findings)

            await wait_until(cleared, timeout=20, interval=0.2)
    finally:
        for worker in workers:
            worker.terminate()
        broker.terminate()


async def _observed_count(redis: Redis, namespace: str, report_id: str, count: int) -> bool:
    return len(await observed(redis, namespace, report_id)) >= count


@pytest.mark.e2e
async def test_a_cancel_published_before_any_broker_or_worker_still_cancels(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """Trigger, then Cancel, both before anything of cancel-broker ran: the broker's group
    starts the lookback back too, so the cancel is handled, and the run stops."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    async with Client(redis_server.url, namespace=namespace) as client:
        trigger = await client.send(TRIGGER, {"reportId": "early"})
        await client.send("report/cancel.requested", {"reportId": "early"})
        worker = start_worker(redis_server.url, namespace)
        broker, _ = start_broker(redis_server.url, namespace)
        try:
            info = await wait_for_status(client, await run_of(client, trigger), "cancelled")
            assert info.cancel_reason is not None
            assert info.cancel_reason.startswith("cancel event report/cancel.requested")
        finally:
            worker.terminate()
            broker.terminate()


async def test_a_new_functions_group_reads_the_lookback_and_zero_reads_nothing_old(
    redis_url: str, namespace: str, client: Client
) -> None:
    """A rolling deploy adds a function: its triggers sent before the deploy are run; a
    worker with a lookback of 0 starts at the stream's end, as before."""
    seen: list[str] = []

    def worker(function_id: str, trigger: str, **options: object) -> Worker:
        w = Worker("reports", redis_url, namespace=namespace, **options)  # type: ignore[arg-type]

        @w.function(id=function_id, trigger=trigger)
        async def body(ctx: RunContext) -> None:
            seen.append(f"{function_id}:{ctx.event.data['n']}")

        return w

    await client.send("summary/requested", {"n": 1})
    await client.send("digest/requested", {"n": 1})
    async with anyio.create_task_group() as tg:
        await tg.start(worker("summary", "summary/requested").serve)
        await tg.start(worker("digest", "digest/requested", trigger_lookback=0).serve)
        await client.send("digest/requested", {"n": 2})
        await wait_until(lambda: _contains(seen, {"summary:1", "digest:2"}))
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    assert sorted(seen) == ["digest:2", "summary:1"]


async def _contains(seen: list[str], wanted: set[str]) -> bool:
    return wanted <= set(seen)


async def test_trimming_keeps_the_lookback_of_acknowledged_events(redis: Redis) -> None:
    """Read and acknowledged by every group, an event still stays for the lookback: the
    group of a function whose first worker has not started yet reads that far back."""
    stream = Keys(f"t{uuid.uuid4().hex[:8]}").events
    ancient = await redis.xadd(stream, {"event": "{}"}, id="1000-0")
    first, last = (
        await redis.xadd(stream, {"event": "{}"}),
        await redis.xadd(stream, {"event": "{}"}),
    )
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xreadgroup("g", "c", {stream: ">"})
    await redis.xack(stream, "g", ancient, first, last)
    assert await trim_acknowledged(redis, stream, approximate=False, keep_ms=60_000) == 1
    assert [entry_id for entry_id, _ in await redis.xrange(stream)] == [first, last]
    # Without a lookback, only what the group still needs: from its last delivered entry.
    assert await trim_acknowledged(redis, stream, approximate=False) == 1
    assert [entry_id for entry_id, _ in await redis.xrange(stream)] == [last]
