"""Cancellation semantics with the broker and a worker in this process, where timing can be
controlled: rules with expressions and timeouts, tombstones in both orders, owners, bulk
cancels, cascades, the outcome event and races. (The same features across processes:
tests/test_end_to_end_semantics.py.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis

from broker import Broker
from broker.scripts import match_events
from sdk import (
    OPERATOR,
    RUN_CANCELLED_EVENT,
    CancelOn,
    Client,
    Event,
    RunCancelled,
    RunContext,
    RunInfo,
    RunNotFinishedError,
    Worker,
)
from sdk.keys import Keys
from sdk.partitions import Partitions
from sdk.rules import index_entries, lookups
from sdk.scripts import Registered, RegisterRequest
from sdk.store import RunStore
from sdk.wire import decode_event, entry_id_of
from tests.helpers import (
    broker_drained,
    partition_keys,
    run_of,
    serving,
    status_is,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.topologies]

REPORT_RULE = CancelOn(event="report/cancel.requested", match="data.reportId")
#: Cancel an account's runs of one tier: an expression only, no key to look up.
TIER_RULE = CancelOn(
    event="account/cancel-all",
    if_="event.data.accountId == async.data.accountId && async.data.tier == event.data.tier",
)
#: Both a key and an expression: the same report, and only if the cancel is "hard".
HARD_RULE = CancelOn(event="report/stop", match="data.reportId", if_="async.data.hard == true")
SHORT_RULE = CancelOn(event="report/stop.early", match="data.reportId", timeout=0.4)
#: An expression that can fail: ``null > 100`` (no ``pages``) is a type error.
BIG_RULE = CancelOn(event="report/stop.big", match="data.reportId", if_="async.data.pages > 100")


def studio(redis_url: str, namespace: str, **options: Any) -> Worker:
    worker = Worker("studio", redis_url, namespace=namespace, **options)

    @worker.function(
        id="generate-report",
        trigger="report/generate.requested",
        cancel_on=[REPORT_RULE, TIER_RULE, HARD_RULE, SHORT_RULE, BIG_RULE],
        owner="data.accountId",
    )
    async def generate_report(ctx: RunContext) -> None:
        await anyio.sleep(float(ctx.event.data.get("seconds", 60)))

    @worker.function(id="project", trigger="project/start.requested")
    async def project(ctx: RunContext) -> None:
        for asset in ctx.event.data.get("assets", []):
            await ctx.spawn("asset/generate.requested", {"assetId": asset})
        await anyio.sleep(60)

    @worker.function(id="generate-asset", trigger="asset/generate.requested")
    async def generate_asset(ctx: RunContext) -> None:
        await anyio.sleep(60)

    return worker


@pytest.fixture
async def worker(redis_url: str, namespace: str, broker: Broker) -> AsyncIterator[Worker]:
    worker = studio(redis_url, namespace, shutdown_timeout=0.1)
    async with serving(worker.serve):
        yield worker


async def start(client: Client, report_id: str, **data: Any) -> str:
    data = {"reportId": report_id, "accountId": "a1", "tier": "free", **data}
    return await run_of(client, await client.send("report/generate.requested", data))


async def settle(redis: Redis, namespace: str) -> None:
    """Wait until the broker has handled everything published so far."""
    await wait_until(lambda: broker_drained(redis, namespace))


async def final(client: Client, run_id: str) -> RunInfo:
    return await client.wait(run_id, timeout=10)


async def outcome_events(redis: Redis, namespace: str) -> list[Event]:
    """The outcome events in every partition (once each: one a broker moved to its own
    partition keeps its id)."""
    events = {
        event.id: event
        for keys in partition_keys(namespace)
        for entry_id, fields in await redis.xrange(keys.events)
        if (event := decode_event(entry_id, fields, partition=keys.partition)).name
        == RUN_CANCELLED_EVENT
    }
    return list(events.values())


# -- rules -------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_an_expression_rule_cancels_only_the_runs_it_holds_for(
    client: Client, redis: Redis, namespace: str
) -> None:
    free, pro, other = (
        await start(client, "r1"),
        await start(client, "r2", tier="pro"),
        await start(client, "r3", accountId="a2"),
    )
    cancel_id = await client.send("account/cancel-all", {"accountId": "a1", "tier": "free"})
    cancelled = await final(client, free)
    assert (cancelled.status, cancelled.cancelled_by) == ("cancelled", cancel_id)
    await settle(redis, namespace)
    for run_id in (pro, other):
        assert await status_is(client, run_id, "running")


@pytest.mark.usefixtures("worker")
async def test_match_and_if_must_both_hold(client: Client, redis: Redis, namespace: str) -> None:
    run_id = await start(client, "r1")
    await client.send("report/stop", {"reportId": "r1", "hard": False})
    await client.send("report/stop", {"reportId": "r2", "hard": True})
    await settle(redis, namespace)
    assert await status_is(client, run_id, "running")
    await client.send("report/stop", {"reportId": "r1", "hard": True})
    assert (await final(client, run_id)).status == "cancelled"


@pytest.mark.usefixtures("worker")
async def test_an_expression_that_errors_never_matches_and_is_recorded(
    client: Client, redis: Redis, namespace: str, broker: Broker
) -> None:
    run_id = await start(client, "r1")
    # No "pages" in the cancel event: `null > 100` is a type error.
    await client.send("report/stop.big", {"reportId": "r1"})
    await settle(redis, namespace)
    info = await client.get_run(run_id)
    assert info is not None
    assert info.status == "running"
    assert info.rule_error is not None
    assert "report/stop.big" in info.rule_error
    assert "TypeError" in info.rule_error


@pytest.mark.usefixtures("worker")
async def test_a_rule_stops_listening_after_its_timeout(
    client: Client, redis: Redis, namespace: str
) -> None:
    early, late = await start(client, "r1"), await start(client, "r2")
    await client.send("report/stop.early", {"reportId": "r1"})
    assert (await final(client, early)).status == "cancelled"
    await anyio.sleep(0.5)  # SHORT_RULE listens for 0.4 s after a run started
    await client.send("report/stop.early", {"reportId": "r2"})
    await settle(redis, namespace)
    assert await status_is(client, late, "running")
    # The other rules still listen.
    await client.send("report/cancel.requested", {"reportId": "r2"})
    assert (await final(client, late)).status == "cancelled"


# -- tombstones: the cancel that arrives before the run registered ------------------------


async def test_a_cancel_handled_before_the_run_registers_cancels_it_at_once(
    redis_url: str, namespace: str, client: Client, redis: Redis, broker: Broker
) -> None:
    worker = studio(redis_url, namespace)
    async with worker:
        pass  # the function groups exist: triggers now wait in the stream for a worker
    trigger = await client.send("report/generate.requested", {"reportId": "r1"})
    cancel = await client.send("report/cancel.requested", {"reportId": "r1"})
    # "Regenerate" after the cancel: a newer trigger for the same report.
    regenerate = await client.send("report/generate.requested", {"reportId": "r1"})
    await settle(redis, namespace)  # the broker matched nothing: no run exists yet
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        old, new = await run_of(client, trigger), await run_of(client, regenerate)
        cancelled = await final(client, old)
        assert (cancelled.status, cancelled.cancelled_by) == ("cancelled", cancel)
        assert cancelled.cancel_reason is not None
        assert "arrived before the run registered" in cancelled.cancel_reason
        assert await status_is(client, new, "running")
        tg.cancel_scope.cancel()


async def test_tombstones_of_expression_rules_are_evaluated_by_the_worker(
    redis_url: str, namespace: str, client: Client, redis: Redis, broker: Broker
) -> None:
    worker = studio(redis_url, namespace)
    async with worker:
        pass
    free = await client.send(
        "report/generate.requested", {"reportId": "r1", "accountId": "a1", "tier": "free"}
    )
    pro = await client.send(
        "report/generate.requested", {"reportId": "r2", "accountId": "a1", "tier": "pro"}
    )
    await client.send("account/cancel-all", {"accountId": "a1", "tier": "free"})
    await settle(redis, namespace)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        assert (await final(client, await run_of(client, free))).status == "cancelled"
        assert await status_is(client, await run_of(client, pro), "running")
        tg.cancel_scope.cancel()


async def test_a_retried_registration_reports_expression_tombstones_again(
    redis: Redis, namespace: str
) -> None:
    """The worker evaluates a tombstone's expression after registering; if that failed
    (Redis went away in between), its retry must be told about the tombstone again."""
    store = RunStore(redis, Keys(namespace))
    data = {"accountId": "a1", "tier": "free"}
    trigger = Event(name="report/generate.requested", data=data, id="1-0")
    cancel = Event(name="account/cancel-all", data=data, id="2-0")
    found = lookups(cancel, [TIER_RULE.selector.text], store.keys)
    await match_events(store.redis, [(store.keys, cancel, found)], tombstone_ms=60_000)
    entries = index_entries((TIER_RULE,), trigger, store.keys)
    for _ in range(2):
        registration = await store.register(
            RegisterRequest(
                run_id="r1",
                app_id="studio",
                function_id="generate-report",
                config_hash="c",
                worker_id="w1",
                event=trigger,
                entries=entries,
            )
        )
        assert isinstance(registration, Registered)
        ((entry, tombstone),) = registration.tombstones
        assert (entry.selector, tombstone) == (TIER_RULE.selector.text, cancel)


async def test_a_run_queued_behind_a_full_worker_is_cancelled_when_it_starts(
    redis_url: str, namespace: str, client: Client, redis: Redis, broker: Broker, topology: str
) -> None:
    """The seeds' race, with the delay injected by a worker that has no free slot."""
    worker = studio(redis_url, namespace, concurrency=1)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        busy = await start(client, "busy", seconds=0.6)
        queued = await client.send("report/generate.requested", {"reportId": "r1"})
        await client.send("report/cancel.requested", {"reportId": "r1"})
        await settle(redis, namespace)
        if topology != "partitioned":
            assert await client.runs_for_event(queued) == []  # still queued when cancelled
        # (With partitions the worker has one reader per partition; one may take the trigger
        # while the busy run holds the only slot: its run registers, waits for the slot, and
        # is cancelled there. It never runs either way.)
        run_id = await run_of(client, queued)
        info = await final(client, run_id)
        assert info.status == "cancelled"
        assert (await final(client, busy)).status == "completed"
        tg.cancel_scope.cancel()


