"""Publish events, read runs, cancel them by id or in bulk, and wait for their end."""

from __future__ import annotations

import contextlib
import difflib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self, cast

import anyio
import msgspec
import structlog
from redis.asyncio.cluster import RedisCluster

from sdk.config import (
    MATCH_ON_PUBLISH,
    PENDING_CANCEL_LOOKBACK,
    resolve_lookback,
    resolve_namespace,
    resolve_wait,
)
from sdk.connection import REDIS_ERRORS, command_client, redis_now_ms, resolve_url, unavailable
from sdk.durability import Replicas
from sdk.early_match import EarlyMatch, NotPublishedError
from sdk.errors import InvalidBulkCancelError, RunNotFinishedError, UnknownFunctionError
from sdk.expressions import Expression, compile_trigger_filter, event_variable
from sdk.keys import Keys, check_id, check_name
from sdk.partitions import Partitions, check_partitions
from sdk.rules import value_token
from sdk.scripts import CANCELLED_BY_API, OPERATOR_ACTOR, CancelRequest
from sdk.store import RunStore, request_cancel_everywhere
from sdk.wire import (
    MAX_EVENT_BYTES,
    TERMINAL_STATUSES,
    BulkCancel,
    BulkCancelResult,
    CancelResult,
    Event,
    RunInfo,
    WorkerInfo,
    decode_stored_event,
    decode_worker,
    encode_event,
)

#: Runs read, filtered and cancelled per round trip by :meth:`Client.cancel_many`.
BULK_BATCH: Final = 500
#: How far ahead of the Redis clock a ``started_before`` may be and still count as now:
#: the caller's clock and Redis's differ a little.
CLOCK_SKEW_MS: Final = 1_000

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


