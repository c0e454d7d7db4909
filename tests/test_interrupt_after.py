"""``interrupt_after``: a ``between_steps`` run that has not stopped that long after its
cancel is interrupted where it is, and its record says so."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from sdk import CancelOn, Client, ConfigurationError, RunContext, RunInfo, Worker
from sdk.context import CancelState
from sdk.function import canonical_config
from sdk.wire import config_hash
from tests.helpers import run_of, status_is, wait_until
from tests.processes import alive, start_broker, start_worker
from tests.test_process_steps import child_pid

pytestmark = pytest.mark.anyio

TRIGGER = "render/graceful.requested"
CANCEL = "render/cancel.requested"


async def _body(ctx: RunContext) -> None:
    await anyio.sleep(60)


def test_interrupt_after_is_checked_and_is_part_of_the_config() -> None:
    worker = Worker("renders", "redis://localhost:1/0")
    fn = worker.function(
        id="f", trigger=TRIGGER, cancel_mode="between_steps", interrupt_after="30s"
    )(_body)
    assert (fn.interrupt_after, fn.config.interrupt_after_s) == (30.0, 30.0)
    without = canonical_config("f", TRIGGER, (), "between_steps")
    assert fn.config_hash != config_hash(without)
    # A configuration without it keeps the hash it had before the setting existed (a
    # rolling upgrade of the SDK is no configuration drift).
    rule = CancelOn(event="x/y", match="data.id", if_="event.data.a == 1", timeout="1h")
    old = canonical_config("f", "a/b", (rule,), "between_steps", owner="data.o")
    assert config_hash(old) == "24f6a0b23a8975f4224c73fce3330858830618c1ee2de6230c8f387457c90072"
    for mode, value, message in [
        ("immediate", "30s", "between_steps' only"),
        ("between_steps", "soon", "not a duration"),
        ("between_steps", 0, "positive duration"),
        ("between_steps", float("inf"), "positive duration"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            worker.function(
                id=f"g-{value}", trigger=TRIGGER, cancel_mode=mode, interrupt_after=value
            )(_body)  # type: ignore[arg-type]


async def test_the_deadline_interrupts_only_a_run_that_has_not_stopped() -> None:
    escalated = CancelState("between_steps", interrupt_after=0.1)
    escalated.body_started = True
    with escalated.scope:
        escalated.receive("user")
        escalated.receive("user, again")  # a signal sent again moves no deadline
        await anyio.sleep(5)
    assert escalated.escalated
    at_boundary = CancelState("between_steps", interrupt_after=0.1)
    at_boundary.body_started = True
    with at_boundary.scope:
        at_boundary.receive("user")
        at_boundary.interrupt()  # the next step boundary, before the deadline
        await anyio.sleep(5)
    assert not at_boundary.escalated


async def observed(redis: Redis, namespace: str, render_id: str) -> list[str]:
    entries = await redis.lrange(f"{namespace}:test:observed:{render_id}", 0, -1)
    return [json.loads(entry)["what"] for entry in entries]


async def finished(client: Client, run_id: str) -> RunInfo:
    await wait_until(lambda: status_is(client, run_id, "cancelled"), timeout=10)
    info = await client.get_run(run_id)
    assert info is not None
    return info


async def test_a_step_awaiting_60_s_is_interrupted_2_s_after_its_cancel(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    broker, _ = start_broker(redis_url, namespace)
    worker = start_worker(redis_url, namespace, app="renders", interrupt_after="2s")
    try:
        async with Client(redis_url, namespace=namespace) as client:
            # "long" awaits 60 s in its step; "short" finishes its step within the 2 s.
            runs = {
                render_id: await run_of(
                    client, await client.send(TRIGGER, {"renderId": render_id, "seconds": s})
                )
                for render_id, s in [("long", 60), ("short", 1.0)]
            }
            # Cancelled once in their steps: a cancel that reached a loaded worker before a
            # body began its step would stop it at that boundary, not in the step.
            for render_id in runs:
                await wait_until(partial(_started, redis, namespace, render_id), timeout=10)
            for render_id in runs:
                await client.send(CANCEL, {"renderId": render_id})
            long, short = [await finished(client, run_id) for run_id in runs.values()]
            await wait_until(lambda: _cleaned_up(redis, namespace, "long"), timeout=5)
            await wait_until(lambda: _cleaned_up(redis, namespace, "short"), timeout=5)
    finally:
        worker.terminate()
        broker.terminate()
    # From the cancel's publication to the body stopping, on the Redis clock.
    assert long.escalated
    assert long.cancel_latency_ms is not None
    assert 1.9 <= long.cancel_latency_ms / 1000 < 3.0, long.cancel_latency_ms
    assert await observed(redis, namespace, "long") == ["started", "cleanup"]
    assert not short.escalated  # stopped at its next step boundary, in time
    assert await observed(redis, namespace, "short") == ["started", "encoded", "cleanup"]


async def test_a_process_step_is_killed_when_interrupt_after_passes(
    redis_url: str, namespace: str, redis: Redis, tmp_path: Path
) -> None:
    broker, _ = start_broker(redis_url, namespace)
    worker = start_worker(
        redis_url, namespace, app="renders", interrupt_after="1s", thread_grace="0.5"
    )
    try:
        async with Client(redis_url, namespace=namespace) as client:
            pid_file = tmp_path / "pid"
            data = {"renderId": "spin", "mode": "spin", "pid_file": str(pid_file)}
            run_id = await run_of(client, await client.send(TRIGGER, data))
            pid = await child_pid(pid_file)
            sent_at = time.monotonic()
            await client.send(CANCEL, {"renderId": "spin"})
            await wait_until(lambda: _now(not alive(pid)), timeout=5, interval=0.01)
            gone_after = time.monotonic() - sent_at
            info = await finished(client, run_id)
            await wait_until(lambda: _cleaned_up(redis, namespace, "spin"), timeout=5)
    finally:
        worker.terminate()
        broker.terminate()
    # interrupt_after, then SIGTERM ignored for the grace, then SIGKILL.
    assert 1.5 <= gone_after < 1.5 + 1, gone_after
    assert info.escalated
    assert await observed(redis, namespace, "spin") == ["started", "cleanup"]


async def _started(redis: Redis, namespace: str, render_id: str) -> bool:
    return "started" in await observed(redis, namespace, render_id)


async def _cleaned_up(redis: Redis, namespace: str, render_id: str) -> bool:
    return "cleanup" in await observed(redis, namespace, render_id)


async def _now(value: bool) -> bool:
    return value
