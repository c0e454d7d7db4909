"""Running a step's plain function in a worker thread, with a grace period on cancel.

Python cannot stop a thread. When the run is cancelled, the thread is given ``grace``
seconds to notice (``ctx.check()`` raises :class:`~sdk.errors.RunCancelled`) and return;
past that it is abandoned: it keeps running until it returns, but its result is
discarded and the run does not wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


async def run_in_thread(
    call: Callable[[], T], *, grace: float, on_abandon: Callable[[], None]
) -> T:
    """``call()`` in a worker thread; on cancel, wait up to ``grace`` s, then abandon it.

    Whatever the thread does after the cancel (returns, raises), the caller sees the
    cancellation: the run was cancelled. ``on_abandon`` is called if the grace runs out.
    """
    results: list[T] = []
    errors: list[Exception] = []
    finished = anyio.Event()
    # Shielded, so that the run's cancel reaches only the waiter below, which decides
    # when (after the grace) the thread is let go.
    thread_scope = anyio.CancelScope(shield=True)

    async def work() -> None:
        try:
            with thread_scope:
                results.append(await anyio.to_thread.run_sync(call, abandon_on_cancel=True))
        except Exception as exc:  # re-raised in the caller's task, not as an ExceptionGroup
            errors.append(exc)
        finally:
            finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        try:
            await finished.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await _grace(finished, thread_scope, grace, on_abandon)
            raise
    if errors:
        raise errors[0]
    return results[0]


async def _grace(
    finished: anyio.Event,
    thread_scope: anyio.CancelScope,
    grace: float,
    on_abandon: Callable[[], None],
) -> None:
    with anyio.move_on_after(grace):
        await finished.wait()
    if not finished.is_set():
        on_abandon()
        thread_scope.cancel()  # abandon_on_cancel: returns at once, the thread runs on
        await finished.wait()
