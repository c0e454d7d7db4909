"""The hard stop of Celery's prefork pool: a task that ignored its cancel loses its process.

The cancel reaches a task in its pool process (``SIGUSR2``, ``TaskCancelled``), which is
enough for Python code. A task stuck in C code that never returns to the interpreter, or
one that swallows the interrupt and runs on, holds its pool slot for ever; if it holds the
GIL, its process cannot even run the thread that would stop it. So the one process a task
cannot block, Celery's main process, watches the tasks it handed to the pool: a task still
executing ``terminate_after`` seconds after its run's cancel was requested is terminated as
Celery's own ``revoke(terminate=True, signal="SIGKILL")`` terminates one
(``Request.terminate``). Celery then marks it ``REVOKED``, fires ``task_revoked`` with
``terminated=True`` and replaces the pool process; the run is recorded ``cancelled`` with
``terminated``, and the dead process's worker identity is taken out of the registry.

The watch is a consumer bootstep whose check runs on the consumer's own timer (in the main
process's event loop, as Celery's own periodic work does); it talks to Redis through a
blocking portal of its own, each call bounded by ``CHECK_TIMEOUT_S``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any, Final, cast

import anyio
import anyio.from_thread
import structlog
from celery import bootsteps
from celery.worker import state

from sdk.connection import REDIS_ERRORS, command_client
from sdk.partitions import Partitions
from sdk.registration import deregister
from sdk.store import RunStore
from sdk.worker import Worker

log = structlog.get_logger("sdk.integrations.celery")

#: Seconds between two looks at the tasks the pool executes.
CHECK_EVERY_S: Final = 0.25
#: The most one look may block the main process's event loop (Redis is slow or down).
CHECK_TIMEOUT_S: Final = 0.5
#: Run statuses of a task whose cancel was requested (``cancelled``: its pool process
#: recorded it after the grace, with ``abandoned_thread``, while the body ran on).
_CANCELLED: Final = ("cancelling", "cancelled")

RunIdOf = Callable[[Any], str]


class PoolSupervisor:
    """In Celery's main process: terminates the pool processes of tasks that outlived
    their cancel by ``terminate_after`` seconds."""

    def __init__(
        self, worker: Worker, task_names: Iterable[str], run_id_of: RunIdOf, terminate_after: float
    ) -> None:
        self.worker = worker
        self.task_names = task_names  # read at each look: tasks are declared after us
        self.run_id_of = run_id_of
        self.terminate_after_ms = terminate_after * 1000
        self._stack: ExitStack | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._stores: tuple[RunStore, ...] = ()
        self._timer_entry: Any = None
        #: Runs whose task was terminated and that Celery has not yet seen end.
        self._terminated: set[str] = set()

    def start(self, consumer: Any) -> None:
        if "prefork" not in type(consumer.pool).__module__:
            return  # threads, solo: nothing to terminate (see docs/integrations.md)
        stack = ExitStack()
        self._portal = stack.enter_context(
            anyio.from_thread.start_blocking_portal(name="cancel-broker-pool-supervisor")
        )
        self._stack = stack
        self._timer_entry = consumer.timer.call_repeatedly(
            CHECK_EVERY_S, self.check, (consumer.pool,), priority=10
        )

    def stop(self, consumer: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None
        stack, portal = self._stack, self._portal
        self._stack = self._portal = None
        if stack is None or portal is None:
            return
        try:
            portal.call(self._close)
        finally:
            stack.close()

    def check(self, pool: Any) -> None:
        """One look: terminate every task that outlived its cancel (on the consumer's timer)."""
        portal = self._portal
        names = set(self.task_names)
        executing = {
            self.run_id_of(request): request
            for request in list(state.active_requests)
            if request.task_name in names and request.time_start and request.worker_pid
        }
        self._terminated &= executing.keys()
        for run_id in self._terminated:
            del executing[run_id]
        if portal is None or not executing:
            return
        try:
            overdue = portal.call(self._overdue, list(executing))
        except (*REDIS_ERRORS, TimeoutError) as exc:  # the next look tries again
            log.warning("pool.check_failed", error=repr(exc))
            return
        for run_id, worker_id, store in overdue:
            request = executing[run_id]
            log.warning(
                "task.terminated",
                task_id=request.id,
                run_id=run_id,
                pid=request.worker_pid,
                after_s=self.terminate_after_ms / 1000,
                hint="the task ignored its cancel (stuck in C code, or swallowing the"
                " interrupt): its pool process is killed and replaced",
            )
            request.terminate(pool, signal.SIGKILL)  # REVOKED, task_revoked, a new process
            self._terminated.add(run_id)
            try:
                portal.call(self._record, store, run_id, worker_id)
            except (*REDIS_ERRORS, TimeoutError) as exc:  # the broker reaps it later: lost
                log.warning("task.terminated_unrecorded", run_id=run_id, error=repr(exc))

    async def _open(self) -> tuple[RunStore, ...]:
        if not self._stores:
            redis = command_client(self.worker.redis_url)
            partitions = await Partitions.open(
                redis, self.worker.keys, self.worker.partitions, store=False
            )
            self._stores = partitions.stores()
        return self._stores

    async def _close(self) -> None:
        if self._stores:
            await self._stores[0].redis.aclose()
            self._stores = ()

    async def _overdue(self, run_ids: list[str]) -> list[tuple[str, str, RunStore]]:
        """The runs among these whose cancel was requested ``terminate_after`` ago or more,
        with the worker id that holds each and the store of its partition (one round trip
        per partition)."""
        with anyio.fail_after(CHECK_TIMEOUT_S):
            overdue = []
            for store in await self._open():
                async with store.redis.pipeline(transaction=False) as pipe:
                    pipe.time()
                    for run_id in run_ids:
                        fields = ("status", "cancel_requested_at", "worker_id")
                        pipe.hmget(store.keys.run(run_id), *fields)
                    (seconds, micros), *replies = await pipe.execute()
                now_ms = int(seconds) * 1000 + int(micros) / 1000
                for run_id, (status, requested_at, worker_id) in zip(run_ids, replies, strict=True):
                    if (
                        status in _CANCELLED
                        and requested_at
                        and now_ms - float(requested_at) >= self.terminate_after_ms
                    ):
                        overdue.append((run_id, cast(str, worker_id), store))
            return overdue

    async def _record(self, store: RunStore, run_id: str, worker_id: str) -> None:
        """The run ends ``cancelled``, ``terminated`` (in ``store``, the partition that
        holds it); its dead process leaves the registry (else it would look alive until its
        heartbeats are missed)."""
        with anyio.fail_after(CHECK_TIMEOUT_S * 4):
            await store.record_terminated(run_id, worker_id=worker_id)
            async with store.redis.pipeline(transaction=True) as pipe:
                deregister(pipe, self.worker.keys, worker_id)
                await pipe.execute()


def supervisor_step(supervisor: PoolSupervisor) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep (``app.steps["consumer"].add(...)``) that runs ``supervisor``."""

    class CancelBrokerPoolSupervisor(bootsteps.StartStopStep):  # type: ignore[misc]  # untyped
        def start(self, consumer: Any) -> None:
            supervisor.start(consumer)

        def stop(self, consumer: Any) -> None:
            supervisor.stop(consumer)

        def shutdown(self, consumer: Any) -> None:
            supervisor.stop(consumer)

    return CancelBrokerPoolSupervisor
