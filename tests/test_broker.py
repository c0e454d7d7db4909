"""The broker in this process: matching through the index, dead letters, idempotence."""

from __future__ import annotations

import json

import anyio
import pytest
from redis.asyncio import Redis

from broker import Broker, EmbeddedRedis
from broker.embedded import free_port
from broker.scripts import match_events
from sdk import CancelOn, CancelResult, Client, Event
from sdk.keys import Keys
from sdk.registration import declare_rules
from sdk.rules import index_entries, lookups
from sdk.scripts import Registered, RegisterRequest
from sdk.store import RunStore
from sdk.streams import trim_acknowledged
from tests.helpers import broker_drained, wait_until

pytestmark = pytest.mark.anyio

RULES = (CancelOn(event="report/cancel.requested", match="data.reportId"),)


async def register(
    store: RunStore,
    run_id: str,
    report_id: str,
    *,
    event_id: str = "",
    worker: str = "w1",
    config_hash: str = "c0",
) -> None:
    event = Event(
        name="report/generate.requested",
        data={"reportId": report_id},
        id=event_id or "1-0",
    )
    async with store.redis.pipeline(transaction=True) as pipe:
        declare_rules(pipe, store.keys, RULES, 0)  # what a worker's sync does
        await pipe.execute()
    registration = await store.register(
        RegisterRequest(
            run_id=run_id,
            app_id="reports",
            function_id="generate-report",
            config_hash=config_hash,
            worker_id=worker,
            event=event,
            entries=index_entries(RULES, event, store.keys),
        )
    )
    assert isinstance(registration, Registered)


def cancel_event(event_id: str, report_id: str = "r1") -> Event:
    return Event(name="report/cancel.requested", data={"reportId": report_id}, id=event_id)


async def match(store: RunStore, event: Event) -> list[CancelResult]:
    (reply,) = await match_events(
        store.redis,
        [(store.keys, event, lookups(event, ["data.reportId"], store.keys))],
        tombstone_ms=60_000,
    )
    assert not isinstance(reply, Exception)
    results, candidates = reply
    assert candidates == []
    return results


@pytest.fixture
def store(redis: Redis, namespace: str) -> RunStore:
    return RunStore(redis, Keys(namespace))


async def signals(redis: Redis, namespace: str, worker: str = "w1") -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(f"{Keys(namespace).prefix}signals:{worker}")]


@pytest.mark.usefixtures("broker")
async def test_cancel_event_signals_the_matching_run(
    store: RunStore, client: Client, redis: Redis, namespace: str
) -> None:
    await register(store, "run-a", "r1")
    await register(store, "run-b", "r2")
    event_id = await client.send("report/cancel.requested", {"reportId": "r1"})
    await wait_until(lambda: broker_drained(redis, namespace))
    assert await signals(redis, namespace) == [
        {
            "run_id": "run-a",
            "reason": "cancel event report/cancel.requested",
            "event_id": event_id,
            "sent_at": (await signals(redis, namespace))[0]["sent_at"],
        }
    ]
    a, b = await client.get_run("run-a"), await client.get_run("run-b")
    assert a is not None
    assert b is not None
    assert (a.status, a.cancelled_by) == ("cancelling", event_id)
    assert b.status == "running"


@pytest.mark.usefixtures("broker")
async def test_values_match_by_json_equality(
    store: RunStore, client: Client, redis: Redis, namespace: str
) -> None:
    await register(store, "run-int", 7)  # type: ignore[arg-type]
    await register(store, "run-str", "7")
    await client.send("report/cancel.requested", {"reportId": 7.0})
    await wait_until(lambda: broker_drained(redis, namespace))
    assert [s["run_id"] for s in await signals(redis, namespace)] == ["run-int"]


async def test_the_same_event_handled_twice_signals_once(
    store: RunStore, redis: Redis, namespace: str
) -> None:
    await register(store, "run-a", "r1")
    first = await match(store, cancel_event("5-0"))
    again = await match(store, cancel_event("5-0"))
    assert [r.outcome for r in first] == ["signalled"]
    assert [r.outcome for r in again] == ["already_cancelling"]
    assert len(await signals(redis, namespace)) == 1


async def test_the_triggering_event_never_cancels_its_own_run(
    store: RunStore, redis: Redis, namespace: str
) -> None:
    # A function cancelled by the same event name that starts it (a "restart" pattern).
    await register(store, "old", "r1", event_id="1-0")
    await register(store, "new", "r1", event_id="2-0")
    results = await match(store, cancel_event("2-0"))
    assert {r.run_id: r.outcome for r in results} == {"old": "signalled", "new": "own_trigger"}


