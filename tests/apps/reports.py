"""A report worker used by the end-to-end tests, the benchmark and the demo.

Each run writes what its body observed to the list ``{namespace}:test:observed:{reportId}``
(``started``, ``cancelled`` with the CLOCK_MONOTONIC time it saw the cancellation and the
exception's class, ``swallowed``, ``completed``) so that another process can check what
really happened.

The trigger's data selects the body: ``seconds`` (how long the work takes, default 60),
``mode``: ``sleep`` (one long awaited call), ``steps`` (a loop of 10 ms steps),
``catch-exception`` (the long call wrapped in ``except Exception``), ``block-loop`` (a
blocking ``time.sleep`` of ``seconds`` in an async step, then a long awaited call),
``fail`` (raises, with the trigger's ``card`` in a local).

``REPORTS_VERSION=v1`` runs the old deploy, whose function declares no ``cancel_on``
(the stale configuration of the first seed); ``CANCEL_APP_VERSION`` names the version.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import anyio
import structlog

from sdk import CancelOn, RunContext, Worker
from sdk.connection import CONNECTION_ERRORS, command_client
from tests.apps import serve

# A namespace of "-": none given, the SDK's own default (CANCEL_BROKER_NAMESPACE, else cancel).
REDIS_URL, GIVEN_NAMESPACE = sys.argv[1], sys.argv[2]

worker = Worker(
    "reports",
    REDIS_URL,
    namespace=None if GIVEN_NAMESPACE == "-" else GIVEN_NAMESPACE,
    shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "30")),
    heartbeat_interval=float(os.environ.get("HEARTBEAT_INTERVAL", "5")),
    concurrency=int(os.environ.get("CONCURRENCY", "100")),
    retention=timedelta(seconds=float(os.environ.get("RETENTION", "86400"))),
)
NAMESPACE = worker.keys.namespace
CANCEL_RULES = (
    []
    if os.environ.get("REPORTS_VERSION") == "v1"
    else [CancelOn(event="report/cancel.requested", match="data.reportId")]
)
# The SDK's own kind of client (a blocking pool: thousands of runs record at once in the
# fault tests; a cluster client for a redis+cluster:// URL).
recorder = command_client(REDIS_URL)
log = structlog.get_logger("reports")


async def record(ctx: RunContext, what: str, **extra: Any) -> None:
    if ctx.event.data.get("quiet"):
        return  # the soak benchmark: nobody reads the observations
    entry = {"what": what, "run_id": ctx.run_id, "monotonic": time.monotonic(), **extra}
    with anyio.CancelScope(shield=True):
        key = f"{NAMESPACE}:test:observed:{ctx.event.data['reportId']}"
        for attempt in range(5):
            try:
                await recorder.rpush(key, json.dumps(entry))
                return
            except CONNECTION_ERRORS:
                # redis-py's cluster client drops connections in use when its slot map
                # changes (a slot moving under the cluster tests): the observation is the
                # test's evidence, so it is sent again.
                if attempt == 4:
                    raise
                await anyio.sleep(0.05)


async def call_llm(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "text"


async def block_loop(seconds: float) -> str:
    time.sleep(seconds)  # noqa: ASYNC251 - the trap on purpose: it holds the whole loop
    return "text"


@worker.function(
    id="generate-report",
    trigger="report/generate.requested",
    cancel_on=CANCEL_RULES,
)
async def generate_report(ctx: RunContext) -> str:
    seconds = float(ctx.event.data.get("seconds", 60))
    mode = ctx.event.data.get("mode", "sleep")
    await record(ctx, "started")
    try:
        if mode == "steps":
            deadline = time.monotonic() + seconds
            step = 0
            while time.monotonic() < deadline:
                await ctx.step.run(f"chunk-{step}", call_llm, 0.01)
                step += 1
        elif mode == "block-loop":
            await ctx.step.run("blocking", block_loop, seconds)
            await ctx.step.run("llm", call_llm, 60)
        elif mode == "fail":
            card = ctx.event.data["card"]  # a local a rich traceback would print
            raise ValueError(f"payment declined for a card ending {card[-4:]}")
        elif mode == "catch-exception":
            try:
                await ctx.step.run("llm", call_llm, seconds)
            except Exception as exc:  # the trap from the seeds: must not swallow a cancel
                await record(ctx, "swallowed", error=repr(exc))
        else:
            await ctx.step.run("llm", call_llm, seconds)
    except anyio.get_cancelled_exc_class() as exc:
        seen = f"{type(exc).__module__}.{type(exc).__qualname__}"
        await record(ctx, "cancelled", reason=ctx.cancel_reason, exception=seen)
        raise
    await record(ctx, "completed")
    return "report"


if __name__ == "__main__":
    serve(worker, recorder)
