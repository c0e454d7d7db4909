"""Celery tasks for tests/test_integration_celery.py, run by a real ``celery worker``.

``python -m celery -A tests.apps.celery_tasks worker --pool prefork|threads -Q <queue>``
with ``REDIS_URL`` and ``NAMESPACE`` in the environment. Each task writes what its body
observed to the list ``{namespace}:test:observed:{report_id}`` (``started``, ``cancelled``
with the exception's class, ``swallowed``, ``completed``, ``ended``), so the test process
can check what really happened in the pool.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import redis
from celery import Celery, signals

from sdk import CancelOn, Worker
from sdk.integrations.celery import CeleryCancellation, current_run
from sdk.logs import configure_logging

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("NAMESPACE", "cancel")

configure_logging("info", "json")
app = Celery("reports", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # The JSON log lines go to the real stderr, which the test reads.
    worker_redirect_stdouts=False,
    task_acks_late=True,
)
worker = Worker(
    "reports",
    REDIS_URL,
    namespace=NAMESPACE,
    heartbeat_interval=float(os.environ.get("HEARTBEAT_INTERVAL", "1")),
    thread_grace=1.0,
)
cancels = CeleryCancellation(app, worker)
recorder = redis.Redis.from_url(REDIS_URL)
RULE = CancelOn(event="report/cancel.requested", match="data.report_id")


def record(report_id: str, what: str, **extra: Any) -> None:
    entry = {"what": what, "pid": os.getpid(), "monotonic": time.monotonic(), **extra}
    recorder.rpush(f"{NAMESPACE}:test:observed:{report_id}", json.dumps(entry))


@signals.task_revoked.connect
def record_revoked(
    request: Any = None, terminated: Any = None, signum: Any = None, **_: Any
) -> None:
    """Celery's own signal, which existing handlers (and our tests) listen to; recorded
    under ``{report_id}-revoked``, apart from what the body observed."""
    report_id = (getattr(request, "kwargs", None) or {}).get("report_id")
    if report_id:
        record(f"{report_id}-revoked", "revoked_signal", terminated=terminated, signum=signum)


def kind(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


@cancels.task(trigger="report/generate.requested", cancel_on=[RULE], owner="data.account_id")
def blocking_report(report_id: str, account_id: str = "a1", seconds: float = 30) -> str:
    """One long blocking call that checks nothing: only a signal can stop it."""
    record(report_id, "started")
    try:
        try:
            time.sleep(seconds)
        except Exception as exc:  # the trap from the seeds: must not swallow a cancel
            record(report_id, "swallowed", exception=kind(exc))
    except BaseException as exc:
        record(report_id, "cancelled", exception=kind(exc))
        raise
    else:
        record(report_id, "completed")
    finally:
        record(report_id, "ended")
    return "report"


@cancels.task(trigger="report/generate.requested", cancel_on=[RULE])
def stubborn_report(report_id: str, mode: str = "swallow") -> str:
    """A task no interrupt stops: ``swallow`` catches every one and sleeps on; ``c-loop``
    runs C code that holds the GIL and never returns to the interpreter (no signal
    handler, no other thread of its process runs meanwhile)."""
    record(report_id, "started")
    if mode == "c-loop":
        sum(itertools.repeat(0, 10**12))
    else:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                time.sleep(60)
            except BaseException as exc:
                record(report_id, "swallowed", exception=kind(exc))
    record(report_id, "completed")
    return "report"


@cancels.task(
    trigger="report/generate.requested",
    cancel_on=[RULE],
    autoretry_for=(Exception,),
    retry_backoff=False,
    max_retries=3,
    default_retry_delay=0,
)
def polling_report(report_id: str, seconds: float = 30) -> str:
    """A loop with cancellable points (for the thread pool), retried on any Exception."""
    record(report_id, "started")
    try:
        current_run().sleep(seconds)
    except BaseException as exc:
        record(report_id, "cancelled", exception=kind(exc))
        raise
    finally:
        record(report_id, "ended")
    record(report_id, "completed")
    return "report"


@cancels.task(trigger="report/generate.requested", cancel_on=[RULE])
def spawning_report(report_id: str) -> str:
    """Spawns a section task (a child of this run), then waits for a cancel."""
    child = flaky_section.spawn(report_id=f"{report_id}-section")
    record(report_id, "spawned", child=child.id)
    current_run().sleep(30)
    return "report"


@cancels.task(
    trigger="section/write.requested",
    bind=True,
    autoretry_for=(ValueError,),
    max_retries=1,
    default_retry_delay=0,
    queue=f"{NAMESPACE}-threads",  # the thread pool's queue (spawn is delay: default routing)
)
def flaky_section(self: Any, report_id: str) -> str:
    """Fails its first attempt; the retry waits for a cancel (cooperatively)."""
    record(report_id, "started", retries=self.request.retries, run_id=current_run().run_id)
    if not self.request.retries:
        raise ValueError("the first attempt fails")
    try:
        current_run().sleep(30)
    except BaseException as exc:
        record(report_id, "cancelled", exception=kind(exc))
        raise
    return "section"


@cancels.task(trigger="report/generate.requested", cancel_on=[RULE], bind=True, max_retries=2)
def retrying_report(self: Any, report_id: str, countdown: float = 3) -> str:
    """Asks to be retried after ``countdown`` seconds on its first attempt."""
    record(report_id, "started", retries=self.request.retries)
    if not self.request.retries:
        raise self.retry(countdown=countdown)
    record(report_id, "completed")
    return "report"
