"""arq: an async job cancelled by ``Job.abort()``.

The worker (``python -m arq tests.benchmarks.peer_apps.arq_app.WorkerSettings``) runs with
``allow_abort_jobs=True``; it reads the sorted set ``arq:abort`` once per ``poll_delay``
(arq's default, 0.5 s) and cancels the job's asyncio task.
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq.connections import RedisSettings

from tests.benchmarks.peer_apps import awaited_work, class_name, entry, observed_key, redis_url

DB = 1
POLL_DELAY_S = 0.5  # arq's default, spelled out: aborts are read once per poll


async def job(ctx: dict[str, Any], key: str, workload: str) -> None:
    redis = ctx["redis"]
    await redis.rpush(observed_key(key), entry("started"))
    try:
        await awaited_work(workload)
    except asyncio.CancelledError as exc:
        await redis.rpush(observed_key(key), entry("cancelled", exception=class_name(exc)))
        raise
    else:
        await redis.rpush(observed_key(key), entry("completed"))
    finally:
        await redis.rpush(observed_key(key), entry("ended"))


def settings() -> RedisSettings:
    return RedisSettings.from_dsn(redis_url(DB))


class WorkerSettings:
    functions = (job,)  # arq reads the settings class's attributes
    redis_settings = settings()
    allow_abort_jobs = True
    poll_delay = POLL_DELAY_S
