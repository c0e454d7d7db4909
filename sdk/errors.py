"""Exceptions raised by the SDK. Catch :class:`CancelBrokerError` for all of them."""

from __future__ import annotations

import signal as signal_module
import traceback


class CancelBrokerError(Exception):
    """Base class of every error this package raises."""


class ConfigurationError(CancelBrokerError, ValueError):
    """A function, rule or worker was declared wrongly; raised at definition time."""


class InvalidRedisUrlError(CancelBrokerError, ValueError):
    """A Redis URL that cannot be connected to as written (a malformed cluster node list,
    a database other than 0 on a cluster)."""


class InvalidEventError(CancelBrokerError, ValueError):
    """An event cannot be published or consumed as it is.

    ``reason`` is a short machine-readable code (it is also the dead-letter reason),
    ``detail`` says what exactly is wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidIdError(CancelBrokerError, ValueError):
    """A run or event id that cannot be part of a key name (checked before any lookup)."""


class InvalidBulkCancelError(CancelBrokerError, ValueError):
    """``Client.cancel_many`` was asked for a time range it cannot honour: a
    ``started_before`` in the future (it would cancel runs not triggered yet), or bounds in
    the wrong order."""


class NotReplicatedError(CancelBrokerError):
    """A publisher that waits for replicas (``Client(wait_replicas=N)``) wrote, and fewer than
    N replicas acknowledged the write within ``wait_timeout``.

    The write was applied by the primary (``result`` is what the call would have returned:
    an event id, a :class:`~sdk.wire.CancelResult`, ...), but a failover before a replica
    has it would lose it. Sending again is safe: an event id differs, a cancel is idempotent.
    """

    def __init__(self, result: object, *, wanted: int, acknowledged: int, timeout: float) -> None:
        super().__init__(
            f"written, but {acknowledged} of {wanted} replica(s) acknowledged it within"
            f" {timeout:g} s: a failover now could lose it"
        )
        self.result = result
        self.wanted = wanted
        self.acknowledged = acknowledged
        self.timeout = timeout


class UnknownFunctionError(CancelBrokerError, LookupError):
    """``worker.run`` named a function the worker does not declare, or
    ``Client.cancel_many`` one that no app declares and that has no runs."""


class WorkerNotStartedError(CancelBrokerError, RuntimeError):
    """A run was started outside ``async with worker`` / ``worker.serve()``.

    Someone has to listen for cancel signals while the run executes; that listener
    lives for as long as the worker is entered.
    """


class DuplicateRunError(CancelBrokerError):
    """A run with this id is already registered (the same trigger delivered twice)."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is already registered with status {status!r}")
        self.run_id = run_id
        self.status = status


class RunCancelled(CancelBrokerError):
    """Raised after a ``worker.run`` block was stopped by a cancellation.

    The body itself is interrupted with the event loop's cancellation exception
    (``asyncio.CancelledError``), which ``except Exception`` does not catch. This
    exception tells the code after the block that the block did not finish.
    """

    def __init__(self, run_id: str, reason: str | None) -> None:
        super().__init__(f"run {run_id} was cancelled" + (f": {reason}" if reason else ""))
        self.run_id = run_id
        self.reason = reason

    def __reduce__(self) -> tuple[type[RunCancelled], tuple[str, str | None]]:
        # Picklable with its fields: job queues store it as the job's result (arq, Celery).
        return type(self), (self.run_id, self.reason)


class RedisUnavailableError(CancelBrokerError, ConnectionError):
    """Redis cannot be reached, or refused this process's credentials, as a worker or a
    client starts: the message names the URL (its password masked), ``hint`` what to do.
    The error redis-py raised is its ``__cause__``."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class ThreadCancelled(BaseException):
    """Raised inside a blocked thread, after its grace, by ``BlockingWorker(...,
    raise_in_thread=True)``: the last resort for a body that never polls its cancel.

    A ``BaseException``, so ``except Exception`` cannot swallow it; the ``run`` block's
    caller sees :class:`RunCancelled`, as for any cancelled block.
    """


class RunNotFinishedError(CancelBrokerError, TimeoutError):
    """``Client.wait`` gave up: the run had not finished within the timeout."""

    def __init__(self, run_id: str, timeout: float | None) -> None:
        super().__init__(f"run {run_id} did not finish within {timeout} s")
        self.run_id = run_id
        self.timeout = timeout


class PartitionCountError(ConfigurationError):
    """This process was configured with another number of partitions than the namespace
    stored in Redis: it would look for runs and events where they are not."""

    def __init__(self, namespace: str, stored: int, configured: int) -> None:
        super().__init__(
            f"namespace {namespace!r} has {stored} partition(s) in Redis, but this process"
            f" was configured with {configured}; give every process the same number"
            f" (CANCEL_BROKER_PARTITIONS), or drain the namespace and delete"
            f" {{{namespace}}}:partitions to change it"
        )
        self.namespace = namespace
        self.stored = stored
        self.configured = configured


class ProcessStepError(CancelBrokerError):
    """A process step (``ctx.step.run(..., process=True)``) could not run or did not end."""


class NotPicklableError(ProcessStepError, TypeError):
    """A process step's callable, arguments or result cannot be pickled to cross processes."""


class ProcessStepCrashed(ProcessStepError):
    """A process step's child process died without an answer (a signal, ``os._exit``).

    ``signal`` names the signal that killed it (``"SIGKILL"`` for the OOM killer,
    ``"SIGSEGV"`` for a crash in C code), or is ``None`` when it exited with ``exitcode``.
    """

    def __init__(self, step: str | None, exitcode: int) -> None:
        self.step = step
        self.exitcode = exitcode
        self.signal: str | None = None
        if exitcode < 0:
            try:
                self.signal = signal_module.Signals(-exitcode).name
            except ValueError:
                self.signal = f"signal {-exitcode}"
            how = f"was killed by {self.signal}"
        else:
            how = f"exited with code {exitcode} without returning"
        super().__init__(f"the process of step {step!r} {how}")


def traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback as Python prints it: file, line and code of each frame, never
    the values of their variables (which may hold a trigger's data)."""
    return "".join(traceback.format_exception(exc)).rstrip()