async def test_tombstones_expire_after_the_lookback(
    redis_url: str, namespace: str, client: Client, redis: Redis
) -> None:
    broker = Broker(redis_url, namespace=namespace, tombstone_lookback_s=0.2)
    worker = studio(redis_url, namespace)
    async with worker:
        pass
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        trigger = await client.send("report/generate.requested", {"reportId": "r1"})
        await client.send("report/cancel.requested", {"reportId": "r1"})
        await settle(redis, namespace)
        await anyio.sleep(0.3)
        await tg.start(worker.serve)
        run_id = await run_of(client, trigger)
        await anyio.sleep(0.2)
        assert await status_is(client, run_id, "running")
        tg.cancel_scope.cancel()


# -- idempotence and races ----------------------------------------------------------------


async def test_duplicate_events_and_two_brokers_signal_each_run_once(
    redis_url: str, namespace: str, client: Client, redis: Redis
) -> None:
    worker = studio(redis_url, namespace)
    brokers = [Broker(redis_url, namespace=namespace, consumer=f"b{i}") for i in range(2)]
    async with anyio.create_task_group() as tg:
        for broker in brokers:
            await tg.start(broker.run)
        await tg.start(worker.serve)
        runs = [await start(client, f"r{i}") for i in range(10)]
        for i in range(10):
            for _ in range(3):  # the same cancel, sent three times
                await client.send("report/cancel.requested", {"reportId": f"r{i}"})
        infos = [await final(client, run_id) for run_id in runs]
        assert {info.status for info in infos} == {"cancelled"}
        await settle(redis, namespace)
        tg.cancel_scope.cancel()
    # One outcome event per run, whoever handled which copy.
    outcomes = await outcome_events(redis, namespace)
    assert sorted(event.data["run_id"] for event in outcomes) == sorted(runs)


