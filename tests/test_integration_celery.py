"""Celery: tasks are runs. A real ``celery worker`` (prefork, then threads) on the private
Redis, a real broker process, and the test as the app: it sends tasks with Celery and
cancels them with ``SyncClient``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, chain, group

from broker import EmbeddedRedis
from sdk import OPERATOR
from sdk.integrations.celery import SENT_HEADER
from tests.celery_workers import (
    BLOCKING,
    POLLING,
    SPAWNING,
    Setup,
    app_with_broker,
    outcome_events_of,
    start_celery,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def setup(redis_server: EmbeddedRedis) -> Iterator[Setup]:
    with app_with_broker(redis_server.url) as setup:
        yield setup


@pytest.fixture(scope="module")
def prefork(setup: Setup) -> Iterator[str]:
    queue = f"{setup.namespace}-prefork"
    handle = start_celery(setup, "prefork", queue, concurrency=1)
    try:
        yield queue
    finally:
        handle.stop_group()


@pytest.fixture(scope="module")
def threads(setup: Setup) -> Iterator[str]:
    queue = f"{setup.namespace}-threads"
    handle = start_celery(setup, "threads", queue, concurrency=2)
    try:
        yield queue
    finally:
        handle.stop_group()


def test_prefork_a_cancel_by_task_id_stops_a_blocking_call_at_once(
    setup: Setup, prefork: str
) -> None:
    result = setup.send(BLOCKING, prefork, report_id="p1", account_id="a1")
    setup.wait_observed("p1", "started")
    # The task id is the run id; the function declares an owner.
    assert setup.client.cancel(result.id, actor="a2").outcome == "forbidden"
    cancelled_at = time.monotonic()
    assert setup.client.cancel(result.id, actor="a1").outcome == "signalled"
    seen = setup.wait_observed("p1", "cancelled")
    assert seen["monotonic"] - cancelled_at < 1.0  # not the 30 s sleep
    # A BaseException: the task's `except Exception` did not swallow it; `finally` ran.
    assert seen["exception"] == "sdk.integrations.celery.TaskCancelled"
    setup.wait_observed("p1", "ended")  # its `finally` records just after
    assert [o["what"] for o in setup.observed("p1")] == ["started", "cancelled", "ended"]
    setup.wait_state(result, "REVOKED")
    info = setup.client.wait(result.id, timeout=5)
    assert info.status == "cancelled"
    assert info.function_id == BLOCKING


def test_prefork_a_cancel_event_matches_the_task_by_its_arguments(
    setup: Setup, prefork: str
) -> None:
    result = setup.send(BLOCKING, prefork, report_id="p2")
    setup.wait_observed("p2", "started")
    setup.client.send("report/cancel.requested", {"report_id": "p2"})
    setup.wait_state(result, "REVOKED")
    assert setup.wait_observed("p2", "cancelled")["exception"].endswith("TaskCancelled")
    info = setup.client.wait(result.id, timeout=5)
    assert info.cancel_reason == "cancel event report/cancel.requested"
    # The pool process survived: it runs the next task.
    done = setup.send(BLOCKING, prefork, report_id="p3", seconds=0)
    assert done.get(timeout=10) == "report"


def test_prefork_a_task_cancelled_while_queued_is_revoked_without_running(
    setup: Setup, prefork: str
) -> None:
    busy = setup.send(BLOCKING, prefork, report_id="p4", account_id="a1")  # the only pool process
    setup.wait_observed("p4", "started")
    queued = setup.send(BLOCKING, prefork, report_id="p5")
    setup.client.send("report/cancel.requested", {"report_id": "p5"})
    time.sleep(0.2)  # the broker handles the cancel while p5 waits in the queue
    assert setup.client.cancel(busy.id, actor="a1").outcome == "signalled"
    setup.wait_state(queued, "REVOKED")
    assert setup.observed("p5") == []
    info = setup.client.wait(queued.id, timeout=5)
    assert "before the run registered" in (info.cancel_reason or "")


def test_prefork_a_queued_task_cancelled_by_its_id_never_runs(setup: Setup, prefork: str) -> None:
    """Celery's `revoke` of a queued task, as seeds 002 and 004: the id is known, the run
    does not exist yet. The cancel is kept; the task is revoked when the pool picks it up."""
    busy = setup.send(BLOCKING, prefork, report_id="q1", account_id="a1")
    setup.wait_observed("q1", "started")
    queued = setup.send(BLOCKING, prefork, report_id="q2", account_id="a1")
    # The function declares an owner: the kept cancel is checked against it on arrival.
    result = setup.client.cancel(queued.id, reason="the user clicked Cancel", actor="a1")
    assert (result.outcome, result.status) == ("pending", None)
    assert result.kept_until is not None
    assert setup.client.cancel(busy.id, actor="a1").outcome == "signalled"
    setup.wait_state(queued, "REVOKED")
    assert setup.observed("q2") == []  # its body never ran
    info = setup.client.wait(queued.id, timeout=5)
    assert (info.status, info.cancel_reason, info.cancelled_by) == (
        "cancelled",
        "the user clicked Cancel",
        "api",
    )
    (outcome,) = outcome_events_of(setup, queued.id)
    assert outcome["reason"] == "the user clicked Cancel"


def test_prefork_an_id_cancelled_before_the_task_was_sent_never_runs(
    setup: Setup, prefork: str
) -> None:
    task_id = f"job-{uuid.uuid4().hex}"
    assert setup.client.cancel(task_id, actor=OPERATOR).outcome == "pending"
    result = setup.send(BLOCKING, prefork, task_id=task_id, report_id="q3", seconds=0)
    setup.wait_state(result, "REVOKED")
    assert setup.observed("q3") == []
    assert setup.client.wait(task_id, timeout=5).status == "cancelled"


def test_prefork_queued_members_of_a_group_cancelled_by_id_never_run(
    setup: Setup, prefork: str
) -> None:
    busy = setup.send(BLOCKING, prefork, report_id="g0", account_id="a1")
    setup.wait_observed("g0", "started")
    members = group(
        setup.signature(BLOCKING, prefork, report_id=f"g{i}", seconds=0) for i in (1, 2, 3)
    ).apply_async()
    first, second, third = members.results
    for member in (first, third):
        assert setup.client.cancel(member.id, actor=OPERATOR).outcome == "pending"
    setup.client.cancel(busy.id, actor="a1")
    assert second.get(timeout=10) == "report"
    for member in (first, third):
        setup.wait_state(member, "REVOKED")
    assert setup.observed("g1") == setup.observed("g3") == []
    assert setup.client.wait(first.id, timeout=5).status == "cancelled"


def test_prefork_a_later_link_of_a_chain_cancelled_by_id_never_runs(
    setup: Setup, prefork: str
) -> None:
    """The second link is sent only when the first has finished: its id is known from the
    start (``result.parent``), its run exists only then."""
    links = chain(
        setup.signature(BLOCKING, prefork, report_id="c1", seconds=0.5),
        setup.signature(BLOCKING, prefork, report_id="c2", seconds=0),
    ).apply_async()
    second, first = links, links.parent
    setup.wait_observed("c1", "started")
    assert setup.client.cancel(second.id, actor=OPERATOR).outcome == "pending"
    assert first.get(timeout=10) == "report"
    setup.wait_state(second, "REVOKED")
    assert setup.observed("c2") == []
    assert setup.client.wait(second.id, timeout=5).status == "cancelled"


def test_a_cancelled_task_delivered_again_never_runs(setup: Setup, prefork: str) -> None:
    result = setup.send(BLOCKING, prefork, report_id="p6", account_id="a1")
    setup.wait_observed("p6", "started")
    setup.client.cancel(result.id, actor="a1")
    setup.wait_state(result, "REVOKED")
    again = setup.send(BLOCKING, prefork, task_id=result.id, report_id="p6b")
    time.sleep(0.5)
    setup.wait_state(again, "REVOKED")
    assert setup.observed("p6b") == []


def test_threads_a_cancel_stops_the_task_at_its_cancellable_point_and_is_not_retried(
    setup: Setup, threads: str
) -> None:
    result = setup.send(POLLING, threads, report_id="t1")
    setup.wait_observed("t1", "started")
    cancelled_at = time.monotonic()
    setup.client.cancel(result.id)
    seen = setup.wait_observed("t1", "cancelled")
    assert seen["monotonic"] - cancelled_at < 1.0
    setup.wait_state(result, "REVOKED")
    # autoretry_for=(Exception,) would have retried RunCancelled: never for a cancel.
    time.sleep(0.5)
    setup.wait_observed("t1", "ended")
    assert [o["what"] for o in setup.observed("t1")] == ["started", "cancelled", "ended"]
    assert setup.client.wait(result.id, timeout=5).status == "cancelled"


def test_threads_a_task_without_cancellable_points_is_abandoned_not_stopped(
    setup: Setup, threads: str
) -> None:
    """The documented limit: a thread cannot be stopped from outside."""
    result = setup.send(BLOCKING, threads, report_id="t2", account_id="a1", seconds=2)
    setup.wait_observed("t2", "started")
    setup.client.cancel(result.id, actor="a1")
    # Recorded cancelled after the worker's thread_grace (1 s), while the body still runs.
    info = setup.client.wait(result.id, timeout=5)
    assert (info.status, info.abandoned_thread) == ("cancelled", True)
    assert "completed" not in [o["what"] for o in setup.observed("t2")]
    setup.wait_observed("t2", "completed", timeout=5)
    setup.wait_state(result, "REVOKED")  # its result is discarded


def test_a_spawned_task_and_its_retry_are_cancelled_with_their_parent(
    setup: Setup, threads: str
) -> None:
    """``task.spawn`` makes the task a child of the current run; a retry of the child stays
    that run's child, so cancelling the parent still reaches it. (The prefork pool, where
    the children are interrupted mid-call: tests/test_example_celery_pipeline.py.)"""
    parent = setup.send(SPAWNING, threads, report_id="s1")
    child_id = setup.wait_observed("s1", "spawned")["child"]
    deadline = time.monotonic() + 10
    # The child records once per attempt; until its first attempt has, there is nothing.
    while not (sections := setup.observed("s1-section")) or sections[-1]["retries"] != 1:
        assert time.monotonic() < deadline, sections
        time.sleep(0.02)
    retry = sections[-1]
    assert retry["run_id"] == f"{child_id}-retry-1"
    info = setup.client.get_run(retry["run_id"])
    assert info is not None
    assert info.parent_run_id == parent.id

    result = setup.client.cancel(parent.id)
    assert result.outcome == "signalled"
    assert result.cascaded == (retry["run_id"],)
    assert setup.wait_observed("s1-section", "cancelled")["exception"].endswith("RunCancelled")
    assert setup.client.wait(retry["run_id"], timeout=5).cancel_reason == (
        f"parent run {parent.id} was cancelled"
    )
    setup.wait_state(parent, "REVOKED")


def test_spawn_outside_a_cancellable_task_has_no_parent(redis_url: str, namespace: str) -> None:
    from sdk import Worker
    from sdk.integrations.celery import CeleryCancellation

    app = Celery("spawns", broker="memory://")
    cancels = CeleryCancellation(app, Worker("spawns", redis_url, namespace=namespace))

    @cancels.task(name="spawns.job")
    def job() -> None:  # pragma: no cover - never sent
        pass

    with pytest.raises(LookupError):
        job.spawn()


def test_sending_a_task_stamps_the_time_it_was_sent(redis_url: str, namespace: str) -> None:
    """The stamp orders the run against cancel events published while it is queued."""
    from sdk import Worker
    from sdk.integrations.celery import CeleryCancellation

    app = Celery("stamps", broker="memory://")
    cancels = CeleryCancellation(app, Worker("stamps", redis_url, namespace=namespace))

    @cancels.task(name="stamps.job")
    def job(report_id: str) -> None:  # pragma: no cover - only sent
        pass

    before = int(time.time() * 1000)
    job.delay(report_id="s1")
    job.apply_async(kwargs={"report_id": "s2"}, headers={"other": "kept"})
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue("celery")
        first, second = queue.get(timeout=2), queue.get(timeout=2)
        queue.close()
    after = int(time.time() * 1000)
    assert before <= first.headers[SENT_HEADER] <= after
    assert before <= second.headers[SENT_HEADER] <= after
    assert second.headers["other"] == "kept"
