"""What a cancelled run does at run time: cancel modes, shielded steps, the on_cancel
hook, thread steps, and runs that are never resumed. In-process worker, real Redis."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import structlog
from redis.asyncio import Redis

from sdk import (
    CancelOn,
    Client,
    ConfigurationError,
    DuplicateRunError,
    Event,
    RunCancelled,
    RunContext,
    Worker,
)
from sdk.context import CANCEL_MODES
from sdk.function import canonical_config
from sdk.keys import Keys
from sdk.runner import INTERRUPTED_REASON, SHUTDOWN_REASON
from sdk.scripts import Registered, RegisterRequest
from sdk.store import RunStore
from sdk.triggers import triggered_run_id
from sdk.wire import config_hash
from tests.helpers import run_of, status_is, wait_until

pytestmark = pytest.mark.anyio

TRIGGER = "report/generate.requested"
RULE = CancelOn(event="report/cancel.requested", match="data.reportId")


async def test_the_record_carries_abandoned_thread_and_on_cancel_error(
    redis: Redis, namespace: str
) -> None:
    store = RunStore(redis, Keys(namespace))
    event = Event(name="x/requested", data={}, id="1-0")
    for run_id in ("plain", "marked"):
        registration = await store.register(
            RegisterRequest(
                run_id=run_id,
                app_id="reports",
                function_id="f",
                config_hash="c",
                worker_id="w1",
                event=event,
                entries=[],
            )
        )
        assert isinstance(registration, Registered)
    await store.finish("plain", "cancelled", [], app_id="reports", function_id="f", worker_id="w1")
    await store.finish(
        "marked",
        "cancelled",
        [],
        app_id="reports",
        function_id="f",
        worker_id="w1",
        abandoned_thread=True,
        on_cancel_error="ValueError: boom",
    )
    plain, marked = await store.get("plain"), await store.get("marked")
    assert plain is not None
    assert marked is not None
    assert (plain.abandoned_thread, plain.on_cancel_error) == (False, None)
    assert (marked.abandoned_thread, marked.on_cancel_error) == (True, "ValueError: boom")


# -- cancel modes ---------------------------------------------------------------------


def modes_worker(redis_url: str, namespace: str, **options: Any) -> Worker:
    """A worker declaring ``immediate`` and ``between-steps``, same trigger and rule."""
    worker = Worker("reports", redis_url, namespace=namespace, **options)
    for mode in CANCEL_MODES:

        @worker.function(
            id=mode.replace("_", "-"), trigger=TRIGGER, cancel_on=[RULE], cancel_mode=mode
        )
        async def body(ctx: RunContext) -> None:
            await anyio.sleep(60)

    return worker


@pytest.fixture
async def worker(redis_url: str, namespace: str) -> AsyncIterator[Worker]:
    async with modes_worker(redis_url, namespace) as worker:
        yield worker


def report_event(report_id: str = "r1") -> Event:
    return Event(name=TRIGGER, data={"reportId": report_id})


async def cancel_when(
    client: Client, ctx: RunContext, ready: Callable[[], bool], reason: str = "user"
) -> None:
    """Cancel the run by id (no broker needed) once ``ready()``, and wait until received."""
    await wait_until(lambda: _now(ready()))
    await client.cancel(ctx.run_id, reason=reason)
    await wait_until(lambda: _now(ctx.cancelled))


async def _now(value: bool) -> bool:
    return value


async def test_cancel_mode_is_checked_and_is_part_of_the_config_hash() -> None:
    worker = Worker("reports", "redis://localhost:1/0")
    for mode in CANCEL_MODES:
        fn = worker.function(id=f"f-{mode}", trigger=TRIGGER, cancel_mode=mode)(_sleep_body)
        assert (fn.cancel_mode, fn.config.cancel_mode) == (mode, mode)
    immediate, between = (canonical_config("f", TRIGGER, (), mode) for mode in CANCEL_MODES)
    assert config_hash(immediate) != config_hash(between)
    # The default is today's behaviour, with today's hash.
    assert config_hash(canonical_config("f", TRIGGER, ())) == config_hash(immediate)
    with pytest.raises(ConfigurationError, match="cancel_mode"):
        worker.function(id="f", trigger=TRIGGER, cancel_mode="later")(_sleep_body)  # type: ignore[arg-type]


async def _sleep_body(ctx: RunContext) -> None:
    await anyio.sleep(60)


async def test_immediate_mode_interrupts_the_awaited_step_within_milliseconds(
    worker: Worker, client: Client
) -> None:
    sent_at: list[float] = []

    async def cancel_in_step(ctx: RunContext) -> None:
        await wait_until(lambda: _now(ctx.step.current == "llm"))
        sent_at.append(time.monotonic())
        await client.cancel(ctx.run_id)

    with pytest.raises(RunCancelled):
        async with (
            worker.run("immediate", report_event()) as ctx,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(cancel_in_step, ctx)
            try:
                await ctx.step.run("llm", anyio.sleep, 60)
            finally:
                stopped_at = time.monotonic()
    # A request to Redis, a signal back: milliseconds, nowhere near the step's 60 s.
    assert stopped_at - sent_at[0] < 0.1
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_between_steps_finishes_the_step_in_flight_and_stops_at_the_next(
    worker: Worker, client: Client
) -> None:
    done: list[str] = []
    seen_by_next: list[BaseException] = []

    async def first(ctx: RunContext) -> str:
        await anyio.sleep(0.3)  # the cancel arrives meanwhile
        done.append(f"first finished, cancelled={ctx.cancelled}")
        return "draft"

    async def second() -> None:
        done.append("second ran")  # pragma: no cover - must not run

    with pytest.raises(RunCancelled) as caught:
        async with (
            worker.run("between-steps", report_event()) as ctx,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(cancel_when, client, ctx, lambda: ctx.step.current == "first")
            assert await ctx.step.run("first", first, ctx) == "draft"
            try:
                await ctx.step.run("second", second)
            except BaseException as exc:
                seen_by_next.append(exc)
                raise
    assert done == ["first finished, cancelled=True"]
    assert isinstance(seen_by_next[0], anyio.get_cancelled_exc_class())
    assert caught.value.reason == "user"
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_between_steps_leaves_awaits_outside_steps_and_a_return_is_cancelled(
    worker: Worker, client: Client
) -> None:
    slept = False
    with pytest.raises(RunCancelled):
        async with worker.run("between-steps", report_event()) as ctx:
            await client.cancel(ctx.run_id)
            await wait_until(lambda: _now(ctx.cancelled))
            await anyio.sleep(0.05)  # not a step: not interrupted
            slept = True
            # Returns without another step: received the cancel, so never "completed".
    assert slept
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_between_steps_runs_are_interrupted_at_once_when_the_worker_shuts_down(
    redis_url: str, namespace: str, client: Client
) -> None:
    worker = modes_worker(redis_url, namespace, shutdown_timeout=0.05)
    default = signal.getsignal(signal.SIGTERM)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.serve)
            event_id = await client.send(TRIGGER, {"reportId": "r1"})

            async def both_running() -> bool:
                runs = await client.runs_for_event(event_id)
                return len(runs) == 2 and all(run.status == "running" for run in runs)

            await wait_until(both_running)
            # serve()'s SIGTERM handler must be installed before the signal is sent.
            await wait_until(lambda: _now(signal.getsignal(signal.SIGTERM) is not default))
            started = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
    assert time.monotonic() - started < 1  # the 60 s steps were not let finish
    runs = await client.runs_for_event(event_id)
    assert sorted(run.function_id for run in runs) == ["between-steps", "immediate"]
    for run in runs:
        assert (run.status, run.cancel_reason) == ("cancelled", SHUTDOWN_REASON)


async def test_ctx_cancelled_is_true_on_receipt_in_both_modes(
    worker: Worker, client: Client
) -> None:
    for function_id in ("immediate", "between-steps"):
        with pytest.raises(RunCancelled):
            async with worker.run(function_id, report_event()) as ctx:
                assert not ctx.cancelled
                with anyio.CancelScope(shield=True):  # observe without being interrupted
                    await client.cancel(ctx.run_id, reason="r")
                    await wait_until(lambda: _now(ctx.cancelled))
                assert ctx.cancel_reason == "r"


# -- shielded steps ---------------------------------------------------------------------


async def test_a_shielded_step_completes_and_the_cancel_takes_effect_when_it_returns(
    worker: Worker, client: Client
) -> None:
    events: list[str] = []

    async def charge(amount: int) -> str:
        await anyio.sleep(0.3)  # the cancel arrives meanwhile
        events.append(f"charged {amount}")
        return "receipt"

    started = time.monotonic()
    with pytest.raises(RunCancelled):
        async with (
            worker.run("immediate", report_event()) as ctx,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(cancel_when, client, ctx, lambda: ctx.step.current == "pay")
            try:
                await ctx.step.run("pay", charge, 42, shield=True)
                events.append("after the step")  # pragma: no cover - must not run
            except anyio.get_cancelled_exc_class():
                events.append(f"cancelled on return, cancelled={ctx.cancelled}")
                raise
    assert events == ["charged 42", "cancelled on return, cancelled=True"]
    assert 0.3 <= time.monotonic() - started < 1.5
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_step_keywords_go_to_the_function_except_shield(worker: Worker) -> None:
    def echo(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return args, kwargs

    async with worker.run("immediate", report_event()) as ctx:
        # ``name`` and ``fn`` are positional-only: a step function may take them as keywords.
        got = await ctx.step.run("echo", echo, 1, name="n", fn="f", shield=True)
        assert got == ((1,), {"name": "n", "fn": "f"})
        assert await ctx.step.run("echo", echo, shield=False) == ((), {})


# -- the on_cancel hook -----------------------------------------------------------------


def hooked_worker(
    redis_url: str, namespace: str, hook: Any, **on_cancel: float
) -> tuple[Worker, list[str]]:
    """A worker whose ``generate-report`` body sleeps 60 s (noting when it stops)."""
    worker = Worker("reports", redis_url, namespace=namespace)
    log: list[str] = []

    @worker.function(id="generate-report", trigger=TRIGGER, cancel_on=[RULE])
    async def generate_report(ctx: RunContext) -> None:
        try:
            await ctx.step.run("llm", anyio.sleep, 60)
        finally:
            log.append("body stopped")

    generate_report.on_cancel(**on_cancel)(hook)
    return worker, log


async def test_on_cancel_runs_with_ctx_and_reason_after_the_body_and_before_the_record(
    redis_url: str, namespace: str, client: Client
) -> None:
    async def cleanup(ctx: RunContext, reason: str) -> None:
        await anyio.sleep(0.05)  # shielded: the run's cancel does not stop the hook
        info = await client.get_run(ctx.run_id)
        assert info is not None
        log.append(f"cleanup {ctx.function_id} {reason!r}, run is {info.status}")

    worker, log = hooked_worker(redis_url, namespace, cleanup)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)  # a triggered run: the worker's own execution path
        run_id = await run_of(client, await client.send(TRIGGER, {"reportId": "r1"}))
        await wait_until(lambda: _now(bool(worker.active_runs)))
        await client.cancel(run_id, reason="user clicked cancel")
        await wait_until(lambda: status_is(client, run_id, "cancelled"), timeout=2)
        tg.cancel_scope.cancel()
    assert log == [
        "body stopped",
        # Still "cancelling" while the hook runs: the outcome is recorded after it.
        "cleanup generate-report 'user clicked cancel', run is cancelling",
    ]
    info = await client.get_run(run_id)
    assert info is not None
    assert info.on_cancel_error is None


async def test_a_failing_on_cancel_is_recorded_and_the_run_stays_cancelled(
    redis_url: str, namespace: str, client: Client
) -> None:
    async def cleanup(ctx: RunContext, reason: str) -> None:
        raise ValueError("boom")

    worker, _ = hooked_worker(redis_url, namespace, cleanup)
    async with worker:
        with pytest.raises(RunCancelled):  # not the hook's ValueError
            async with worker.run("generate-report", report_event()) as ctx:
                await client.cancel(ctx.run_id)
                await anyio.sleep(60)
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert (info.status, info.on_cancel_error) == ("cancelled", "ValueError: boom")


async def test_an_on_cancel_past_its_deadline_is_recorded_and_the_run_stays_cancelled(
    redis_url: str, namespace: str, client: Client
) -> None:
    async def cleanup(ctx: RunContext, reason: str) -> None:
        await anyio.sleep(60)

    worker, _ = hooked_worker(redis_url, namespace, cleanup, timeout=0.1)
    started = time.monotonic()
    async with worker:
        with pytest.raises(RunCancelled):
            async with worker.run("generate-report", report_event()) as ctx:
                await client.cancel(ctx.run_id)
                await anyio.sleep(60)
    assert time.monotonic() - started < 1
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert info.status == "cancelled"
    assert info.on_cancel_error == "TimeoutError: on_cancel did not finish within 0.1 s"


async def test_on_cancel_runs_for_a_block_cancelled_from_outside(
    redis_url: str, namespace: str, client: Client
) -> None:
    reasons: list[str] = []

    async def cleanup(ctx: RunContext, reason: str) -> None:
        await anyio.sleep(0.01)  # shielded from the outer cancel too
        reasons.append(reason)

    worker, _ = hooked_worker(redis_url, namespace, cleanup)
    async with worker:
        with anyio.move_on_after(0.05):  # e.g. a request timeout around the block
            async with worker.run("generate-report", report_event()) as ctx:
                await anyio.sleep(60)
    assert reasons == [INTERRUPTED_REASON]
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_on_cancel_does_not_run_for_runs_that_were_not_cancelled(
    redis_url: str, namespace: str, client: Client
) -> None:
    async def cleanup(ctx: RunContext, reason: str) -> None:
        log.append("cleanup")  # pragma: no cover - must not run

    worker, log = hooked_worker(redis_url, namespace, cleanup)
    async with worker:
        async with worker.run("generate-report", report_event()):
            pass
        with pytest.raises(ZeroDivisionError):
            async with worker.run("generate-report", report_event()):
                _ = 1 / 0
    assert log == []


def test_on_cancel_is_checked_at_definition() -> None:
    worker = Worker("reports", "redis://localhost:1/0")
    fn = worker.function(id="f", trigger=TRIGGER)(_sleep_body)

    async def cleanup(ctx: RunContext, reason: str) -> None:
        pass

    assert fn.on_cancel(cleanup) is cleanup  # the bare form returns the hook
    assert fn.cancel_hook is not None
    assert (fn.cancel_hook.hook, fn.cancel_hook.timeout) == (cleanup, 30.0)
    with pytest.raises(ConfigurationError, match="already has an on_cancel hook"):
        fn.on_cancel(timeout=5)(cleanup)

    other = worker.function(id="g", trigger=TRIGGER)(_sleep_body)
    with pytest.raises(ConfigurationError, match="async def"):
        other.on_cancel(lambda ctx, reason: None)  # type: ignore[arg-type,return-value]
    for timeout in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigurationError, match="timeout"):
            other.on_cancel(timeout=timeout)
    other.on_cancel(timeout=10)(cleanup)
    assert other.cancel_hook is not None
    assert other.cancel_hook.timeout == 10.0
    # Attaching a hook changes nothing of what the function declares.
    assert other.config_hash == config_hash(canonical_config("g", TRIGGER, ()))


# -- thread steps -----------------------------------------------------------------------


def polls_check(ctx: RunContext, seen: list[str]) -> str:
    """A CPU-bound loop in the shape of the seeds' ``shouldCancel`` polling."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen.append(f"cancelled={ctx.cancelled}") if not seen else None  # read in the thread
        try:
            ctx.check()
        except RunCancelled:
            seen.append(f"stopped, cancelled={ctx.cancelled}")
            raise
        time.sleep(0.005)
    return "ran to the end"  # pragma: no cover - the cancel must stop it


