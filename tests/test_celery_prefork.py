"""Celery's prefork pool, its default: every pool process has its own identity, decided
after the fork, so one that exits or dies takes only its own runs with it; what Celery's
own revoke does for chains, retries and monitors, our cancels do too; and a task that
ignores its cancel loses its pool process.

Real ``celery worker`` processes (prefork, ``--concurrency 3`` with task events,
``--concurrency 2 --max-tasks-per-child 1``, and ``--concurrency 1`` for the stubborn
tasks), a real broker, the test as the app.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from celery import chain

from sdk import OPERATOR
from tests.celery_workers import (
    BLOCKING,
    RETRYING,
    STUBBORN,
    Setup,
    celery_queue,
    start_celery,
)
from tests.processes import ProcessHandle, alive, children_of, sync_status

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pool(celery_app: Setup) -> Iterator[str]:
    """Three pool processes, sending task events (``-E``) as Flower needs."""
    with celery_queue(celery_app, "prefork", "pool", 3, "-E") as queue:
        yield queue


@pytest.fixture(scope="module")
def one_task_per_child(celery_app: Setup) -> Iterator[str]:
    """Each pool process exits after one task (``worker_max_tasks_per_child=1``)."""
    with celery_queue(
        celery_app, "prefork", "short-lived", 2, "--max-tasks-per-child", "1"
    ) as queue:
        yield queue


@pytest.fixture(scope="module")
def single(celery_app: Setup) -> Iterator[tuple[str, ProcessHandle]]:
    """One pool process. Heartbeats 5 s apart: a process stuck in C code cannot send them,
    and must be terminated for its cancel, not reaped for its silence first."""
    queue = f"{celery_app.namespace}-single"
    handle = start_celery(celery_app, "prefork", queue, 1, env={"HEARTBEAT_INTERVAL": "5"})
    try:
        yield queue, handle
    finally:
        handle.stop_group()


def wait_status(celery_app: Setup, run_id: str, status: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (info := celery_app.client.get_run(run_id)) is None or info.status != status:
        assert time.monotonic() < deadline, f"{run_id}: {info and info.status}, not {status}"
        time.sleep(0.05)


def test_a_pool_process_killed_loses_only_its_own_run(celery_app: Setup, pool: str) -> None:
    """SIGKILL of one pool process: its run is recorded lost within the heartbeat window
    (it was left running for ever), and the runs of its siblings go on, cancellable."""
    sent = [celery_app.send(BLOCKING, pool, report_id=f"k{i}", account_id="a1") for i in range(3)]
    started = [celery_app.wait_observed(f"k{i}", "started", timeout=20) for i in range(3)]
    assert len({s["pid"] for s in started}) == 3  # one task per pool process
    runs = [celery_app.client.get_run(result.id) for result in sent]
    assert len({run.worker_id for run in runs if run is not None}) == 3  # three identities
    os.kill(started[0]["pid"], signal.SIGKILL)
    wait_status(celery_app, sent[0].id, "lost")
    for result in sent[1:]:  # untouched: a sibling's death is not theirs
        assert celery_app.client.get_run(result.id).status == "running"  # type: ignore[union-attr]
    for i, result in enumerate(sent[1:], start=1):
        assert celery_app.client.cancel(result.id, actor="a1").outcome == "signalled"
        celery_app.wait_state(result, "REVOKED")
        assert celery_app.wait_observed(f"k{i}", "cancelled")["exception"].endswith("TaskCancelled")


def test_pool_processes_that_exit_after_each_task_leave_their_siblings_alone(
    celery_app: Setup, one_task_per_child: str
) -> None:
    """With worker_max_tasks_per_child=1 every task's pool process exits after it: those
    exits (a clean stop of their own worker identity) do not touch a long sibling task."""
    queue = one_task_per_child
    long = celery_app.send(BLOCKING, queue, report_id="m0", account_id="a1", seconds=30)
    celery_app.wait_observed("m0", "started", timeout=20)
    short = [celery_app.send(BLOCKING, queue, report_id=f"m{i}", seconds=0) for i in range(1, 4)]
    pids = set()
    for i, result in enumerate(short, start=1):
        assert result.get(timeout=20) == "report"
        pids.add(celery_app.wait_observed(f"m{i}", "started")["pid"])
    assert len(pids) == 3  # a new pool process for each
    # Each process its own identity: the exits deregistered theirs, not the long task's.
    identities = {celery_app.client.get_run(r.id).worker_id for r in [long, *short]}  # type: ignore[union-attr]
    assert len(identities) == 4
    time.sleep(3)  # past the heartbeat window (1 s x 2.5): a lost run would show by now
    info = celery_app.client.get_run(long.id)
    assert info is not None
    assert info.status == "running"
    _, state = anyio.run(sync_status, celery_app.redis_url, celery_app.namespace)
    live = {worker["worker_id"] for worker in state["workers"]}
    assert info.worker_id in live
    assert not live & (identities - {info.worker_id})
    assert [o["what"] for o in celery_app.observed("m0")] == ["started"]
    assert celery_app.client.cancel(long.id, actor="a1").outcome == "signalled"
    celery_app.wait_state(long, "REVOKED")


def test_a_cancel_published_while_a_chains_first_link_runs_cancels_the_later_links(
    celery_app: Setup, pool: str
) -> None:
    """A later link is sent when the first has finished, after the cancel: it counts as
    triggered with its chain, so the cancel (a tombstone by then) is newer and applies."""
    first = celery_app.signature(BLOCKING, pool, report_id="ch1", seconds=1)
    # As the worker sends it: no stamp of its own (Setup.signature stamps the first).
    second = celery_app.celery.signature(
        BLOCKING, kwargs={"report_id": "ch2", "seconds": 0}, queue=pool, immutable=True
    )
    links = chain(first, second).apply_async()
    celery_app.wait_observed("ch1", "started")
    celery_app.client.send("report/cancel.requested", {"report_id": "ch2"})
    assert links.parent.get(timeout=10) == "report"
    celery_app.wait_state(links, "REVOKED")
    assert celery_app.observed("ch2") == []
    info = celery_app.client.wait(links.id, timeout=5)
    assert info.cancel_reason == (
        "cancel event report/cancel.requested (it arrived before the run registered)"
    )


def test_a_task_waiting_on_a_retry_countdown_is_cancelled_by_its_task_id(
    celery_app: Setup, pool: str
) -> None:
    """The first attempt ended (it asked for a retry in 3 s): a cancel by the task id is
    passed on to the retry's run, kept until it registers, and the retry never runs."""
    result = celery_app.send(RETRYING, pool, report_id="rt1", countdown=3)
    celery_app.wait_observed("rt1", "started")
    celery_app.wait_state(result, "RETRY")
    first = celery_app.client.get_run(result.id)
    assert first is not None
    assert (first.status, first.continued_by) == ("failed", f"{result.id}-retry-1")
    cancelled = celery_app.client.cancel(result.id, reason="user clicked cancel")
    assert (cancelled.run_id, cancelled.outcome) == (result.id, "pending")
    celery_app.wait_state(result, "REVOKED", timeout=15)
    assert [o.get("retries") for o in celery_app.observed("rt1") if o["what"] == "started"] == [0]
    retry = celery_app.client.wait(f"{result.id}-retry-1", timeout=5)
    assert (retry.status, retry.cancel_reason) == ("cancelled", "user clicked cancel")


