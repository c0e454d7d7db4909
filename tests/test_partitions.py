"""Partitions: one namespace's run state split over several hash slots.

What must hold: every process agrees on the number; a run and the cancel events that
match it by key meet in one partition; cancel events whose rules cannot be placed so are
looked up everywhere; entries published without a partition are moved to theirs; event
and run ids stay unique; and on a cluster the partitions spread over the primaries. The
end-to-end, race and crash suites also run partitioned (``pytest.mark.topologies``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis

from broker import Broker, EmbeddedRedis
from broker.run_listing import RunsQuery
from sdk import CancelOn, Client, Event, RunContext, Worker
from sdk.connection import command_client
from sdk.errors import ConfigurationError, PartitionCountError
from sdk.keys import Keys
from sdk.partitions import (
    MAX_PARTITIONS,
    Partitions,
    agree_partitions,
    check_partitions,
    declare_placements,
    partition_of_token,
)
from sdk.rules import value_token
from sdk.wire import decode_event, encode_event, entry_id_of, event_id
from tests.cluster import RedisClusterServer
from tests.helpers import serving, status_is, wait_until
from tests.processes import ProcessHandle

pytestmark = pytest.mark.anyio

BY_REPORT = CancelOn(event="report/cancel.requested", match="data.reportId")
BY_ACCOUNT = CancelOn(event="account/cancelled", match="data.accountId")
BY_EXPRESSION = CancelOn(event="tier/cancel", if_="event.data.tier == async.data.tier")


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = command_client(redis_server.url)
    yield client
    await client.aclose()


def reports(redis_url: str, namespace: str, *, partitions: int | None = None) -> Worker:
    worker = Worker("reports", redis_url, namespace=namespace, partitions=partitions)

    @worker.function(
        id="generate", trigger="report/generate", cancel_on=[BY_REPORT, BY_ACCOUNT, BY_EXPRESSION]
    )
    async def generate(ctx: RunContext) -> None:
        if child := ctx.event.data.get("child"):
            await ctx.spawn("report/generate", {"reportId": child, "accountId": "child"})
        await anyio.sleep(60)

    return worker


# -- agreeing on the number -----------------------------------------------------------------


def test_a_configured_number_is_validated() -> None:
    assert check_partitions(None) is None
    assert check_partitions("8") == 8
    for wrong in ("0", "-1", "x", str(MAX_PARTITIONS + 1)):
        with pytest.raises(ConfigurationError):
            check_partitions(wrong)


async def test_the_first_process_stores_the_number_and_the_others_must_agree(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    # A publisher only reads: nothing stored yet, so it knows nothing.
    assert await agree_partitions(redis, keys, 4, store=False) is None
    assert await redis.get(keys.partitions) is None
    assert await agree_partitions(redis, keys, 4) == 4
    assert await agree_partitions(redis, keys, None) == 4  # not configured: as stored
    with pytest.raises(PartitionCountError, match=r"has 4 partition.*configured with 2"):
        await agree_partitions(redis, keys, 2)


async def test_a_worker_configured_otherwise_refuses_to_start(
    redis_server: EmbeddedRedis, redis: Redis, namespace: str
) -> None:
    await redis.set(Keys(namespace).partitions, 4)
    with pytest.raises(PartitionCountError):
        async with reports(redis_server.url, namespace, partitions=2):
            pass
    async with reports(redis_server.url, namespace, partitions=4) as worker:
        assert worker._require_runner().partitions.count == 4


def test_a_broker_configured_otherwise_exits_with_one_line(
    redis_server: EmbeddedRedis, namespace: str
) -> None:
    import redis as sync_redis

    with sync_redis.Redis.from_url(redis_server.url) as plain:
        plain.set(Keys(namespace).partitions, 4)
    handle = ProcessHandle(
        [
            *(sys.executable, "-m", "broker", "run", "--redis-url", redis_server.url),
            *("--namespace", namespace, "--http-port", "0", "--partitions", "2"),
        ]
    )
    assert handle.process.wait(30) != 0
    assert "has 4 partition(s) in Redis, but this process was configured with 2" in handle.output
    assert "Traceback" not in handle.output
    assert "(hint: docs/scaling.md#partitions" in handle.output


# -- the key layout and ids -------------------------------------------------------------------


def test_partition_zero_is_the_unpartitioned_layout() -> None:
    assert Keys("cancel").run("r1") == "{cancel}:run:r1"
    assert Keys("cancel", 0).events == "{cancel}:events"
    assert Keys("cancel", 3).run("r1") == "{cancel:3}:run:r1"
    assert Keys("cancel", 3).events == "{cancel:3}:events"
    # Shared state stays in the namespace's own slot whatever the partition.
    assert Keys("cancel", 3).workers == "{cancel}:workers"
    assert Keys("cancel", 3).dead_letters == "{cancel}:events:dead"


def test_event_ids_are_unique_across_partitions_and_keep_their_order() -> None:
    assert event_id("1700000000000-0", 0) == "1700000000000-0"
    assert event_id("1700000000000-0", 3) == "1700000000000-0:3"
    assert entry_id_of("1700000000000-0:3") == "1700000000000-0"
    body = encode_event("x/y", {}).decode()
    moved = decode_event("9-9", {"event": body, "partition": "2", "origin": "5-0:1"}, partition=2)
    assert moved.id == "5-0:1"  # a moved entry keeps the id it was published under
    assert moved.ts == 5
    native = decode_event("7-1", {"event": body, "partition": "2"}, partition=2)
    assert native.id == "7-1:2"
    # Only a moved entry names its origin: a publisher's own "origin" field is ignored.
    assert decode_event("7-1", {"event": body, "origin": "5-0"}).id == "7-1"


# -- routes -------------------------------------------------------------------------------


async def test_routes_place_a_run_with_the_cancel_events_that_match_it(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    worker = reports("redis://unused", namespace)
    await declare_placements(redis, keys, worker.functions.values())
    partitions = Partitions(redis, keys, 8)
    # The trigger is placed by its first match path; the cancel event by the same path.
    assert await partitions.placement_paths(["report/generate", "report/cancel.requested"]) == {
        "report/generate": "data.reportId",
        "report/cancel.requested": "data.reportId",
    }
    for report in ("r1", "r2", "a very long report id " * 10):
        trigger = Event(name="report/generate", data={"reportId": report, "accountId": "a"})
        cancel = Event(name="report/cancel.requested", data={"reportId": report})
        token = value_token(report)
        assert token is not None
        expected = partition_of_token(token, 8)
        assert await partitions.of_event(trigger) == await partitions.of_event(cancel) == expected
    # Rules the placement cannot serve are looked up in every partition: another path
    # (accountId), or an expression without a path.
    assert await partitions.broadcast(
        ["report/cancel.requested", "account/cancelled", "tier/cancel", "never/declared"]
    ) == {"account/cancelled", "tier/cancel", "never/declared"}


async def test_a_placement_never_changes_and_a_broadcast_never_ends(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    first = reports("redis://unused", namespace)
    await declare_placements(redis, keys, first.functions.values())
    # A later function triggered by the same event, first matching on another path.
    later = Worker("billing", "redis://unused", namespace=namespace)

    @later.function(id="invoice", trigger="report/generate", cancel_on=[BY_ACCOUNT, BY_REPORT])
    async def invoice(ctx: RunContext) -> None:
        pass

    await declare_placements(redis, keys, later.functions.values())
    partitions = Partitions(redis, keys, 8)
    assert (await partitions.placement_paths(["report/generate"]))["report/generate"] == (
        "data.reportId"
    )
    assert "account/cancelled" in await partitions.broadcast(["account/cancelled"])
    # Declaring the first again changes nothing back.
    await declare_placements(redis, keys, first.functions.values())
    assert "account/cancelled" in await partitions.broadcast(["account/cancelled"])
    assert await partitions.broadcast(["report/cancel.requested"]) == set()


async def test_one_partition_reads_and_writes_nothing_more(redis: Redis, namespace: str) -> None:
    partitions = Partitions(redis, Keys(namespace), 1)
    await redis.delete(Keys(namespace).placements)
    event = Event(name="report/generate", data={"reportId": "r1"}, parent="p1")
    assert await partitions.of_event(event) == 0
    assert await partitions.locate(["a", "b"]) == {"a": 0, "b": 0}
    assert await partitions.broadcast(["report/cancel.requested"]) == set()
    entry = await partitions.publish(encode_event("x/y", {}), Event(name="x/y"))
    ((entry_id, fields),) = await redis.xrange(Keys(namespace).events)
    assert entry == entry_id
    assert "partition" not in fields  # the wire format of one partition is unchanged


# -- on a cluster -------------------------------------------------------------------------


@pytest.fixture
async def on_cluster(
    redis_cluster: RedisClusterServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, Client, Redis]]:
    monkeypatch.setenv("CANCEL_BROKER_PARTITIONS", "6")
    redis = command_client(redis_cluster.url)
    async with Client(redis_cluster.url, namespace=namespace) as client:
        broker = Broker(redis_cluster.url, namespace=namespace)
        async with serving(broker.run):
            yield redis_cluster.url, client, redis
    await redis.aclose()


async def test_runs_spread_over_the_primaries_and_are_cancelled_by_key(
    on_cluster: tuple[str, Client, Redis], redis_cluster: RedisClusterServer, namespace: str
) -> None:
    url, client, redis = on_cluster
    async with anyio.create_task_group() as tg:
        worker = reports(url, namespace)
        await tg.start(worker.serve)
        events = [
            await client.send("report/generate", {"reportId": f"r{i}", "accountId": f"a{i}"})
            for i in range(60)
        ]
        run_ids = []
        for event in events:
            await wait_until(lambda event=event: _has_runs(client, event))
            run_ids += [run.run_id for run in await client.runs_for_event(event)]
        partitions = await Partitions.open(redis, Keys(namespace))
        located = await partitions.locate(run_ids)
        assert len(set(located.values())) == 6  # 60 keys over 6 partitions: each has some
        # Each partition its own slot (which primary serves it is the slot map's business).
        assert len({redis_cluster.slot_of(keys.events) for keys in partitions.keys}) == 6
        for i in range(0, 60, 2):
            await client.send("report/cancel.requested", {"reportId": f"r{i}"})
        # A broadcast rule: looked up in every partition.
        await client.send("account/cancelled", {"accountId": "a1"})
        for i, run_id in enumerate(run_ids):
            await wait_until(
                lambda run_id=run_id, i=i: status_is(
                    client, run_id, "cancelled" if i % 2 == 0 or i == 1 else "running"
                )
            )
        tg.cancel_scope.cancel()


async def _has_runs(client: Client, event_id: str) -> bool:
    return bool(await client.runs_for_event(event_id))


async def test_a_child_lives_with_its_parent_and_its_own_key_still_cancels_it(
    on_cluster: tuple[str, Client, Redis], namespace: str
) -> None:
    url, client, redis = on_cluster
    partitions = await Partitions.open(redis, Keys(namespace))
    # A child key placed in another partition than its parent's.
    parent_key = "parent-1"
    parent_token, child_key = value_token(parent_key), ""
    for n in range(100):
        candidate = f"child-{n}"
        if partition_of_token(str(value_token(candidate)), 6) != partition_of_token(
            str(parent_token), 6
        ):
            child_key = candidate
            break
    async with anyio.create_task_group() as tg:
        await tg.start(reports(url, namespace).serve)
        event = await client.send(
            "report/generate", {"reportId": parent_key, "accountId": "p", "child": child_key}
        )
        await wait_until(lambda: _has_runs(client, event))
        (parent,) = await client.runs_for_event(event)

        async def child_runs() -> list[str]:
            return [
                run.run_id
                for keys in partitions.keys
                for run_id in await redis.zrange(keys.function_runs("reports", "generate"), 0, -1)
                if (run := await client.get_run(run_id)) and run.parent_run_id == parent.run_id
            ]

        async def has_child() -> bool:
            return bool(await child_runs())

        await wait_until(has_child)
        (child,) = await child_runs()
        located = await partitions.locate([parent.run_id, child])
        assert located[child] == located[parent.run_id]
        # Its own rule, whose key lives elsewhere, now looks up everywhere: it still cancels.
        assert "report/cancel.requested" in await partitions.broadcast(["report/cancel.requested"])
        await client.send("report/cancel.requested", {"reportId": child_key})
        await wait_until(lambda: status_is(client, child, "cancelled"))
        assert await status_is(client, parent.run_id, "running")
        # And cancelling the parent cascades, in one script, within their partition.
        await client.send("report/cancel.requested", {"reportId": parent_key})
        await wait_until(lambda: status_is(client, parent.run_id, "cancelled"))
        tg.cancel_scope.cancel()


async def test_an_event_published_without_a_partition_is_moved_to_its_own(
    on_cluster: tuple[str, Client, Redis], namespace: str
) -> None:
    url, client, redis = on_cluster
    async with anyio.create_task_group() as tg:
        await tg.start(reports(url, namespace).serve)
        # A plain XADD into partition 0's stream, as any language would.
        body = encode_event("report/generate", {"reportId": "moved", "accountId": "m"})
        origin = await redis.xadd(Keys(namespace).events, {"event": body})
        await wait_until(lambda: _has_runs(client, origin))
        (run,) = await client.runs_for_event(origin)
        partitions = await Partitions.open(redis, Keys(namespace))
        token = value_token("moved")
        assert token is not None
        expected = partition_of_token(token, 6)
        assert (await partitions.locate([run.run_id]))[run.run_id] == expected
        if expected:
            ((_, fields),) = await redis.xrange(partitions.keys[expected].events)
            assert fields["origin"] == origin
        tg.cancel_scope.cancel()


async def test_a_trigger_placed_away_from_its_key_is_still_cancelled_by_it(
    on_cluster: tuple[str, Client, Redis], namespace: str
) -> None:
    """What a publisher that looked a route up just before the first worker recorded it
    does: the trigger lands in a partition its key does not name."""
    url, client, redis = on_cluster
    token = value_token("stray")
    assert token is not None
    home = partition_of_token(token, 6)
    elsewhere = (home + 1) % 6
    partitions = await Partitions.open(redis, Keys(namespace))
    async with anyio.create_task_group() as tg:
        await tg.start(reports(url, namespace).serve)
        assert await partitions.broadcast(["report/cancel.requested"]) == set()
        body = encode_event("report/generate", {"reportId": "stray", "accountId": "s"})
        entry_id = await redis.xadd(
            partitions.keys[elsewhere].events, {"event": body, "partition": str(elsewhere)}
        )
        trigger = event_id(str(entry_id), elsewhere)
        await wait_until(lambda: _has_runs(client, trigger))
        (run,) = await client.runs_for_event(trigger)
        assert (await partitions.locate([run.run_id]))[run.run_id] == elsewhere
        assert await partitions.broadcast(["report/cancel.requested"]) == {
            "report/cancel.requested"
        }
        await client.send("report/cancel.requested", {"reportId": "stray"})
        await wait_until(lambda: status_is(client, run.run_id, "cancelled"))
        tg.cancel_scope.cancel()


async def test_the_dashboard_statistics_and_sync_state_cover_every_partition(
    redis_cluster: RedisClusterServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANCEL_BROKER_PARTITIONS", "6")
    broker = Broker(redis_cluster.url, namespace=namespace)
    async with (
        Client(redis_cluster.url, namespace=namespace) as client,
        serving(broker.run),
        anyio.create_task_group() as tg,
    ):
        await tg.start(reports(redis_cluster.url, namespace).serve)
        events = [
            await client.send("report/generate", {"reportId": f"d{i}", "accountId": "a"})
            for i in range(30)
        ]
        for event in events:
            await wait_until(lambda event=event: _has_runs(client, event))
        (first,) = await client.runs_for_event(events[0])
        await client.send("report/cancel.requested", {"reportId": "d0"})
        await wait_until(lambda: status_is(client, first.run_id, "cancelled"))
        partitions = await Partitions.open(client._redis, Keys(namespace))
        located = await partitions.locate(
            [run.run_id for event in events for run in await client.runs_for_event(event)]
        )
        assert len(set(located.values())) > 1

        page = await broker.dashboard().runs(RunsQuery(limit=100))
        assert (page.active_total, page.finished_total) == (29, 1)
        assert len(page.runs) == 30
        assert page.runs[-1].run_id == first.run_id  # finished runs after running ones

        (function,) = (await broker.sync_state()).functions
        assert sum(function.active_runs.values()) == 29

        await broker.metrics.cluster.refresh(client._redis, Keys(namespace))
        snapshot = broker.metrics.cluster.snapshot
        assert snapshot.runs_active[("reports", "generate")] == 29
        assert snapshot.runs_finished[("reports", "generate", "cancelled")] == 1
        assert snapshot.signals_acknowledged == 1
        tg.cancel_scope.cancel()
