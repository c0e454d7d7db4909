"""What a function body sees: its run's identity, trigger, steps and cancel state."""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, TypeVar, overload

import anyio
import anyio.lowlevel
import structlog

from sdk.errors import RunCancelled
from sdk.process_steps import pickled_call, run_in_process
from sdk.threads import run_in_thread
from sdk.wire import Event

T = TypeVar("T")

log = structlog.get_logger("sdk.run")


def is_async_callable(fn: object) -> bool:
    """Coroutine functions, partials of them, and objects with an ``async def __call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable() says nothing about async
    )


#: Guards the lazy creation of a run's threading.Event (threads that wait for a cancel).
_EVENT_CREATION: Final = threading.Lock()

CancelMode = Literal["immediate", "between_steps"]
CANCEL_MODES: Final[tuple[CancelMode, ...]] = ("immediate", "between_steps")
#: Seconds a thread step gets to return (or raise ``RunCancelled``) once its run is
#: interrupted, before it is abandoned (``Worker(thread_grace=...)``).
DEFAULT_THREAD_GRACE: Final = 5.0


class CancelState:
    """The cancel scope a run executes in, whether a cancel was received, and why.

    A received cancel *interrupts* the run (cancels its scope) at once in ``immediate``
    mode, and at the next step boundary in ``between_steps`` mode; with ``interrupt_after``,
    a ``between_steps`` run that has not stopped that many seconds after its cancel is
    interrupted where it is (the scope's deadline). anyio cancel scopes are
    level-triggered: once interrupted, every later await in the scope raises again, so a
    body that catches the cancellation cannot carry on.
    """

    def __init__(
        self, mode: CancelMode = "immediate", *, interrupt_after: float | None = None
    ) -> None:
        self.scope = anyio.CancelScope()
        self.mode: CancelMode = mode
        self.interrupt_after = interrupt_after
        # Whether the scope was cancelled by us (a step boundary, immediate mode, a
        # shutdown) rather than by the interrupt_after deadline: see ``escalated``.
        self._interrupted = False
        self.reason: str | None = None
        # Read by thread steps (ctx.cancelled, ctx.check()) as well: one attribute, set
        # once and never cleared, needs no lock (and a threading.Event per run is not free).
        self._received = False
        # Made only for a thread that blocks until the cancel (wait_received).
        self._received_event: threading.Event | None = None
        #: Until the body starts, nothing of the user's can be cut short: any mode interrupts.
        self.body_started = False
        #: A thread step ignored the interruption past its grace and was left running.
        self.abandoned_thread = False
        #: The body was stopped by force after its grace (an exception raised in its thread).
        self.terminated = False
        #: The run that continues this one once it has ended (a job queue's retry): a
        #: cancel by this run's id then reaches that one (recorded as ``continued_by``).
        self.continued_by: str | None = None

    def receive(self, reason: str, *, interrupt: bool = False) -> None:
        """Receive a cancel; interrupt now if the mode says so, or if ``interrupt``."""
        if self.reason is None:
            self.reason = reason  # before the flag: a thread that sees the flag sees why
        self._received = True
        if self._received_event is not None:
            self._received_event.set()
        if interrupt or self.mode == "immediate" or not self.body_started:
            self.interrupt()
        elif self.interrupt_after is not None and math.isinf(self.scope.deadline):
            # Called in the event loop's thread (signals, the backstop, reconciliation).
            self.scope.deadline = anyio.current_time() + self.interrupt_after

    def interrupt(self) -> None:
        """Cancel the run's scope: its current (or next) await raises."""
        if not self.scope.cancel_called:
            self._interrupted = True
        self.scope.cancel()

    @property
    def escalated(self) -> bool:
        """A ``between_steps`` run had not stopped within ``interrupt_after`` of its cancel
        and was interrupted at its current await (a process step killed)."""
        return self.scope.cancel_called and not self._interrupted

    @property
    def cancelled(self) -> bool:
        return self._received

    def wait_received(self, timeout: float | None) -> bool:
        """Block the calling thread until a cancel is received or ``timeout`` passes."""
        with _EVENT_CREATION:
            if self._received_event is None:
                self._received_event = threading.Event()
        # Read after the event exists: a cancel that came before it set only the flag.
        return self._received or self._received_event.wait(timeout)


Backstop = Callable[[], Awaitable[None]]
Spawn = Callable[[str, "dict[str, Any] | None"], Awaitable[str]]


async def _no_backstop() -> None:
    return None


async def _no_spawn(name: str, data: dict[str, Any] | None) -> str:
    raise RuntimeError("this run cannot spawn children")


class Step:
    """Named units of work inside a run: ``await ctx.step.run("outline", fn, *args)``."""

    def __init__(
        self,
        run_id: str,
        state: CancelState,
        backstop: Backstop = _no_backstop,
        *,
        thread_grace: float = DEFAULT_THREAD_GRACE,
    ) -> None:
        self._run_id = run_id
        self._state = state
        self._backstop = backstop
        self._thread_grace = thread_grace
        #: Name of the step in progress, if any.
        self.current: str | None = None

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        shield: bool = False,
        process: bool = False,
        **kwargs: Any,
    ) -> T: ...

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., T],
        /,
        *args: Any,
        shield: bool = False,
        process: bool = False,
        **kwargs: Any,
    ) -> T: ...

    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        shield: bool = False,
        process: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` as step ``name`` and return its result.

        Coroutine functions are awaited and are interrupted at their current await when
        the run is interrupted. Plain functions run in a worker thread, which gets the
        worker's ``thread_grace`` to return (or raise ``RunCancelled`` from
        ``ctx.check()``) before it is abandoned (Python cannot stop a thread).

        ``shield=True`` lets the step run to its end whatever cancel arrives meanwhile (a
        payment must not be cut in half); the cancel takes effect as soon as it returns.
        ``process=True`` runs a plain function in a child process instead, which a cancel
        stops whatever it is doing: SIGTERM, then SIGKILL after ``thread_grace``. ``fn``,
        its arguments and its result must be picklable.

        ``shield`` and ``process`` are reserved: they are never passed on to ``fn``.
        """
        payload: bytes | None = None
        if process:
            if is_async_callable(fn):
                raise TypeError(f"step {name!r}: process=True runs plain functions, not coroutines")
            payload = pickled_call(name, fn, args, kwargs)  # refused here, before any cancel check
        # A cancel whose signal never arrived is still seen here, then any cancel stops us:
        # a step boundary is where a between_steps run is interrupted.
        await self._backstop()
        if self._state.cancelled:
            self._state.interrupt()
        await anyio.lowlevel.checkpoint()
        self.current = name
        log.debug("step.started", run_id=self._run_id, step=name, shield=shield)
        try:
            if not shield:
                return await self._call(name, fn, args, kwargs, shielded=False, payload=payload)
            with anyio.CancelScope(shield=True):
                result = await self._call(name, fn, args, kwargs, shielded=True, payload=payload)
            # The cancel the shield held back takes effect now that the step is done.
            await anyio.lowlevel.checkpoint_if_cancelled()
            return result
        except RunCancelled as exc:
            if exc.run_id != self._run_id or not self._state.cancelled:
                raise
            # The step stopped itself because of this run's cancel (``ctx.check()``): the
            # body must see the cancellation, which ``except Exception`` cannot swallow.
            self._state.interrupt()
            await anyio.lowlevel.checkpoint()
            raise  # only outside the run's scope (an on_cancel hook)
        finally:
            self.current = None

    async def _call(
        self,
        name: str,
        fn: Callable[..., Any],
        args: Any,
        kwargs: dict[str, Any],
        *,
        shielded: bool,
        payload: bytes | None,
    ) -> Any:
        if payload is not None:  # a process step, its call already pickled
            return await run_in_process(name, payload, grace=self._thread_grace)
        if is_async_callable(fn):
            return await fn(*args, **kwargs)
        call = functools.partial(fn, *args, **kwargs)
        if shielded:  # nothing can cancel it: no grace to give
            result = await anyio.to_thread.run_sync(call)
        else:
            result = await run_in_thread(call, grace=self._thread_grace, on_abandon=self._abandoned)
        if inspect.isawaitable(result):  # a lambda or wrapper that returned a coroutine
            return await result
        return result

    def _abandoned(self) -> None:
        self._state.abandoned_thread = True
        log.warning(
            "step.thread_abandoned",
            run_id=self._run_id,
            step=self.current,
            grace_s=self._thread_grace,
        )


class RunContext:
    """Passed to every function body, and yielded by ``worker.run``."""

    def __init__(
        self,
        *,
        run_id: str,
        app_id: str,
        function_id: str,
        event: Event,
        state: CancelState,
        backstop: Backstop = _no_backstop,
        spawn: Spawn = _no_spawn,
        parent_run_id: str | None = None,
        thread_grace: float = DEFAULT_THREAD_GRACE,
    ) -> None:
        self.run_id = run_id
        self.app_id = app_id
        self.function_id = function_id
        self.event = event
        #: The run this one was started inside, if any.
        self.parent_run_id = parent_run_id
        self.step = Step(run_id, state, backstop, thread_grace=thread_grace)
        self._state = state
        self._spawn = spawn

    async def spawn(self, name: str, data: dict[str, Any] | None = None) -> str:
        """Publish an event; the runs it triggers are this run's children.

        Cancelling this run cancels them (and theirs), wherever they run; a child that
        registers after this run was cancelled is cancelled at once. Returns the event id.
        """
        return await self._spawn(name, data)

    @property
    def cancelled(self) -> bool:
        """True once a cancel for this run has been received, in either mode.

        Safe to read from a thread step.
        """
        return self._state.cancelled

    @property
    def cancel_reason(self) -> str | None:
        return self._state.reason

    def check(self) -> None:
        """Raise :class:`~sdk.errors.RunCancelled` if a cancel for this run was received.

        For code that cannot be interrupted at an await, typically a plain function
        running as a step in a thread: call it in its loop. Raised in a step, it reaches
        the body as the cancellation itself, and the run ends ``cancelled``.
        """
        if self._state.cancelled:
            raise RunCancelled(self.run_id, self._state.reason)

    def __repr__(self) -> str:
        return f"RunContext(run_id={self.run_id!r}, function_id={self.function_id!r})"


FunctionBody = Callable[[RunContext], Awaitable[Any]]
