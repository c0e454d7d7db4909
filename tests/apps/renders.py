"""A render worker whose one step runs in a child process (``process=True``).

The trigger ``render/requested`` carries ``renderId``, ``mode`` (``spin``: a child that
ignores SIGTERM and spins; ``crash``: a child killed by SIGKILL) and ``pid_file``, where
the child writes its pid. What the run saw goes to ``{namespace}:test:observed:{renderId}``.

``render/graceful.requested`` runs ``render-graceful``, a ``between_steps`` function with
``interrupt_after`` (``INTERRUPT_AFTER``, default 2 s): its first step awaits ``seconds``
(default 60), or, in ``spin`` mode, spins in a child process; a second step follows.
"""

from __future__ import annotations

import json
import os
import sys
import time

import anyio

from sdk import CancelOn, RunContext, Worker
from sdk.connection import command_client
from tests.apps import serve
from tests.apps.spinning import crash, spin

REDIS_URL, NAMESPACE = sys.argv[1], sys.argv[2]

worker = Worker(
    "renders",
    REDIS_URL,
    namespace=NAMESPACE,
    thread_grace=float(os.environ.get("THREAD_GRACE", "1")),
    shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "5")),
)
recorder = command_client(REDIS_URL)


async def record(ctx: RunContext, what: str) -> None:
    entry = {"what": what, "monotonic": time.monotonic()}
    await recorder.rpush(
        f"{NAMESPACE}:test:observed:{ctx.event.data['renderId']}", json.dumps(entry)
    )


@worker.function(
    id="render",
    trigger="render/requested",
    cancel_on=[CancelOn(event="render/cancel.requested", match="data.renderId")],
)
async def render(ctx: RunContext) -> str:
    work = crash if ctx.event.data.get("mode") == "crash" else spin
    await record(ctx, "started")
    return await ctx.step.run("frames", work, ctx.event.data["pid_file"], process=True)


@render.on_cancel
async def cleanup(ctx: RunContext, reason: str) -> None:
    await record(ctx, "cleanup")


@worker.function(
    id="render-graceful",
    trigger="render/graceful.requested",
    cancel_on=[CancelOn(event="render/cancel.requested", match="data.renderId")],
    cancel_mode="between_steps",
    interrupt_after=os.environ.get("INTERRUPT_AFTER", "2s"),
)
async def render_graceful(ctx: RunContext) -> str:
    await record(ctx, "started")
    if ctx.event.data.get("mode") == "spin":
        await ctx.step.run("frames", spin, ctx.event.data["pid_file"], process=True)
    else:
        await ctx.step.run("encode", anyio.sleep, ctx.event.data.get("seconds", 60))
    await record(ctx, "encoded")
    await ctx.step.run("publish", anyio.sleep, 0)
    return "published"


render_graceful.on_cancel(cleanup)


if __name__ == "__main__":
    serve(worker, recorder)
