"""A worker app for the end-to-end semantics tests: rules with expressions and timeouts,
owners, cascades and a function triggered by the outcome event.

Each run appends what its body observed to ``{namespace}:test:observed:{key}`` (``key``
is the trigger's ``reportId``, ``projectId`` or ``assetId``), so another process can check
what really happened. ``seconds`` in the trigger's data is how long a body works.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio

from sdk import RUN_CANCELLED_EVENT, CancelOn, RunContext, Worker
from sdk.connection import command_client
from tests.apps import serve

REDIS_URL, NAMESPACE = sys.argv[1], sys.argv[2]

worker = Worker(
    "studio",
    REDIS_URL,
    namespace=NAMESPACE,
    shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "0.2")),
    concurrency=int(os.environ.get("CONCURRENCY", "100")),
)
recorder = command_client(REDIS_URL)


async def record(key: str, what: str, ctx: RunContext, **extra: Any) -> None:
    entry = {"what": what, "run_id": ctx.run_id, "monotonic": time.monotonic(), **extra}
    with anyio.CancelScope(shield=True):
        await recorder.rpush(f"{NAMESPACE}:test:observed:{key}", json.dumps(entry))


async def work(ctx: RunContext, key: str) -> None:
    await record(key, "started", ctx)
    try:
        await ctx.step.run("work", anyio.sleep, float(ctx.event.data.get("seconds", 60)))
    except anyio.get_cancelled_exc_class():
        await record(key, "cancelled", ctx, reason=ctx.cancel_reason)
        raise
    await record(key, "completed", ctx)


@worker.function(
    id="generate-report",
    trigger="report/generate.requested",
    cancel_on=[
        CancelOn(event="report/cancel.requested", match="data.reportId"),
        # Cancel an account's runs of one tier: an expression only.
        CancelOn(
            event="account/cancel-all",
            if_="event.data.accountId == async.data.accountId"
            " && async.data.tier == event.data.tier",
        ),
        # Only within 2 s of the start: a "stop early" button.
        CancelOn(event="report/stop.early", match="data.reportId", timeout="2s"),
    ],
    owner="data.accountId",
)
async def generate_report(ctx: RunContext) -> None:
    await work(ctx, ctx.event.data["reportId"])


@worker.function(
    id="project",
    trigger="project/start.requested",
    cancel_on=[CancelOn(event="project/cancel.requested", match="data.projectId")],
)
async def project(ctx: RunContext) -> None:
    project_id = ctx.event.data["projectId"]
    for asset in ctx.event.data.get("assets", []):
        await ctx.spawn("asset/generate.requested", {"assetId": asset, "projectId": project_id})
    await work(ctx, project_id)


@worker.function(id="generate-asset", trigger="asset/generate.requested")
async def generate_asset(ctx: RunContext) -> None:
    await work(ctx, ctx.event.data["assetId"])


JOB_RULE = CancelOn(event="job/cancel.requested", match="data.jobId")


@worker.function(
    id="export", trigger="export/requested", cancel_on=[JOB_RULE], cancel_mode="between_steps"
)
async def export(ctx: RunContext) -> None:
    """Two steps that must each run whole: a cancel takes effect between them."""
    key = ctx.event.data["jobId"]
    await record(key, "started", ctx)
    for step in ("render", "upload"):
        await ctx.step.run(step, anyio.sleep, float(ctx.event.data.get("seconds", 1)))
        await record(key, f"{step}-done", ctx)


@export.on_cancel
async def export_cleanup(ctx: RunContext, reason: str) -> None:
    await record(ctx.event.data["jobId"], "cleanup", ctx, reason=reason)


@worker.function(id="checkout", trigger="checkout/requested", cancel_on=[JOB_RULE])
async def checkout(ctx: RunContext) -> None:
    """A payment step that must not be cut in half, then an interruptible one."""
    key = ctx.event.data["jobId"]
    await record(key, "started", ctx)

    async def charge(seconds: float) -> None:
        await anyio.sleep(seconds)
        await record(key, "charged", ctx)

    await ctx.step.run("charge", charge, float(ctx.event.data.get("seconds", 1)), shield=True)
    # The cancel the shield held back takes effect here: the body does not go on.
    await record(key, "after-charge", ctx)
    await ctx.step.run("ship", anyio.sleep, 60)
    await record(key, "shipped", ctx)


@worker.function(id="crunch", trigger="crunch/requested", cancel_on=[JOB_RULE])
async def crunch(ctx: RunContext) -> None:
    """CPU-bound work in a thread that polls for the cancel (the seeds' shouldCancel)."""
    key = ctx.event.data["jobId"]
    await record(key, "started", ctx)

    def polling_loop() -> int:
        rounds = 0
        while True:
            ctx.check()  # raises RunCancelled once the cancel was received
            time.sleep(0.005)
            rounds += 1

    try:
        await ctx.step.run("crunch", polling_loop)
    except anyio.get_cancelled_exc_class():
        await record(key, "cancelled", ctx, reason=ctx.cancel_reason)
        raise


@worker.function(id="on-cancelled", trigger=RUN_CANCELLED_EVENT)
async def on_cancelled(ctx: RunContext) -> None:
    """Cleanup triggered by the outcome event: here it records what it was told."""
    data = ctx.event.data
    await record(f"outcome:{data['run_id']}", "outcome", ctx, data=data, event_id=ctx.event.id)


@worker.function(
    id="discard-draft",
    trigger=RUN_CANCELLED_EVENT,
    trigger_if="event.data.app_id == 'studio' && event.data.function_id == 'generate-report'",
)
async def discard_draft(ctx: RunContext) -> None:
    """Inngest's cleanup function on ``inngest/function.cancelled``, ported with its ``if``:
    only the outcomes of generate-report runs start it."""
    data = ctx.event.data
    await record(f"ported:{data['run_id']}", "discarded", ctx, data=data)


if __name__ == "__main__":
    serve(worker, recorder)
