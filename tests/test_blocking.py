"""Runs whose body the caller drives (BlockingWorker), the trigger time of such runs, and
SyncClient: blocking code registered, told of its cancel and recorded like any run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from broker import Broker
from sdk import (
    BlockingWorker,
    Client,
    DuplicateRunError,
    Event,
    RunCancelled,
    RunNotFinishedError,
    SyncClient,
    Worker,
)
from sdk.keys import Keys
from tests.helpers import RULE, broker_drained, wait_until

TRIGGER = "report/generate.requested"


def make_worker(redis_url: str, namespace: str, **options: float) -> Worker:
    worker = Worker("reports", redis_url, namespace=namespace, **options)
    worker.declare(id="generate-report", trigger=TRIGGER, cancel_on=[RULE])  # no body
    return worker


@pytest.fixture
def host(redis_url: str, namespace: str) -> Iterator[BlockingWorker]:
    with BlockingWorker(make_worker(redis_url, namespace, thread_grace=5.0)) as host:
        yield host


@pytest.fixture
def sync_client(redis_url: str, namespace: str) -> Iterator[SyncClient]:
    with SyncClient(redis_url, namespace=namespace) as client:
        yield client


def report(report_id: str) -> Event:
    return Event(name=TRIGGER, data={"reportId": report_id})


def cancel_soon(client: SyncClient, run_id: str, delay: float = 0.1) -> threading.Thread:
    def cancel() -> None:
        time.sleep(delay)
        assert client.cancel(run_id, reason="user clicked cancel").outcome == "signalled"

    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def test_a_cancel_stops_a_blocking_body_at_its_sleep(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    reasons: list[str] = []
    started = time.monotonic()
    with pytest.raises(RunCancelled) as raised:  # noqa: SIM117 - the block is the body
        with host.run(
            "generate-report", report("r1"), run_id="r1-run", on_interrupt=reasons.append
        ) as run:
            canceller = cancel_soon(sync_client, run.run_id)
            run.sleep(30)
    canceller.join()
    assert time.monotonic() - started < 5
    assert raised.value.run_id == "r1-run"
    assert reasons == ["user clicked cancel"]
    info = sync_client.wait("r1-run", timeout=5)
    assert info.status == "cancelled"
    assert info.cancel_reason == "user clicked cancel"
    assert info.abandoned_thread is False
    assert info.cancel_latency_ms is not None
    assert info.cancel_latency_ms < 2_000


def test_a_body_that_polls_check_stops_and_is_recorded_cancelled(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    steps = 0
    with pytest.raises(RunCancelled):  # noqa: SIM117
        with host.run("generate-report", report("r2")) as run:
            canceller = cancel_soon(sync_client, run.run_id)
            run_id = run.run_id
            while True:
                run.check()
                steps += 1
                time.sleep(0.005)
    canceller.join()
    assert 0 < steps < 1_000
    assert sync_client.wait(run_id, timeout=5).status == "cancelled"


def test_a_body_that_ignores_its_cancel_is_abandoned_after_the_grace(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    started = time.monotonic()
    with pytest.raises(RunCancelled):  # noqa: SIM117
        with host.run("generate-report", report("r3"), grace=0.2) as run:
            canceller = cancel_soon(sync_client, run.run_id, delay=0.05)
            run_id = run.run_id

            def recorded() -> bool:
                info = sync_client.get_run(run_id)
                return info is not None and info.status == "cancelled"

            # The outcome is recorded once the grace is over, while the body still runs.
            while not recorded():
                assert time.monotonic() - started < 5
                time.sleep(0.02)
    canceller.join()
    info = sync_client.wait(run_id, timeout=5)
    assert info.abandoned_thread is True


def test_raise_in_thread_stops_a_body_that_never_polls_after_the_grace(
    redis_url: str, namespace: str, sync_client: SyncClient
) -> None:
    """The opt-in last resort: ThreadCancelled raised in the block's thread once the grace
    is over. ``except Exception`` cannot swallow it, ``finally`` runs, the caller sees
    RunCancelled and the run is recorded ``cancelled``, ``terminated``, not abandoned."""
    worker = make_worker(redis_url, namespace, thread_grace=0.3)
    seen: list[str] = []
    with BlockingWorker(worker, raise_in_thread=True) as host:
        started = time.monotonic()
        with pytest.raises(RunCancelled):  # noqa: SIM117
            with host.run("generate-report", report("r-spin")) as run:
                canceller = cancel_soon(sync_client, run.run_id, delay=0.05)
                try:
                    while time.monotonic() - started < 30:  # pure Python, never polls
                        try:
                            sum(range(1000))
                        except Exception:  # the trap: swallows ordinary exceptions only
                            seen.append("swallowed")  # pragma: no cover
                finally:
                    seen.append("finally")
        stopped_after = time.monotonic() - started
    canceller.join()
    assert seen == ["finally"]
    assert 0.3 <= stopped_after < 2, stopped_after
    info = sync_client.wait(run.run_id, timeout=5)
    assert (info.status, info.terminated, info.abandoned_thread) == ("cancelled", True, False)


def test_without_raise_in_thread_nothing_is_raised_in_a_thread_that_finishes_late(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    """The default: a block past its grace is abandoned, never interrupted by force."""
    with pytest.raises(RunCancelled):  # noqa: SIM117
        with host.run("generate-report", report("r-late"), grace=0.1) as run:
            canceller = cancel_soon(sync_client, run.run_id, delay=0.05)
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:  # past the grace: ThreadCancelled never lands
                sum(range(1000))
    canceller.join()
    info = sync_client.wait(run.run_id, timeout=5)
    assert (info.terminated, info.abandoned_thread) == (False, True)


def test_completed_and_failed_blocks_are_recorded(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    with host.run("generate-report", report("r4")) as run:
        done_id = run.run_id
    assert sync_client.wait(done_id, timeout=5).status == "completed"

    with pytest.raises(ValueError, match="bad outline") as raised:  # noqa: SIM117
        with host.run("generate-report", report("r5")) as run:
            failed_id = run.run_id
            raise ValueError("bad outline")
    assert raised.value.__traceback__ is not None
    info = sync_client.wait(failed_id, timeout=5)
    assert (info.status, info.error) == ("failed", "ValueError: bad outline")


def test_a_run_cancelled_before_its_block_starts_never_runs_it(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    ran = False
    with pytest.raises(RunCancelled, match="cancelled by request"):  # noqa: SIM117
        with host.run("generate-report", report("parent")) as parent:
            assert sync_client.cancel(parent.run_id).outcome == "signalled"
            with pytest.raises(RunCancelled, match="parent run"):  # noqa: SIM117
                with host.run("generate-report", report("child"), parent=parent.run_id):
                    ran = True
            parent.sleep(5)
    assert not ran


def test_a_cancelled_run_id_is_never_run_again(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    with pytest.raises(RunCancelled):  # noqa: SIM117
        with host.run("generate-report", report("r6"), run_id="job-6") as run:
            cancel_soon(sync_client, run.run_id, delay=0).join()
            run.sleep(5)
    with pytest.raises(DuplicateRunError) as raised:  # noqa: SIM117
        with host.run("generate-report", report("r6"), run_id="job-6"):
            pytest.fail("a cancelled run ran again")  # pragma: no cover
    assert raised.value.status == "cancelled"


def test_run_async_interrupts_a_body_on_another_event_loop(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    seen: list[str] = []

    async def job() -> None:
        async with host.run_async("generate-report", report("r7"), run_id="r7-run") as run:
            cancel_soon(sync_client, run.run_id)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")
            # Level-triggered: the next await is cancelled again.
            await asyncio.sleep(30)
            seen.append("carried on")  # pragma: no cover

    started = time.monotonic()
    with pytest.raises(RunCancelled):
        asyncio.run(job())
    assert time.monotonic() - started < 5
    assert seen == ["cancelled"]
    assert sync_client.wait("r7-run", timeout=5).status == "cancelled"


def test_sync_client_sends_reads_cancels_and_waits(
    host: BlockingWorker, sync_client: SyncClient
) -> None:
    event_id = sync_client.send("report/progress", {"reportId": "r8"})
    assert event_id.count("-") == 1
    assert sync_client.runs_for_event(event_id) == []
    assert sync_client.get_run("nope") is None
    assert sync_client.cancel("nope").outcome == "pending"
    with pytest.raises(RunNotFinishedError):
        sync_client.wait("nope", timeout=0.2)

    with pytest.raises(RunCancelled):  # noqa: SIM117
        with host.run("generate-report", report("r8")) as run:
            results = sync_client.cancel_many(
                "generate-report", started_after=datetime.now(UTC) - timedelta(minutes=1)
            )
            assert [(r.run_id, r.outcome) for r in results.results] == [(run.run_id, "signalled")]
            run.sleep(5)
    assert sync_client.wait(run.run_id, timeout=5).status == "cancelled"


def test_sync_client_is_shared_by_threads(sync_client: SyncClient) -> None:
    ids: list[str] = []

    def send() -> None:
        for _ in range(20):
            ids.append(sync_client.send("report/progress", {"n": 1}))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 80


@pytest.mark.anyio
async def test_a_trigger_time_lets_a_cancel_sent_while_queued_apply(
    broker: Broker, client: Client, redis: Redis, redis_url: str, namespace: str
) -> None:
    """A job enqueued, then cancelled while queued, then started: its ``event.ts`` (the
    enqueue time) orders it before the cancel, so the tombstone cancels it on start; the
    same job without a time starts after the cancel and runs."""
    worker = make_worker(redis_url, namespace)
    enqueued_ms = int(time.time() * 1000) - 50
    async with worker:  # its rules are declared: the broker tombstones their cancels
        await client.send("report/cancel.requested", {"reportId": "q1"})
        await wait_until(lambda: broker_drained(redis, namespace))
        with pytest.raises(RunCancelled, match="before the run registered"):
            async with worker.run(
                "generate-report", Event(name=TRIGGER, data={"reportId": "q1"}, ts=enqueued_ms)
            ):
                await anyio.sleep(5)
        async with worker.run("generate-report", Event(name=TRIGGER, data={"reportId": "q1"})):
            await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_a_blocking_worker_creates_no_trigger_groups(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """A group nobody reads would keep the events stream from ever being trimmed."""
    with BlockingWorker(make_worker(redis_url, namespace)):
        groups = await redis.xinfo_groups(Keys(namespace).events)
    assert [group["name"] for group in groups] == ["broker"]


def test_stopping_the_host_cancels_the_runs_it_still_holds(
    redis_url: str, namespace: str, sync_client: SyncClient
) -> None:
    host = BlockingWorker(make_worker(redis_url, namespace, thread_grace=2.0))
    host.start()
    entered = threading.Event()
    reasons: list[str | None] = []

    def body() -> None:
        try:
            with host.run("generate-report", report("r9"), run_id="r9-run") as run:
                entered.set()
                run.sleep(30)
        except RunCancelled as exc:
            reasons.append(exc.reason)

    thread = threading.Thread(target=body)
    thread.start()
    assert entered.wait(5)
    host.stop()
    thread.join(5)
    assert reasons == ["worker shutdown"]
    info = sync_client.wait("r9-run", timeout=5)
    assert (info.status, info.cancel_reason) == ("cancelled", "worker shutdown")


@pytest.mark.anyio
async def test_a_declared_function_has_no_trigger_group_and_its_trigger_starts_nothing(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    """``worker.declare``: a function whose runs only their callers hold, served by a
    plain worker too (which consumes triggers for its other functions)."""
    worker = make_worker(redis_url, namespace)
    fn = worker.functions["generate-report"]
    assert fn.held
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        async with Client(redis_url, namespace=namespace) as client:
            event_id = await client.send(TRIGGER, {"reportId": "d1"})
            groups = await redis.xinfo_groups(Keys(namespace).events)
            assert "fn:reports/generate-report" not in {group["name"] for group in groups}
            await anyio.sleep(0.3)
            assert await client.runs_for_event(event_id) == []
            # Its runs are the ones callers hold.
            async with worker.run("generate-report", Event(name=TRIGGER)) as ctx:
                assert (await client.get_run(ctx.run_id)).status == "running"  # type: ignore[union-attr]
        tg.cancel_scope.cancel()
