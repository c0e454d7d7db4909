"""Runs whose body the caller drives itself, outside the worker's event loop.

A Celery task in a pool process or thread, an arq job on arq's own event loop, a Django
view: the body is not an ``async def`` run by :meth:`Worker.serve`, yet it should be
registered under a function's cancel rules, told of its cancel, and recorded. A
:class:`BlockingWorker` enters a :class:`~sdk.worker.Worker` in an event loop of its own
(a background thread, through an anyio blocking portal) and holds each run there, in
``worker.run``, while the body runs wherever it runs:

- the body learns of the cancel through the thread-safe :class:`BlockingRun`
  (``cancelled``, ``check()``, ``sleep()``), and through ``on_interrupt``, called the
  moment the cancel interrupts the run, which can stop the body harder (signal its
  thread, cancel its task);
- the run is recorded only once the body has stopped (or after ``grace`` seconds, as an
  abandoned thread): its outcome and cancel latency are the body's, not the holder's;
- with ``raise_in_thread=True``, a body still running after its grace gets
  :class:`~sdk.errors.ThreadCancelled` raised in its thread
  (``PyThreadState_SetAsyncExc``), a last resort with the caveats of docs/sdk.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from types import TracebackType
from typing import Final, Self

import anyio
import anyio.from_thread
import structlog
from anyio.abc import TaskStatus

from sdk.context import CancelState, RunContext
from sdk.errors import RunCancelled, ThreadCancelled, WorkerNotStartedError, traceback_text
from sdk.keys import check_id
from sdk.runner import INTERRUPTED_REASON, SHUTDOWN_REASON
from sdk.wire import Event
from sdk.worker import Worker

log = structlog.get_logger("sdk.blocking")

#: Called in the worker's thread, with the reason, when a cancel interrupts a run: it must
#: return at once (send a signal, schedule a cancel), never block.
OnInterrupt = Callable[[str], None]
#: Seconds a thread gets to stop once ``ThreadCancelled`` was raised in it (it lands at
#: its next bytecode: a C call must return first) before it is abandoned.
RAISED_WAIT_S: Final = 1.0


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    """``PyThreadState_SetAsyncExc``: raise ``exc`` in the thread at its next bytecode
    (``None`` takes back one not raised yet); returns how many threads it reached."""
    return int(
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
        )
    )


class BlockingRun:
    """What a body run by :meth:`BlockingWorker.run` sees; safe to use from any thread."""

    def __init__(self, ctx: RunContext, state: CancelState) -> None:
        self._ctx = ctx
        self._state = state
        self._finished = anyio.Event()  # set in the worker's loop
        self._error: BaseException | None = None
        # The thread running the block, until it leaves it: where ThreadCancelled may be
        # raised. The lock makes raising it and leaving the block exclude each other.
        self._thread_id: int | None = None
        self._thread_lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self._ctx.run_id

    @property
    def function_id(self) -> str:
        return self._ctx.function_id

    @property
    def event(self) -> Event:
        return self._ctx.event

    @property
    def cancelled(self) -> bool:
        """True once a cancel for this run has been received."""
        return self._state.cancelled

    @property
    def cancel_reason(self) -> str | None:
        return self._state.reason

    def check(self) -> None:
        """Raise :class:`~sdk.errors.RunCancelled` if a cancel for this run was received."""
        if self._state.cancelled:
            raise RunCancelled(self.run_id, self._state.reason)

    def continue_as(self, run_id: str) -> None:
        """Say that once this run has ended, the run ``run_id`` continues it (a job queue's
        retry of the job): a cancel by this run's id, kept or not, then reaches that run.
        Recorded with the run's outcome (``RunInfo.continued_by``)."""
        self._state.continued_by = check_id("run id", run_id)

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` that a cancel cuts short: raises ``RunCancelled`` the moment the
        run's cancel arrives (a cancellable point for code that waits or polls)."""
        if self._state.wait_received(max(0.0, seconds)):
            self.check()

    def __repr__(self) -> str:
        return f"BlockingRun(run_id={self.run_id!r}, function_id={self.function_id!r})"


def _raise_in_thread(run: BlockingRun) -> bool:
    """Raise ThreadCancelled in the thread running ``run``'s block, if it is still in it."""
    with run._thread_lock:
        if run._thread_id is None:
            return False
        _set_async_exc(run._thread_id, ThreadCancelled)
        run._thread_id = None  # once
        return True


def _leave_block(run: BlockingRun) -> ThreadCancelled | None:
    """In the block's thread, as it leaves the block: no ThreadCancelled can be raised in
    it after this; one raised just now, and not yet landed, is taken back (or returned,
    if it landed here)."""
    try:
        with run._thread_lock:
            if run._thread_id is not None:
                run._thread_id = None
            else:
                _set_async_exc(threading.get_ident(), None)
    except ThreadCancelled as landed:
        return landed
    return None


def _body_result(run: BlockingRun, error: BaseException | None) -> None:
    """Called in the worker's loop when the body is over."""
    run._error = error
    run._finished.set()


class BlockingWorker:
    """A :class:`Worker` entered in a background thread, for bodies run outside it.

    ``with BlockingWorker(worker) as host:`` (or ``start()`` / ``stop()``) starts the
    thread, its event loop and the worker's signal listener; ``with host.run(...) as
    run:`` holds a run while the block executes. One per process: after a fork, start
    another in the child (threads do not survive a fork).
    """

    def __init__(self, worker: Worker, *, raise_in_thread: bool = False) -> None:
        self.worker = worker
        #: Raise ThreadCancelled in a block's thread still running after its grace.
        self.raise_in_thread = raise_in_thread
        # Its functions' triggers are consumed by nobody here: no consumer groups for them.
        worker._trigger_groups = False
        self._stack: ExitStack | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._stack is not None:
                return
            stack = ExitStack()
            try:
                portal = stack.enter_context(
                    anyio.from_thread.start_blocking_portal(name="cancel-broker-worker")
                )
                stack.enter_context(portal.wrap_async_context_manager(self.worker))
            except BaseException:
                stack.close()
                raise
            self._stack, self._portal = stack, portal

    def stop(self) -> None:
        """Cancel the runs still held (reason ``worker shutdown``), wait for them to be
        recorded, leave the worker and stop the thread."""
        with self._lock:
            stack, portal = self._stack, self._portal
            self._stack = self._portal = None
        if stack is None or portal is None:
            return
        try:
            portal.call(self._release_runs)
        finally:
            stack.close()

    async def _release_runs(self) -> None:
        # Job queues wait for their jobs before they stop us: a run still held is being
        # abandoned. Its body is interrupted (on_interrupt, grace) and its outcome recorded
        # while the worker's connections are still open.
        runner = self.worker._require_runner()
        runner.deliver_all(SHUTDOWN_REASON, interrupt=True)
        with anyio.move_on_after(self.worker.shutdown_timeout):
            await runner.wait_empty()

    @property
    def started(self) -> bool:
        return self._portal is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _require_portal(self) -> anyio.from_thread.BlockingPortal:
        portal = self._portal
        if portal is None:
            raise WorkerNotStartedError("start the BlockingWorker first: `with BlockingWorker(w):`")
        return portal

    @contextmanager
    def run(
        self,
        function_id: str,
        event: Event,
        *,
        run_id: str | None = None,
        parent: str | None = None,
        on_interrupt: OnInterrupt | None = None,
        grace: float | None = None,
    ) -> Iterator[BlockingRun]:
        """Hold a run of ``function_id`` while the block runs, in the calling thread.

        As :meth:`Worker.run`: the run is registered under the function's rules (a run
        cancelled before it starts raises :class:`~sdk.errors.RunCancelled` on entry,
        before the block runs), and after a cancelled block ``RunCancelled`` is raised;
        an exception from the block is recorded (``failed``) and propagates. A block cannot
        be interrupted from outside: it polls ``run.check()`` / ``run.sleep()``, and
        ``on_interrupt(reason)`` may stop it harder. Once interrupted, it gets ``grace``
        seconds (default: the worker's ``thread_grace``) to stop; then the run is recorded
        ``cancelled`` with ``abandoned_thread``.
        """
        portal = self._require_portal()
        future, run = portal.start_task(
            self._hold, function_id, event, run_id, parent, on_interrupt, grace
        )
        if run.cancelled:  # cancelled on registration: the block must not start
            portal.call(_body_result, run, None)
            future.result()  # raises RunCancelled once the outcome is recorded
            raise RunCancelled(run.run_id, run.cancel_reason)
        if self.raise_in_thread:
            run._thread_id = threading.get_ident()
        try:
            yield run
            if (landed := _leave_block(run)) is not None:
                raise landed
        except BaseException as raised:
            exc: BaseException = _leave_block(run) or raised
            traceback = exc.__traceback__
            portal.call(_body_result, run, exc)
            try:
                future.result()  # the outcome is recorded
            except RunCancelled as cancelled:
                # Cancelled: the cancel wins over whatever the block raised on its way out,
                # except KeyboardInterrupt and the like, which must go on.
                if isinstance(exc, ThreadCancelled) or (
                    isinstance(exc, Exception)
                    and not (isinstance(exc, RunCancelled) and exc.run_id == run.run_id)
                ):
                    raise cancelled from exc
            except BaseException:
                pass  # the block's own exception, recorded ``failed``: raised below, as it was
            raise exc.with_traceback(traceback) from exc.__cause__
        portal.call(_body_result, run, None)
        future.result()

    @asynccontextmanager
    async def run_async(
        self,
        function_id: str,
        event: Event,
        *,
        run_id: str | None = None,
        parent: str | None = None,
        grace: float | None = None,
    ) -> AsyncIterator[BlockingRun]:
        """:meth:`run` for a body on another asyncio event loop (arq's): the run's cancel
        interrupts the block at its current await (a cancel scope in the caller's loop,
        cancelled from the worker's thread), and is level-triggered as in a worker. A run
        cancelled before it starts raises ``RunCancelled`` on entry."""
        portal = self._require_portal()
        loop = asyncio.get_running_loop()
        scope = anyio.CancelScope()

        def interrupt(reason: str) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nothing to stop
                loop.call_soon_threadsafe(scope.cancel)

        # Registering blocks for a round trip to Redis: not on the caller's loop. Shielded:
        # a run registered for a caller that went away would be held until the worker stops.
        with anyio.CancelScope(shield=True):
            future, run = await anyio.to_thread.run_sync(
                portal.start_task, self._hold, function_id, event, run_id, parent, interrupt, grace
            )
        if run.cancelled:  # cancelled on registration: the block must not start
            portal.start_task_soon(_body_result, run, None)
            await asyncio.wrap_future(future)  # raises RunCancelled once it is recorded
            raise RunCancelled(run.run_id, run.cancel_reason)
        error: BaseException | None = None
        try:
            with scope:
                yield run
        except BaseException as exc:
            error = exc
            raise
        finally:
            portal.start_task_soon(_body_result, run, error)
            with anyio.CancelScope(shield=True):
                try:
                    await asyncio.wrap_future(future)
                except BaseException:
                    # RunCancelled when the block stopped because of its cancel (the scope
                    # swallowed the cancellation): say so, as worker.run does. The block's own
                    # exception (recorded failed), or a cancellation from outside, goes on.
                    if error is None:
                        raise

    async def _hold(
        self,
        function_id: str,
        event: Event,
        run_id: str | None,
        parent: str | None,
        on_interrupt: OnInterrupt | None,
        grace: float | None,
        *,
        task_status: TaskStatus[BlockingRun],
    ) -> None:
        """In the worker's loop: the run, held until the body says it is over."""
        async with self.worker.run(function_id, event, run_id=run_id, parent=parent) as ctx:
            state: CancelState = ctx._state
            run = BlockingRun(ctx, state)
            task_status.started(run)
            try:
                await run._finished.wait()
            except anyio.get_cancelled_exc_class():
                # The run was interrupted (its cancel, or the worker stopping): stop the body,
                # then wait, shielded, for it to be over before the outcome is recorded.
                if on_interrupt is not None:
                    try:
                        on_interrupt(state.reason or "cancelled")
                    except Exception as exc:  # the body still gets its grace
                        log.error(
                            "run.on_interrupt_failed",
                            run_id=run.run_id,
                            exception=traceback_text(exc),
                        )
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(self.worker.thread_grace if grace is None else grace):
                        await run._finished.wait()
                    if not run._finished.is_set() and _raise_in_thread(run):
                        log.warning("run.thread_cancelled", run_id=run.run_id)
                        with anyio.move_on_after(RAISED_WAIT_S):
                            await run._finished.wait()
                        state.terminated = run._finished.is_set()
                    if not run._finished.is_set():
                        state.abandoned_thread = True  # recorded with the outcome
                raise
            error = run._error
            if error is None:
                return
            if state.cancelled:
                return  # stopped because of its cancel, however it ended: cancelled
            if isinstance(error, Exception):
                raise error  # recorded failed; the caller re-raises its own
            # KeyboardInterrupt, SystemExit: the body was stopped from outside the run.
            state.receive(INTERRUPTED_REASON, interrupt=True)
