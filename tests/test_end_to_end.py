"""`cancel-broker run` and a worker as separate processes, driven like a user would."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from sdk import Client, RunInfo
from sdk.keys import Keys
from tests.helpers import (
    broker_drained,
    count_run_keys,
    observed,
    partition_keys,
    topology_url,
    wait_for_observation,
    wait_for_status,
    wait_until,
)
from tests.processes import ProcessHandle, broker_and_worker, start_broker, start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.topologies]


@pytest.fixture(scope="module")
def module_namespace(topology: str) -> str:
    return f"e2e-{topology}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, module_namespace: str) -> str:
    """The module's namespace for the tests that share its processes (``shared``); a fresh
    one for a test that starts processes of its own (it counts or stops what they do)."""
    if "shared" in request.fixturenames:
        return module_namespace
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def shared_processes(
    request: pytest.FixtureRequest, topology: str, module_namespace: str
) -> Iterator[None]:
    """One broker and one report worker for the module's tests that only watch their own
    runs, started once per topology."""
    with broker_and_worker(
        topology_url(request, topology), module_namespace, shutdown_timeout="0.2"
    ):
        yield


@pytest.fixture
async def shared(
    shared_processes: None, client: Client, redis: Redis, namespace: str
) -> AsyncIterator[None]:
    """The shared processes; after the test, whatever run it left running is cancelled, so
    the next one starts on a namespace with no active run and an empty index."""
    yield

    async def active() -> list[str]:
        return [
            run_id
            for keys in partition_keys(namespace)
            for run_id in await redis.zrange(keys.active_runs, 0, -1)
        ]

    for run_id in await active():
        await client.cancel(run_id)

    async def quiet() -> bool:
        return not await active() and await count_run_keys(redis, namespace, "idx:*") == 0

    await wait_until(quiet)


@pytest.fixture
def broker_process(redis_url: str, namespace: str) -> Iterator[tuple[ProcessHandle, str]]:
    handle, http = start_broker(redis_url, namespace)
    yield handle, http
    assert handle.terminate() == 0, handle.output


@pytest.fixture
def worker_process(redis_url: str, namespace: str) -> Iterator[ProcessHandle]:
    handle = start_worker(redis_url, namespace, shutdown_timeout="0.2")
    yield handle
    assert handle.terminate() == 0, handle.output


async def start_report(client: Client, report_id: str, **data: Any) -> RunInfo:
    event_id = await client.send("report/generate.requested", {"reportId": report_id, **data})
    runs: list[RunInfo] = []

    async def registered() -> bool:
        runs[:] = await client.runs_for_event(event_id)
        return bool(runs)

    await wait_until(registered)
    (run,) = runs
    return run


@pytest.mark.usefixtures("shared")
async def test_cancel_event_stops_only_the_targeted_run(
    client: Client, redis: Redis, namespace: str
) -> None:
    r1 = await start_report(client, "r1")
    r2 = await start_report(client, "r2")
    await wait_for_observation(redis, namespace, "r1", "started")
    await wait_for_observation(redis, namespace, "r2", "started")

    sent = time.monotonic()
    cancel_id = await client.send("report/cancel.requested", {"reportId": "r1"})
    seen = await wait_for_observation(redis, namespace, "r1", "cancelled", timeout=5)
    # Stopped in the middle of a 60 s awaited call, well within a second.
    assert seen["monotonic"] - sent < 1.0
    info = await wait_for_status(client, r1.run_id, "cancelled")
    assert info.cancelled_by == cancel_id
    assert info.cancel_reason == "cancel event report/cancel.requested"

    other = await client.get_run(r2.run_id)
    assert other is not None
    assert other.status == "running"
    assert [o["what"] for o in await observed(redis, namespace, "r2")] == ["started"]


@pytest.mark.usefixtures("shared")
async def test_plain_xadd_from_any_language_cancels(
    client: Client, redis: Redis, namespace: str
) -> None:
    run = await start_report(client, "r7")
    await wait_for_observation(redis, namespace, "r7", "started")
    # What a Go, Node or shell publisher does: one XADD, no SDK.
    body = '{"name": "report/cancel.requested", "data": {"reportId": "r7"}}'
    await redis.xadd(f"{Keys(namespace).prefix}events", {"event": body})
    await wait_for_observation(redis, namespace, "r7", "cancelled", timeout=5)
    await wait_for_status(client, run.run_id, "cancelled")


@pytest.mark.usefixtures("shared")
async def test_body_catching_exception_is_still_stopped(
    client: Client, redis: Redis, namespace: str
) -> None:
    run = await start_report(client, "r3", mode="catch-exception")
    await wait_for_observation(redis, namespace, "r3", "started")
    await client.send("report/cancel.requested", {"reportId": "r3"})
    await wait_for_status(client, run.run_id, "cancelled", timeout=5)
    whats = [o["what"] for o in await observed(redis, namespace, "r3")]
    assert whats == ["started", "cancelled"]  # never "swallowed", never "completed"


@pytest.mark.usefixtures("shared")
async def test_cancel_after_completion_changes_nothing(
    client: Client, redis: Redis, namespace: str
) -> None:
    run = await start_report(client, "r4", seconds=0)
    done = await wait_for_status(client, run.run_id, "completed")

    await client.send("report/cancel.requested", {"reportId": "r4"})
    await wait_until(lambda: broker_drained(redis, namespace))
    # The run left the index when it ended: nothing listens, nothing is signalled.
    assert await count_run_keys(redis, namespace, "idx:*") == 0
    result = await client.cancel(run.run_id)
    assert result.outcome == "already_completed"
    assert (result.previous_status, result.status) == ("completed", "completed")
    after = await client.get_run(run.run_id)
    assert after == done
    assert [o["what"] for o in await observed(redis, namespace, "r4")] == ["started", "completed"]


@pytest.mark.usefixtures("worker_process")
async def test_unknown_and_malformed_events_are_ignored_or_dead_lettered(
    client: Client, redis: Redis, namespace: str, broker_process: tuple[ProcessHandle, str]
) -> None:
    handle, http = broker_process
    run = await start_report(client, "r5")
    await client.send("report/something.else", {"reportId": "r5"})
    await client.send("no/listener", {})
    await redis.xadd(f"{Keys(namespace).prefix}events", {"event": "{not json"})
    await redis.xadd(f"{Keys(namespace).prefix}events", {"wrong": "field"})

    async def dead_lettered() -> bool:
        return await redis.xlen(f"{Keys(namespace).prefix}events:dead") == 2

    await wait_until(dead_lettered)
    dead = await redis.xrange(Keys(namespace).dead_letters)
    reasons = sorted(f["reason"] for _, f in dead)
    assert reasons == ["invalid_json", "missing_field"]
    # The broker is alive and the run untouched; a real cancel still works afterwards.
    info = await client.get_run(run.run_id)
    assert info is not None
    assert info.status == "running"
    await client.send("report/cancel.requested", {"reportId": "r5"})
    await wait_for_status(client, run.run_id, "cancelled", timeout=5)

    async with httpx.AsyncClient(base_url=http) as web:
        assert (await web.get("/healthz")).json() == {"status": "ok"}
        metrics = (await web.get("/metrics")).text
    assert 'cancel_broker_events_total{result="dead_lettered"} 2.0' in metrics
    assert 'cancel_broker_events_total{result="matched"} 1.0' in metrics
    assert 'cancel_broker_dead_letters_total{reason="invalid_json"} 1.0' in metrics
    assert "cancel_broker_signals_sent_total 1.0" in metrics
    assert handle.process.poll() is None


@pytest.mark.usefixtures("broker_process", "worker_process")
async def test_registry_is_empty_after_runs_end(
    client: Client, redis: Redis, namespace: str
) -> None:
    runs = [await start_report(client, f"k{i}", seconds=0 if i % 2 else 60) for i in range(20)]
    for i in range(0, 20, 2):
        await client.send("report/cancel.requested", {"reportId": f"k{i}"})
    finished = [
        await wait_for_status(client, run.run_id, "completed" if i % 2 else "cancelled")
        for i, run in enumerate(runs)
    ]
    assert len(finished) == 20
    # The index, the function's runs and the active set are empty: nothing can leak.
    assert await count_run_keys(redis, namespace, "idx:*") == 0
    assert await count_run_keys(redis, namespace, "fn-runs:*") == 0
    for keys in partition_keys(namespace):
        assert await redis.zcard(keys.active_runs) == 0
    # Finished run records stay readable for a while, then expire.
    run_keys = [
        key
        for keys in partition_keys(namespace)
        async for key in redis.scan_iter(match=f"{keys.shard}run:*")
    ]
    assert len(run_keys) == 20
    for key in run_keys:
        assert 0 < await redis.ttl(key) <= 86400


async def test_worker_sigterm_finishes_runs_and_exits(
    client: Client, redis: Redis, redis_url: str, namespace: str
) -> None:
    worker = start_worker(redis_url, namespace, shutdown_timeout="0.5")
    try:
        quick = await start_report(client, "s1", seconds=0.2)
        slow = await start_report(client, "s2", seconds=60)
        await wait_for_observation(redis, namespace, "s2", "started")
    finally:
        code = await anyio.to_thread.run_sync(worker.terminate)
    assert code == 0, worker.output
    # The short run was let finish; the long one was cancelled after shutdown_timeout.
    assert (await wait_for_status(client, quick.run_id, "completed")).status == "completed"
    stopped = await wait_for_status(client, slow.run_id, "cancelled")
    assert stopped.cancel_reason == "worker shutdown"
    for keys in partition_keys(namespace):
        assert await redis.exists(keys.signals(stopped.worker_id)) == 0


async def test_a_cancel_event_the_sdk_sends_is_matched_as_it_is_published(
    redis_url: str, client: Client, redis: Redis, namespace: str, topology: str
) -> None:
    """Client.send matches a cancel event in the script that publishes it
    (sdk/early_match.py): its run stops with no broker running. The broker, started after,
    decides the same entry and records the run signalled once. With several partitions the
    broker alone matches (it places and broadcasts)."""
    worker = start_worker(redis_url, namespace, shutdown_timeout="0.2")
    try:
        run = await start_report(client, "r9")
        await wait_for_observation(redis, namespace, "r9", "started")
        cancel_id = await client.send("report/cancel.requested", {"reportId": "r9"})
        if topology != "partitioned":
            await wait_for_observation(redis, namespace, "r9", "cancelled", timeout=5)
            info = await wait_for_status(client, run.run_id, "cancelled")
            assert info.cancelled_by == cancel_id
        else:
            await anyio.sleep(0.3)
            assert [o["what"] for o in await observed(redis, namespace, "r9")] == ["started"]
        broker, _http = start_broker(redis_url, namespace)
        try:
            await wait_for_status(client, run.run_id, "cancelled")
            decisions: list[dict[str, Any]] = []

            async def decided() -> bool:
                raw = await redis.lrange(Keys(namespace).decisions, 0, -1)
                decisions[:] = [d for d in map(json.loads, raw) if d["event_id"] == cancel_id]
                return bool(decisions)

            await wait_until(decided)
            ((decision),) = decisions
            assert (decision["decision"], decision["outcomes"]) == ("matched", {"signalled": 1})
            assert decision["signals_sent"] == 1
        finally:
            assert broker.terminate() == 0, broker.output
    finally:
        assert worker.terminate() == 0, worker.output
