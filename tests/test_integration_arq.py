"""arq: jobs are runs. A real arq worker process on the private Redis, a real broker
process, and the test as the app: it enqueues jobs with arq and cancels them."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from arq.jobs import Job, JobStatus

from broker import EmbeddedRedis
from sdk import Client, RunCancelled
from tests.processes import ProcessHandle, start_broker

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


@pytest.fixture(scope="module")
def arq_worker(redis_server: EmbeddedRedis) -> Iterator[str]:
    """A broker and an arq worker process under a namespace of their own."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    broker, _ = start_broker(redis_server.url, namespace)
    env = {"REDIS_URL": redis_server.url, "NAMESPACE": namespace}
    handle = ProcessHandle(
        [sys.executable, "-m", "arq", "tests.apps.arq_jobs.WorkerSettings"],
        env=env,
        new_session=True,
    )
    try:
        handle.wait_for_log("worker.started", timeout=30)
        yield namespace
    finally:
        handle.stop_group()
        broker.terminate()


@pytest.fixture
async def arq(redis_url: str, arq_worker: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(
        RedisSettings.from_dsn(redis_url), default_queue_name=f"{arq_worker}:arq"
    )
    yield pool
    await pool.aclose()


@pytest.fixture
async def app_client(redis_url: str, arq_worker: str) -> AsyncIterator[Client]:
    async with Client(redis_url, namespace=arq_worker) as client:
        yield client


async def observed(arq: ArqRedis, namespace: str, report_id: str) -> list[dict[str, Any]]:
    raw = await arq.lrange(f"{namespace}:test:observed:{report_id}", 0, -1)
    return [json.loads(item) for item in raw]


async def wait_observed(
    arq: ArqRedis, namespace: str, report_id: str, what: str, timeout: float = 10
) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            for entry in await observed(arq, namespace, report_id):
                if entry["what"] == what:
                    return entry
            await anyio.sleep(0.01)


async def result_of(job: Job, timeout: float = 10) -> Any:
    """``job.result()``, once the job is complete. (arq's own wait reads the result, then
    the queue, in two commands: a job finishing in between is "not in queue", whose
    ResultNotFound a loaded machine sees now and then. Its status is read atomically.)"""
    with anyio.fail_after(timeout):
        while await job.status() != JobStatus.complete:
            await anyio.sleep(0.01)
    return await job.result(timeout=timeout)


async def enqueue(arq: ArqRedis, **kwargs: Any) -> Job:
    job = await arq.enqueue_job("long_report", **kwargs)
    assert job is not None
    return job


async def test_a_cancel_by_job_id_interrupts_the_job_at_its_await(
    arq: ArqRedis, app_client: Client, arq_worker: str
) -> None:
    job = await enqueue(arq, report_id="j1", account_id="a1")
    started = await wait_observed(arq, arq_worker, "j1", "started")
    assert started["run_id"] == job.job_id
    assert (await app_client.cancel(job.job_id, actor="a2")).outcome == "forbidden"
    cancelled_at = time.monotonic()
    assert (await app_client.cancel(job.job_id, actor="a1")).outcome == "signalled"
    seen = await wait_observed(arq, arq_worker, "j1", "cancelled")
    assert seen["monotonic"] - cancelled_at < 0.5  # arq's own abort polls every 0.5 s
    assert seen["exception"] == "CancelledError"
    with pytest.raises(RunCancelled):
        await result_of(job)
    # Caught once, cancelled again at the next await; never retried. The job's result can
    # be stored before its last observation is (a race under load): wait for it.
    await wait_observed(arq, arq_worker, "j1", "ended")
    assert [o["what"] for o in await observed(arq, arq_worker, "j1")] == [
        "started",
        "cancelled",
        "ended",
    ]
    assert await job.status() == JobStatus.complete
    info = await app_client.wait(job.job_id, timeout=5)
    assert (info.status, info.function_id) == ("cancelled", "long_report")


async def test_a_cancel_event_reaches_a_running_job_and_a_queued_one(
    arq: ArqRedis, app_client: Client, arq_worker: str
) -> None:
    running = await enqueue(arq, report_id="j2")
    await wait_observed(arq, arq_worker, "j2", "started")
    queued = await enqueue(arq, report_id="j3", _defer_by=1.0)  # waits in the queue
    await app_client.send("report/cancel.requested", {"report_id": "j2"})
    await app_client.send("report/cancel.requested", {"report_id": "j3"})
    with pytest.raises(RunCancelled):
        await result_of(running)
    with pytest.raises(RunCancelled, match="before the run registered"):
        await result_of(queued)
    assert await observed(arq, arq_worker, "j3") == []  # its body never ran
    info = await app_client.wait(running.job_id, timeout=5)
    assert info.cancel_reason == "cancel event report/cancel.requested"


async def test_a_job_that_is_not_cancelled_completes(
    arq: ArqRedis, app_client: Client, arq_worker: str
) -> None:
    job = await enqueue(arq, report_id="j4", seconds=0)
    assert await result_of(job) == "report"
    assert (await app_client.wait(job.job_id, timeout=5)).status == "completed"
