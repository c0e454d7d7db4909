"""Celery: a blocking task in a prefork pool, revoked with ``terminate=True, signal="SIGUSR1"``.

The worker is ``python -m celery -A tests.benchmarks.peer_apps.celery_app worker --pool
prefork --concurrency 1``. ``revoke`` is broadcast to the workers' pidbox (a Redis PUBLISH);
the worker running the task sends SIGUSR1 to its pool process, whose handler raises
``SoftTimeLimitExceeded`` (an ``Exception``) in the task, interrupting even a blocking call.
"""

from __future__ import annotations

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from tests.benchmarks.peer_apps import observed_blocking_job, redis_url

DB = 3

app = Celery("peers", broker=redis_url(DB))
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
recorder = redis.Redis.from_url(redis_url(DB))


@app.task(name="peers.job")
def job(key: str, workload: str) -> None:
    observed_blocking_job(recorder, key, workload, cancellation=SoftTimeLimitExceeded)
