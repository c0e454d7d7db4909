"""The worker in this process against a real Redis: how a run stops, what it records."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.queues
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import structlog

from sdk import (
    CancelOn,
    Client,
    DuplicateRunError,
    Event,
    InvalidIdError,
    RunCancelled,
    RunContext,
    UnknownFunctionError,
    Worker,
    WorkerNotStartedError,
    loop_watch,
)
from sdk.metrics import WorkerMetrics
from sdk.reconcile import RecentOutcomes, RecordedOutcome
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio

CANCEL_RULE = CancelOn(event="report/cancel.requested", match="data.reportId")


def make_worker(redis_url: str, namespace: str, **options: Any) -> Worker:
    worker = Worker("reports", redis_url, namespace=namespace, **options)

    @worker.function(
        id="generate-report", trigger="report/generate.requested", cancel_on=[CANCEL_RULE]
    )
    async def generate_report(ctx: RunContext) -> None:
        await anyio.sleep(60)

    return worker


@pytest.fixture
async def worker(redis_url: str, namespace: str) -> AsyncIterator[Worker]:
    async with make_worker(redis_url, namespace) as worker:
        yield worker


def report_event(report_id: str) -> Event:
    return Event(name="report/generate.requested", data={"reportId": report_id})


async def test_cancel_by_id_interrupts_the_awaited_call(worker: Worker, client: Client) -> None:
    seen: dict[str, object] = {}

    async def cancel_soon(run_id: str) -> None:
        await anyio.sleep(0.05)
        # Shielded: this task lives inside the run it cancels, whose cancellation may arrive
        # before the reply does (in an app, the cancel comes from outside the run).
        with anyio.CancelScope(shield=True):
            seen["result"] = await client.cancel(run_id, reason="user clicked cancel")

    started = time.monotonic()
    with pytest.raises(RunCancelled) as caught:
        async with (
            worker.run("generate-report", report_event("r1")) as ctx,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(cancel_soon, ctx.run_id)
            try:
                await ctx.step.run("llm", anyio.sleep, 60)
            except Exception:  # pragma: no cover - the trap: must not catch a cancel
                pytest.fail("a cancellation was caught by `except Exception`")
    assert time.monotonic() - started < 5
    assert caught.value.reason == "user clicked cancel"
    result = seen["result"]
    assert result.outcome == "signalled"  # type: ignore[attr-defined]
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert info.status == "cancelled"
    assert info.cancel_reason == "user clicked cancel"
    assert info.cancelled_by == "api"
    assert info.finished_at is not None


async def test_a_cancelled_body_goes_before_the_acknowledgement_of_its_signal(
    worker: Worker, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's bookkeeping of a signal (its log lines, the acknowledgement's script)
    waits until the runs it cancelled have seen their cancellation: it costs them no
    latency."""
    order: list[str] = []
    acknowledge = worker._acknowledge

    async def acknowledged(*args: Any) -> None:
        order.append("acknowledged")
        await acknowledge(*args)

    monkeypatch.setattr(worker, "_acknowledge", acknowledged)
    run_ids: list[str] = []
    started = anyio.Event()

    async def run() -> None:
        with pytest.raises(RunCancelled):
            async with worker.run("generate-report", report_event("r1")) as ctx:
                run_ids.append(ctx.run_id)
                started.set()
                try:
                    await anyio.sleep(60)
                finally:
                    order.append("body")

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await started.wait()
        await client.cancel(run_ids[0])

    async def both() -> bool:
        return len(order) == 2

    await wait_until(both, timeout=5)
    assert order == ["body", "acknowledged"]


async def test_a_body_that_swallows_the_cancel_is_cancelled_again(
    worker: Worker, client: Client
) -> None:
    swallowed = 0
    with pytest.raises(RunCancelled):
        async with worker.run("generate-report", report_event("r1")) as ctx:
            # Shielded: the signal may arrive before the cancel's own reply, and the body
            # must meet it at the awaits below, the ones it swallows.
            with anyio.CancelScope(shield=True):
                await client.cancel(ctx.run_id)
            for _ in range(3):
                try:
                    await anyio.sleep(60)
                except BaseException:
                    swallowed += 1
            await anyio.sleep(60)  # level-triggered: this raises again
            pytest.fail("the run carried on after a cancel")
    assert swallowed == 3
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert info.status == "cancelled"