def _ms(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone; pass an aware datetime")
    return round(value.timestamp() * 1000)


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _iso(ms: int) -> str:
    return _datetime(ms).isoformat(timespec="milliseconds")


def _first_decided(results: list[CancelResult]) -> CancelResult:
    """Of one run id's results in every partition: the one where the run was (it registered
    meanwhile), else the kept cancel's."""
    for result in results:
        if result.outcome not in ("pending", "not_found"):
            return result
    return next((r for r in results if r.outcome == "pending"), results[0])


def _worker_info(raw: str | None) -> WorkerInfo | None:
    """A worker's registration, None when it is gone or unreadable (another version)."""
    if raw is None:
        return None
    try:
        return decode_worker(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


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
        pending_cancel_lookback: float | timedelta | str | None = None,
        wait_replicas: int | None = None,
        wait_timeout: float | timedelta | str | None = None,
        match_on_publish: bool | None = None,
    ) -> None:
        self.redis_url = resolve_url(redis_url)
        self.keys = Keys(resolve_namespace(namespace))
        #: How long a cancel of runs not registered yet is kept (by id, or in bulk), for
        #: them to be cancelled when they register: ``$CANCEL_BROKER_PENDING_CANCEL_LOOKBACK``
        #: unless given, 10 minutes by default; zero keeps none.
        self.pending_cancel_lookback = resolve_lookback(
            PENDING_CANCEL_LOOKBACK, pending_cancel_lookback
        )
        self.max_event_bytes = max_event_bytes
        #: The number of partitions this client expects (None: whatever the namespace has).
        self.partitions = check_partitions(partitions)
        self._redis = command_client(self.redis_url)
        #: The replicas every write must reach (``$CANCEL_BROKER_WAIT_REPLICAS``, 0 by
        #: default), waited for ``wait_timeout`` at most (``$CANCEL_BROKER_WAIT_TIMEOUT``,
        #: 1 s): a write fewer acknowledged raises :class:`~sdk.errors.NotReplicatedError`.
        wanted, timeout = resolve_wait(wait_replicas, wait_timeout)
        self.replicas = Replicas(self._redis, self.keys, wanted=wanted, timeout=timeout)
        self._partitions: Partitions | None = None
        self._stores: tuple[RunStore, ...] = ()
        self._early = EarlyMatch(self._redis, self.keys, log=log)
        #: ``send`` matches a cancel event as it publishes it (``$CANCEL_BROKER_MATCH_ON_PUBLISH``,
        #: on unless set): see :mod:`sdk.early_match`.
        self._early.enabled = MATCH_ON_PUBLISH.resolve(match_on_publish)

    @property
    def match_on_publish(self) -> bool:
        """Whether ``send`` matches cancel events as it publishes them: as configured, and
        False from the moment Redis refused it (a user that may only publish)."""
        return self._early.enabled

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
        try:
            partitions = await Partitions.open(self._redis, self.keys, self.partitions, store=False)
        except REDIS_ERRORS as exc:
            if (explained := unavailable(exc, self.redis_url)) is not None:
                raise explained from exc
            raise
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

        Raises :class:`~sdk.errors.InvalidEventError` for an event the broker would refuse,
        :class:`~sdk.errors.NotReplicatedError` for one fewer replicas than
        ``wait_replicas`` acknowledged (it was published).
        """
        body = encode_event(name, data, max_bytes=self.max_event_bytes)
        partitions = await self._open()
        event = Event(name=name, data=data or {})
        # One partition, known: the publisher can match the event as it publishes it.
        alone = partitions.known and not partitions.partitioned
        found = await self._early.lookups(event) if alone else []
        event_id = None
        # Failed before anything was written: published plainly, matched by the broker.
        with contextlib.suppress(NotPublishedError):
            if found:
                event_id = await self._early.publish(body, event, found)
        if event_id is None:
            event_id = await partitions.publish(body, event)
        return await self.replicas.check(event_id)

    async def get_run(self, run_id: str) -> RunInfo | None:
        """The run's record, or None if there is no such run (or it expired)."""
        store = await self._store_of(check_id("run id", run_id))
        return None if store is None else await store.get(run_id)

    async def runs_for_event(self, event_id: str) -> list[RunInfo]:
        """The runs an event triggered."""
        check_id("event id", event_id)
        await self._open()
        return [run for store in self._stores for run in await store.runs_for_event(event_id)]

    @property
    def _keep_ms(self) -> int:
        return round(self.pending_cancel_lookback.total_seconds() * 1000)

    async def cancel(
        self, run_id: str, *, reason: str | None = None, actor: Actor = None
    ) -> CancelResult:
        """Cancel one run by id; the result has the run's previous and new status.

        ``outcome`` says what happened: ``signalled`` (its worker is stopping it),
        ``pending`` (no run has this id yet, a job still queued: the cancel is kept until
        ``kept_until``, the client's ``pending_cancel_lookback``, and a run that registers
        with the id by then is cancelled at once, its body never run),
        ``already_cancelling``, ``already_completed``, ``already_cancelled``,
        ``already_failed`` (terminal states are final), ``lost`` (its worker died),
        ``not_found`` (no such run, and keeping is off), or ``forbidden``: the function
        declares an ``owner`` and ``actor`` is not that value (pass :data:`OPERATOR` to
        cancel any run). A kept cancel is checked against the owner when the run registers.
        With ``wait_replicas``, a cancel fewer replicas acknowledged raises
        :class:`~sdk.errors.NotReplicatedError`, whose ``result`` is this result.
        """
        check_id("run id", run_id)
        partitions = await self._open()
        request = CancelRequest(
            cancelled_by=CANCELLED_BY_API,
            reason=reason or "cancelled by request",
            actor=_actor_token(actor),
            keep_ms=self._keep_ms,
        )
        located = await partitions.locate([run_id])
        if run_id in located:
            (result,) = await self._stores[located[run_id]].request_cancel([run_id], request)
        else:
            # In no partition yet: kept in each, since any of them may be where it registers.
            result = _first_decided(await request_cancel_everywhere(self._stores, run_id, request))
        # The audit line of a cancel by id, refused ones included.
        (log.warning if result.outcome == "forbidden" else log.info)(
            "cancel.requested",
            run_id=run_id,
            outcome=result.outcome,
            previous_status=result.previous_status,
            status=result.status,
            cascaded=len(result.cascaded),
            kept_until=result.kept_until,
            actor=repr(actor),
            reason=reason,
        )
        return await self.replicas.check(result)

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
    ) -> BulkCancelResult:
        """Cancel the unfinished runs of a function (of every app declaring it, or of
        ``app_id``) triggered between ``started_after`` and ``started_before`` (both
        included; default: any time up to now), and whose trigger satisfies ``if_``, a CEL
        expression over ``event``. An operator's action: owner checks do not apply.

        A run's time is when it was triggered (its trigger published, its job sent), so
        runs whose trigger waits in the stream behind a full worker count too: the cancel
        is kept (for the client's ``pending_cancel_lookback``) and cancels each of them
        when it registers, as Inngest's bulk cancel does. A ``started_before`` in the
        future would cancel work not asked for yet: it raises
        :class:`~sdk.errors.InvalidBulkCancelError`, as do bounds in the wrong order.

        Returns a :class:`~sdk.wire.BulkCancelResult`: one result per registered run
        considered, the time range, and until when the cancel is kept. ``progress(done,
        total)`` is called once the runs are listed (``done == 0``) and after each batch of
        ``BULK_BATCH`` runs: ``total`` counts the runs in the time range, before ``if_``
        filters them. With ``wait_replicas``, :class:`~sdk.errors.NotReplicatedError`
        (carrying this result) says that fewer replicas acknowledged the cancels.
        """
        check_name("function id", function_id)
        condition = None if if_ is None else compile_trigger_filter(if_)
        await self._open()
        now = await redis_now_ms(self._redis)
        before = now if started_before is None else _ms(started_before)
        if before > now + CLOCK_SKEW_MS:
            raise InvalidBulkCancelError(
                f"started_before={started_before.isoformat() if started_before else None} is"
                f" in the future (Redis time is {_iso(now)}): it would cancel runs not"
                " triggered yet; give a time up to now, or none for now"
            )
        before = min(before, now)
        after = None if started_after is None else _ms(started_after)
        if after is not None and after > before:
            raise InvalidBulkCancelError(
                f"started_after ({_iso(after)}) is later than started_before ({_iso(before)})"
            )
        apps = (
            [check_name("app id", app_id)]
            if app_id
            else sorted(cast(set[str], await self._redis.smembers(self.keys.apps)))
        )
        await self._check_declared(function_id, apps, app_id)
        reason = reason or f"bulk cancel of {function_id}"
        bulk_request = CancelRequest(cancelled_by=CANCELLED_BY_API, reason=reason)
        kept_until = None
        if self._keep_ms:
            # Kept before the registered runs are listed: a run registering meanwhile is
            # either listed, or registers after the cancel is kept and meets it there.
            bulk = BulkCancel(
                id=uuid.uuid4().hex,
                function_id=function_id,
                app=app_id or "",
                after=after,
                before=before,
                if_=if_ or "",
                reason=reason,
                at=now,
            )
            for store in self._stores:
                await store.keep_bulk_cancel(bulk, keep_ms=self._keep_ms)
            kept_until = _datetime(now + self._keep_ms)
        # Both bounds included, as Inngest's bulk cancel; runs are scored by trigger time.
        low = "-inf" if after is None else str(after)
        # Listed first, so that progress knows the total.
        listed = [
            (
                store,
                cast(
                    list[str],
                    await self._redis.zrangebyscore(
                        store.keys.function_runs(app, function_id), low, str(before)
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
                results += await store.request_cancel(batch, bulk_request)
                if progress is not None:
                    progress(done, total)
        result = BulkCancelResult(
            results=results,
            started_after=None if after is None else _datetime(after),
            started_before=_datetime(before),
            kept_until=kept_until,
        )
        log.info(
            "cancel.bulk",
            function_id=function_id,
            app_id=app_id,
            started_after=result.started_after,
            started_before=result.started_before,
            condition=if_,
            runs=len(results),
            outcomes=dict(Counter(r.outcome for r in results)),
            kept_until=kept_until,
        )
        return await self.replicas.check(result)

    async def _check_declared(self, function_id: str, apps: list[str], app_id: str | None) -> None:
        """Refuse a bulk cancel of a function that no app declares (in its latest sync, or
        a live worker's registration) and that has no runs: a typo would otherwise cancel
        nothing, silently."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrange(self.keys.workers, 0, -1)
            for app in apps:
                pipe.hkeys(self.keys.app_functions(app))
                for store in self._stores:
                    pipe.exists(store.keys.function_runs(app, function_id))
            workers, *replies = await pipe.execute()
        per_app = 1 + len(self._stores)
        declared: set[str] = set()
        for i in range(0, len(replies), per_app):
            functions, *runs = replies[i : i + per_app]
            if function_id in functions or any(runs):
                return
            declared |= set(cast(list[str], functions))
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in cast(list[str], workers):
                pipe.hget(self.keys.worker(worker_id), "info")
            for raw in cast(list[str | None], await pipe.execute()):
                info = _worker_info(raw)
                if info is None or (app_id is not None and info.app_id != app_id):
                    continue
                if function_id in info.functions:
                    return
                declared |= set(info.functions)
        where = f"app {app_id!r}" if app_id else "any app"
        close = difflib.get_close_matches(function_id, sorted(declared), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownFunctionError(
            f"no function {function_id!r} in {where}: no app or live worker declares it and"
            f" it has no runs (declared: {', '.join(sorted(declared)) or 'none yet'}){hint}"
        )

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
                # Any: redis-py types aclose in some versions and not in others.
                await cast(Any, pubsub).aclose()