async def test_the_same_event_delivered_again_changes_nothing(
    redis_url: str, namespace: str, client: Client, redis: Redis, broker: Broker
) -> None:
    worker = studio(redis_url, namespace)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        run_id = await start(client, "r1")
        cancel = await client.send("report/cancel.requested", {"reportId": "r1"})
        await final(client, run_id)
        # The run can end before the broker read the event (the publisher matched it), and
        # the broker's own decision counts the signal: the count is taken after it.
        decided = broker.metrics.events.labels(result="matched")

        async def broker_decided() -> bool:
            return decided._value.get() == 1

        await wait_until(broker_decided)
        signals_before = broker.metrics.signals_sent._value.get()
        assert signals_before == 1
        # Redelivery: the broker handles the very same entry again (after a crash).
        partitions = await Partitions.open(redis, broker.keys)
        ((partition, fields),) = [
            (keys.partition, found[0][1])
            for keys in partitions.keys
            if (found := await redis.xrange(keys.events, entry_id_of(cancel), entry_id_of(cancel)))
        ]
        matcher = broker.matcher(partitions, partitions.stores())
        await matcher.handle([(cancel, fields)], partition)
        assert broker.metrics.signals_sent._value.get() == signals_before
        tg.cancel_scope.cancel()


async def test_cancel_racing_completion_has_exactly_one_outcome(
    redis_url: str, namespace: str, client: Client, redis: Redis
) -> None:
    """A body finishing at the moment its cancel arrives, many times over: each run has one
    terminal status, the canceller's answer agrees with it, and an outcome event exists
    exactly for the runs that ended cancelled."""
    worker = Worker("race", redis_url, namespace=namespace)

    @worker.function(id="quick", trigger="quick/start")
    async def quick(ctx: RunContext) -> None:
        await anyio.sleep(0.005)

    results = {}
    async with worker:
        for i in range(60):
            async with anyio.create_task_group() as tg:

                async def body(i: int = i) -> None:
                    async with worker.run(
                        "quick", Event(name="quick/start"), run_id=f"q{i}"
                    ) as ctx:
                        await quick.handler(ctx)

                async def cancel(i: int = i) -> None:
                    # Spread around the body's end, whatever a cancel by id costs (with
                    # partitions, finding the run's partition first).
                    await anyio.sleep(0.0025 * (i % 6))
                    results[f"q{i}"] = await client.cancel(f"q{i}")

                tg.start_soon(run_and_swallow, body)
                tg.start_soon(cancel)
    statuses = {run_id: (await final(client, run_id)).status for run_id in results}
    for run_id, result in results.items():
        status = statuses[run_id]
        assert status in ("completed", "cancelled")
        if result.outcome == "already_completed":
            assert status == "completed"
        if result.outcome == "pending":  # it came before the run registered: kept for it
            assert status == "cancelled"
        if status == "cancelled":
            assert result.outcome in ("signalled", "pending")
    outcomes = [event.data["run_id"] for event in await outcome_events(redis, namespace)]
    assert sorted(outcomes) == sorted(r for r, s in statuses.items() if s == "cancelled")
    # Both sides won sometimes: the test did exercise the race.
    assert set(statuses.values()) == {"completed", "cancelled"}


