"""rq: a blocking job stopped by ``send_stop_job_command``.

The worker is ``python -m rq.cli worker peers`` (``rq.Worker``: one forked work horse per
job). The command is a PUBLISH to the worker's channel; the worker SIGKILLs the work horse
and marks the job ``stopped``. The job's code is not told: the broadest ``except`` and the
``finally`` below never run, which the benchmark checks.
"""

from __future__ import annotations

import redis

from tests.benchmarks.peer_apps import observed_blocking_job, redis_url

DB = 4
QUEUE = "peers"

recorder = redis.Redis.from_url(redis_url(DB))


def job(key: str, workload: str) -> None:
    # rq tells the job nothing (it SIGKILLs the work horse): whatever it raises.
    observed_blocking_job(recorder, key, workload, cancellation=BaseException)
