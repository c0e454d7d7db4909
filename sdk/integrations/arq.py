"""arq: every job is a run, so ``cancel_on`` rules, cancels by id (the job id) and owners
apply to arq jobs, and a cancel interrupts the job at its current await within
milliseconds (arq's own ``Job.abort()`` is read once per ``poll_delay``, 0.5 s).

::

    worker = Worker("reports")                       # declares nothing itself
    cancels = ArqCancellation(worker)

    @cancels.job(
        trigger="report/generate.requested",
        cancel_on=[CancelOn(event="report/cancel.requested", match="data.report_id")],
    )
    async def generate_report(ctx: dict, report_id: str) -> str: ...

    class WorkerSettings:
        functions = [generate_report]
        on_startup = cancels.on_startup
        on_shutdown = cancels.on_shutdown

The job's keyword arguments are the run's trigger ``data``; its ``enqueue_time`` orders it
against cancel events (a cancel published while it was queued cancels it when it starts,
before its body runs). A cancelled job raises ``asyncio.CancelledError`` at its current
await (level-triggered: again at every later await) and ends as a failed job whose
result is :class:`~sdk.RunCancelled`; arq never retries it (arq retries a job that ends
with ``CancelledError``, so the wrapper ends it with ``RunCancelled``).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, TypeVar

import anyio.to_thread

from sdk.blocking import BlockingRun, BlockingWorker
from sdk.context import CancelMode
from sdk.integrations.arguments import EventData, keyword_data
from sdk.rules import CancelOn
from sdk.wire import Event
from sdk.worker import Worker

R = TypeVar("R")
Job = Callable[..., Awaitable[R]]

_current: contextvars.ContextVar[BlockingRun] = contextvars.ContextVar("cancel_broker_arq_run")


def current_run() -> BlockingRun:
    """The run of the job executing in this task. Raises ``LookupError`` outside one."""
    return _current.get()


class ArqCancellation:
    """Declares cancellable arq jobs under ``worker``'s app id.

    ``on_startup`` / ``on_shutdown`` (the worker settings' hooks, or awaited from yours)
    enter ``worker`` in a background thread for the arq worker's lifetime.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.host = BlockingWorker(worker)

    async def on_startup(self, ctx: dict[str, Any]) -> None:
        await anyio.to_thread.run_sync(self.host.start)

    async def on_shutdown(self, ctx: dict[str, Any]) -> None:
        await anyio.to_thread.run_sync(self.host.stop)

    def job(
        self,
        *,
        trigger: str | None = None,
        cancel_on: Iterable[CancelOn] = (),
        cancel_mode: CancelMode = "immediate",
        owner: str | None = None,
        event_data: EventData = keyword_data,
        name: str | None = None,
    ) -> Callable[[Job[R]], Job[R]]:
        """``@cancels.job(...)``: the job's calls are runs of a function named ``name``
        (default: the job's name, as arq knows it), triggered by ``trigger`` (default
        ``arq/{name}``) with ``data = event_data(*args, **kwargs)``."""

        def declare(fn: Job[R]) -> Job[R]:
            function_id = name or fn.__name__
            function = self.worker.declare(
                id=function_id,
                trigger=trigger or f"arq/{function_id}",
                cancel_on=cancel_on,
                cancel_mode=cancel_mode,
                owner=owner,
            )

            @functools.wraps(fn)
            async def run_job(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> R:
                enqueued: datetime | None = ctx.get("enqueue_time")
                event = Event(
                    name=function.trigger,
                    data=event_data(*args, **kwargs),
                    ts=int(enqueued.timestamp() * 1000) if enqueued else 0,
                )
                job_id: str = ctx["job_id"]
                job_try = int(ctx.get("job_try") or 1)
                # A retried job is another run (a run id is never registered twice), the
                # child of the first try: if that one was cancelled, so is the retry.
                run_id = job_id if job_try == 1 else f"{job_id}-try-{job_try}"
                async with self.host.run_async(
                    function.id, event, run_id=run_id, parent=job_id if job_try > 1 else None
                ) as run:
                    token = _current.set(run)
                    try:
                        return await fn(ctx, *args, **kwargs)
                    finally:
                        _current.reset(token)
                raise AssertionError("unreachable: a cancelled block raises RunCancelled")

            return run_job

        return declare
