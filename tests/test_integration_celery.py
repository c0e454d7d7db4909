"""Celery: tasks are runs. A real ``celery worker`` (prefork, then threads) on the private
Redis, a real broker process, and the test as the app: it sends tasks with Celery and
cancels them with ``SyncClient``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, chain, group

from sdk import OPERATOR
from sdk.integrations.celery import SENT_HEADER
from tests.celery_workers import (
    BLOCKING,
    POLLING,
    SPAWNING,
    Setup,
    celery_queue,
    outcome_events_of,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def prefork(celery_app: Setup) -> Iterator[str]:
    with celery_queue(celery_app, "prefork", "prefork", 1) as queue:
        yield queue


@pytest.fixture(scope="module")
def threads(celery_app: Setup) -> Iterator[str]:
    with celery_queue(celery_app, "threads", "threads", 2) as queue:
        yield queue


def test_prefork_a_cancel_by_task_id_stops_a_blocking_call_at_once(
    celery_app: Setup, prefork: str
) -> None:
    result = celery_app.send(BLOCKING, prefork, report_id="p1", account_id="a1")
    celery_app.wait_observed("p1", "started")
    # The task id is the run id; the function declares an owner.
    assert celery_app.client.cancel(result.id, actor="a2").outcome == "forbidden"
    cancelled_at = time.monotonic()
    assert celery_app.client.cancel(result.id, actor="a1").outcome == "signalled"
    seen = celery_app.wait_observed("p1", "cancelled")
    assert seen["monotonic"] - cancelled_at < 1.0  # not the 30 s sleep
    # A BaseException: the task's `except Exception` did not swallow it; `finally` ran.
    assert seen["exception"] == "sdk.integrations.celery.TaskCancelled"
    celery_app.wait_observed("p1", "ended")  # its `finally` records just after
    assert [o["what"] for o in celery_app.observed("p1")] == ["started", "cancelled", "ended"]
    celery_app.wait_state(result, "REVOKED")
    info = celery_app.client.wait(result.id, timeout=5)
    assert info.status == "cancelled"
    assert info.function_id == BLOCKING


def test_prefork_a_cancel_event_matches_the_task_by_its_arguments(
    celery_app: Setup, prefork: str
) -> None:
    result = celery_app.send(BLOCKING, prefork, report_id="p2")
    celery_app.wait_observed("p2", "started")
    celery_app.client.send("report/cancel.requested", {"report_id": "p2"})
    celery_app.wait_state(result, "REVOKED")
    assert celery_app.wait_observed("p2", "cancelled")["exception"].endswith("TaskCancelled")
    info = celery_app.client.wait(result.id, timeout=5)
    assert info.cancel_reason == "cancel event report/cancel.requested"
    # The pool process survived: it runs the next task.
    done = celery_app.send(BLOCKING, prefork, report_id="p3", seconds=0)
    assert done.get(timeout=10) == "report"


def test_prefork_a_task_cancelled_while_queued_is_revoked_without_running(
    celery_app: Setup, prefork: str
) -> None:
    busy = celery_app.send(
        BLOCKING, prefork, report_id="p4", account_id="a1"
    )  # the only pool process
    celery_app.wait_observed("p4", "started")
    queued = celery_app.send(BLOCKING, prefork, report_id="p5")
    celery_app.client.send("report/cancel.requested", {"report_id": "p5"})
    time.sleep(0.2)  # the broker handles the cancel while p5 waits in the queue
    assert celery_app.client.cancel(busy.id, actor="a1").outcome == "signalled"
    celery_app.wait_state(queued, "REVOKED")
    assert celery_app.observed("p5") == []
    info = celery_app.client.wait(queued.id, timeout=5)
    assert "before the run registered" in (info.cancel_reason or "")


def test_prefork_a_queued_task_cancelled_by_its_id_never_runs(
    celery_app: Setup, prefork: str
) -> None:
    """Celery's `revoke` of a queued task, as seeds 002 and 004: the id is known, the run
    does not exist yet. The cancel is kept; the task is revoked when the pool picks it up."""
    busy = celery_app.send(BLOCKING, prefork, report_id="q1", account_id="a1")
    celery_app.wait_observed("q1", "started")
    queued = celery_app.send(BLOCKING, prefork, report_id="q2", account_id="a1")
    # The function declares an owner: the kept cancel is checked against it on arrival.
    result = celery_app.client.cancel(queued.id, reason="the user clicked Cancel", actor="a1")
    assert (result.outcome, result.status) == ("pending", None)
    assert result.kept_until is not None
    assert celery_app.client.cancel(busy.id, actor="a1").outcome == "signalled"
    celery_app.wait_state(queued, "REVOKED")
    assert celery_app.observed("q2") == []  # its body never ran
    info = celery_app.client.wait(queued.id, timeout=5)
    assert (info.status, info.cancel_reason, info.cancelled_by) == (
        "cancelled",
        "the user clicked Cancel",
        "api",
    )
    (outcome,) = outcome_events_of(celery_app, queued.id)
    assert outcome["reason"] == "the user clicked Cancel"


def test_prefork_an_id_cancelled_before_the_task_was_sent_never_runs(
    celery_app: Setup, prefork: str
) -> None:
    task_id = f"job-{uuid.uuid4().hex}"
    assert celery_app.client.cancel(task_id, actor=OPERATOR).outcome == "pending"
    result = celery_app.send(BLOCKING, prefork, task_id=task_id, report_id="q3", seconds=0)
    celery_app.wait_state(result, "REVOKED")
    assert celery_app.observed("q3") == []
    assert celery_app.client.wait(task_id, timeout=5).status == "cancelled"


def test_prefork_queued_members_of_a_group_cancelled_by_id_never_run(
    celery_app: Setup, prefork: str
) -> None:
    busy = celery_app.send(BLOCKING, prefork, report_id="g0", account_id="a1")
    celery_app.wait_observed("g0", "started")
    members = group(
        celery_app.signature(BLOCKING, prefork, report_id=f"g{i}", seconds=0) for i in (1, 2, 3)
    ).apply_async()
    first, second, third = members.results
    for member in (first, third):
        assert celery_app.client.cancel(member.id, actor=OPERATOR).outcome == "pending"
    celery_app.client.cancel(busy.id, actor="a1")
    assert second.get(timeout=10) == "report"
    for member in (first, third):
        celery_app.wait_state(member, "REVOKED")
    assert celery_app.observed("g1") == celery_app.observed("g3") == []
    assert celery_app.client.wait(first.id, timeout=5).status == "cancelled"


def test_prefork_a_later_link_of_a_chain_cancelled_by_id_never_runs(
    celery_app: Setup, prefork: str
) -> None:
    """The second link is sent only when the first has finished: its id is known from the
    start (``result.parent``), its run exists only then."""
    links = chain(
        celery_app.signature(BLOCKING, prefork, report_id="c1", seconds=0.5),
        celery_app.signature(BLOCKING, prefork, report_id="c2", seconds=0),
    ).apply_async()
    second, first = links, links.parent
    celery_app.wait_observed("c1", "started")
    assert celery_app.client.cancel(second.id, actor=OPERATOR).outcome == "pending"
    assert first.get(timeout=10) == "report"
    celery_app.wait_state(second, "REVOKED")
    assert celery_app.observed("c2") == []
    assert celery_app.client.wait(second.id, timeout=5).status == "cancelled"


def test_a_cancelled_task_delivered_again_never_runs(celery_app: Setup, prefork: str) -> None:
    result = celery_app.send(BLOCKING, prefork, report_id="p6", account_id="a1")
    celery_app.wait_observed("p6", "started")
    celery_app.client.cancel(result.id, actor="a1")
    celery_app.wait_state(result, "REVOKED")
    again = celery_app.send(BLOCKING, prefork, task_id=result.id, report_id="p6b")
    time.sleep(0.5)
    celery_app.wait_state(again, "REVOKED")
    assert celery_app.observed("p6b") == []


def test_threads_a_cancel_stops_the_task_at_its_cancellable_point_and_is_not_retried(
    celery_app: Setup, threads: str
) -> None:
    result = celery_app.send(POLLING, threads, report_id="t1")
    celery_app.wait_observed("t1", "started")
    cancelled_at = time.monotonic()
    celery_app.client.cancel(result.id)
    seen = celery_app.wait_observed("t1", "cancelled")
    assert seen["monotonic"] - cancelled_at < 1.0
    celery_app.wait_state(result, "REVOKED")
    # autoretry_for=(Exception,) would have retried RunCancelled: never for a cancel.
    time.sleep(0.5)
    celery_app.wait_observed("t1", "ended")
    assert [o["what"] for o in celery_app.observed("t1")] == ["started", "cancelled", "ended"]
    assert celery_app.client.wait(result.id, timeout=5).status == "cancelled"


def test_threads_a_task_without_cancellable_points_is_abandoned_not_stopped(
    celery_app: Setup, threads: str
) -> None:
    """The documented limit: a thread cannot be stopped from outside."""
    result = celery_app.send(BLOCKING, threads, report_id="t2", account_id="a1", seconds=2)
    celery_app.wait_observed("t2", "started")
    celery_app.client.cancel(result.id, actor="a1")
    # Recorded cancelled after the worker's thread_grace (1 s), while the body still runs.
    info = celery_app.client.wait(result.id, timeout=5)
    assert (info.status, info.abandoned_thread) == ("cancelled", True)
    assert "completed" not in [o["what"] for o in celery_app.observed("t2")]
    celery_app.wait_observed("t2", "completed", timeout=5)
    celery_app.wait_state(result, "REVOKED")  # its result is discarded


def test_a_spawned_task_and_its_retry_are_cancelled_with_their_parent(
    celery_app: Setup, threads: str
) -> None:
    """``task.spawn`` makes the task a child of the current run; a retry of the child stays
    that run's child, so cancelling the parent still reaches it. (The prefork pool, where
    the children are interrupted mid-call: tests/test_example_celery_pipeline.py.)"""
    parent = celery_app.send(SPAWNING, threads, report_id="s1")
    child_id = celery_app.wait_observed("s1", "spawned")["child"]
    deadline = time.monotonic() + 10
    # The child records once per attempt; until its first attempt has, there is nothing.
    while not (sections := celery_app.observed("s1-section")) or sections[-1]["retries"] != 1:
        assert time.monotonic() < deadline, sections
        time.sleep(0.02)
    retry = sections[-1]
    assert retry["run_id"] == f"{child_id}-retry-1"
    info = celery_app.client.get_run(retry["run_id"])
    assert info is not None
    assert info.parent_run_id == parent.id

    result = celery_app.client.cancel(parent.id)
    assert result.outcome == "signalled"
    assert result.cascaded == (retry["run_id"],)
    assert celery_app.wait_observed("s1-section", "cancelled")["exception"].endswith("RunCancelled")
    assert celery_app.client.wait(retry["run_id"], timeout=5).cancel_reason == (
        f"parent run {parent.id} was cancelled"
    )
    celery_app.wait_state(parent, "REVOKED")


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