@pytest.mark.parametrize("function_id", ["immediate", "between-steps"])
async def test_a_thread_step_polling_check_stops_and_the_body_sees_the_cancellation(
    redis_url: str, namespace: str, client: Client, function_id: str
) -> None:
    # In between_steps mode nothing interrupts the step: only the thread's own
    # RunCancelled, which must still reach the body as the cancellation.
    seen: list[str] = []
    caught: list[BaseException] = []
    async with modes_worker(redis_url, namespace, thread_grace=5) as worker:
        started = time.monotonic()
        with pytest.raises(RunCancelled):
            async with (
                worker.run(function_id, report_event()) as ctx,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(cancel_when, client, ctx, lambda: bool(seen))
                try:
                    await ctx.step.run("crunch", polls_check, ctx, seen)
                except Exception as exc:  # pragma: no cover - the trap
                    pytest.fail(f"the thread's RunCancelled surfaced as {exc!r}")
                except BaseException as exc:
                    caught.append(exc)
                    raise
    assert time.monotonic() - started < 1  # within the grace, not after it
    assert seen == ["cancelled=False", "stopped, cancelled=True"]
    assert isinstance(caught[0], anyio.get_cancelled_exc_class())
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert (info.status, info.abandoned_thread, info.error) == ("cancelled", False, None)


async def test_a_thread_that_ignores_the_cancel_is_abandoned_after_the_grace(
    redis_url: str, namespace: str, client: Client
) -> None:
    release = threading.Event()  # lets the abandoned thread end with the test
    results: list[str] = []
    sent_at: list[float] = []

    def ignores_cancel() -> str:
        release.wait(10)
        results.append("returned")
        return "late"

    async def cancel_in_step(ctx: RunContext) -> None:
        await wait_until(lambda: _now(ctx.step.current == "x"))
        sent_at.append(time.monotonic())
        await client.cancel(ctx.run_id)

    try:
        async with modes_worker(redis_url, namespace, thread_grace=0.2) as worker:
            with pytest.raises(RunCancelled):
                async with (
                    worker.run("immediate", report_event()) as ctx,
                    anyio.create_task_group() as tg,
                ):
                    tg.start_soon(cancel_in_step, ctx)
                    await ctx.step.run("x", ignores_cancel)
                    pytest.fail("the run carried on after a cancel")  # pragma: no cover
            stopped = time.monotonic()
    finally:
        release.set()
    assert 0.2 <= stopped - sent_at[0] < 1  # waited the grace, then let the thread go
    assert results == []  # abandoned while still running
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert (info.status, info.abandoned_thread) == ("cancelled", True)


async def test_a_thread_step_that_returns_within_the_grace_is_not_abandoned(
    redis_url: str, namespace: str, client: Client
) -> None:
    async with modes_worker(redis_url, namespace, thread_grace=2) as worker:
        started = time.monotonic()
        with pytest.raises(RunCancelled):
            async with (
                worker.run("immediate", report_event()) as ctx,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(cancel_when, client, ctx, lambda: ctx.step.current == "x")
                await ctx.step.run("x", time.sleep, 0.3)  # does not poll, but ends in time
    assert 0.3 <= time.monotonic() - started < 1.5
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert (info.status, info.abandoned_thread) == ("cancelled", False)


async def test_between_steps_a_thread_step_runs_to_its_end(
    redis_url: str, namespace: str, client: Client
) -> None:
    done: list[str] = []

    def work(ctx: RunContext) -> str:
        time.sleep(0.4)  # past the grace: in between_steps mode there is no grace to run out
        done.append(f"finished, cancelled={ctx.cancelled}")
        return "result"

    async with modes_worker(redis_url, namespace, thread_grace=0.05) as worker:
        with pytest.raises(RunCancelled):
            async with (
                worker.run("between-steps", report_event()) as ctx,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(cancel_when, client, ctx, lambda: ctx.step.current == "x")
                assert await ctx.step.run("x", work, ctx) == "result"
                await ctx.step.run("next", anyio.sleep, 0)
    assert done == ["finished, cancelled=True"]
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert (info.status, info.abandoned_thread) == ("cancelled", False)


async def test_check_outside_a_step_ends_the_run_cancelled_not_failed(
    worker: Worker, client: Client
) -> None:
    with pytest.raises(RunCancelled):
        async with worker.run("between-steps", report_event()) as ctx:
            ctx.check()  # nothing received yet: no-op
            await client.cancel(ctx.run_id)
            await wait_until(lambda: _now(ctx.cancelled))
            ctx.check()
    info = await client.get_run(ctx.run_id)
    assert info is not None
    assert (info.status, info.error) == ("cancelled", None)


def test_thread_grace_is_checked() -> None:
    for grace in (-1, float("nan")):
        with pytest.raises(ConfigurationError, match="thread_grace"):
            Worker("reports", "redis://localhost:1/0", thread_grace=grace)
    assert Worker("reports", "redis://localhost:1/0", thread_grace=0).thread_grace == 0


# -- level-triggered, never resumed -----------------------------------------------------


@pytest.mark.parametrize("function_id", ["immediate", "between-steps"])
async def test_a_body_that_swallows_the_cancel_is_cancelled_again(
    worker: Worker, client: Client, function_id: str
) -> None:
    swallowed = 0
    with pytest.raises(RunCancelled):
        async with worker.run(function_id, report_event()) as ctx:
            with anyio.CancelScope(shield=True):  # receive it before the first step
                await client.cancel(ctx.run_id)
                await wait_until(lambda: _now(ctx.cancelled))
            for _ in range(3):
                try:
                    await ctx.step.run("llm", anyio.sleep, 60)
                except BaseException:
                    swallowed += 1
            # Level-triggered, in between_steps mode too once interrupted: not a step,
            # and it raises all the same.
            await anyio.sleep(60)
            pytest.fail("the run carried on after a cancel")  # pragma: no cover
    assert swallowed == 3
    assert await status_is(client, ctx.run_id, "cancelled")


@pytest.mark.parametrize("function_id", ["immediate", "between-steps"])
async def test_a_body_that_swallows_the_cancel_and_returns_is_recorded_cancelled(
    worker: Worker, client: Client, function_id: str
) -> None:
    with pytest.raises(RunCancelled):
        async with worker.run(function_id, report_event()) as ctx:
            with anyio.CancelScope(shield=True):
                await client.cancel(ctx.run_id)
                await wait_until(lambda: _now(ctx.cancelled))
            try:
                await ctx.step.run("llm", anyio.sleep, 60)
            except BaseException:
                pass  # and returns
    assert await status_is(client, ctx.run_id, "cancelled")


async def test_a_cancelled_run_id_cannot_be_started_again(
    redis_url: str, namespace: str, worker: Worker, client: Client
) -> None:
    with pytest.raises(RunCancelled):
        async with worker.run("immediate", report_event(), run_id="job-1") as ctx:
            await client.cancel(ctx.run_id)
            await anyio.sleep(60)
    with pytest.raises(DuplicateRunError) as caught:
        async with worker.run("immediate", report_event(), run_id="job-1"):
            pytest.fail("a cancelled run was resumed")  # pragma: no cover
    assert caught.value.status == "cancelled"
    # Nor by another worker (a retry elsewhere, after a restart).
    async with modes_worker(redis_url, namespace) as other:
        with pytest.raises(DuplicateRunError) as caught:
            async with other.run("between-steps", report_event(), run_id="job-1"):
                pytest.fail("a cancelled run was resumed")  # pragma: no cover
    assert caught.value.status == "cancelled"
    assert await status_is(client, "job-1", "cancelled")


async def test_a_trigger_delivered_again_after_its_run_was_cancelled_starts_no_run(
    redis_url: str, namespace: str, client: Client, redis: Redis
) -> None:
    worker = Worker("reports", redis_url, namespace=namespace)
    started: list[str] = []

    @worker.function(id="generate-report", trigger=TRIGGER, cancel_on=[RULE])
    async def generate_report(ctx: RunContext) -> None:
        started.append(ctx.event.data["reportId"])
        await anyio.sleep(60)

    keys = Keys(namespace)
    group = keys.function_group("reports", "generate-report")

    async def all_acknowledged() -> bool:
        return bool((await redis.xpending(keys.events, group))["pending"] == 0)

    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.serve)
            first = await client.send(TRIGGER, {"reportId": "r1"})
            run_id = await run_of(client, first)
            assert run_id == triggered_run_id(keys, "reports", "generate-report", first)
            await wait_until(lambda: _now(started == ["r1"]))
            await client.cancel(run_id)
            await wait_until(lambda: status_is(client, run_id, "cancelled"))
            # Deliver the trigger again, as a reset or restored consumer group would; a
            # new trigger wakes the worker's blocked read, which then gets both.
            await redis.xgroup_setid(keys.events, group, "0")
            second = await client.send(TRIGGER, {"reportId": "r2"})
            await run_of(client, second)
            await wait_until(all_acknowledged)
            tg.cancel_scope.cancel()
    runs = await client.runs_for_event(first)
    assert [(run.run_id, run.status) for run in runs] == [(run_id, "cancelled")]
    assert started == ["r1", "r2"]
    assert {"event": "run.duplicate_trigger", "run_id": run_id, "status": "cancelled"} in [
        {key: entry.get(key) for key in ("event", "run_id", "status")} for entry in logs
    ]
