"""Publish events, read runs, cancel them by id or in bulk, and wait for their end."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self, cast

import anyio
import structlog
from redis.asyncio.cluster import RedisCluster

from sdk.config import resolve_namespace
from sdk.connection import command_client, resolve_url
from sdk.errors import RunNotFinishedError
from sdk.expressions import Expression, compile_trigger_filter, event_variable
from sdk.keys import Keys, check_id, check_name
from sdk.partitions import Partitions, check_partitions
from sdk.rules import value_token
from sdk.store import OPERATOR_ACTOR, RunStore
from sdk.wire import (
    MAX_EVENT_BYTES,
    TERMINAL_STATUSES,
    CancelResult,
    Event,
    RunInfo,
    decode_stored_event,
    encode_event,
)

#: Runs read, filtered and cancelled per round trip by :meth:`Client.cancel_many`.
BULK_BATCH: Final = 500

log = structlog.get_logger("sdk.client")


class _Operator:
    """The type of :data:`OPERATOR`."""

    def __repr__(self) -> str:
        return "OPERATOR"


#: ``Client.cancel(run_id, actor=OPERATOR)``: cancel a run whatever owner its function
#: declares (an operator or a back office, never the end user's own request).
OPERATOR: Final = _Operator()

Actor = str | int | _Operator | None


def _actor_token(actor: Actor) -> str:
    if actor is None:
        return ""
    if isinstance(actor, _Operator):
        return OPERATOR_ACTOR
    return value_token(actor) or ""


def _ms(value: datetime) -> float:
    if value.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone; pass an aware datetime")
    return value.timestamp() * 1000


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Client:
    """The app-side API: ``async with Client(url) as client: await client.send(...)``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        partitions: int | None = None,
    ) -> None:
        self.redis_url = resolve_url(redis_url)
        self.keys = Keys(resolve_namespace(namespace))
        self.max_event_bytes = max_event_bytes
        #: The number of partitions this client expects (None: whatever the namespace has).
        self.partitions = check_partitions(partitions)
        self._redis = command_client(self.redis_url)
        self._partitions: Partitions | None = None
        self._stores: tuple[RunStore, ...] = ()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _open(self) -> Partitions:
        """The namespace's partitions, read from Redis on first use."""
        if self._partitions is not None:
            return self._partitions
        # A client only reads the number: publishing needs no right to write it.
        partitions = await Partitions.open(self._redis, self.keys, self.partitions, store=False)
        self._stores = partitions.stores()
        if partitions.known:
            self._partitions = partitions
        return partitions

    async def _store_of(self, run_id: str) -> RunStore | None:
        """The store of the partition holding the run, or None if there is no such run."""
        partitions = await self._open()
        partition = (await partitions.locate([run_id])).get(run_id)
        return None if partition is None else self._stores[partition]

    async def send(self, name: str, data: dict[str, Any] | None = None) -> str:
        """Publish an event; returns its id (the stream entry id).

        Raises :class:`~sdk.errors.InvalidEventError` for an event the broker would refuse.
        """
        body = encode_event(name, data, max_bytes=self.max_event_bytes)
        partitions = await self._open()
        return await partitions.publish(body, Event(name=name, data=data or {}))

    async def get_run(self, run_id: str) -> RunInfo | None:
        """The run's record, or None if there is no such run (or it expired)."""
        store = await self._store_of(check_id("run id", run_id))
        return None if store is None else await store.get(run_id)

    async def runs_for_event(self, event_id: str) -> list[RunInfo]:
        """The runs an event triggered."""
        check_id("event id", event_id)
        await self._open()
        return [run for store in self._stores for run in await store.runs_for_event(event_id)]

    async def cancel(
        self, run_id: str, *, reason: str | None = None, actor: Actor = None
    ) -> CancelResult:
        """Cancel one run by id; the result has the run's previous and new status.

        ``outcome`` says what happened: ``signalled`` (its worker is stopping it),
        ``already_cancelling``, ``already_completed``, ``already_cancelled``,
        ``already_failed`` (terminal states are final), ``lost`` (its worker died),
        ``not_found``, or ``forbidden``: the function declares an ``owner`` and ``actor``
        is not that value (pass :data:`OPERATOR` to cancel any run).
        """
        store = await self._store_of(check_id("run id", run_id))
        if store is None:
            result = CancelResult(run_id=run_id, outcome="not_found", status=None)
        else:
            (result,) = await store.request_cancel(
                [run_id],
                reason=reason or "cancelled by request",
                cancelled_by="api",
                actor=_actor_token(actor),
            )
        # The audit line of a cancel by id, refused ones included.
        (log.warning if result.outcome == "forbidden" else log.info)(
            "cancel.requested",
            run_id=run_id,
            outcome=result.outcome,
            previous_status=result.previous_status,
            status=result.status,
            cascaded=len(result.cascaded),
            actor=repr(actor),
            reason=reason,
        )
        return result

    async def cancel_many(
        self,
        function_id: str,
        *,
        app_id: str | None = None,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        if_: str | None = None,
        reason: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[CancelResult]:
        """Cancel the unfinished runs of a function (of every app declaring it, or of
        ``app_id``), optionally only those started in a time range or whose trigger
        satisfies ``if_``, a CEL expression over ``event``. An operator's action: owner
        checks do not apply. Returns one result per run considered.

        ``progress(done, total)`` is called once the runs are listed (``done == 0``) and
        after each batch of ``BULK_BATCH`` runs: ``total`` counts the runs in the time
        range, before ``if_`` filters them.
        """
        check_name("function id", function_id)
        condition = None if if_ is None else compile_trigger_filter(if_)
        await self._open()
        apps = (
            [check_name("app id", app_id)]
            if app_id
            else sorted(cast(set[str], await self._redis.smembers(self.keys.apps)))
        )
        # Exclusive bounds ("after", "before"), as Inngest's bulk cancel.
        low = "-inf" if started_after is None else f"({_ms(started_after)}"
        high = "+inf" if started_before is None else f"({_ms(started_before)}"
        # Listed first, so that progress knows the total.
        listed = [
            (
                store,
                cast(
                    list[str],
                    await self._redis.zrangebyscore(
                        store.keys.function_runs(app, function_id), low, high
                    ),
                ),
            )
            for app in apps
            for store in self._stores
        ]
        total = sum(len(run_ids) for _, run_ids in listed)
        done = 0
        if progress is not None:
            progress(done, total)
        results: list[CancelResult] = []
        for store, run_ids in listed:
            for batch in _batches(run_ids, BULK_BATCH):
                done += len(batch)
                if condition is not None:
                    batch = await self._filter(store, batch, condition)
                results += await store.request_cancel(
                    batch,
                    reason=reason or f"bulk cancel of {function_id}",
                    cancelled_by="api",
                )
                if progress is not None:
                    progress(done, total)
        log.info(
            "cancel.bulk",
            function_id=function_id,
            app_id=app_id,
            started_after=started_after,
            started_before=started_before,
            condition=if_,
            runs=len(results),
            outcomes=dict(Counter(result.outcome for result in results)),
        )
        return results

    async def _filter(
        self, store: RunStore, run_ids: list[str], condition: Expression
    ) -> list[str]:
        """The runs whose trigger satisfies ``condition``; an error selects nothing."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hget(store.keys.run(run_id), "event")
            triggers = cast(list[str | None], await pipe.execute())
        selected = []
        for run_id, trigger in zip(run_ids, triggers, strict=True):
            if trigger is None:
                continue
            try:
                holds = condition.evaluate({"event": event_variable(decode_stored_event(trigger))})
            except Exception:
                continue
            if holds:
                selected.append(run_id)
        return selected

    # The timeout is part of the call (as in Inngest and asyncio.wait_for): a wait that
    # raises a named error says which run did not finish, which a cancelled scope cannot.
    async def wait(self, run_id: str, timeout: float | None = None) -> RunInfo:  # noqa: ASYNC109
        """Wait until the run has a terminal status and return its record.

        Raises :class:`~sdk.errors.RunNotFinishedError` after ``timeout`` seconds. A run
        that does not exist yet is waited for too (it may still be queued).
        """
        check_id("run id", run_id)
        if isinstance(self._redis, RedisCluster):
            # Its Pub/Sub needs the slot map, which it does not load by itself.
            await self._redis.initialize()
        pubsub = self._redis.pubsub()
        try:
            # Subscribed before reading: an end announced in between is not missed.
            await pubsub.subscribe(self.keys.finished(run_id))
            with anyio.move_on_after(timeout):
                while True:
                    info = await self.get_run(run_id)
                    if info is not None and info.status in TERMINAL_STATUSES:
                        return info
                    # Also wakes up now and then: a record that expired, a lost notice.
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            raise RunNotFinishedError(run_id, timeout)
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
