"""arq jobs for tests/test_integration_arq.py, run by a real arq worker.

``python -m arq tests.apps.arq_jobs.WorkerSettings`` with ``REDIS_URL`` and ``NAMESPACE``
in the environment (the queue is ``{NAMESPACE}:arq``). Each job writes what its body
observed to the list ``{namespace}:test:observed:{report_id}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from arq.connections import RedisSettings

from sdk import CancelOn, Worker
from sdk.integrations.arq import ArqCancellation, current_run
from sdk.logs import configure_logging

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("NAMESPACE", "cancel")
QUEUE = f"{NAMESPACE}:arq"

configure_logging("info", "json")
worker = Worker("reports", REDIS_URL, namespace=NAMESPACE, heartbeat_interval=1.0)
cancels = ArqCancellation(worker)


async def record(ctx: dict[str, Any], report_id: str, what: str, **extra: Any) -> None:
    entry = {"what": what, "monotonic": time.monotonic(), **extra}
    key = f"{NAMESPACE}:test:observed:{report_id}"
    await asyncio.shield(ctx["redis"].rpush(key, json.dumps(entry)))


@cancels.job(
    trigger="report/generate.requested",
    cancel_on=[CancelOn(event="report/cancel.requested", match="data.report_id")],
    owner="data.account_id",
)
async def long_report(
    ctx: dict[str, Any], report_id: str, account_id: str = "a1", seconds: float = 30
) -> str:
    await record(ctx, report_id, "started", run_id=current_run().run_id)
    try:
        try:
            await asyncio.sleep(seconds)  # an awaited LLM call
        except asyncio.CancelledError as exc:
            await record(ctx, report_id, "cancelled", exception=type(exc).__name__)
        # Level-triggered: a job that caught the cancellation is cancelled again here.
        await asyncio.sleep(seconds)
        await record(ctx, report_id, "carried on")
    finally:
        await record(ctx, report_id, "ended")
    return "report"


class WorkerSettings:
    functions = (long_report,)  # arq reads the settings class's attributes
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    queue_name = QUEUE
    on_startup = cancels.on_startup
    on_shutdown = cancels.on_shutdown
    poll_delay = 0.05
    max_tries = 3