@pytest.mark.usefixtures("broker")
async def test_matching_cost_does_not_grow_with_running_runs(
    store: RunStore, client: Client, redis: Redis, namespace: str
) -> None:
    async def commands_for_one_cancel(report_id: str) -> dict[str, int]:
        before = await redis.info("commandstats")
        await client.send("report/cancel.requested", {"reportId": report_id})
        await wait_until(lambda: broker_drained(redis, namespace))
        after = await redis.info("commandstats")
        return {
            name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
            for name in ("cmdstat_smembers", "cmdstat_hmget", "cmdstat_scan", "cmdstat_keys")
            if name in after
        }

    await register(store, "first", "x0")
    small = await commands_for_one_cancel("x0")
    for i in range(1, 2000):
        await register(store, f"run-{i}", f"x{i}")
    large = await commands_for_one_cancel("x1999")
    assert small == large
    # One run looked at, whatever the number running: as the SDK published the event
    # (sdk/early_match.py), then by the broker.
    assert small["cmdstat_hmget"] == 2


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"event": "{not json"}, "invalid_json"),
        ({"payload": "{}"}, "missing_field"),
        ({"event": json.dumps({"name": 5})}, "invalid_shape"),
        ({"event": json.dumps({"name": "a/b", "data": [1, 2]})}, "invalid_shape"),
        ({"event": json.dumps({"name": " "})}, "invalid_name"),
        ({"event": json.dumps({"name": "a/b", "v": 2})}, "unsupported_version"),
        ({"event": json.dumps({"name": "a/b", "data": {"x": "y" * 70_000}})}, "too_large"),
        ({"event": '{"name": "a/b", "data": {"x": ' + "[" * 40 + "]" * 40 + "}}"}, "too_deep"),
        ({"event": '{"name": "a/b", "data": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"}, "too_deep"),
    ],
)
@pytest.mark.usefixtures("broker")
async def test_malformed_entries_are_dead_lettered_with_the_reason(
    redis: Redis, namespace: str, broker: Broker, fields: dict[str, str], reason: str
) -> None:
    entry_id = await redis.xadd(f"{Keys(namespace).prefix}events", fields)  # type: ignore[arg-type]
    await redis.xadd(f"{Keys(namespace).prefix}events", {"event": '{"name": "still/alive"}'})
    await wait_until(lambda: broker_drained(redis, namespace))
    (dead,) = await redis.xrange(f"{Keys(namespace).prefix}events:dead")
    _, letter = dead
    assert letter["reason"] == reason
    assert letter["entry_id"] == entry_id
    assert json.loads(letter["fields"]) == fields  # the original entry, nothing lost
    assert letter["detail"]
    metrics = broker.metrics
    assert metrics.dead_letters.labels(reason=reason)._value.get() == 1
    # The entry after it was handled too: no function triggers on it (nothing runs).
    assert metrics.events.labels(result="unserved")._value.get() == 1


async def test_trim_keeps_what_any_group_still_needs(redis: Redis, namespace: str) -> None:
    stream = f"{Keys(namespace).prefix}events"
    ids = [await redis.xadd(stream, {"event": "{}"}) for _ in range(3)]
    await redis.xgroup_create(stream, "fast", id="0")
    await redis.xgroup_create(stream, "slow", id="0")
    await redis.xreadgroup("fast", "c", {stream: ">"})
    await redis.xack(stream, "fast", *ids)
    await redis.xreadgroup("slow", "c", {stream: ">"}, count=2)
    await redis.xack(stream, "slow", ids[0])
    # "slow" still has ids[1] pending and has not read ids[2]: only ids[0] may go.
    assert await trim_acknowledged(redis, stream, approximate=False) == 1
    assert [entry_id for entry_id, _ in await redis.xrange(stream)] == ids[1:]
    await redis.xack(stream, "slow", ids[1])
    await redis.xreadgroup("slow", "c", {stream: ">"})
    await redis.xack(stream, "slow", ids[2])
    assert await trim_acknowledged(redis, stream, approximate=False) == 1
    assert await redis.xlen(stream) == 1  # the last entry stays: the stream keeps its id


async def test_broker_waits_for_redis_instead_of_dying(namespace: str) -> None:
    server = EmbeddedRedis()
    server.port = free_port()  # nothing listens there yet
    broker = Broker(server.url, namespace=namespace)
    listening = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:

            async def run_broker() -> None:
                await tg.start(broker.run)
                listening.set()

            tg.start_soon(run_broker)
            await anyio.sleep(0.3)
            assert not listening.is_set()
            await anyio.to_thread.run_sync(server.start)
            with anyio.fail_after(15):
                await listening.wait()
            tg.cancel_scope.cancel()
    finally:
        server.close()


async def test_a_server_that_forgot_the_scripts_still_matches_every_event(
    redis: Redis, store: RunStore
) -> None:
    """A restarted server (or a promoted replica) answers NOSCRIPT to the batch's EVALSHAs
    without running them: the script is loaded and those calls sent again, once."""
    await register(store, "r1", "r1", event_id="1700000000000-0")
    await redis.script_flush()
    events = [cancel_event(f"170000000000{i}-1") for i in range(1, 4)]
    replies = await match_events(
        store.redis,
        [(store.keys, event, lookups(event, ["data.reportId"], store.keys)) for event in events],
        tombstone_ms=60_000,
    )
    outcomes = [[result.outcome for result in reply[0]] for reply in replies]  # type: ignore[index]
    assert outcomes == [["signalled"], ["already_cancelling"], ["already_cancelling"]]


async def test_an_event_whose_script_fails_fails_alone_in_its_batch(
    redis: Redis, store: RunStore
) -> None:
    """One script applies a partition's batch; an event whose matching fails there (here a
    key of the wrong type under its lookup) comes back as its error, and the events around
    it are decided as if it were not there."""
    await register(store, "run-a", "r1", event_id="1-0")
    await register(store, "run-c", "r3", event_id="1-1")
    events = [cancel_event("2-0", "r1"), cancel_event("2-1", "r2"), cancel_event("2-2", "r3")]
    found = [lookups(event, ["data.reportId"], store.keys) for event in events]
    await redis.set(found[1][0].key, "not a set")
    replies = await match_events(
        store.redis,
        [(store.keys, event, f) for event, f in zip(events, found, strict=True)],
        tombstone_ms=60_000,
    )
    assert isinstance(replies[1], Exception)
    assert [[r.outcome for r in reply[0]] for reply in (replies[0], replies[2])] == [  # type: ignore[index]
        ["signalled"],
        ["signalled"],
    ]
