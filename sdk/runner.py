"""The runs one worker process holds.

Each run is registered in Redis (with its index entries), executes inside its own cancel
scope, records its outcome, and only then leaves this registry: a cancel signal can
always find a run that has not finished (the registry is never dropped early).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import anyio
import msgspec

from sdk.connection import REDIS_ERRORS, Backoff
from sdk.context import DEFAULT_THREAD_GRACE, CancelState, RunContext
from sdk.errors import DuplicateRunError, RunCancelled
from sdk.expressions import compile_trigger_filter, describe_error, event_variable
from sdk.function import Function
from sdk.metrics import WorkerMetrics
from sdk.partitions import Partitions
from sdk.reconcile import RecentOutcomes, RecordedOutcome
from sdk.rules import IndexEntry, index_entries, parse_path, unreachable_rules, value_token
from sdk.scripts import (
    CANCELLED_BY_API,
    CancelledOnRegistration,
    CancelRequest,
    Finished,
    Outcome,
    Registered,
    RegisterRequest,
    RunRegistration,
    Taken,
    tombstone_reason,
)
from sdk.store import DEFAULT_RETENTION
from sdk.unreachable import UnreachableRuns
from sdk.wire import TERMINAL_STATUSES, Event, encode_event, entry_timestamp

#: Registering a run is one short script; longer means Redis is unreachable.
REGISTER_TIMEOUT_S: Final = 10.0
#: How long a run's outcome is retried while Redis is unreachable.
FINISH_TIMEOUT_S: Final = 30.0
SHUTDOWN_REASON: Final = "worker shutdown"
INTERRUPTED_REASON: Final = "interrupted: the block was cancelled from outside the run"
LOST_REASON: Final = "this worker missed its heartbeats and its runs were recorded as lost"
#: A step boundary reads its run's status (the backstop for signals that all went astray)
#: at most this often per run: signals are re-sent every 2 s anyway, and a read per 10 ms
#: step would double what a run costs Redis.
BACKSTOP_INTERVAL_S: Final = 0.5


@dataclass(eq=False, slots=True)
class Run:
    run_id: str
    function: Function
    event: Event
    entries: list[IndexEntry]
    state: CancelState
    parent_run_id: str | None = None
    #: The partition holding the run's record and index entries.
    partition: int = 0
    #: When the body stopped (monotonic), for the cancel latency recorded with the outcome.
    stopped_at: float | None = None
    #: When the run's status was last read from Redis (its registration is a read too).
    status_read_at: float = 0.0
    #: What registered it: registered again, as it was, if Redis loses its data.
    request: RegisterRequest | None = None
    #: Whether its registration script has answered (until then Redis may not hold it).
    registered: bool = False


def _stopped_by_its_cancel(exc: Exception, run: Run) -> bool:
    return isinstance(exc, RunCancelled) and exc.run_id == run.run_id and run.state.cancelled


class Runner:
    """Registers, executes and records the runs of one worker process."""

    def __init__(
        self,
        partitions: Partitions,
        *,
        app_id: str,
        worker_id: str,
        log: Any,
        retention: timedelta = DEFAULT_RETENTION,
        thread_grace: float = DEFAULT_THREAD_GRACE,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.partitions = partitions
        #: One run store per partition; a run's is ``stores[run.partition]``.
        self.stores = partitions.stores(retention=retention)
        self.store = self.stores[0]
        self.metrics = metrics or WorkerMetrics()
        self.app_id = app_id
        self.worker_id = worker_id
        self.thread_grace = thread_grace
        self._log = log
        self._runs: dict[str, Run] = {}
        #: What this process recorded lately, to record again if Redis loses it.
        self.recent = RecentOutcomes()
        self._changed = anyio.Event()
        #: Runs registered out of their rules' reach (no value at a match path), said so.
        self.unreachable = UnreachableRuns(app_id, partitions.base, log)

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def log(self) -> Any:
        return self._log

    def held(self, partition: int) -> list[Run]:
        """The registered runs this process holds in ``partition``."""
        return [r for r in self._runs.values() if r.partition == partition and r.registered]

    def held_ids(self) -> set[str]:
        """The ids of every run this process holds, registered or registering."""
        return set(self._runs)

    async def register(
        self,
        fn: Function,
        event: Event,
        run_id: str,
        *,
        parent_run_id: str | None = None,
        trigger_ms: int | None = None,
    ) -> Run:
        """Register a run in Redis; raises :class:`DuplicateRunError` if the id is taken.

        A run whose parent was cancelled, or that a cancel event published before it
        registered matches (a tombstone), is returned already cancelled: its body stops at
        its first await.
        """
        parent_run_id = parent_run_id or event.parent
        parent = self._runs.get(parent_run_id) if parent_run_id else None
        partition = await self.partitions.of_event(
            msgspec.structs.replace(event, parent=parent_run_id),
            parent_partition=None if parent is None else parent.partition,
        )
        run, request = self._admit(
            fn, event, run_id, parent_run_id, partition, trigger_ms=trigger_ms
        )
        try:
            # Shielded: a run must not be half registered because its starter was cancelled.
            with anyio.fail_after(REGISTER_TIMEOUT_S, shield=True):
                await self.partitions.keep_reachable(fn.cancel_on, event, partition)
                # Idempotent for this worker.
                registration = await self.stores[partition].register(request)
                await self.unreachable.flush(self.store.redis)
                return await self._settle(run, registration)
        except BaseException:
            self._forget(run)
            raise

    async def register_many(
        self, fn: Function, triggers: Sequence[tuple[Event, str]], partition: int = 0
    ) -> list[Run | Exception]:
        """:meth:`register` for a batch of ``(trigger, run id)`` read from ``partition``'s
        stream, in one round trip; each gets its run or the exception :meth:`register`
        would have raised."""
        admitted: list[tuple[Run, RegisterRequest] | Exception] = []
        for event, run_id in triggers:
            try:
                admitted.append(self._admit(fn, event, run_id, event.parent, partition))
            except DuplicateRunError as exc:
                admitted.append(exc)
        requests = [item[1] for item in admitted if not isinstance(item, Exception)]
        store = self.stores[partition]
        results: list[Run | Exception] = []
        try:
            with anyio.fail_after(REGISTER_TIMEOUT_S, shield=True):
                for request in requests:
                    await self.partitions.keep_reachable(fn.cancel_on, request.event, partition)
                registrations = iter(await store.register_many(requests) if requests else [])
                await self.unreachable.flush(store.redis)
                for item in admitted:
                    if isinstance(item, Exception):
                        results.append(item)
                        continue
                    run, registration = item[0], next(registrations)
                    try:
                        if isinstance(registration, Exception):
                            raise registration
                        results.append(await self._settle(run, registration))
                    except Exception as exc:
                        self._forget(run)
                        results.append(exc)
        except BaseException:
            # As for one run: none of the batch is held, and the triggers, unacknowledged,
            # are read again (a registered run is adopted then: same id, same worker).
            for item in admitted:
                if not isinstance(item, Exception):
                    self._forget(item[0])
            raise
        return results

    def _admit(
        self,
        fn: Function,
        event: Event,
        run_id: str,
        parent_run_id: str | None,
        partition: int,
        *,
        trigger_ms: int | None = None,
    ) -> tuple[Run, RegisterRequest]:
        """Put a run in the registry, before its registration script runs: a signal can
        arrive the moment the script returns."""
        if run_id in self._runs:
            raise DuplicateRunError(run_id, "running")
        entries = index_entries(fn.cancel_on, event, self.stores[partition].keys)
        if unreachable := unreachable_rules(fn.cancel_on, event):
            self.unreachable.note(fn.id, run_id, unreachable)
        state = CancelState(fn.cancel_mode, interrupt_after=fn.interrupt_after)
        run = Run(run_id, fn, event, entries, state, parent_run_id, partition)
        run.status_read_at = time.monotonic()
        self._runs[run_id] = run
        request = run.request = RegisterRequest(
            run_id=run_id,
            app_id=self.app_id,
            function_id=fn.id,
            config_hash=fn.config_hash,
            worker_id=self.worker_id,
            event=event,
            entries=entries,
            parent_run_id=parent_run_id,
            owner=self._owner(fn, event),
            trigger_ms=trigger_ms,
        )
        return run, request

    async def register_again(self, runs: Iterable[Run] | None = None) -> int:
        """After Redis lost its data (or, ``runs``, these runs' records): register every run
        this process holds again, as it first registered (its trigger, its rules, its
        parent), so that cancels reach it again; returns how many. A cancel that came since
        (kept by id, a tombstone) applies as it registers. A run that cannot be registered
        now is said and left out."""
        by_partition: dict[int, list[Run]] = {}
        for run in self._runs.values() if runs is None else runs:
            if run.request is not None:
                by_partition.setdefault(run.partition, []).append(run)
        registered = 0
        for partition, runs in sorted(by_partition.items()):
            requests = [run.request for run in runs if run.request is not None]
            replies = await self.stores[partition].register_many(requests)
            for run, reply in zip(runs, replies, strict=True):
                if isinstance(reply, Exception):
                    self._log.error(
                        "run.register_again_failed", run_id=run.run_id, error=repr(reply)
                    )
                    continue
                registered += 1
                if isinstance(reply, CancelledOnRegistration):
                    self._log.info("run.cancelled_on_registration", run_id=run.run_id)
                    run.state.receive(reply.reason)
                elif isinstance(reply, Registered) and (reply.tombstones or reply.bulk_cancels):
                    await self._settle(run, reply)
        return registered

    async def _settle(self, run: Run, registration: RunRegistration) -> Run:
        """Act on what registering did: tombstones and bulk cancels to evaluate, a cancel by
        id the owner refused, a taken id, a cancel."""
        run.registered = True
        if isinstance(registration, Taken):
            self._forget(run)
            raise DuplicateRunError(run.run_id, registration.status)
        if isinstance(registration, CancelledOnRegistration):
            self._log.info(
                "run.cancelled_on_registration",
                run_id=run.run_id,
                reason=registration.reason,
                cancelled_by=registration.cancelled_by,
            )
            run.state.receive(registration.reason)
            return run
        if registration.refused_actor:
            self._log.warning(
                "run.pending_cancel_refused",
                run_id=run.run_id,
                actor=registration.refused_actor,
                owner=run.function.owner,
                reason="a cancel by this run's id came before it registered, from an actor"
                " that is not the run's owner",
            )
        if registration.bulk_cancels:
            await self._apply_bulk_cancels(run, registration)
        if registration.tombstones and not run.state.cancelled:
            await self._apply_tombstones(run, registration)
        return run

    @staticmethod
    def _owner(fn: Function, event: Event) -> tuple[str, str | None] | None:
        if fn.owner is None:
            return None
        return fn.owner, value_token(parse_path(fn.owner).lookup(event))

    async def _apply_bulk_cancels(self, run: Run, registration: Registered) -> None:
        """Bulk cancels (``Client.cancel_many``) that cover the run's trigger time and have a
        condition over the trigger: the worker evaluates it, and cancels its own run."""
        trigger = {"event": event_variable(run.event)}
        for bulk in registration.bulk_cancels:
            try:
                holds = compile_trigger_filter(bulk.if_).evaluate(trigger)
            except Exception as exc:  # an error selects nothing, as in cancel_many
                self._log.warning("run.bulk_condition_error", run_id=run.run_id, error=str(exc))
                continue
            if not holds:
                continue
            (result,) = await self.stores[run.partition].request_cancel(
                [run.run_id],
                CancelRequest(
                    cancelled_by=CANCELLED_BY_API, reason=bulk.reason, holder=self.worker_id
                ),
            )
            if result.outcome in ("signalled", "already_cancelling"):
                self._log.info(
                    "run.cancelled_on_registration",
                    run_id=run.run_id,
                    cancelled_by=CANCELLED_BY_API,
                )
                run.state.receive(bulk.reason)
                return

    async def _apply_tombstones(self, run: Run, registration: Registered) -> None:
        """Cancel events that arrived before the run registered, under rules with an
        expression: the worker, which holds the compiled rule, decides."""
        trigger = event_variable(run.event)
        for entry, cancel in registration.tombstones:
            assert entry.expression is not None
            try:
                matched = entry.expression.evaluate(
                    {"event": trigger, "async": event_variable(cancel)}
                )
            except Exception as exc:  # an expression error never matches
                self._log.warning("run.rule_error", run_id=run.run_id, error=describe_error(exc))
                continue
            if not matched:
                continue
            reason = tombstone_reason(cancel.name)
            (result,) = await self.stores[run.partition].request_cancel(
                [run.run_id],
                CancelRequest(
                    cancelled_by=cancel.id,
                    reason=reason,
                    event_id=cancel.id,
                    cancel_at_ms=entry_timestamp(cancel.id),
                    holder=self.worker_id,
                ),
            )
            if result.outcome in ("signalled", "already_cancelling"):
                self._log.info(
                    "run.cancelled_on_registration", run_id=run.run_id, cancelled_by=cancel.id
                )
                run.state.receive(reason)
                return

    async def spawn(self, parent: Run, name: str, data: dict[str, Any] | None) -> str:
        """Publish an event whose runs are children of ``parent`` (cancelled with it)."""
        body = encode_event(name, data, parent=parent.run_id)
        event = Event(name=name, data=data or {}, parent=parent.run_id)
        return await self.partitions.publish(body, event, parent_partition=parent.partition)

    @asynccontextmanager
    async def running(
        self, run: Run, *, interrupted_reason: str = SHUTDOWN_REASON
    ) -> AsyncIterator[RunContext]:
        """Execute a registered run's body in its cancel scope and record the outcome.

        A cancelled run's ``on_cancel`` hook runs after the body stopped and before the
        outcome is recorded.

        ``interrupted_reason`` is recorded when the body is cancelled from outside its own
        scope (by whoever runs it) rather than by a cancel request.
        """
        state = run.state
        ctx = RunContext(
            run_id=run.run_id,
            app_id=self.app_id,
            function_id=run.function.id,
            event=run.event,
            state=state,
            backstop=lambda: self._check_cancel_requested(run),
            spawn=lambda name, data: self.spawn(run, name, data),
            parent_run_id=run.parent_run_id,
            thread_grace=self.thread_grace,
        )
        outcome: Outcome = "completed"
        error: str | None = None
        started = time.monotonic()
        log = self._log.bind(run_id=run.run_id, function_id=run.function.id)
        log.debug("run.started", event_id=run.event.id, event_name=run.event.name)
        active = self.metrics.runs_active.labels(run.function.id)
        active.inc()
        try:
            with state.scope:
                yield ctx
            run.stopped_at = time.monotonic()
        except Exception as exc:
            run.stopped_at = time.monotonic()
            if not _stopped_by_its_cancel(exc, run):
                outcome, error = "failed", f"{type(exc).__name__}: {exc}"
                raise
            # ``ctx.check()`` outside a step: the body stopped because of its cancel. Not
            # re-raised; ``worker.run`` raises RunCancelled after any cancelled block.
        except BaseException:
            run.stopped_at = time.monotonic()
            # Cancelled from outside the run (the worker is going away, or the caller of
            # ``worker.run`` was cancelled): never a silent end.
            state.receive(interrupted_reason, interrupt=True)
            outcome = "cancelled"
            raise
        finally:
            if state.cancelled:
                outcome = "cancelled"
            on_cancel_error: str | None = None
            try:
                if outcome == "cancelled":
                    on_cancel_error = await self._run_on_cancel(run, ctx, log)
            finally:
                # Recorded after the hook: whoever waits for the final state sees its result.
                try:
                    await self._record(run, outcome, error, on_cancel_error=on_cancel_error)
                finally:
                    self._forget(run)
                    active.dec()
                    log.info(
                        "run.finished",
                        outcome=outcome,
                        reason=state.reason,
                        error=error,
                        on_cancel_error=on_cancel_error,
                        duration_ms=round((time.monotonic() - started) * 1000, 3),
                    )

    async def _run_on_cancel(self, run: Run, ctx: RunContext, log: Any) -> str | None:
        """Run the function's ``on_cancel`` hook; returns how it failed, None if it did not."""
        on_cancel = run.function.cancel_hook
        if on_cancel is None:
            return None
        error: str | None = None
        # Shielded: the run's cancel (or the worker's shutdown) is why the hook runs, and
        # must not stop it; only its own deadline does.
        with anyio.move_on_after(on_cancel.timeout, shield=True) as deadline:
            try:
                await on_cancel.hook(ctx, run.state.reason or "cancelled")
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if deadline.cancelled_caught:
            error = f"TimeoutError: on_cancel did not finish within {on_cancel.timeout:g} s"
        if error is not None:
            log.error("run.on_cancel_failed", error=error)
        return error

    def deliver(self, run_id: str, reason: str, *, interrupt: bool = False) -> bool:
        """Deliver a cancel to a run this process holds; False if it holds no such run (any
        more).

        The run's ``cancel_mode`` decides when the body is interrupted; ``interrupt=True``
        interrupts it now whatever the mode.
        """
        run = self._runs.get(run_id)
        if run is None:
            return False
        run.state.receive(reason, interrupt=interrupt)
        return True

    async def _check_cancel_requested(self, run: Run) -> None:
        """At a step boundary: has a cancel been requested that no signal told us about?"""
        now = time.monotonic()
        if run.state.cancelled or now - run.status_read_at < BACKSTOP_INTERVAL_S:
            return
        run.status_read_at = now
        try:
            status, reason = await self.stores[run.partition].status(run.run_id)
        except REDIS_ERRORS as exc:  # an outage must not fail the step; signals still work
            self._log.debug("run.backstop_unavailable", run_id=run.run_id, error=repr(exc))
            return
        if status == "cancelling":
            self._log.warning("run.cancel_seen_at_step", run_id=run.run_id)
            run.state.receive(reason or "cancelled")

    def deliver_all(self, reason: str, *, interrupt: bool = False) -> None:
        """Deliver a cancel to every run this process holds (``interrupt`` as for
        :meth:`deliver`).

        The worker passes ``interrupt=True`` when it is going away (shutdown, declared
        lost): a between_steps run cannot wait for a step boundary that may never come.
        """
        for run in list(self._runs.values()):
            run.state.receive(reason, interrupt=interrupt)

    async def changed(self) -> None:
        """Wait until a run ends or a slot is released."""
        await self._changed.wait()

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_empty(self) -> None:
        while self._runs:
            await self.changed()

    def _forget(self, run: Run) -> None:
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]
        self.notify()

    async def _record(
        self, run: Run, outcome: Outcome, error: str | None, *, on_cancel_error: str | None = None
    ) -> None:
        recorded = RecordedOutcome(
            run_id=run.run_id,
            partition=run.partition,
            function_id=run.function.id,
            outcome=outcome,
            index_keys=tuple(entry.key for entry in run.entries),
            error=error,
            cancel_reason=run.state.reason if outcome == "cancelled" else None,
            abandoned_thread=run.state.abandoned_thread,
            escalated=outcome == "cancelled" and run.state.escalated,
            terminated=run.state.terminated,
            on_cancel_error=on_cancel_error,
            continued_by=run.state.continued_by,
        )
        # Remembered before it is written: from the moment the run leaves the registry, a
        # reconciliation that finds it still listed in Redis can write it again.
        self.recent.remember(recorded)
        finished = Finished(None)
        backoff = Backoff(self._log, "run.finish", run_id=run.run_id)
        with anyio.move_on_after(FINISH_TIMEOUT_S, shield=True) as scope:
            while True:
                try:
                    stopped = run.stopped_at or time.monotonic()
                    finished = await self.write_outcome(
                        recorded, stopped_ago_ms=(time.monotonic() - stopped) * 1000
                    )
                    break
                except REDIS_ERRORS as exc:  # an outage, OOM, a failover: try again
                    await backoff.failed(exc)
        if scope.cancelled_caught:
            self._log.error("run.finish_failed", run_id=run.run_id, outcome=outcome)
        elif finished.previous in TERMINAL_STATUSES:
            self._log.warning(
                "run.outcome_ignored",
                run_id=run.run_id,
                outcome=outcome,
                recorded=finished.previous,
            )
        else:
            self.metrics.runs_finished.labels(run.function.id, outcome).inc()
            if finished.cancel_latency_ms is not None:
                self.metrics.cancel_latency.observe(finished.cancel_latency_ms / 1000)
        if run.state.abandoned_thread:
            self.metrics.abandoned_threads.inc()
        if on_cancel_error is not None:
            self.metrics.on_cancel_errors.inc()

    async def write_outcome(
        self, recorded: RecordedOutcome, *, stopped_ago_ms: float | None = None
    ) -> Finished:
        """Write a run's outcome to its record (a record already terminal keeps its own)."""
        return await self.stores[recorded.partition].finish(
            recorded.run_id,
            recorded.outcome,
            recorded.index_keys,
            app_id=self.app_id,
            function_id=recorded.function_id,
            worker_id=self.worker_id,
            error=recorded.error,
            cancel_reason=recorded.cancel_reason,
            stopped_ago_ms=stopped_ago_ms,
            abandoned_thread=recorded.abandoned_thread,
            escalated=recorded.escalated,
            terminated=recorded.terminated,
            continued_by=recorded.continued_by,
            on_cancel_error=recorded.on_cancel_error,
        )
