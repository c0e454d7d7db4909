"""The broker: reads cancel events, finds the runs they target, signals their workers.

It consumes the events stream (and the workers' sync notices) through the ``broker``
consumer group, hands each batch to its :class:`~broker.matching.Matcher`, and only then
acknowledges it; housekeeping, the sync monitor and the cluster statistics run beside.
Handling a batch twice (after a crash, or by two brokers) changes nothing: a run already
cancelling is not signalled again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Sequence
from typing import Any, Final, cast

import anyio
import structlog
from anyio.abc import TaskStatus

from broker import decisions
from broker.dashboard import DashboardData
from broker.findings import DEFAULT_WINDOWS, SyncState, Windows
from broker.housekeeping import Housekeeping
from broker.matching import Matcher
from broker.metrics import BrokerMetrics
from broker.placement import move_unplaced
from broker.stats import REFRESH_INTERVAL_S as STATS_REFRESH_S
from broker.sync import HISTORY_MAXLEN, EventWatch, SyncMonitor, SyncRecorder
from broker.sync_state import collect_state
from sdk.client import Client
from sdk.config import ON_EVICTING_REDIS, TRIGGER_LOOKBACK, resolve_lookback, resolve_namespace
from sdk.connection import (
    REDIS_ERRORS,
    Backoff,
    BackoffHooks,
    RedisClient,
    command_client,
    redis_now_ms,
    unavailable,
)
from sdk.epoch import Epoch
from sdk.keys import BROKER_GROUP, PRESENCE, Keys, presence_field
from sdk.logs import held_lines
from sdk.partitions import Partitions, check_partitions
from sdk.redis_health import EvictionWatch, OnEvicting
from sdk.server_watch import CHECK_EVERY_S as SERVER_CHECK_S
from sdk.server_watch import ServerWatch
from sdk.store import RunStore
from sdk.streams import (
    DEAD_LETTER_MAXLEN,
    MAX_DELIVERIES,
    Entry,
    GroupConsumer,
    create_group,
    dead_letter,
)
from sdk.wire import (
    MAX_EVENT_BYTES,
)

BLOCK_MS: Final = 5_000
BATCH: Final = 200
#: Readers of each partition's events stream, each its own consumer of the group: while
#: one waits for Redis to run its batch's script, another decodes the next batch, so the
#: broker's Python and Redis's work overlap (events are idempotent and independent, as
#: with several brokers). The first reader is named as the broker.
READERS: Final = 2
#: Entries a broker read and left unacknowledged this long are taken over by another.
CLAIM_IDLE_MS: Final = 30_000
#: How long a cancel event keeps cancelling runs that register after it was handled.
TOMBSTONE_LOOKBACK_S: Final = 600.0
#: How long a broker's presence counts after it last said so (it says so every 2 s).
PRESENCE_MS: Final = 10_000


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def reader_name(consumer: str, reader: int) -> str:
    """The consumer name of a broker's ``reader``-th reader of a partition (the first:
    the broker's own name, so a restart under that name reads what it left pending)."""
    return consumer if reader == 0 else f"{consumer}#{reader}"


