"""Celery: every task call is a run, so ``cancel_on`` rules, cancels by id (the task id)
and owners apply to Celery tasks.

::

    app = Celery("reports", broker=..., backend=...)
    worker = Worker("reports")                      # declares nothing itself
    cancels = CeleryCancellation(app, worker)

    @cancels.task(
        trigger="report/generate.requested",
        cancel_on=[CancelOn(event="report/cancel.requested", match="data.report_id")],
    )
    def generate_report(report_id: str) -> str:
        run = current_run()                         # check() / sleep() in long loops
        ...

The task's keyword arguments are the run's trigger ``data`` (``event_data=`` to map them
otherwise), and its id is the run id: ``Client.cancel(task_id)`` cancels it.

A task that starts others sends them with ``other_task.spawn(...)`` (``delay`` as a child
of the current run): cancelling the parent cancels them too, running or queued.

What a cancel does depends on where the task runs:

- **prefork** (Celery's default): the task runs in the main thread of a pool process. The
  cancel signals that process (``SIGUSR2``, as Celery's own ``revoke(terminate=True)``
  signals it) and its handler raises :class:`TaskCancelled` in the task at once, even in
  a blocking call. ``TaskCancelled`` is a ``BaseException``: ``except Exception`` cannot
  swallow it (Celery's ``SoftTimeLimitExceeded`` is an ``Exception``); ``finally`` blocks
  and ``with`` exits run. A task still running ``terminate_after`` seconds after the
  cancel (stuck in C code, or swallowing the interrupt) has its pool process killed by
  Celery's main process and replaced (``sdk/integrations/celery_pool.py``).
- **threads, solo**: Python cannot safely stop a thread from outside
  (an exception injected into a thread lands in whatever it runs, locks and ``finally``
  blocks included, and never interrupts a blocking call). The task stops at its next
  cancellable point: ``current_run().check()`` or ``current_run().sleep(s)`` (a sleep the
  cancel cuts short). A task that never reaches one runs to its end; after the worker's
  ``thread_grace`` its run is recorded ``cancelled`` with ``abandoned_thread`` (unless
  ``raise_in_thread=True``: see :class:`~sdk.BlockingWorker`).

Either way the task's state is ``REVOKED`` (``AsyncResult(task_id).state``), its result
is discarded, and it is never retried: ``self.retry()`` and ``autoretry_for`` raise
``TaskCancelled`` instead, and a cancelled run id can never be registered again (a
redelivered message is marked revoked without running). A task cancelled while queued
(a cancel event published after it was sent, a cancelled parent, a cancel by its task
id, even one sent before ``apply_async``) is revoked when a worker picks it up, before its
body runs; so is a retry waiting on its countdown, cancelled by the task id. Celery's
``task_revoked`` signal fires for each, and the ``task-revoked`` event is sent when the
worker sends task events (``-E``, for Flower).

Each prefork pool process has a worker identity of its own (decided after the fork): one
that exits or dies takes only its own run with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, ClassVar, Final, TypeVar

import structlog
from celery import Celery, Task, signals, states
from celery.exceptions import Ignore, Retry

from sdk.blocking import BlockingRun, BlockingWorker
from sdk.context import CancelMode
from sdk.errors import DuplicateRunError, RunCancelled
from sdk.integrations.arguments import EventData, keyword_data
from sdk.integrations.celery_pool import PoolSupervisor, supervisor_step
from sdk.rules import CancelOn
from sdk.wire import Event
from sdk.worker import Worker

log = structlog.get_logger("sdk.integrations.celery")

#: Message header carrying when the task was sent (ms): cancel events published since
#: then apply, even to a task still queued.
SENT_HEADER: Final = "cancel_broker_sent_ms"
#: Message header naming the run a task was sent from (:meth:`CancellableTask.spawn`):
#: the task's run is that run's child, so cancelling the parent cancels it too.
PARENT_HEADER: Final = "cancel_broker_parent_run"
#: The signal that stops a task in a prefork pool process (SIGUSR1 is billiard's soft
#: time limit).
INTERRUPT_SIGNAL: Final = signal.SIGUSR2
#: Seconds past the worker's ``thread_grace`` after which a prefork task still running
#: its cancelled run has its pool process terminated (``terminate_after`` by default).
TERMINATE_MARGIN_S: Final = 1.0

F = TypeVar("F", bound=Callable[..., Any])

_current: contextvars.ContextVar[BlockingRun] = contextvars.ContextVar("cancel_broker_celery_run")


class TaskCancelled(BaseException):
    """Raised in a task whose run was cancelled: by the interrupt signal (prefork), by
    ``self.retry()`` of a cancelled task, or by ``autoretry_for``.

    A ``BaseException``, so that ``except Exception`` in the task cannot swallow it.
    """

    def __init__(self, run_id: str, reason: str | None) -> None:
        super().__init__(f"task {run_id} was cancelled" + (f": {reason}" if reason else ""))
        self.run_id = run_id
        self.reason = reason

    def __reduce__(self) -> tuple[type[TaskCancelled], tuple[str, str | None]]:
        return type(self), (self.run_id, self.reason)


def current_run() -> BlockingRun:
    """The run of the task executing in this thread (``check()``, ``sleep()``,
    ``cancelled``). Raises ``LookupError`` outside a cancellable task."""
    return _current.get()


class CancellableTask(Task):  # type: ignore[misc]  # celery is untyped
    """The base class of tasks declared with :meth:`CeleryCancellation.task`."""

    cancellation: ClassVar[CeleryCancellation]
    function_id: ClassVar[str]
    cancel_trigger: ClassVar[str]
    event_data: ClassVar[EventData]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.id is None or request.called_directly:  # a plain function call
            return super().__call__(*args, **kwargs)
        return self.cancellation._execute(self, request, args, kwargs)

    def apply_async(self, *args: Any, **options: Any) -> Any:
        headers = dict(options.pop("headers", None) or {})
        headers.setdefault(SENT_HEADER, _workflow_sent_ms(self.app) or int(time.time() * 1000))
        return super().apply_async(*args, headers=headers, **options)

    def spawn(self, *args: Any, **kwargs: Any) -> Any:
        """``delay(*args, **kwargs)`` as a child of the run executing in this thread: a
        cancel of that run (by id, by a cancel event, or of its own parent) cancels the
        child too, running or still queued, and a child that arrives after its parent was
        cancelled is revoked without running. Returns the ``AsyncResult``.

        Raises ``LookupError`` outside a cancellable task (there is no run to be the
        child of). To pass other ``apply_async`` options, set the header yourself:
        ``apply_async(kwargs=..., headers={PARENT_HEADER: current_run().run_id})``.
        """
        parent = current_run().run_id
        return self.apply_async(args, kwargs, headers={PARENT_HEADER: parent})

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        run = _current.get(None)
        if run is not None and run.cancelled:  # a cancelled task is never retried
            raise TaskCancelled(run.run_id, run.cancel_reason)
        try:
            retried = super().retry(*args, **kwargs)
        except Retry:
            self._continued(run)
            raise
        if isinstance(retried, Retry):  # retry(throw=False)
            self._continued(run)
        return retried

    def _continued(self, run: BlockingRun | None) -> None:
        """The retry is sent: the run of this attempt is continued by the next attempt's,
        so a cancel by the task id while the retry waits (its countdown) reaches it."""
        if run is not None:
            run.continue_as(_run_id(self.request.id, int(self.request.retries or 0) + 1))


def _run_id(task_id: str, retries: int) -> str:
    """The run of one attempt of a task: its task id, then ``{task id}-retry-{n}``."""
    return task_id if not retries else f"{task_id}-retry-{retries}"


def _run_id_of(request: Any) -> str:
    """The run of a task the main process handed to the pool (a ``Request``)."""
    return _run_id(request.id, int(request.request_dict.get("retries") or 0))


def _workflow_sent_ms(app: Celery) -> int | None:
    """When the workflow of a task sent from inside a running task was sent: the sender's
    own send time. A chain's later links, a chord's callback, a task started by a task are
    triggered with the workflow, so a cancel published while an earlier task ran is newer
    than them and cancels them when they start."""
    current = app.current_worker_task
    if current is None:
        return None
    sent = _header(current.request, SENT_HEADER)
    return int(sent) if sent else None


def _header(request: Any, name: str) -> Any:
    """A custom message header: an attribute of the request (message protocol 2), or in
    its ``headers`` (protocol 1)."""
    return getattr(request, name, None) or (request.headers or {}).get(name)


class CeleryCancellation:
    """Declares cancellable tasks on a Celery ``app`` under ``worker``'s app id.

    Every process that runs the tasks (each prefork pool process, or the worker process
    for the thread pools) enters ``worker`` in a background thread (a
    :class:`~sdk.BlockingWorker`) that receives the cancel signals; it is started when
    the process starts and left when it stops. ``worker`` only needs the app id and the
    Redis settings: the functions are declared by :meth:`task`.

    ``terminate_stuck`` (prefork): Celery's main process kills the pool process of a task
    still running ``terminate_after`` seconds after its cancel (default: the worker's
    ``thread_grace`` plus ``TERMINATE_MARGIN_S``), as ``revoke(terminate=True)`` would.
    ``raise_in_thread`` (threads, solo): the last resort of :class:`~sdk.BlockingWorker`.
    """

    def __init__(
        self,
        app: Celery,
        worker: Worker,
        *,
        terminate_stuck: bool = True,
        terminate_after: float | None = None,
        raise_in_thread: bool = False,
    ) -> None:
        self.app = app
        self.worker = worker
        self.raise_in_thread = raise_in_thread
        #: The names of the cancellable tasks declared (``task``).
        self.task_names: set[str] = set()
        if terminate_stuck:
            after = terminate_after
            if after is None:
                after = worker.thread_grace + TERMINATE_MARGIN_S
            supervisor = PoolSupervisor(worker, self.task_names, _run_id_of, after)
            app.steps["consumer"].add(supervisor_step(supervisor))
        self._host: BlockingWorker | None = None
        self._pid = 0
        self._lock = threading.Lock()
        #: The run whose body is executing in the main thread, while it can be interrupted.
        self._interruptible: BlockingRun | None = None
        self._main_thread = threading.main_thread().ident
        self._signal_installed = False
        #: Whether the Celery worker sends task events (``-E``): read where it starts, in
        #: the main process, and inherited by the pool processes it forks.
        self._task_events = bool(app.conf.worker_send_task_events)
        signals.worker_init.connect(self._worker_starting, weak=False)
        signals.worker_process_init.connect(self._process_started, weak=False)
        signals.worker_process_shutdown.connect(self._process_stopping, weak=False)
        signals.worker_shutdown.connect(self._process_stopping, weak=False)

    def task(
        self,
        *,
        trigger: str | None = None,
        cancel_on: Iterable[CancelOn] = (),
        cancel_mode: CancelMode = "immediate",
        owner: str | None = None,
        event_data: EventData = keyword_data,
        **celery_options: Any,
    ) -> Callable[[F], Any]:
        """``@cancels.task(...)``: ``app.task`` whose calls are runs of a function.

        ``trigger`` names the function's trigger event (default ``celery/{task name}``);
        ``cancel_on``, ``cancel_mode`` and ``owner`` are as in ``worker.function``, over
        the trigger ``{"name": trigger, "data": event_data(*args, **kwargs)}``. Other
        keywords go to ``app.task`` (``name``, ``bind``, ``acks_late``, ...).
        """

        def declare(fn: F) -> Any:
            options = dict(celery_options)
            name = options.pop("name", None) or self.app.gen_task_name(fn.__name__, fn.__module__)
            function = self.worker.declare(
                id=name,
                trigger=trigger or f"celery/{name}",
                cancel_on=cancel_on,
                cancel_mode=cancel_mode,
                owner=owner,
            )
            base = type(
                f"Cancellable_{fn.__name__}",
                (options.pop("base", CancellableTask),),
                {
                    "cancellation": self,
                    "function_id": function.id,
                    "cancel_trigger": function.trigger,
                    "event_data": staticmethod(event_data),
                },
            )
            self.task_names.add(name)
            return self.app.task(base=base, name=name, **options)(fn)

        return declare

    # -- the process's worker --------------------------------------------------------

    def host(self) -> BlockingWorker:
        """This process's started :class:`BlockingWorker` (started on first use)."""
        with self._lock:
            if self._host is None or self._pid != os.getpid():
                # A new process, or a fork: threads do not survive one, start another.
                self._host = BlockingWorker(self.worker, raise_in_thread=self.raise_in_thread)
                self._pid = os.getpid()
            host = self._host
        host.start()
        return host

    def _worker_starting(self, sender: Any = None, **_: Any) -> None:
        self._task_events = bool(getattr(sender, "task_events", self._task_events))
        pool = getattr(sender, "pool_cls", None)
        name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        if "prefork" not in name:
            self.host()  # tasks run in this process: threads, solo
        # prefork: each pool process starts its own (_process_started), after its fork.

    def _process_started(self, **_: Any) -> None:
        # A prefork pool process: its tasks run in its main thread, which the cancel can
        # signal. Installed here, in the main thread (signal handlers must be).
        self._main_thread = threading.main_thread().ident
        signal.signal(INTERRUPT_SIGNAL, self._on_interrupt_signal)
        self._signal_installed = True
        self.host()

    def _process_stopping(self, **_: Any) -> None:
        with self._lock:
            host, self._host = self._host, None
        if host is not None and self._pid == os.getpid():
            host.stop()

    def _on_interrupt_signal(self, signum: int, frame: FrameType | None) -> None:
        run = self._interruptible
        if run is not None and run.cancelled:
            self._interruptible = None  # once: cleanup code that follows is not interrupted
            raise TaskCancelled(run.run_id, run.cancel_reason)

    def _interrupter(self) -> Callable[[str], None] | None:
        if not self._signal_installed or threading.get_ident() != self._main_thread:
            return None  # a thread pool: cooperative only
        main, pid = self._main_thread, os.getpid()

        def interrupt(reason: str) -> None:
            assert main is not None
            with contextlib.suppress(ProcessLookupError):  # the process is exiting
                if os.getpid() == pid:
                    signal.pthread_kill(main, INTERRUPT_SIGNAL)

        return interrupt

    @contextlib.contextmanager
    def _interruptible_body(self, run: BlockingRun, interruptible: bool) -> Iterator[None]:
        if not interruptible:
            yield
            return
        self._interruptible = run
        try:
            # A cancel signalled before the handler knew the run: seen here.
            if run.cancelled:
                raise TaskCancelled(run.run_id, run.cancel_reason)
            yield
        finally:
            self._interruptible = None

    # -- one task ----------------------------------------------------------------------

    def _execute(
        self, task: CancellableTask, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        sent_ms = _header(request, SENT_HEADER)
        event = Event(
            name=task.cancel_trigger,
            data=task.event_data(*args, **kwargs),
            ts=int(sent_ms) if sent_ms else 0,
        )
        retries = int(request.retries or 0)
        # A retry is another run (a run id is never registered twice). A spawned task's
        # retry stays the child of the run that spawned it, so cancelling that run still
        # reaches it; any other retry is the child of the first attempt: if that one was
        # cancelled, the retry is cancelled on arrival.
        run_id = _run_id(request.id, retries)
        parent = _header(request, PARENT_HEADER) or (request.id if retries else None)
        interrupt = self._interrupter()
        started = False  # whether the body ran (else it was revoked before it could)
        try:
            with self.host().run(
                task.function_id,
                event,
                run_id=run_id,
                parent=parent,
                on_interrupt=interrupt,
            ) as run:
                started = True
                token = _current.set(run)
                try:
                    with self._interruptible_body(run, interrupt is not None):
                        return task.run(*args, **kwargs)
                finally:
                    _current.reset(token)
        except (RunCancelled, TaskCancelled) as exc:
            if exc.run_id != run_id:
                raise
            self._revoked(task, request, run_id, exc.reason, terminated=started)
            raise Ignore() from None
        except DuplicateRunError as exc:
            if exc.status not in ("cancelling", "cancelled"):
                raise
            # Delivered again (a redelivery, acks_late after a crash): it was cancelled.
            self._revoked(task, request, run_id, "the run was cancelled", terminated=False)
            raise Ignore() from None

    def _revoked(
        self,
        task: CancellableTask,
        request: Any,
        run_id: str,
        reason: str | None,
        *,
        terminated: bool,
    ) -> None:
        """Say that the task was revoked, as Celery's own ``revoke`` does: its state, the
        ``task_revoked`` signal (existing handlers see our cancels), and the
        ``task-revoked`` event for Flower and other monitors when the worker sends task
        events (``-E``). ``terminated``: it was interrupted while running."""
        log.info("task.revoked", task_id=request.id, run_id=run_id, reason=reason)
        if not task.ignore_result:
            task.backend.mark_as_revoked(
                request.id, reason or "cancelled", request=request, state=states.REVOKED
            )
        signum = int(INTERRUPT_SIGNAL) if terminated and self._signal_installed else None
        signals.task_revoked.send(
            sender=task, request=request, terminated=terminated, signum=signum, expired=False
        )
        if self._task_events and task.send_events:
            try:
                task.send_event("task-revoked", terminated=terminated, signum=signum, expired=False)
            except Exception as exc:  # a monitor's event never fails the revoke
                log.warning("task.revoked_event_failed", task_id=request.id, error=repr(exc))