def test_our_cancels_fire_celerys_task_revoked_signal_and_event(
    celery_app: Setup, pool: str
) -> None:
    """Existing ``task_revoked`` handlers and Flower (task events) see our cancels."""
    events: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    listening, stop = threading.Event(), threading.Event()

    def receive() -> None:
        with celery_app.celery.connection_for_read() as connection:
            receiver = celery_app.celery.events.Receiver(
                connection,
                handlers={"task-revoked": events.append, "cancel-broker-probe": probes.append},
            )
            ready = receiver.on_consume_ready

            def on_ready(*args: Any, **kwargs: Any) -> None:
                ready(*args, **kwargs)
                listening.set()

            receiver.on_consume_ready = on_ready  # type: ignore[method-assign]
            threading.Thread(
                target=lambda: (stop.wait(), setattr(receiver, "should_stop", True)), daemon=True
            ).start()
            receiver.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        assert listening.wait(10)
        # Subscribed once it receives: probe until an event of ours comes back.
        deadline = time.monotonic() + 10
        while not probes:
            assert time.monotonic() < deadline, "the event receiver never subscribed"
            with celery_app.celery.events.default_dispatcher(hostname="probe@test") as dispatcher:
                dispatcher.send("cancel-broker-probe")
            time.sleep(0.1)
        running = celery_app.send(BLOCKING, pool, report_id="ev1", account_id="a1")
        celery_app.wait_observed("ev1", "started")
        celery_app.client.cancel(running.id, actor=OPERATOR)
        celery_app.wait_state(running, "REVOKED")
        signalled = celery_app.wait_observed("ev1-revoked", "revoked_signal")
        assert (signalled["terminated"], signalled["signum"]) == (True, int(signal.SIGUSR2))
        queued_id = f"job-{uuid.uuid4().hex}"
        celery_app.client.cancel(queued_id, actor=OPERATOR)
        queued = celery_app.send(BLOCKING, pool, task_id=queued_id, report_id="ev2", seconds=0)
        celery_app.wait_state(queued, "REVOKED")
        assert celery_app.wait_observed("ev2-revoked", "revoked_signal")["terminated"] is False
        assert celery_app.observed("ev2") == []  # revoked before its body ran
        deadline = time.monotonic() + 10
        while {e["uuid"] for e in events} < {running.id, queued_id}:
            assert time.monotonic() < deadline, events
            time.sleep(0.05)
        by_id = {e["uuid"]: e for e in events}
        assert by_id[running.id]["terminated"] is True
        assert by_id[queued_id]["terminated"] is False
    finally:
        stop.set()
        thread.join(5)