class Broker:
    """One broker process; several share the work through the ``broker`` consumer group."""

    def __init__(
        self,
        redis_url: str,
        *,
        namespace: str | None = None,
        consumer: str | None = None,
        metrics: BrokerMetrics | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        claim_idle_ms: int = CLAIM_IDLE_MS,
        windows: Windows = DEFAULT_WINDOWS,
        cancel_event_names: frozenset[str] = frozenset(),
        dead_letter_maxlen: int = DEAD_LETTER_MAXLEN,
        history_length: int = HISTORY_MAXLEN,
        tombstone_lookback_s: float = TOMBSTONE_LOOKBACK_S,
        partitions: int | None = None,
        pending_cancel_lookback_s: float | None = None,
        wait_replicas: int | None = None,
        wait_timeout_s: float | None = None,
        trigger_lookback_s: float | None = None,
        on_evicting_redis: OnEvicting | None = None,
        eviction_check_s: float | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.keys = Keys(resolve_namespace(namespace))
        #: The number of partitions this broker expects (None: whatever the namespace has).
        self.partitions = check_partitions(partitions)
        self.consumer = consumer or default_consumer_name()
        self.metrics = metrics or BrokerMetrics()
        self.max_event_bytes = max_event_bytes
        self.claim_idle_ms = claim_idle_ms
        self.windows = windows
        self.dead_letter_maxlen = dead_letter_maxlen
        self.history_length = history_length
        self.tombstone_ms = max(0, round(tombstone_lookback_s * 1000))
        #: For the dashboard's Cancel, as for any Client (None: the SDK's own default).
        self.pending_cancel_lookback_s = pending_cancel_lookback_s
        self.wait_replicas = wait_replicas
        self.wait_timeout_s = wait_timeout_s
        #: How long the events stream keeps what every group has read, for a function's
        #: first worker to read that far back (the workers' own setting, read alike).
        self.trigger_lookback_ms = round(
            resolve_lookback(TRIGGER_LOOKBACK, trigger_lookback_s).total_seconds() * 1000
        )
        self._log = structlog.get_logger(
            "broker", consumer=self.consumer, namespace=self.keys.namespace
        )
        self._watch = EventWatch(self.keys, cancel_event_names, self._log)
        self._epoch: Epoch | None = None
        #: Why the broker cannot start yet (Redis unreachable, the password refused).
        self._waiting_for_redis: str | None = None
        self._eviction = EvictionWatch(
            redis_url,
            cast(OnEvicting, ON_EVICTING_REDIS.resolve(on_evicting_redis)),
            self._log,
            every_s=eviction_check_s,
        )
        self._backoff_hooks = BackoffHooks(
            on_failure=self.metrics.redis_errors.inc, on_recovery=self.metrics.redis_reconnects.inc
        )
        self._redis: RedisClient | None = None
        self._partitions: Partitions | None = None
        self._events: list[GroupConsumer] = []
        self._dashboard: DashboardData | None = None
        #: Set when :meth:`run` has returned (after :meth:`stop`, or cancellation).
        self.stopped = anyio.Event()

    def stop(self) -> None:
        """Stop reading events; the batch in hand is finished and acknowledged first."""
        for events in self._events:
            events.stop()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume cancel events until :meth:`stop` or cancellation.

        Signals ``task_status`` once listening.
        """
        redis = command_client(self.redis_url)
        # The dashboard's Cancel goes through the SDK's own cancel by id.
        client = Client(
            self.redis_url,
            namespace=self.keys.namespace,
            partitions=self.partitions,
            pending_cancel_lookback=self.pending_cancel_lookback_s,
            wait_replicas=self.wait_replicas,
            wait_timeout=self.wait_timeout_s,
        )
        try:
            partitions = await self._wait_for_redis(redis)
            stores = partitions.stores()
            syncs = self._consumer(redis, self.keys.syncs, self.consumer, lookback_ms=0)
            readers = [
                [
                    self._consumer(
                        redis,
                        keys.events,
                        reader_name(self.consumer, reader),
                        lookback_ms=self.trigger_lookback_ms,
                    )
                    for reader in range(READERS)
                ]
                for keys in partitions.keys
            ]
            self._events = events = [consumer for group in readers for consumer in group]
            recorder = SyncRecorder(redis, self.keys, self._log, history_length=self.history_length)
            monitor = SyncMonitor(
                redis,
                self.keys,
                self._watch,
                self.metrics,
                self.windows,
                self._log,
                trigger_lookback_s=self.trigger_lookback_ms / 1000,
            )

            matcher = self.matcher(partitions, stores)

            async def handle_events(partition: int, entries: Sequence[Entry]) -> None:
                with held_lines():  # an audit line per event: one write per batch
                    await handle_batch(partition, entries)

            async def handle_batch(partition: int, entries: Sequence[Entry]) -> None:
                placed = await move_unplaced(partitions, entries, partition)
                if moved := len(entries) - len(placed):
                    self.metrics.events.labels(result="moved").inc(moved)
                recorded = await matcher.handle(placed, partition) if placed else []
                # What the dashboard and the sync findings read, and the acknowledgement,
                # in one round trip; only a failed acknowledgement fails the batch.
                stream = partitions.keys[partition].events
                async with redis.pipeline(transaction=False) as pipe:
                    decisions.queue(pipe, self.keys, recorded)
                    self._watch.queue(pipe)
                    pipe.xack(stream, BROKER_GROUP, *(entry_id for entry_id, _ in entries))
                    *notes, acked = await pipe.execute(raise_on_error=False)
                if isinstance(acked, Exception):
                    raise acked
                if failed := [note for note in notes if isinstance(note, Exception)]:
                    self._log.warning(
                        "decisions.not_recorded", decisions=len(recorded), error=repr(failed[0])
                    )

            async def handle_syncs(entries: Sequence[Entry]) -> None:
                await recorder.record(entries)
                await syncs.ack(*(entry_id for entry_id, _ in entries))
                monitor.wake()

            self._redis, self._partitions = redis, partitions
            self._dashboard = DashboardData(
                redis, partitions, client, self.sync_state, warnings=self.warnings
            )
            # Once before the first event: what is declared (rules, triggers) is known
            # when the first events are counted, matched, orphaned or unserved.
            with contextlib.suppress(*REDIS_ERRORS):
                await monitor.scan()
            self._log.info(
                "broker.started",
                stream=self.keys.events,
                group=BROKER_GROUP,
                partitions=partitions.count,
            )
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    Housekeeping(
                        stores, self.metrics, self._log, keep_ms=self.trigger_lookback_ms
                    ).run
                )
                tg.start_soon(self._refresh_cluster_stats, redis)
                tg.start_soon(self._watch_eviction, redis)
                tg.start_soon(self._watch_server, redis, [syncs, *events])
                tg.start_soon(monitor.run)
                tg.start_soon(syncs.run, handle_syncs)
                async with anyio.create_task_group() as consuming:
                    for partition, group in enumerate(readers):
                        for reader in group:
                            consuming.start_soon(
                                reader.run, functools.partial(handle_events, partition)
                            )
                tg.cancel_scope.cancel()  # stopped: the rest is housekeeping
        finally:
            self._redis = self._partitions = self._dashboard = None
            self._events = []
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await redis.aclose()
            self.stopped.set()
            self._log.info("broker.stopped")

    def _consumer(
        self, redis: RedisClient, stream: str, consumer: str, *, lookback_ms: int
    ) -> GroupConsumer:
        return GroupConsumer(
            self.redis_url,
            redis,
            stream=stream,
            group=BROKER_GROUP,
            consumer=consumer,
            block_ms=BLOCK_MS,
            batch=BATCH,
            claim_idle_ms=self.claim_idle_ms,
            on_poison=self._poison_handler(redis, stream),
            log=self._log,
            backoff_hooks=self._backoff_hooks,
            lookback_ms=lookback_ms,
        )

    def _poison_handler(self, redis: RedisClient, stream: str) -> Any:
        async def park(entries: Sequence[Entry]) -> None:
            for entry_id, fields in entries:
                detail = f"delivered more than {MAX_DELIVERIES} times without being handled"
                await self._dead_letter(redis, entry_id, fields, "poison", f"{stream}: {detail}")

        return park

    def matcher(self, partitions: Partitions, stores: Sequence[RunStore]) -> Matcher:
        """What decides this broker's batches of events, over one store per partition."""

        async def dead_letter(
            entry_id: str, fields: dict[str, str] | None, reason: str, detail: str
        ) -> None:
            await self._dead_letter(partitions.redis, entry_id, fields, reason, detail)

        return Matcher(
            partitions,
            stores,
            metrics=self.metrics,
            watch=self._watch,
            dead_letter=dead_letter,
            max_event_bytes=self.max_event_bytes,
            tombstone_ms=self.tombstone_ms,
            log=self._log,
            consumer=self.consumer,
        )

    async def readiness(self) -> tuple[bool, str]:
        """Whether this broker can do its work now: Redis answers and its groups exist. A
        reason other than ``ready`` with True: it works, degraded (``/readyz`` says so)."""
        redis, partitions = self._redis, self._partitions
        if redis is None or partitions is None:
            return False, self._not_running()
        for keys in partitions.keys:
            try:
                with anyio.fail_after(2):
                    groups = {g["name"] for g in await redis.xinfo_groups(keys.events)}
            except (*REDIS_ERRORS, TimeoutError) as exc:
                return False, f"Redis is unreachable: {exc!r}"
            if BROKER_GROUP not in groups:
                return False, f"consumer group {BROKER_GROUP!r} is missing on {keys.events}"
        if self._eviction.problem is not None:
            return True, f"degraded: {self._eviction.problem}"
        return True, "ready"

    async def sync_state(self) -> SyncState:
        """Registrations and stale-configuration findings, computed now."""
        if self._redis is None or self._partitions is None:
            raise RuntimeError(self._not_running())
        return await collect_state(
            self._redis,
            self.keys,
            windows=self.windows,
            trigger_lookback_s=self.trigger_lookback_ms / 1000,
        )

    def dashboard(self) -> DashboardData:
        """What the dashboard reads and cancels through, while the broker runs."""
        if self._dashboard is None:
            raise RuntimeError(self._not_running())
        return self._dashboard

    async def _wait_for_redis(self, redis: RedisClient) -> Partitions:
        """Agree on the partitions and create the groups, retrying while Redis is
        unreachable: the broker waits, not dies."""
        backoff = Backoff(self._log, "broker.startup", hooks=self._backoff_hooks)
        while True:
            try:
                await self._eviction.check_at_start(redis)
                self.metrics.redis_evicting.set(self._eviction.problem is not None)
                partitions = await Partitions.open(redis, self.keys, self.partitions)
                self._epoch = Epoch(redis, self.keys, self._log)
                await self._epoch.join()
                for keys in partitions.keys:
                    # Starting the lookback back: cancel events published before any
                    # broker (or worker) existed still leave their tombstones.
                    await create_group(
                        redis, keys.events, BROKER_GROUP, lookback_ms=self.trigger_lookback_ms
                    )
                await create_group(redis, self.keys.syncs, BROKER_GROUP)
            except REDIS_ERRORS as exc:
                self._note_waiting(exc)
                await backoff.failed(exc)
                continue
            backoff.succeeded()
            self._waiting_for_redis = None
            return partitions

    def _note_waiting(self, exc: BaseException) -> None:
        """What the broker waits for, said where an operator looks: one log line per new
        reason (a refused password above all), ``/readyz`` and the dashboard."""
        explained = unavailable(exc, self.redis_url)
        reason = str(explained) if explained else f"Redis answered: {exc}"
        if reason != self._waiting_for_redis:
            self._log.error(
                "broker.waiting_for_redis",
                reason=reason,
                hint=explained.hint if explained else None,
            )
        self._waiting_for_redis = reason

    def _not_running(self) -> str:
        if self._waiting_for_redis is not None:
            return f"waiting for Redis: {self._waiting_for_redis}"
        return "the broker is not running"

    async def _recover(self, redis: RedisClient) -> None:
        """Redis lost its data (a restart without persistence): store the partition count
        again and recreate the groups from the start of the new streams (everything in
        them came after the loss); workers register their runs again themselves."""
        self.metrics.redis_data_lost.inc()
        assert self._partitions is not None
        await redis.set(self.keys.partitions, self._partitions.count, nx=True)
        for keys in self._partitions.keys:
            await create_group(redis, keys.events, BROKER_GROUP, from_start=True)
        await create_group(redis, self.keys.syncs, BROKER_GROUP, from_start=True)
        self._log.warning("broker.rebuilt_after_data_loss")

    async def _watch_eviction(self, redis: RedisClient) -> None:
        """Read the Redis's eviction policy now and then (it can change under us)."""
        while True:
            await anyio.sleep(self._eviction.every_s)
            problem = await self._eviction.check(redis)
            self.metrics.redis_evicting.set(problem is not None)

    async def _watch_server(self, redis: RedisClient, consumers: list[GroupConsumer]) -> None:
        """When another Redis server answers (a failover, a restart), read again every
        entry delivered to this broker but not acknowledged there: a batch handled on the
        old primary whose effects and acknowledgement the new one lacks is handled again
        (handling is idempotent), not left until another consumer claims it."""
        watch = ServerWatch(self._log)
        await watch.changed(redis)
        while True:
            await anyio.sleep(SERVER_CHECK_S)
            if await watch.changed(redis):
                self.metrics.redis_server_changes.inc()
                for consumer in consumers:
                    consumer.reread_pending()

    def warnings(self) -> list[str]:
        """What is wrong with the broker's Redis now (the dashboard's banner)."""
        return [self._eviction.problem] if self._eviction.problem else []

    async def _refresh_cluster_stats(self, redis: RedisClient) -> None:
        """Every few seconds: the cluster's figures, and this namespace's broker presence
        (what workers and other namespaces' brokers read to notice a namespace split)."""
        field = presence_field("broker", self.keys.namespace)
        try:
            while True:
                try:
                    if self._epoch is not None and await self._epoch.lost():
                        await self._recover(redis)
                    until = await redis_now_ms(redis) + PRESENCE_MS
                    await redis.hset(PRESENCE, field, until)
                    await self.metrics.cluster.refresh(redis, self.keys)
                except REDIS_ERRORS as exc:  # the event loop reports outages; try next round
                    self._log.debug("stats.refresh_failed", error=repr(exc))
                await anyio.sleep(STATS_REFRESH_S)
        finally:
            # Stopped: no longer present (another broker of the namespace says so again).
            with anyio.move_on_after(2, shield=True):
                try:
                    await redis.hdel(PRESENCE, field)
                except REDIS_ERRORS as exc:
                    self._log.debug("presence.clear_failed", error=repr(exc))

    async def _dead_letter(
        self,
        redis: RedisClient,
        entry_id: str,
        fields: dict[str, str] | None,
        reason: str,
        detail: str,
    ) -> None:
        self.metrics.dead_letters.labels(reason=reason).inc()
        await dead_letter(
            redis,
            self.keys.dead_letters,
            entry_id,
            fields,
            reason=reason,
            detail=detail,
            consumer=self.consumer,
            maxlen=self.dead_letter_maxlen,
        )
