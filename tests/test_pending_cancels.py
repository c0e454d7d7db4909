"""A cancel that arrives before its run exists is kept, and lands when the run registers.

Seeds 002 and 004: the app knows a job id (or which jobs to stop) before any worker has
registered the run. A cancel by id of an unknown id is kept (``pending``) for the
pending-cancel lookback; ``cancel_many`` keeps its cancel for runs whose trigger waits in
the stream. The run is cancelled as it registers: its body never runs, it ends
``cancelled`` with the cancel's reason, and its outcome event fires. Celery's queued
tasks, groups and chains: tests/test_integration_celery.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import structlog
from redis.asyncio import Redis

from broker import BrokerMetrics
from broker.housekeeping import Housekeeping
from sdk import (
    OPERATOR,
    BlockingWorker,
    CancelOn,
    Client,
    Event,
    RunCancelled,
    RunContext,
    Worker,
)
from sdk.errors import InvalidBulkCancelError
from sdk.keys import Keys
from sdk.partitions import Partitions
from sdk.scripts import CancelRequest
from sdk.wire import RUN_CANCELLED_EVENT, decode_event
from tests.helpers import (
    observed,
    partition_keys,
    run_of,
    status_is,
    topology_url,
    wait_for_observation,
    wait_for_status,
    wait_until,
)
from tests.processes import start_worker

pytestmark = pytest.mark.anyio

RULE = CancelOn(event="report/cancel.requested", match="data.reportId")


def report(report_id: str, **data: Any) -> Event:
    return Event(name="report/generate.requested", data={"reportId": report_id, **data})


@pytest.fixture
async def worker(redis_url: str, namespace: str) -> AsyncIterator[Worker]:
    worker = Worker("reports", redis_url, namespace=namespace)
    entered: list[str] = []

    @worker.function(
        id="generate-report",
        trigger="report/generate.requested",
        cancel_on=[RULE],
        owner="data.accountId",
    )
    async def generate(ctx: RunContext) -> None:
        entered.append(ctx.run_id)
        await anyio.sleep(60)

    @generate.on_cancel
    async def cleanup(ctx: RunContext, reason: str) -> None:
        entered.append(f"cleanup {ctx.run_id}: {reason}")

    worker.entered = entered  # type: ignore[attr-defined]
    async with worker:
        yield worker


async def outcome_events(redis: Redis, namespace: str, run_id: str) -> list[dict[str, Any]]:
    return [
        event.data
        for keys in partition_keys(namespace)
        for entry_id, fields in await redis.xrange(keys.events)
        if (event := decode_event(entry_id, fields, partition=keys.partition)).name
        == RUN_CANCELLED_EVENT
        and event.data["run_id"] == run_id
    ]


@pytest.mark.topologies
async def test_a_run_cancelled_by_id_before_it_registered_never_runs_its_block(
    worker: Worker, client: Client, redis: Redis, namespace: str
) -> None:
    """With several partitions too: the cancel is kept in each, and the one where the run
    registers applies it."""
    kept = await client.cancel("job-1", reason="the user clicked Cancel", actor=OPERATOR)
    assert (kept.outcome, kept.status, kept.previous_status) == ("pending", None, None)
    assert kept.kept_until is not None
    entered = False
    with pytest.raises(RunCancelled, match="the user clicked Cancel"):
        async with worker.run("generate-report", report("r1", accountId="a1"), run_id="job-1"):
            entered = True  # pragma: no cover - must not run
    assert not entered
    info = await client.get_run("job-1")
    assert info is not None
    assert (info.status, info.cancel_reason, info.cancelled_by) == (
        "cancelled",
        "the user clicked Cancel",
        "api",
    )
    (outcome,) = await outcome_events(redis, namespace, "job-1")
    assert outcome["reason"] == "the user clicked Cancel"
    # Its on_cancel hook ran, as for any cancelled run; the kept cancel is used up.
    assert worker.entered == ["cleanup job-1: the user clicked Cancel"]  # type: ignore[attr-defined]
    again = await client.cancel("job-1", actor=OPERATOR)
    assert again.outcome == "already_cancelled"


async def test_a_kept_cancel_is_checked_against_the_owner_when_the_run_registers(
    worker: Worker, client: Client
) -> None:
    """The owner is known only when the run registers: a kept cancel from another account
    is refused then (and the worker says so); one from the owner applies."""
    assert (await client.cancel("job-2", actor="a2")).outcome == "pending"
    with structlog.testing.capture_logs() as logs:
        async with worker.run("generate-report", report("r2", accountId="a1"), run_id="job-2"):
            pass
    (refused,) = [line for line in logs if line["event"] == "run.pending_cancel_refused"]
    assert (refused["run_id"], refused["actor"]) == ("job-2", '"a2"')
    assert (await client.get_run("job-2")).status == "completed"  # type: ignore[union-attr]
    assert (await client.cancel("job-3", actor="a1")).outcome == "pending"
    with pytest.raises(RunCancelled):
        async with worker.run("generate-report", report("r3", accountId="a1"), run_id="job-3"):
            pass  # pragma: no cover


def test_a_blocking_run_with_a_job_id_cancelled_first_never_runs(
    redis_url: str, namespace: str
) -> None:
    """``BlockingWorker.run(..., run_id=job_id)``, as a job queue runs a job it was told to
    cancel while it waited."""
    worker = Worker("jobs", redis_url, namespace=namespace)

    @worker.function(id="render", trigger="render/requested")
    async def render(ctx: RunContext) -> None:  # pragma: no cover - run by the host
        pass

    async def cancel_first() -> str:
        async with Client(redis_url, namespace=namespace) as client:
            return (await client.cancel("render-7")).outcome

    assert anyio.run(cancel_first) == "pending"
    with BlockingWorker(worker) as host, pytest.raises(RunCancelled):  # noqa: SIM117
        with host.run("render", Event(name="render/requested"), run_id="render-7"):
            pytest.fail("the block ran")


async def test_a_kept_cancel_no_run_takes_expires_and_is_reported(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    """Bounded in time: after the lookback, the broker removes it, counts it and names the
    run id in a warning (it cancelled nothing, and says so)."""
    async with Client(redis_url, namespace=namespace, pending_cancel_lookback=0.2) as client:
        assert (await client.cancel("never-started")).outcome == "pending"
        partitions = await Partitions.open(redis, client.keys)
        metrics = BrokerMetrics()
        housekeeping = Housekeeping(partitions.stores(), metrics, structlog.get_logger())
        await anyio.sleep(0.3)
        with structlog.testing.capture_logs() as logs:
            await housekeeping.expire_pending_once()
        (expired,) = [line for line in logs if line["event"] == "cancel.pending_expired"]
        assert expired["run_ids"] == ["never-started"]
        assert metrics.pending_cancels_expired._value.get() == 1
        for keys in partitions.keys:
            assert not await redis.exists(keys.pending_cancels, keys.pending_cancel_deadlines)
        # Expired means gone: a run registering with the id now runs.
        worker = Worker("reports", redis_url, namespace=namespace)

        @worker.function(id="quick", trigger="quick/requested")
        async def quick(ctx: RunContext) -> None:
            pass

        async with (
            worker,
            worker.run("quick", Event(name="quick/requested"), run_id="never-started"),
        ):
            pass
        assert await status_is(client, "never-started", "completed")


async def test_kept_cancels_are_bounded_in_number(redis_url: str, namespace: str) -> None:
    """Bounded in memory: beyond the room, the kept cancel closest to its end is dropped."""
    async with Client(redis_url, namespace=namespace) as client:
        store = (await Partitions.open(client._redis, client.keys)).stores()[0]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sdk.scripts.PENDING_CANCELS_KEPT", 3)
            for i in range(5):
                await store.request_cancel(
                    [f"id-{i}"], CancelRequest(cancelled_by="api", reason="r", keep_ms=60_000)
                )
        kept = await client._redis.zrange(store.keys.pending_cancel_deadlines, 0, -1)
        assert kept == ["id-2", "id-3", "id-4"]
        assert await client._redis.hlen(store.keys.pending_cancels) == 3


# -- cancel_many: runs whose trigger waits in the stream ------------------------------------


@pytest.fixture(scope="module")
def queued_namespace() -> str:
    return "pending-bulk"


@pytest.fixture(scope="module")
def one_slot_worker(request: pytest.FixtureRequest, queued_namespace: str) -> Iterator[None]:
    """A worker process with room for one run: the next triggers wait in the stream."""
    handle = start_worker(topology_url(request, "single"), queued_namespace, concurrency="1")
    yield
    assert handle.terminate() == 0, handle.output


@pytest.mark.e2e
@pytest.mark.usefixtures("one_slot_worker")
async def test_cancel_many_reaches_runs_queued_behind_a_full_worker(
    redis_server: Any, redis: Redis, queued_namespace: str
) -> None:
    """As Inngest's bulk cancel: runs whose trigger was published in the range are cancelled
    when they register (the condition evaluated by the worker), the others run."""
    namespace = queued_namespace
    async with Client(redis_server.url, namespace=namespace) as client:
        running = await run_of(
            client,
            await client.send("report/generate.requested", {"reportId": "b0", "tier": "free"}),
        )
        await wait_for_observation(redis, namespace, "b0", "started")
        free = await client.send("report/generate.requested", {"reportId": "b1", "tier": "free"})
        pro = await client.send(
            "report/generate.requested", {"reportId": "b2", "tier": "pro", "seconds": 0}
        )
        bulk = await client.cancel_many(
            "generate-report", if_='event.data.tier == "free"', reason="plan downgraded"
        )
        # The one registered run, signalled now; the queued ones are not listed (they do not
        # exist yet), and the cancel is kept for them.
        assert [(r.run_id, r.outcome) for r in bulk.results] == [(running, "signalled")]
        assert bulk.kept_until is not None
        assert bulk.kept_until - bulk.started_before == client.pending_cancel_lookback
        queued = await run_of(client, free)
        info = await wait_for_status(client, queued, "cancelled")
        assert (info.cancel_reason, info.cancelled_by) == ("plan downgraded", "api")
        assert await observed(redis, namespace, "b1") == []  # never ran
        assert (await client.wait(await run_of(client, pro), timeout=10)).status == "completed"


@pytest.mark.topologies
async def test_cancel_many_bounds_are_inclusive_and_cover_runs_that_register_later(
    redis_url: str, namespace: str, client: Client, redis: Redis
) -> None:
    """A range of one millisecond, the trigger's own, selects it: Inngest's bounds are
    inclusive. A run with a trigger of that time registering later is cancelled too,
    without a worker having to evaluate anything; one triggered outside is not."""
    worker = Worker("reports", redis_url, namespace=namespace)

    @worker.function(id="generate-report", trigger="report/generate.requested")
    async def generate(ctx: RunContext) -> None:
        await anyio.sleep(60)

    async with worker:
        at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
        ms = int(at.timestamp() * 1000)

        async def hold(run_id: str, ts: int) -> None:
            with pytest.raises(RunCancelled):
                async with worker.run(
                    "generate-report", Event(name="report/generate.requested", ts=ts), run_id=run_id
                ):
                    await anyio.sleep(60)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, "inside", ms)
            await wait_until(lambda: status_is(client, "inside", "running"))
            bulk = await client.cancel_many("generate-report", started_after=at, started_before=at)
            assert [(r.run_id, r.outcome) for r in bulk.results] == [("inside", "signalled")]
            assert (bulk.started_after, bulk.started_before) == (at, at)
            # Triggered at that same millisecond, registering only now: cancelled on arrival.
            with pytest.raises(RunCancelled, match="bulk cancel of generate-report"):
                async with worker.run(
                    "generate-report", Event(name="report/generate.requested", ts=ms), run_id="late"
                ):
                    pytest.fail("the block ran")
            # A millisecond later: outside the range.
            async with worker.run(
                "generate-report", Event(name="report/generate.requested", ts=ms + 1), run_id="out"
            ):
                pass
        assert await status_is(client, "out", "completed")


async def test_cancel_many_refuses_a_range_it_cannot_honour(
    client: Client, redis: Redis, namespace: str
) -> None:
    # What a broker records of a sync: an app declares the function (it has no runs).
    await redis.sadd(Keys(namespace).apps, "reports")
    await redis.hset(Keys(namespace).app_functions("reports"), "generate-report", "h")
    future = datetime.now(UTC) + timedelta(minutes=5)
    with pytest.raises(InvalidBulkCancelError, match="in the future"):
        await client.cancel_many("generate-report", started_before=future)
    with pytest.raises(InvalidBulkCancelError, match="later than started_before"):
        await client.cancel_many(
            "generate-report",
            started_after=datetime.now(UTC) - timedelta(minutes=1),
            started_before=datetime.now(UTC) - timedelta(minutes=2),
        )
    # The caller's clock may run a little ahead of Redis's: now is now.
    bulk = await client.cancel_many("generate-report", started_before=datetime.now(UTC))
    assert bulk.results == []
