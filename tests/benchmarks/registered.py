"""Runs registered directly in Redis, the way a worker's registration script leaves them,
for the benchmarks that need many active runs without running their bodies."""

from __future__ import annotations

import time
from typing import Final

import anyio
from redis.asyncio import Redis

from sdk import CancelOn, Event
from sdk.keys import Keys
from sdk.registration import declare_rules
from sdk.rules import index_entries
from sdk.store import RegisterRequest, RunStore

RULES: Final = (CancelOn(event="report/cancel.requested", match="data.reportId"),)
#: Registrations in flight at once.
BATCH: Final = 1_000


def report_id(i: int) -> str:
    return f"report-{i:08d}"


def trigger(i: int) -> Event:
    """The trigger of run ``i``, as it came through the events stream."""
    return Event(
        name="report/generate.requested",
        data={"reportId": report_id(i)},
        id=f"{1_700_000_000_000 + i}-0",
    )


def run_id(i: int) -> str:
    return f"{i:032x}"


async def register_runs(redis: Redis, keys: Keys, n: int) -> float:
    """Declare :data:`RULES` and register ``n`` running runs of a worker that does not
    exist (nothing reads its signals); returns the seconds it took. ``redis`` needs a
    blocking connection pool (``sdk.connection.command_client``)."""
    store = RunStore(redis, keys)
    async with redis.pipeline(transaction=True) as pipe:
        declare_rules(pipe, keys, RULES, 0)
        await pipe.execute()
    started = time.perf_counter()
    for first in range(0, n, BATCH):
        async with anyio.create_task_group() as tg:
            for i in range(first, min(n, first + BATCH)):
                tg.start_soon(_register, store, i)
    return time.perf_counter() - started


async def _register(store: RunStore, i: int) -> None:
    event = trigger(i)
    await store.register(
        RegisterRequest(
            run_id=run_id(i),
            app_id="reports",
            function_id="generate-report",
            config_hash="c" * 64,
            worker_id="vm-1234-abcdef",
            event=event,
            entries=index_entries(RULES, event, store.keys),
        )
    )
