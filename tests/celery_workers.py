"""A real Celery worker for the integration tests, and the test process as the app: it
sends tasks by name with Celery (without importing their module, whose worker setup is
the worker process's) and cancels them with ``SyncClient``."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery, Signature
from celery.result import AsyncResult

from sdk import RUN_CANCELLED_EVENT, SyncClient
from sdk.integrations.celery import SENT_HEADER
from sdk.keys import Keys
from tests.processes import ProcessHandle, start_broker

BLOCKING = "tests.apps.celery_tasks.blocking_report"
POLLING = "tests.apps.celery_tasks.polling_report"
SPAWNING = "tests.apps.celery_tasks.spawning_report"
RETRYING = "tests.apps.celery_tasks.retrying_report"
STUBBORN = "tests.apps.celery_tasks.stubborn_report"


class Setup:
    def __init__(self, redis_url: str, namespace: str) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.celery = Celery("sender", broker=redis_url, backend=redis_url)
        self.client = SyncClient(redis_url, namespace=namespace)

    def send(self, name: str, queue: str, task_id: str | None = None, **kwargs: Any) -> AsyncResult:
        # What CancellableTask.apply_async adds (the tests send by name, without importing
        # the tasks' module, whose worker is configured for the worker process).
        headers = {SENT_HEADER: int(time.time() * 1000)}
        return self.celery.send_task(
            name, kwargs=kwargs, queue=queue, task_id=task_id, headers=headers
        )

    def signature(self, name: str, queue: str, **kwargs: Any) -> Signature:
        """A link of a chain or a member of a group, as ``send`` would send it (immutable:
        a link does not take the previous link's result)."""
        headers = {SENT_HEADER: int(time.time() * 1000)}
        return self.celery.signature(
            name, kwargs=kwargs, queue=queue, headers=headers, immutable=True
        )

    def observed(self, report_id: str) -> list[dict[str, Any]]:
        raw = self.redis.lrange(f"{self.namespace}:test:observed:{report_id}", 0, -1)
        return [json.loads(item) for item in raw]

    def wait_observed(self, report_id: str, what: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.observed(report_id):
                if entry["what"] == what:
                    return entry
            time.sleep(0.01)
        raise TimeoutError(f"{report_id}: no {what!r} in {self.observed(report_id)}")

    def wait_state(self, result: AsyncResult, state: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while result.state != state:
            assert time.monotonic() < deadline, f"{result.id} is {result.state}, not {state}"
            time.sleep(0.02)


@contextmanager
def app_with_broker(redis_url: str) -> Iterator[Setup]:
    """A broker process in a namespace of its own, and the app's side of it."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    broker, _ = start_broker(redis_url, namespace)
    setup = Setup(redis_url, namespace)
    try:
        yield setup
    finally:
        setup.client.close()
        setup.celery.close()
        broker.terminate()


@contextmanager
def celery_queue(
    setup: Setup,
    pool: str,
    name: str,
    concurrency: int,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """A ``celery worker`` serving the queue ``{namespace}-{name}`` (see
    :func:`start_celery`), stopped with its pool processes at the end; yields the queue."""
    queue = f"{setup.namespace}-{name}"
    handle = start_celery(setup, pool, queue, concurrency, *extra, env=env)
    try:
        yield queue
    finally:
        handle.stop_group()


def start_celery(
    setup: Setup,
    pool: str,
    queue: str,
    concurrency: int,
    *extra: str,
    env: dict[str, str] | None = None,
) -> ProcessHandle:
    """``celery worker`` for ``queue`` (``extra``: more options, ``-E``,
    ``--max-tasks-per-child 1``; ``env``: more environment), once its first pool process
    has entered the worker."""
    args = [sys.executable, "-m", "celery", "-A", "tests.apps.celery_tasks", "worker"]
    args += ["--pool", pool, "--concurrency", str(concurrency), "-Q", queue, *extra]
    args += ["-n", f"{queue}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    args += ["--loglevel", "WARNING"]
    env = {"REDIS_URL": setup.redis_url, "NAMESPACE": setup.namespace, **(env or {})}
    handle = ProcessHandle(args, env=env, new_session=True)
    handle.wait_for_log("worker.started", timeout=30)
    return handle


def outcome_events_of(setup: Setup, run_id: str) -> list[dict[str, Any]]:
    """The ``cancel/run.cancelled`` events published for ``run_id``."""
    found = []
    for _, fields in setup.redis.xrange(Keys(setup.namespace).events):
        event = json.loads(fields["event"])
        if event["name"] == RUN_CANCELLED_EVENT and event["data"]["run_id"] == run_id:
            found.append(event["data"])
    return found
