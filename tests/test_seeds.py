"""The five write-ups in ``shared/seeds`` of cancel buttons that did not cancel, as tests.

Each failure they describe and the test that shows it cannot happen here (broker and
worker as separate processes unless noted):

Seed 0, "Inngest cancel button not actually cancelling runs"
- cancelOn config never synced after a deploy: ``test_rolling_deploy`` (drift reported
  by ``sync status``, exit 1) and ``test_sync::test_cancel_events_nobody_listens_to_are_
  reported`` (the orphan ``report/cancel.requested``).
- cancelled only between steps, a 60 s LLM step runs on: ``test_end_to_end::
  test_cancel_event_stops_only_the_targeted_run`` (interrupted mid-call, milliseconds).
- cancellation caught by an error handler: ``test_end_to_end::
  test_body_catching_exception_is_still_stopped``.
- cancel racing completion: ``test_end_to_end_semantics::
  test_cancels_racing_completions_each_end_one_way``.
- the cancel event lost on the way: ``test_reliability`` (re-sent signals, step backstop).
- dashboard status vs the function's state: one record (``Client.wait``), below.

Seed 1, "cancel button not working" (asyncio task registry)
- task removed from the registry before it finished, so the cancel found nothing:
  ``test_a_run_is_cancellable_at_every_moment_of_its_life`` (below).
- "it cancelled for a second, then went back to running" (resume after cancel):
  ``test_a_cancelled_run_never_runs_again`` (below) and ``test_modes::
  test_a_cancelled_run_id_cannot_be_started_again``.
- CancelledError swallowed: ``test_worker::test_a_body_that_swallows_the_cancel_is_
  cancelled_again`` and ``test_modes`` (level-triggered in both modes).

Seed 2, "cancel button implementation complete" (context-based, wallet-authenticated)
- ``Cancel(jobID)`` of a job whose context is not registered yet did nothing: a cancel
  by id of a run not registered yet is kept (``pending``) and lands when it registers:
  ``test_pending_cancels::test_a_run_cancelled_by_id_before_it_registered_never_runs_
  its_block`` and, with Celery's queued tasks, groups and chains,
  ``test_integration_celery::test_prefork_a_queued_task_cancelled_by_its_id_never_runs``.
- only the owner may cancel, 403 otherwise: ``test_end_to_end_semantics::
  test_a_cancel_by_id_needs_the_owner``.
- terminal state check, previous and new status in the answer: same test.
- every running execution of the job cancelled: ``test_end_to_end_semantics::
  test_cancelling_a_project_cancels_the_assets_it_spawned``.

Seed 3, "cancel generations" (database flag polled between poll iterations)
- a ``shouldCancel`` flag polled by long loops: ``test_end_to_end_semantics::
  test_a_thread_polling_check_stops_within_milliseconds``; async loops need no polling.
- CancellationError must not trigger a retry: ``test_modes::
  test_a_trigger_delivered_again_after_its_run_was_cancelled_starts_no_run``.
- a project's in-flight assets cancelled with it: the cascade test above.

Seed 4, "API task cancellation" (client disconnect races execution start)
- the cancel arrives before the run is registered: ``test_end_to_end_semantics::
  test_a_cancel_before_the_worker_started_cancels_the_queued_run_only`` and
  ``test_semantics`` (tombstones, both orders, expiry); by job id (``cancelJob(job.id)``
  before the orchestrator tracked it): ``test_pending_cancels`` (kept, then applied at
  registration, refused for another owner, expired and reported), and a cancel published
  before any worker or broker had started: ``test_trigger_lookback``.
- the client's Ctrl+C: a ``worker.run`` block cancelled from outside is recorded
  cancelled: ``test_hardening::test_an_outer_cancellation_of_a_run_block_is_recorded_
  as_such``.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from redis.asyncio import Redis

from sdk import Client
from sdk.keys import Keys
from sdk.triggers import triggered_run_id
from tests.helpers import (
    observed,
    run_of,
    wait_for_observation,
    wait_for_status,
)
from tests.processes import ProcessHandle, start_broker, start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def processes(redis_url: str, namespace: str) -> Iterator[ProcessHandle]:
    broker, _ = start_broker(redis_url, namespace)
    worker = start_worker(redis_url, namespace, shutdown_timeout="0.2")
    yield worker
    assert worker.terminate() == 0, worker.output
    assert broker.terminate() == 0, broker.output


async def test_a_run_is_cancellable_at_every_moment_of_its_life(
    client: Client, redis: Redis, namespace: str, processes: ProcessHandle
) -> None:
    """Seed 1: the registry lost the task before it finished. Runs of 10 ms steps lasting
    0.6 s are each cancelled at a moment of its own life, from its start to its last
    50 ms: each is found and stops mid-step, or had already completed, and every cancel
    published while its run had 0.15 s or more to go stopped it. Each run keeps its own
    time (started, then cancelled after its offset), so a slow machine shifts no moment."""
    runs: dict[int, str] = {}
    cancels: dict[int, str] = {}

    async def cancel_during_its_life(i: int) -> None:
        data = {"reportId": f"life{i}", "mode": "steps", "seconds": 0.6}
        runs[i] = await run_of(client, await client.send("report/generate.requested", data))
        await wait_for_observation(redis, namespace, f"life{i}", "started")
        await anyio.sleep(i * 0.05)  # 0 to 0.55 s into its life
        cancels[i] = await client.send("report/cancel.requested", {"reportId": f"life{i}"})

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(cancel_during_its_life, i)
    with_time_to_go = 0
    for i, run_id in runs.items():
        info = await client.wait(run_id, timeout=10)
        seen = [o["what"] for o in await observed(redis, namespace, f"life{i}")]
        if info.status == "cancelled":
            assert seen == ["started", "cancelled"], seen  # its body saw it and stopped
        else:
            assert (info.status, seen) == ("completed", ["started", "completed"])
        # Both on the Redis clock: the event id's time and the registration's.
        into_life_s = int(cancels[i].split("-")[0]) / 1000 - info.started_at.timestamp()
        if into_life_s <= 0.45:
            assert info.status == "cancelled", (i, into_life_s)
            with_time_to_go += 1
    assert with_time_to_go >= 6, with_time_to_go  # the moments were not all lost


async def test_a_cancelled_run_never_runs_again(
    client: Client, redis: Redis, namespace: str, processes: ProcessHandle
) -> None:
    """Seed 1: "it cancelled for a second, then went back to running". Once cancelled, a
    run's trigger delivered again (a consumer that crashed before acknowledging it), a
    second cancel and the heartbeats that follow leave it cancelled, and it is not run."""
    event_id = await client.send("report/generate.requested", {"reportId": "again"})
    run_id = await run_of(client, event_id)
    await wait_for_observation(redis, namespace, "again", "started")
    await client.send("report/cancel.requested", {"reportId": "again"})
    info = await client.wait(run_id, timeout=10)
    assert info.status == "cancelled"

    # The same trigger, delivered again to the worker's group (as after a crash).
    keys = Keys(namespace)
    group = keys.function_group("reports", "generate-report")
    await redis.xgroup_setid(keys.events, group, "0")
    assert triggered_run_id(keys, "reports", "generate-report", event_id) == run_id
    await anyio.sleep(0.5)  # heartbeats, re-sends, the re-read trigger
    assert (await client.cancel(run_id)).outcome == "already_cancelled"
    info = await wait_for_status(client, run_id, "cancelled")
    assert [o["what"] for o in await observed(redis, namespace, "again")] == [
        "started",
        "cancelled",
    ]
