"""Regressions found by review: hostile bytes, stale cancels, retries, shutdown, Redis errors."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from broker import Broker
from sdk import Client, Event, RunCancelled, RunContext
from sdk.keys import Keys
from sdk.runner import INTERRUPTED_REASON
from sdk.scripts import RegisterRequest, Taken
from sdk.store import RunStore
from sdk.streams import GroupConsumer, create_group, trim_acknowledged
from tests.helpers import broker_drained, report_worker, run_of, status_is, wait_until

pytestmark = pytest.mark.anyio


async def status_of(client: Client, run_id: str) -> str | None:
    info = await client.get_run(run_id)
    return info.status if info else None


async def test_bytes_that_are_not_utf8_are_dead_lettered_and_nothing_dies(
    redis_url: str, namespace: str, redis: Redis, client: Client, broker: Broker
) -> None:
    raw = Redis.from_url(redis_url)  # bytes in, bytes out: what a hostile publisher sends
    try:
        async with anyio.create_task_group() as tg:
            worker = report_worker(redis_url, namespace)
            await tg.start(worker.serve)
            await raw.xadd(f"{Keys(namespace).prefix}events", {b"event": b"\xff\xfe not utf8"})
            await raw.xadd(f"{Keys(namespace).prefix}events", {b"\xff": b"x"})
            event_id = await client.send("report/generate.requested", {"reportId": "r1"})
            run_id = await run_of(client, event_id)
            await client.send("report/cancel.requested", {"reportId": "r1"})
            await wait_until(lambda: status_is(client, run_id, "cancelled"))
            await wait_until(lambda: broker_drained(redis, namespace))
            tg.cancel_scope.cancel()
    finally:
        await raw.aclose()
    letters = [fields for _, fields in await redis.xrange(f"{Keys(namespace).prefix}events:dead")]
    assert [letter["reason"] for letter in letters] == ["invalid_encoding", "missing_field"]
    assert letters[0]["fields"] == '{"event":"\\\\xff\\\\xfe not utf8"}'


async def test_a_cancel_older_than_the_trigger_does_not_cancel_the_run(
    redis_url: str, namespace: str, redis: Redis, client: Client
) -> None:
    # Cancel, then Regenerate, while the broker is behind (down, or catching up).
    async with anyio.create_task_group() as tg:
        await tg.start(report_worker(redis_url, namespace).serve)
        await client.send("report/cancel.requested", {"reportId": "r1"})
        run_id = await run_of(
            client, await client.send("report/generate.requested", {"reportId": "r1"})
        )
        broker = Broker(redis_url, namespace=namespace)
        await tg.start(broker.run)
        await wait_until(lambda: broker_drained(redis, namespace))
        assert await status_of(client, run_id) == "running"
        # A cancel sent after the trigger does cancel it.
        await client.send("report/cancel.requested", {"reportId": "r1"})
        await wait_until(lambda: status_is(client, run_id, "cancelled"))
        tg.cancel_scope.cancel()


async def test_a_registration_retried_by_its_worker_is_its_own(
    redis: Redis, namespace: str
) -> None:
    store = RunStore(redis, Keys(namespace))
    event = Event(name="x/requested", data={}, id="1-0")

    async def register(worker_id: str) -> str:
        registration = await store.register(
            RegisterRequest(
                run_id="r1",
                app_id="reports",
                function_id="f",
                config_hash="c",
                worker_id=worker_id,
                event=event,
                entries=[],
            )
        )
        if isinstance(registration, Taken):
            return registration.status
        return str(registration.__struct_config__.tag)

    assert await register("w1") == "registered"
    assert await register("w1") == "registered"  # the first reply was lost; same worker
    assert await register("w2") == "running"  # someone else's run
    assert await redis.hget(Keys(namespace).run_configs("reports"), "f:c") == "1"


async def test_a_worker_reads_no_more_triggers_than_it_can_run(
    redis_url: str, namespace: str, client: Client, broker: Broker
) -> None:
    # Published before the function's first worker started: it runs too (the lookback).
    first = await client.send("report/generate.requested", {"reportId": "r1"})
    async with anyio.create_task_group() as tg:
        await tg.start(report_worker(redis_url, namespace, concurrency=1).serve)
        second = await client.send("report/generate.requested", {"reportId": "r2"})
        first_run = await run_of(client, first)
        await anyio.sleep(0.3)
        assert await client.runs_for_event(second) == []  # left in the stream for others
        tg.cancel_scope.cancel()
    # Cancelling serve() records the run it held; the trigger it never took is not lost.
    assert await status_of(client, first_run) == "cancelled"
    async with anyio.create_task_group() as tg:
        await tg.start(report_worker(redis_url, namespace, concurrency=1).serve)
        second_run = await run_of(client, second)
        assert await status_of(client, second_run) == "running"
        tg.cancel_scope.cancel()


async def test_a_trigger_of_a_function_an_old_worker_lacks_is_never_dropped(
    redis_url: str, namespace: str, client: Client
) -> None:
    old = report_worker(redis_url, namespace)
    new = report_worker(redis_url, namespace)

    @new.function(id="export", trigger="report/export.requested")
    async def export(ctx: RunContext) -> None:
        return None

    async with anyio.create_task_group() as tg:
        await tg.start(old.serve)
        await tg.start(new.serve)
        sent = [
            await client.send("report/export.requested", {"reportId": f"e{i}"}) for i in range(20)
        ]
        for event_id in sent:  # every one ran, on the worker that has the function
            run_id = await run_of(client, event_id)
            await wait_until(lambda run_id=run_id: status_is(client, run_id, "completed"))
        tg.cancel_scope.cancel()


async def test_outcomes_survive_redis_refusing_writes(
    redis_url: str, namespace: str, redis: Redis, client: Client
) -> None:
    maxmemory = (await redis.config_get("maxmemory"))["maxmemory"]

    async def allow_writes_later() -> None:
        await anyio.sleep(0.5)
        await redis.config_set("maxmemory", maxmemory)

    try:
        async with report_worker(redis_url, namespace) as worker, anyio.create_task_group() as tg:
            async with worker.run(
                "generate-report", Event(name="report/generate.requested", data={})
            ) as ctx:
                await redis.config_set("maxmemory", 1)  # every write now answers OOM
                tg.start_soon(allow_writes_later)
            # Leaving the block recorded the outcome: retried until Redis took it.
            assert await status_of(client, ctx.run_id) == "completed"
    finally:
        await redis.config_set("maxmemory", maxmemory)
    assert await status_of(client, ctx.run_id) == "completed"


async def test_trim_tolerates_pending_entries_acknowledged_meanwhile() -> None:
    class Racing:
        """XINFO says one entry is pending; by the time XPENDING answers, it is not."""

        async def xinfo_groups(self, stream: str) -> list[dict[str, Any]]:
            return [{"name": "g", "pending": 1, "last-delivered-id": "5-0"}]

        async def xpending(self, stream: str, group: str) -> dict[str, Any]:
            return {"pending": 0, "min": None, "max": None, "consumers": []}

        async def xtrim(self, stream: str, **kwargs: Any) -> int:
            assert kwargs["minid"] == "5-0"
            return 3

    assert await trim_acknowledged(Racing(), "s") == 3  # type: ignore[arg-type]


async def test_step_awaits_what_a_plain_callable_returns(redis_url: str, namespace: str) -> None:
    calls: list[str] = []

    async def llm(prompt: str) -> str:
        calls.append(prompt)
        return prompt.upper()

    class AsyncCallable:
        async def __call__(self, prompt: str) -> str:
            return await llm(prompt)

    async with (
        report_worker(redis_url, namespace) as worker,
        worker.run("generate-report", Event(name="report/generate.requested", data={})) as ctx,
    ):
        assert await ctx.step.run("lambda", lambda: llm("a")) == "A"
        assert await ctx.step.run("object", AsyncCallable(), "b") == "B"
    assert calls == ["a", "b"]


async def test_an_outer_cancellation_of_a_run_block_is_recorded_as_such(
    redis_url: str, namespace: str, client: Client
) -> None:
    async with report_worker(redis_url, namespace) as worker:
        with anyio.move_on_after(0.1):  # e.g. the web request's own timeout
            async with worker.run(
                "generate-report", Event(name="report/generate.requested", data={})
            ) as ctx:
                await anyio.sleep(60)
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert (info.status, info.cancel_reason) == ("cancelled", INTERRUPTED_REASON)


async def test_a_clean_stop_leaves_no_consumer_behind(
    redis_url: str, namespace: str, redis: Redis, broker: Broker
) -> None:
    async with anyio.create_task_group() as tg:
        worker = report_worker(redis_url, namespace)
        await tg.start(worker.serve)
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    group = Keys.function_group("reports", "generate-report")
    consumers = await redis.xinfo_consumers(f"{Keys(namespace).prefix}events", group)
    assert [c["name"] for c in consumers] == []


async def test_run_cancelled_is_raised_after_a_cancelled_block(
    redis_url: str, namespace: str, client: Client
) -> None:
    async with report_worker(redis_url, namespace) as worker:
        with pytest.raises(RunCancelled):
            async with worker.run(
                "generate-report", Event(name="report/generate.requested", data={})
            ) as ctx:
                await client.cancel(ctx.run_id)
                await anyio.sleep(60)


async def test_a_stopped_consumer_handles_what_its_cancelled_read_was_given(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    """stop() cancels a blocked read; if Redis had answered it already, the entries are
    pending for the consumer. They are handled before run() returns, not left for a claim."""
    stream = f"{Keys(namespace).prefix}events"
    await create_group(redis, stream, "g")
    consumer = GroupConsumer(
        redis_url, redis, stream=stream, group="g", consumer="c", block_ms=5_000
    )
    handled: list[str] = []

    async def handle(entries: Any) -> None:
        handled.extend(entry_id for entry_id, _ in entries)
        await consumer.ack(*(entry_id for entry_id, _ in entries))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, handle)
        await wait_until(lambda: _blocked_in_xreadgroup(redis))
        # An entry delivered to "c" that its blocked read never sees: what a read answered
        # at the moment stop() cancels it leaves behind.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"event": "{}"})
            pipe.xreadgroup("g", "c", {stream: ">"})
            entry_id, _ = await pipe.execute()
        consumer.stop()
    assert handled == [entry_id]
    assert (await redis.xpending(stream, "g"))["pending"] == 0


async def _blocked_in_xreadgroup(redis: Redis) -> bool:
    return any(client.get("cmd") == "xreadgroup" for client in await redis.client_list())
