"""Runs registered directly in Redis, the way a worker's registration script leaves them,
for the benchmarks that need many active runs without running their bodies."""

from __future__ import annotations

import time
from typing import Final

import anyio
from redis.asyncio import Redis

from sdk import CancelOn, Event
from sdk.keys import Keys
from sdk.partitions import partition_of_token
from sdk.registration import declare_rules
from sdk.rules import index_entries, value_token
from sdk.scripts import RegisterRequest
from sdk.store import RunStore

TRIGGER: Final = "report/generate.requested"
RULES: Final = (CancelOn(event="report/cancel.requested", match="data.reportId"),)
#: Registrations in flight at once.
BATCH: Final = 1_000


def report_id(i: int) -> str:
    return f"report-{i:08d}"


def trigger(i: int) -> Event:
    """The trigger of run ``i``, as it came through the events stream."""
    return Event(
        name=TRIGGER,
        data={"reportId": report_id(i)},
        id=f"{1_700_000_000_000 + i}-0",
    )


def run_id(i: int) -> str:
    return f"{i:032x}"


def partition_of_report(i: int, partitions: int) -> int:
    """The partition run ``i`` and the cancel events naming it belong in."""
    return partition_of_token(str(value_token(report_id(i))), partitions)


async def register_runs(redis: Redis, keys: Keys, n: int, *, partitions: int = 1) -> float:
    """Declare :data:`RULES` and register ``n`` running runs of a worker that does not
    exist (nothing reads its signals), each in its partition; returns the seconds it took.
    ``redis`` needs a blocking connection pool (``sdk.connection.command_client``)."""
    stores = [RunStore(redis, keys.in_partition(p)) for p in range(partitions)]
    async with redis.pipeline(transaction=True) as pipe:
        declare_rules(pipe, keys, RULES, 0)
        # What a worker's sync records: both events placed by the key the rule matches.
        pipe.hset(
            keys.placements,
            mapping={f"place:{name}": "data.reportId" for name in (TRIGGER, RULES[0].event)},
        )
        await pipe.execute()
    started = time.perf_counter()
    for first in range(0, n, BATCH):
        async with anyio.create_task_group() as tg:
            for i in range(first, min(n, first + BATCH)):
                tg.start_soon(_register, stores[partition_of_report(i, partitions)], i)
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
