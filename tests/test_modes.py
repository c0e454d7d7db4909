"""What a cancelled run does at run time: cancel modes, shielded steps, the on_cancel
hook, thread steps, and runs that are never resumed. In-process worker, real Redis."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from sdk import Event
from sdk.keys import Keys
from sdk.store import RunStore

pytestmark = pytest.mark.anyio


async def test_the_record_carries_abandoned_thread_and_on_cancel_error(
    redis: Redis, namespace: str
) -> None:
    store = RunStore(redis, Keys(namespace))
    event = Event(name="x/requested", data={}, id="1-0")
    for run_id in ("plain", "marked"):
        status = await store.register(
            run_id=run_id,
            app_id="reports",
            function_id="f",
            config_hash="c",
            worker_id="w1",
            event=event,
            entries=[],
        )
        assert status == "registered"
    await store.finish("plain", "cancelled", [], app_id="reports", worker_id="w1")
    await store.finish(
        "marked",
        "cancelled",
        [],
        app_id="reports",
        worker_id="w1",
        abandoned_thread=True,
        on_cancel_error="ValueError: boom",
    )
    plain, marked = await store.get("plain"), await store.get("marked")
    assert plain is not None
    assert marked is not None
    assert (plain.abandoned_thread, plain.on_cancel_error) == (False, None)
    assert (marked.abandoned_thread, marked.on_cancel_error) == (True, "ValueError: boom")