async def test_a_body_that_returns_after_a_cancel_is_recorded_cancelled(
    worker: Worker, client: Client
) -> None:
    with pytest.raises(RunCancelled):
        async with worker.run("generate-report", report_event("r1")) as ctx:
            await client.cancel(ctx.run_id)
            try:
                await anyio.sleep(60)
            except BaseException:
                pass  # returns without awaiting again: still not "completed"
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert info.status == "cancelled"


async def test_completed_run_is_final(worker: Worker, client: Client) -> None:
    async with worker.run("generate-report", report_event("r1")) as ctx:
        pass
    result = await client.cancel(ctx.run_id)
    assert result.outcome == "already_completed"
    assert result.status == "completed"
    assert not result.accepted
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert info.status == "completed"


async def test_failed_body_records_the_error(worker: Worker, client: Client) -> None:
    with pytest.raises(ZeroDivisionError):
        async with worker.run("generate-report", report_event("r1")) as ctx:
            _ = 1 / 0
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert info.status == "failed"
    assert info.error == "ZeroDivisionError: division by zero"


async def test_a_cancel_of_a_run_not_registered_yet_is_kept(
    client: Client, redis_url: str, namespace: str
) -> None:
    result = await client.cancel("no-such-run")
    assert (result.outcome, result.status, result.accepted) == ("pending", None, True)
    assert result.kept_until is not None
    kept_for = result.kept_until - datetime.now(UTC)
    assert timedelta(minutes=9) < kept_for <= timedelta(minutes=10, seconds=1)
    assert await client.get_run("no-such-run") is None
    # Keeping off: nothing is kept, and the answer says there is no such run.
    async with Client(redis_url, namespace=namespace, pending_cancel_lookback=0) as keeps_none:
        result = await keeps_none.cancel("another-run")
    assert (result.outcome, result.kept_until, result.accepted) == ("not_found", None, False)


async def test_sync_step_is_abandoned_on_cancel(
    redis_url: str, namespace: str, client: Client
) -> None:
    started = time.monotonic()
    # No grace: the thread is abandoned the moment the run is cancelled (test_modes.py
    # covers the grace).
    with pytest.raises(RunCancelled):
        async with (
            make_worker(redis_url, namespace, thread_grace=0) as worker,
            worker.run("generate-report", report_event("r1")) as ctx,
            anyio.create_task_group() as tg,
        ):

            async def cancel_soon() -> None:
                await anyio.sleep(0.05)
                await client.cancel(ctx.run_id)

            tg.start_soon(cancel_soon)
            await ctx.step.run("blocking", time.sleep, 2)
    assert time.monotonic() - started < 1.5


async def test_run_needs_a_started_worker(redis_url: str, namespace: str) -> None:
    worker = make_worker(redis_url, namespace)
    with pytest.raises(WorkerNotStartedError):
        async with worker.run("generate-report", report_event("r1")):
            pass


async def test_run_of_unknown_function(worker: Worker) -> None:
    with pytest.raises(UnknownFunctionError):
        async with worker.run("nope", report_event("r1")):
            pass


async def test_same_run_id_twice_is_refused(worker: Worker) -> None:
    async with worker.run("generate-report", report_event("r1"), run_id="fixed-id"):
        with pytest.raises(DuplicateRunError):
            async with worker.run("generate-report", report_event("r1"), run_id="fixed-id"):
                pass
    with pytest.raises(DuplicateRunError) as caught:
        async with worker.run("generate-report", report_event("r1"), run_id="fixed-id"):
            pass
    assert caught.value.status == "completed"


@pytest.mark.parametrize("freeze_gc", [True, False])
async def test_a_serving_worker_keeps_the_startup_objects_out_of_full_collections(
    redis_url: str, namespace: str, freeze_gc: bool
) -> None:
    """A busy worker's full collections scanned the process's startup objects each time
    (tens of ms, every run stopped): ``serve`` freezes them, and unfreezes them when it
    returns."""
    assert gc.get_freeze_count() == 0
    worker = make_worker(redis_url, namespace, freeze_gc=freeze_gc)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        frozen = gc.get_freeze_count()
        tg.cancel_scope.cancel()
    assert (frozen > 10_000) if freeze_gc else (frozen == 0)
    assert gc.get_freeze_count() == 0


