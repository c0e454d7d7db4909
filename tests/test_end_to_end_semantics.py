"""Cancellation semantics across processes: `cancel-broker run` and the worker of
``tests/apps/studio.py`` as separate processes, driven through the SDK client the way an
application drives them. What the bodies observed is read back from Redis."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from sdk import OPERATOR, Client, RunInfo
from tests.helpers import (
    broker_drained,
    observed,
    run_of,
    status_is,
    topology_url,
    wait_for_observation,
    wait_until,
)
from tests.processes import ProcessHandle, start_broker, start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.topologies]


@pytest.fixture(scope="module")
def namespace(topology: str) -> str:
    """One namespace for the module: its tests share one broker and one worker process.
    One per topology: the cluster and the partitioned cluster are the same servers."""
    return f"e2e-semantics-{topology}"


@pytest.fixture(scope="module", autouse=True)
def processes(
    request: pytest.FixtureRequest, topology: str, namespace: str
) -> Iterator[dict[str, ProcessHandle]]:
    url = topology_url(request, topology)
    broker, _http = start_broker(url, namespace)
    worker = start_worker(url, namespace, app="studio")
    yield {"broker": broker, "worker": worker}
    assert worker.terminate() == 0, worker.output
    assert broker.terminate() == 0, broker.output


async def start(client: Client, report_id: str, **data: Any) -> str:
    data = {"reportId": report_id, "accountId": "a1", "tier": "free", **data}
    return await run_of(client, await client.send("report/generate.requested", data))


async def final(client: Client, run_id: str) -> RunInfo:
    return await client.wait(run_id, timeout=10)


async def settled(redis: Redis, namespace: str) -> None:
    await wait_until(lambda: broker_drained(redis, namespace))


async def test_an_expression_rule_cancels_what_it_holds_for_and_the_body_sees_it(
    client: Client, redis: Redis, namespace: str
) -> None:
    free, pro = await start(client, "x1"), await start(client, "x2", tier="pro")
    await wait_for_observation(redis, namespace, "x1", "started")
    cancel = await client.send("account/cancel-all", {"accountId": "a1", "tier": "free"})
    info = await final(client, free)
    assert (info.status, info.cancelled_by) == ("cancelled", cancel)
    seen = await wait_for_observation(redis, namespace, "x1", "cancelled")
    assert seen["reason"] == "cancel event account/cancel-all"
    await settled(redis, namespace)
    assert await status_is(client, pro, "running")
    # A field the cancel lacks is null, as in Inngest: `null == "pro"` is false, no error.
    await client.send("account/cancel-all", {"accountId": "a1"})
    await settled(redis, namespace)
    info = await client.get_run(pro)
    assert info is not None
    assert (info.status, info.rule_error) == ("running", None)
    assert (await client.cancel(pro, actor="a1")).outcome == "signalled"


async def test_a_rule_with_a_timeout_stops_listening(
    client: Client, redis: Redis, namespace: str
) -> None:
    early = await start(client, "t1")
    await client.send("report/stop.early", {"reportId": "t1"})
    assert (await final(client, early)).status == "cancelled"
    late = await start(client, "t2")
    await anyio.sleep(2.2)
    await client.send("report/stop.early", {"reportId": "t2"})
    await settled(redis, namespace)
    assert await status_is(client, late, "running")
    await client.send("report/cancel.requested", {"reportId": "t2"})
    assert (await final(client, late)).status == "cancelled"


async def test_a_cancel_by_id_needs_the_owner(client: Client, redis: Redis, namespace: str) -> None:
    run_id = await start(client, "o1", accountId="acct-7")
    refused = await client.cancel(run_id, reason="not yours", actor="acct-8")
    assert (refused.outcome, refused.status) == ("forbidden", "running")
    accepted = await client.cancel(run_id, reason="user clicked cancel", actor="acct-7")
    assert (accepted.outcome, accepted.previous_status, accepted.status) == (
        "signalled",
        "running",
        "cancelling",
    )
    info = await final(client, run_id)
    assert (info.status, info.cancelled_by, info.cancel_reason) == (
        "cancelled",
        "api",
        "user clicked cancel",
    )
    again = await client.cancel(run_id, actor=OPERATOR)
    assert (again.outcome, again.previous_status) == ("already_cancelled", "cancelled")


async def test_cancel_many_across_processes(client: Client) -> None:
    before = datetime.now(UTC)
    await anyio.sleep(0.01)
    runs = {
        tier: await start(client, f"m-{tier}", tier=tier, accountId="bulk")
        for tier in ("free", "pro")
    }
    results = await client.cancel_many(
        "generate-report",
        app_id="studio",
        started_after=before,
        if_='event.data.accountId == "bulk" && event.data.tier == "pro"',
    )
    assert [(r.run_id, r.outcome) for r in results.results] == [(runs["pro"], "signalled")]
    assert (await final(client, runs["pro"])).status == "cancelled"
    assert await status_is(client, runs["free"], "running")
    await client.cancel(runs["free"], actor=OPERATOR)


async def test_cancelling_a_project_cancels_the_assets_it_spawned(
    client: Client, redis: Redis, namespace: str
) -> None:
    """The video-generation seed: a project and its asset generations, on the worker."""
    await client.send("project/start.requested", {"projectId": "p1", "assets": ["p1-a", "p1-b"]})
    for asset in ("p1-a", "p1-b"):
        await wait_for_observation(redis, namespace, asset, "started")
    children = [o["run_id"] for a in ("p1-a", "p1-b") for o in await observed(redis, namespace, a)]
    cancel = await client.send("project/cancel.requested", {"projectId": "p1"})
    for asset, run_id in zip(("p1-a", "p1-b"), children, strict=True):
        info = await final(client, run_id)
        assert info.status == "cancelled"
        assert info.cancelled_by is not None
        assert info.cancelled_by.startswith("parent:")
        seen = await wait_for_observation(redis, namespace, asset, "cancelled")
        assert seen["reason"].startswith("parent run")
    parent = (await observed(redis, namespace, "p1"))[0]["run_id"]
    assert (await final(client, parent)).cancelled_by == cancel


async def test_the_outcome_event_triggers_a_cleanup_function(
    client: Client, redis: Redis, namespace: str
) -> None:
    run_id = await start(client, "c1")
    await wait_for_observation(redis, namespace, "c1", "started")
    cancel = await client.send("report/cancel.requested", {"reportId": "c1"})
    info = await final(client, run_id)
    seen = await wait_for_observation(redis, namespace, f"outcome:{run_id}", "outcome")
    data = seen["data"]
    assert (data["run_id"], data["function_id"], data["cancelled_by"]) == (
        run_id,
        "generate-report",
        cancel,
    )
    assert data["event"]["data"]["reportId"] == "c1"
    assert data["latency_ms"] == pytest.approx(info.cancel_latency_ms)
    assert 0 <= data["latency_ms"] < 1000


async def test_a_ported_inngest_cleanup_function_starts_only_for_its_function(
    client: Client, redis: Redis, namespace: str, processes: dict[str, ProcessHandle]
) -> None:
    """Inngest's handler on ``inngest/function.cancelled`` with an ``if`` on the function,
    ported as ``trigger_if`` on ``cancel/run.cancelled`` (``discard-draft`` in studio.py)."""
    report = await start(client, "c2")
    project = await run_of(
        client, await client.send("project/start.requested", {"projectId": "p9"})
    )
    await wait_for_observation(redis, namespace, "c2", "started")
    await wait_for_observation(redis, namespace, "p9", "started")
    await client.send("report/cancel.requested", {"reportId": "c2"})
    await client.send("project/cancel.requested", {"projectId": "p9"})
    seen = await wait_for_observation(redis, namespace, f"ported:{report}", "discarded")
    assert seen["data"]["event"]["data"]["reportId"] == "c2"
    # The project's outcome reached the unfiltered handler; the ported one said it let it
    # go, and started nothing for it.
    outcome = await wait_for_observation(redis, namespace, f"outcome:{project}", "outcome")
    worker = processes["worker"]

    async def filtered_out() -> bool:
        return any(
            (line["function_id"], line["event_id"]) == ("discard-draft", outcome["event_id"])
            for line in worker.logs("trigger.filtered_out")
        )

    await wait_until(filtered_out, timeout=10)
    assert await observed(redis, namespace, f"ported:{project}") == []


async def test_duplicates_and_a_second_broker_cancel_each_run_once(
    client: Client, redis: Redis, namespace: str, redis_url: str
) -> None:
    second, _ = start_broker(redis_url, namespace, "--consumer", "second")
    try:
        runs = [await start(client, f"d{i}") for i in range(10)]
        for i in range(10):
            for _ in range(3):
                await client.send("report/cancel.requested", {"reportId": f"d{i}"})
        for run_id in runs:
            assert (await final(client, run_id)).status == "cancelled"
        for run_id in runs:
            outcome = await wait_for_observation(redis, namespace, f"outcome:{run_id}", "outcome")
            assert outcome["data"]["run_id"] == run_id
        await settled(redis, namespace)
        for run_id in runs:  # exactly one outcome per run
            assert len(await observed(redis, namespace, f"outcome:{run_id}")) == 1
    finally:
        assert second.terminate() == 0, second.output


async def test_cancels_racing_completions_each_end_one_way(
    client: Client, redis: Redis, namespace: str
) -> None:
    answers = {}
    for i in range(20):
        run_id = await start(client, f"race{i}", seconds=0.02)
        await anyio.sleep(0.02 + 0.002 * (i % 5))
        answers[run_id] = await client.cancel(run_id, actor="a1")
    for run_id, answer in answers.items():
        info = await final(client, run_id)
        if answer.outcome == "already_completed":
            assert info.status == "completed"
        else:
            assert answer.outcome == "signalled"
            assert info.status in ("cancelled", "completed")
        observations = [
            o["what"] for o in await observed(redis, namespace, info.event.data["reportId"])
        ]
        # The body ran once, and the record agrees with what it saw: a body interrupted by
        # the cancellation is recorded cancelled; a run recorded completed did all its
        # work. (A body that finished its work but had not returned when the cancel reached
        # its worker is recorded cancelled: it never returns completed after a cancel.) On
        # a loaded machine the cancel can reach the worker before the body began: it never
        # begins then, and the run is recorded cancelled.
        if not observations:
            assert (answer.outcome, info.status) == ("signalled", "cancelled")
            continue
        assert observations.count("started") == 1
        assert observations[-1] in ("cancelled", "completed")
        if observations[-1] == "cancelled":
            assert info.status == "cancelled"
        if info.status == "completed":
            assert observations[-1] == "completed"


async def test_a_cancel_before_the_worker_started_cancels_the_queued_run_only(
    client: Client, redis: Redis, redis_url: str, topology: str
) -> None:
    """The API-cancel seed: the cancel arrives before the run is registered. Here the
    delay is a worker that is not running yet; a Regenerate after the cancel survives."""
    namespace = f"e2e-tombstones-{topology}"
    broker, _ = start_broker(redis_url, namespace)
    # A worker ran before (a deploy): its function's group exists, so triggers published
    # while no worker runs wait in the stream.
    worker: ProcessHandle | None = start_worker(redis_url, namespace, app="studio")
    assert worker.terminate() == 0
    try:
        async with Client(redis_url, namespace=namespace) as queued:
            data = {"reportId": "q1", "accountId": "a1", "tier": "free"}
            old = await queued.send("report/generate.requested", data)
            cancel = await queued.send("report/cancel.requested", {"reportId": "q1"})
            new = await queued.send("report/generate.requested", data)
            await wait_until(lambda: broker_drained(redis, namespace))
            worker = start_worker(redis_url, namespace, app="studio")
            old_run, new_run = await run_of(queued, old), await run_of(queued, new)
            info = await queued.wait(old_run, timeout=10)
            assert (info.status, info.cancelled_by) == ("cancelled", cancel)
            await anyio.sleep(0.2)
            assert await status_is(queued, new_run, "running")
            assert await queued.cancel(new_run, actor="a1")
    finally:
        if worker is not None:
            assert worker.terminate() == 0, worker.output
        assert broker.terminate() == 0, broker.output


async def start_job(client: Client, trigger: str, job_id: str, **data: Any) -> str:
    return await run_of(client, await client.send(trigger, {"jobId": job_id, **data}))


async def what(redis: Redis, namespace: str, key: str) -> list[str]:
    return [o["what"] for o in await observed(redis, namespace, key)]


async def test_between_steps_lets_the_step_finish_and_runs_the_cleanup_hook(
    client: Client, redis: Redis, namespace: str
) -> None:
    # Steps longer than a cancel takes to reach a loaded worker: it arrives in the first.
    run_id = await start_job(client, "export/requested", "j1", seconds=1.5)
    await wait_for_observation(redis, namespace, "j1", "started")
    await client.send("job/cancel.requested", {"jobId": "j1"})
    info = await final(client, run_id)
    assert info.status == "cancelled"
    # The step in flight ran whole; the next never started; the hook ran before the end
    # was recorded, with the reason.
    assert await what(redis, namespace, "j1") == ["started", "render-done", "cleanup"]
    cleanup = (await observed(redis, namespace, "j1"))[-1]
    assert cleanup["reason"] == "cancel event job/cancel.requested"
    assert info.on_cancel_error is None


async def test_a_shielded_step_completes_and_the_cancel_takes_effect_after_it(
    client: Client, redis: Redis, namespace: str
) -> None:
    # The charge lasts longer than a cancel takes to reach a loaded worker: the cancel must
    # arrive while it runs.
    run_id = await start_job(client, "checkout/requested", "j2", seconds=1.5)
    await wait_for_observation(redis, namespace, "j2", "started")
    await client.send("job/cancel.requested", {"jobId": "j2"})
    info = await final(client, run_id)
    assert info.status == "cancelled"
    assert await what(redis, namespace, "j2") == ["started", "charged"]


async def test_a_thread_polling_check_stops_within_milliseconds(
    client: Client, redis: Redis, namespace: str
) -> None:
    run_id = await start_job(client, "crunch/requested", "j3")
    await wait_for_observation(redis, namespace, "j3", "started")
    await client.send("job/cancel.requested", {"jobId": "j3"})
    info = await final(client, run_id)
    assert info.status == "cancelled"
    assert not info.abandoned_thread  # it stopped itself, well within the grace
    assert info.cancel_latency_ms is not None
    assert info.cancel_latency_ms < 500
    seen = await wait_for_observation(redis, namespace, "j3", "cancelled")
    assert seen["reason"] == "cancel event job/cancel.requested"