@pytest.mark.parametrize("mode", ["swallow", "c-loop"])
def test_a_task_that_ignores_its_cancel_loses_its_pool_process(
    celery_app: Setup, single: tuple[str, ProcessHandle], mode: str
) -> None:
    """``swallow`` catches every interrupt; ``c-loop`` holds the GIL in C code, so that
    nothing of its process runs. Either way, the worker's ``thread_grace`` (1 s) plus a
    second after the cancel, Celery's main process kills the pool process: the task ends
    REVOKED (``task_revoked``, ``terminated``, SIGKILL), the run ``cancelled`` and
    ``terminated``, a new pool process replaces it, and no process is left behind."""
    queue, celery = single
    report_id = f"st-{mode}"
    result = celery_app.send(STUBBORN, queue, report_id=report_id, mode=mode)
    pid = celery_app.wait_observed(report_id, "started", timeout=20)["pid"]
    sent_at = time.monotonic()
    celery_app.client.send("report/cancel.requested", {"report_id": report_id})
    celery_app.wait_state(result, "REVOKED", timeout=10)
    revoked_after = time.monotonic() - sent_at
    assert 2.0 <= revoked_after < 2.0 + 1.5, revoked_after
    signalled = celery_app.wait_observed(f"{report_id}-revoked", "revoked_signal")
    assert (signalled["terminated"], signalled["signum"]) == (True, int(signal.SIGKILL))
    wait_status(celery_app, result.id, "cancelled", timeout=5)
    info = celery_app.client.get_run(result.id)
    assert info is not None
    assert info.terminated
    assert "completed" not in [o["what"] for o in celery_app.observed(report_id)]
    # The killed process is gone from the process table; another takes its slot and runs
    # the next task.
    deadline = time.monotonic() + 10
    while alive(pid) or not children_of(celery.process.pid) - {pid}:
        assert time.monotonic() < deadline, "the pool process was not replaced"
        time.sleep(0.05)
    assert len(children_of(celery.process.pid)) == 1
    after = celery_app.send(BLOCKING, queue, report_id=f"{report_id}-next", seconds=0)
    assert after.get(timeout=20) == "report"
    assert celery_app.wait_observed(f"{report_id}-next", "started")["pid"] != pid
    # The dead process's identity left the registry at once.
    _, state = anyio.run(sync_status, celery_app.redis_url, celery_app.namespace)
    assert info.worker_id not in {worker["worker_id"] for worker in state["workers"]}
