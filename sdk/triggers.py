"""Consuming one function's triggers.

Every function has its own consumer group on the events stream (``fn:{app}/{function}``),
shared by the workers of the app that declare it: each trigger starts one run of each
function it triggers, and a worker only ever acknowledges triggers of functions it
serves. During a rolling deploy that adds a function, old workers do not read that
function's group at all, so none of its triggers is dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final

from anyio.abc import TaskGroup

from sdk.connection import REDIS_ERRORS, Backoff, is_transient
from sdk.errors import DuplicateRunError, InvalidEventError
from sdk.expressions import describe_error, event_variable
from sdk.function import Function
from sdk.keys import PARTITION_FIELD, Keys
from sdk.runner import Run, Runner
from sdk.streams import MAX_DELIVERIES, Entry, GroupConsumer, dead_letter
from sdk.wire import Event, decode_event

#: How long the blocking read waits before looping (it returns at once on new entries).
TRIGGER_BLOCK_MS: Final = 5_000
#: Most trigger entries read at once.
TRIGGER_BATCH: Final = 100
#: A trigger another worker read and left unacknowledged this long is taken over.
TRIGGER_CLAIM_IDLE_MS: Final = 60_000

#: Runs started by a trigger get an id derived from (namespace, app, function, event):
#: a trigger delivered twice maps to the same run, which registers only once.
_RUN_ID_NAMESPACE: Final = uuid.UUID("6f1c3f0e-6b8e-4c55-9d43-3a1f0f8f6a21")


def triggered_run_id(keys: Keys, app_id: str, function_id: str, event_id: str) -> str:
    return uuid.uuid5(_RUN_ID_NAMESPACE, f"{keys.namespace}/{app_id}/{function_id}/{event_id}").hex


class FunctionTriggers:
    """Registers a run for each trigger of one function, acknowledges it, starts it."""

    def __init__(
        self,
        function: Function,
        runner: Runner,
        *,
        partition: int = 0,
        redis_url: str,
        app_id: str,
        worker_id: str,
        task_group: TaskGroup,
        capacity: Callable[[], Awaitable[int]],
        execute: Callable[[Run], Coroutine[Any, Any, None]],
        log: Any,
        lookback_ms: int = 0,
    ) -> None:
        self.function = function
        self.runner = runner
        self.partition = partition
        #: With several partitions, only entries placed in this one are ours: a broker
        #: moves the others (plain XADDs, outcome events) to where they belong.
        self._placed_only = runner.partitions.partitioned
        self.app_id = app_id
        self._tg = task_group
        self._capacity = capacity
        self._execute = execute
        self._log = log
        #: Entries read whose run is being registered (not yet acknowledged).
        self.starting: set[str] = set()
        keys = runner.stores[partition].keys
        self.consumer = GroupConsumer(
            redis_url,
            runner.store.redis,
            stream=keys.events,
            group=keys.function_group(app_id, function.id),
            consumer=worker_id,
            block_ms=TRIGGER_BLOCK_MS,
            batch=TRIGGER_BATCH,
            claim_idle_ms=TRIGGER_CLAIM_IDLE_MS,
            on_poison=self._park_poison,
            log=log,
            lookback_ms=lookback_ms,
        )

    async def run(self) -> None:
        await self.consumer.run(self._dispatch, capacity=self._capacity)

    async def _park_poison(self, entries: Sequence[Entry]) -> None:
        """A trigger whose start keeps failing (or crashing workers) goes to the dead letters."""
        keys = self.runner.store.keys
        for entry_id, fields in entries:
            await dead_letter(
                self.runner.store.redis,
                keys.dead_letters,
                entry_id,
                fields,
                reason="poison",
                detail=f"trigger of {self.function.id} delivered more than"
                f" {MAX_DELIVERIES} times without starting a run",
                consumer=self.consumer.consumer,
            )

    async def _dispatch(self, entries: Sequence[Entry]) -> None:
        not_ours: list[str] = []
        batch: list[tuple[str, Event]] = []
        for entry_id, fields in entries:
            if entry_id in self.starting:
                continue
            if self._placed_only and (fields or {}).get(PARTITION_FIELD) != str(self.partition):
                not_ours.append(entry_id)
                continue
            try:
                event = decode_event(entry_id, fields, partition=self.partition)
            except InvalidEventError:
                not_ours.append(entry_id)  # the broker dead-letters malformed entries
                continue
            if event.name != self.function.trigger or not self._passes_filter(event):
                not_ours.append(entry_id)
                continue
            self.starting.add(entry_id)
            batch.append((entry_id, event))
        if batch:
            self._tg.start_soon(self._start, batch)
        await self.consumer.ack(*not_ours)

    def _passes_filter(self, event: Event) -> bool:
        """Whether the trigger meets the function's ``trigger_if`` (said when it does not:
        a trigger that starts nothing is never silent)."""
        condition = self.function.trigger_filter
        if condition is None:
            return True
        try:
            if condition.evaluate({"event": event_variable(event)}):
                return True
            self._log.info("trigger.filtered_out", function_id=self.function.id, event_id=event.id)
        except Exception as exc:  # an expression error starts no run, as a false condition
            self._log.warning(
                "trigger.filter_error",
                function_id=self.function.id,
                event_id=event.id,
                error=describe_error(exc),
            )
        return False

    async def _start(self, batch: list[tuple[str, Event]]) -> None:
        """Register a batch of triggers' runs in one round trip, acknowledge the triggers
        in one more, and start the runs.

        While Redis refuses for a reason that is not the triggers' own (OOM, READONLY, a
        lost connection, a cluster move), the triggers still to register are registered
        again after a backoff, as read: reading them again would count deliveries toward
        poison. Registering again is idempotent for this worker.
        """
        backoff = Backoff(self._log, "triggers.start", function_id=self.function.id)
        remaining = batch
        try:
            while remaining:
                remaining, error = await self._register(remaining)
                if error is None:
                    backoff.succeeded()
                    continue
                if not is_transient(error):
                    # Of their own (or unknown): read again, counting toward poison.
                    self._failed([entry_id for entry_id, _ in remaining], error)
                    return
                await backoff.failed(error)
        finally:
            self.starting.difference_update(entry_id for entry_id, _ in batch)
            self.runner.notify()

    async def _register(
        self, batch: list[tuple[str, Event]]
    ) -> tuple[list[tuple[str, Event]], BaseException | None]:
        """One attempt: returns the triggers to try again and the error that stopped them
        (none left and None when every trigger was registered and acknowledged)."""
        keys = self.runner.store.keys
        # From the event's id, not the entry's: unique across partitions, and the same for
        # an entry a broker moved twice.
        run_ids = [
            triggered_run_id(keys, self.app_id, self.function.id, event.id) for _, event in batch
        ]
        runs: list[Run] = []
        again: list[tuple[str, Event]] = []
        error: BaseException | None = None
        try:
            results = await self.runner.register_many(
                self.function,
                [(event, run_id) for (_, event), run_id in zip(batch, run_ids, strict=True)],
                self.partition,
            )
            started: list[str] = []
            for (entry_id, event), run_id, result in zip(batch, run_ids, results, strict=True):
                if isinstance(result, Run):
                    runs.append(result)
                elif isinstance(result, DuplicateRunError):
                    self._log.info("run.duplicate_trigger", run_id=run_id, status=result.status)
                elif isinstance(result, REDIS_ERRORS):
                    again.append((entry_id, event))
                    error = result
                    continue
                else:
                    raise result
                started.append(entry_id)
            await self.consumer.ack(*started)
        except (*REDIS_ERRORS, TimeoutError) as exc:
            # Not acknowledged: registered again (a run that did get registered is adopted
            # then: same id, same worker), or read again for a non-transient error.
            return batch, exc
        finally:
            # Even when this task is being cancelled: a registered run must run (or be
            # recorded as cancelled), never be left "running" by nobody.
            for run in runs:
                self._tg.start_soon(self._execute, run)
        return again, error

    def _failed(self, entry_ids: list[str], exc: BaseException) -> None:
        self._log.warning("triggers.start_failed", entry_ids=entry_ids, error=repr(exc))
        self.consumer.reread_pending()