def test_the_outcomes_a_worker_remembers_are_not_scanned_by_the_garbage_collector() -> None:
    """A busy worker remembers thousands of recent outcomes (RECENT_OUTCOMES_KEPT) for its
    reconciliation; none can be part of a cycle, and a full collection need not visit them."""
    recent = RecentOutcomes()
    outcome = RecordedOutcome("r1", 0, "generate", "completed", ("{cancel}:idx:a",))
    recent.remember(outcome)
    assert not gc.is_tracked(outcome)
    assert recent.get("r1") == outcome


async def test_serve_runs_triggers_and_cancel_events_stop_them(
    redis_url: str, namespace: str, client: Client, broker: object
) -> None:
    worker = make_worker(redis_url, namespace)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        e1 = await client.send("report/generate.requested", {"reportId": "r1"})
        e2 = await client.send("report/generate.requested", {"reportId": "r2"})

        async def both_running() -> bool:
            runs = [*await client.runs_for_event(e1), *await client.runs_for_event(e2)]
            return len(runs) == 2 and all(r.status == "running" for r in runs)

        await wait_until(both_running)
        cancel_id = await client.send("report/cancel.requested", {"reportId": "r1"})
        (r1,) = await client.runs_for_event(e1)

        async def r1_cancelled() -> bool:
            info = await client.get_run(r1.run_id)
            return info is not None and info.status == "cancelled"

        await wait_until(r1_cancelled, timeout=5)
        info = await client.get_run(r1.run_id)
        assert info is not None
        assert info.cancelled_by == cancel_id
        (r2,) = await client.runs_for_event(e2)
        assert r2.status == "running"
        tg.cancel_scope.cancel()
    (r2,) = await client.runs_for_event(e2)
    assert r2.status == "cancelled"
    assert r2.cancel_reason == "worker shutdown"


async def test_ids_are_checked_before_they_become_keys(worker: Worker, client: Client) -> None:
    with pytest.raises(InvalidIdError):
        await client.get_run("run id with spaces")
    with pytest.raises(InvalidIdError):
        await client.cancel("x" * 200)
    with pytest.raises(InvalidIdError):
        await client.runs_for_event("*")
    with pytest.raises(InvalidIdError):
        async with worker.run("generate-report", report_event("r1"), run_id="a b"):
            pass


_FORKED = Worker("reports", "redis://unused:1/0")


def _child_worker_id(queue: multiprocessing.queues.Queue[str]) -> None:
    queue.put(_FORKED.worker_id)


def test_a_worker_declared_before_a_fork_has_its_own_id_in_each_child() -> None:
    """Celery's prefork pool and gunicorn --preload import the app, then fork: a child that
    shared its parent's id would share its registration, and take its siblings' runs with
    it when it exits."""
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.queues.Queue[str] = context.Queue()
    children = [context.Process(target=_child_worker_id, args=(queue,)) for _ in range(2)]
    for child in children:
        child.start()
    ids = {queue.get(timeout=10) for _ in children}
    for child in children:
        child.join(10)
    assert len(ids) == 2
    assert _FORKED.worker_id not in ids
    assert Worker("reports", "redis://unused:1/0", worker_id="fixed").worker_id == "fixed"


async def test_the_loop_watch_heartbeats_a_blocked_loop_for_a_while_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop blocked briefly is kept live by the watchdog's heartbeats; one blocked longer
    than MAX_BLOCKED_S is stuck, and is let go (reaped as a dead worker). The lag is
    measured either way."""
    monkeypatch.setattr(loop_watch, "MAX_BLOCKED_S", 1.0)
    beats: list[float] = []
    metrics = WorkerMetrics()
    watch = loop_watch.LoopWatch(
        structlog.get_logger(),
        metrics,
        heartbeat=lambda: beats.append(time.monotonic()),
        heartbeat_interval=0.2,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        await anyio.sleep(0.3)
        blocked_at = time.monotonic()
        time.sleep(2.0)  # noqa: ASYNC251 - blocking the loop is the point
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    while_blocked = [beat - blocked_at for beat in beats]
    assert while_blocked, "no heartbeat while the loop was blocked"
    assert min(while_blocked) >= loop_watch.BLOCKED_S - loop_watch.TICK_S  # since its last tick
    assert max(while_blocked) < 1.0 + 2 * loop_watch.TICK_S  # then let go
    lag = metrics.loop_lag.collect()[0]
    largest = max(s.value for s in lag.samples if s.name.endswith("_sum"))
    assert largest >= 1.9