async def run_and_swallow(body: Any) -> None:
    try:
        await body()
    except RunCancelled:
        pass


# -- direct, bulk and cascading cancels -----------------------------------------------------


@pytest.mark.usefixtures("worker")
async def test_a_cancel_by_id_checks_the_owner(client: Client) -> None:
    run_id = await start(client, "r1", accountId="acct-1")
    for actor in ("acct-2", None, 1):
        refused = await client.cancel(run_id, actor=actor)
        assert (refused.outcome, refused.previous_status, refused.status) == (
            "forbidden",
            "running",
            "running",
        )
    accepted = await client.cancel(run_id, reason="user clicked cancel", actor="acct-1")
    assert (accepted.outcome, accepted.previous_status, accepted.status) == (
        "signalled",
        "running",
        "cancelling",
    )
    assert (await final(client, run_id)).cancel_reason == "user clicked cancel"
    other = await start(client, "r2", accountId="acct-1")
    assert (await client.cancel(other, actor=OPERATOR)).outcome == "signalled"


@pytest.mark.usefixtures("worker")
async def test_cancel_many_selects_by_time_and_trigger(client: Client) -> None:
    first = await start(client, "r1", tier="pro")
    await anyio.sleep(0.05)
    middle = datetime.now(UTC)
    await anyio.sleep(0.05)
    free, pro = await start(client, "r2"), await start(client, "r3", tier="pro")
    results = await client.cancel_many(
        "generate-report", started_after=middle, if_='event.data.tier == "pro"'
    )
    assert [(r.run_id, r.outcome) for r in results.results] == [(pro, "signalled")]
    assert (await final(client, pro)).status == "cancelled"
    for run_id in (first, free):
        assert await status_is(client, run_id, "running")
    everything = await client.cancel_many("generate-report", app_id="studio")
    assert {r.run_id for r in everything.results} == {first, free}
    with pytest.raises(ValueError, match="time zone"):
        await client.cancel_many("generate-report", started_after=datetime.now())


@pytest.mark.usefixtures("worker")
async def test_cancelling_a_parent_cancels_its_whole_subtree(
    client: Client, worker: Worker
) -> None:
    parent = await run_of(
        client, await client.send("project/start.requested", {"assets": ["a1", "a2"]})
    )
    children: list[str] = []

    async def spawned() -> bool:
        children[:] = [
            run.run_id
            for run in await client_runs(client, "generate-asset")
            if run.parent_run_id == parent
        ]
        return len(children) == 2

    await wait_until(spawned)
    # A grandchild, started in this process inside one of the children.
    grandchild: dict[str, str] = {}

    async def nested() -> None:
        with pytest.raises(RunCancelled):
            async with worker.run("generate-asset", Event(name="x/y"), parent=children[0]) as ctx:
                grandchild["id"] = ctx.run_id
                await anyio.sleep(60)

    async with anyio.create_task_group() as tg:
        tg.start_soon(nested)
        await wait_until(lambda: anyio_true(bool(grandchild)))
        result = await client.cancel(parent, reason="project cancelled")
        assert result.outcome == "signalled"
        assert sorted(result.cascaded) == sorted([*children, grandchild["id"]])
    for run_id in (*children, grandchild["id"]):
        info = await final(client, run_id)
        assert info.status == "cancelled"
        assert info.cancel_reason is not None
        assert info.cancel_reason.startswith("parent run")
    # A child that registers after its parent was cancelled is cancelled at once.
    with pytest.raises(RunCancelled, match=f"parent run {parent} was cancelled"):
        async with worker.run("generate-asset", Event(name="x/y"), parent=parent):
            await anyio.sleep(60)


async def anyio_true(value: bool) -> bool:
    return value


async def client_runs(client: Client, function_id: str) -> list[RunInfo]:
    redis = client._redis
    run_ids = [
        run_id
        for keys in partition_keys(client.keys.namespace)
        for run_id in await redis.zrange(keys.function_runs("studio", function_id), 0, -1)
    ]
    return [info for run_id in run_ids if (info := await client.get_run(run_id)) is not None]


# -- outcomes -------------------------------------------------------------------------------


async def test_a_cancelled_run_publishes_an_outcome_event_functions_can_trigger_on(
    redis_url: str, namespace: str, client: Client, broker: Broker
) -> None:
    worker = studio(redis_url, namespace)
    seen: list[Event] = []

    @worker.function(id="cleanup", trigger=RUN_CANCELLED_EVENT)
    async def cleanup(ctx: RunContext) -> None:
        seen.append(ctx.event)

    async with anyio.create_task_group() as tg:
        await tg.start(worker.serve)
        trigger_data = {"reportId": "r1", "accountId": "a1", "tier": "free"}
        trigger = await client.send("report/generate.requested", trigger_data)
        run_id = await run_of(client, trigger)
        sent = time.monotonic()
        cancel = await client.send("report/cancel.requested", {"reportId": "r1"})
        info = await final(client, run_id)
        elapsed_ms = (time.monotonic() - sent) * 1000
        await wait_until(lambda: anyio_true(bool(seen)))
        tg.cancel_scope.cancel()
    (outcome,) = seen
    data = outcome.data
    assert data["run_id"] == run_id
    assert (data["app_id"], data["function_id"]) == ("studio", "generate-report")
    assert data["event"]["id"] == trigger
    assert data["event"]["data"] == trigger_data
    assert data["reason"] == "cancel event report/cancel.requested"
    assert data["cancelled_by"] == cancel
    assert 0 <= data["latency_ms"] <= elapsed_ms + 2  # ms resolution of the cancel's id
    assert info.cancel_latency_ms == pytest.approx(data["latency_ms"])


async def test_wait_returns_the_final_record_or_times_out(
    redis_url: str, namespace: str, client: Client
) -> None:
    worker = studio(redis_url, namespace)
    async with worker:
        async with worker.run("generate-report", Event(name="x", data={"reportId": "r"})) as ctx:
            with pytest.raises(RunNotFinishedError):
                await client.wait(ctx.run_id, timeout=0.1)
        started = time.monotonic()
        info = await client.wait(ctx.run_id, timeout=5)
        assert info.status == "completed"
        assert time.monotonic() - started < 0.5
    # Waiting wakes up as soon as the run ends, not at a polling interval.
    async with worker, anyio.create_task_group() as tg:
        waited: dict[str, float] = {}

        async def waiter(run_id: str) -> None:
            await client.wait(run_id, timeout=5)
            waited["at"] = time.monotonic()

        async with worker.run("generate-report", Event(name="x", data={"reportId": "r"})) as ctx:
            tg.start_soon(waiter, ctx.run_id)
            await anyio.sleep(0.2)
            ended = time.monotonic()
        await wait_until(lambda: anyio_true(bool(waited)))
        assert waited["at"] - ended < 0.1
    assert msgspec.to_builtins(info)["status"] == "completed"


async def test_a_child_of_an_unknown_parent_leaves_no_key_without_expiry(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    worker = studio(redis_url, namespace)
    async with worker, worker.run("generate-asset", Event(name="x/y"), parent="no-such-run"):
        pass
    (children,) = [
        keys.children("no-such-run")
        for keys in partition_keys(namespace)
        if await redis.exists(keys.children("no-such-run"))
    ]
    assert await redis.smembers(children)  # recorded, in case that parent ever registers
    assert await redis.ttl(children) > 0  # but it expires with the child's retention
