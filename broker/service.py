"""The broker: reads cancel events, finds the runs they target, signals their workers.

It consumes the events stream (and the workers' sync notices) through the ``broker``
consumer group, hands each batch to its :class:`~broker.matching.Matcher`, and only then
acknowledges it; housekeeping, the sync monitor and the cluster statistics run beside.
Handling a batch twice (after a crash, or by two brokers) changes nothing: a run already
cancelling is not signalled again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any, Final

import anyio
import structlog
from anyio.abc import TaskStatus

from broker import decisions
from broker.dashboard import DashboardData
from broker.findings import DEFAULT_WINDOWS, SyncState, Windows, collect_state
from broker.housekeeping import Housekeeping
from broker.matching import Matcher
from broker.metrics import BrokerMetrics
from broker.stats import REFRESH_INTERVAL_S as STATS_REFRESH_S
from broker.sync import HISTORY_MAXLEN, EventWatch, SyncMonitor, SyncRecorder
from sdk.client import Client
from sdk.connection import REDIS_ERRORS, Backoff, BackoffHooks, RedisClient, command_client
from sdk.keys import BROKER_GROUP, DEFAULT_NAMESPACE, Keys
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
#: Entries a broker read and left unacknowledged this long are taken over by another.
CLAIM_IDLE_MS: Final = 30_000
#: How long a cancel event keeps cancelling runs that register after it was handled.
TOMBSTONE_LOOKBACK_S: Final = 600.0


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Broker:
    """One broker process; several share the work through the ``broker`` consumer group."""

    def __init__(
        self,
        redis_url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        consumer: str | None = None,
        metrics: BrokerMetrics | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        claim_idle_ms: int = CLAIM_IDLE_MS,
        windows: Windows = DEFAULT_WINDOWS,
        cancel_event_names: frozenset[str] = frozenset(),
        dead_letter_maxlen: int = DEAD_LETTER_MAXLEN,
        history_length: int = HISTORY_MAXLEN,
        tombstone_lookback_s: float = TOMBSTONE_LOOKBACK_S,
    ) -> None:
        self.redis_url = redis_url
        self.keys = Keys(namespace)
        self.consumer = consumer or default_consumer_name()
        self.metrics = metrics or BrokerMetrics()
        self.max_event_bytes = max_event_bytes
        self.claim_idle_ms = claim_idle_ms
        self.windows = windows
        self.dead_letter_maxlen = dead_letter_maxlen
        self.history_length = history_length
        self.tombstone_ms = max(0, round(tombstone_lookback_s * 1000))
        self._log = structlog.get_logger(
            "broker", consumer=self.consumer, namespace=self.keys.namespace
        )
        self._watch = EventWatch(self.keys, cancel_event_names, self._log)
        self._backoff_hooks = BackoffHooks(
            on_failure=self.metrics.redis_errors.inc, on_recovery=self.metrics.redis_reconnects.inc
        )
        self._redis: RedisClient | None = None
        self._events: GroupConsumer | None = None
        self._dashboard: DashboardData | None = None
        #: Set when :meth:`run` has returned (after :meth:`stop`, or cancellation).
        self.stopped = anyio.Event()

    def stop(self) -> None:
        """Stop reading events; the batch in hand is finished and acknowledged first."""
        if self._events is not None:
            self._events.stop()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume cancel events until :meth:`stop` or cancellation.

        Signals ``task_status`` once listening.
        """
        redis = command_client(self.redis_url)
        # The dashboard's Cancel goes through the SDK's own cancel by id.
        client = Client(self.redis_url, namespace=self.keys.namespace)
        try:
            await self._wait_for_redis(redis)
            store = RunStore(redis, self.keys)
            events, syncs = (
                GroupConsumer(
                    self.redis_url,
                    redis,
                    stream=stream,
                    group=BROKER_GROUP,
                    consumer=self.consumer,
                    block_ms=BLOCK_MS,
                    batch=BATCH,
                    claim_idle_ms=self.claim_idle_ms,
                    on_poison=self._poison_handler(redis, stream),
                    log=self._log,
                    backoff_hooks=self._backoff_hooks,
                )
                for stream in (self.keys.events, self.keys.syncs)
            )
            self._events = events
            recorder = SyncRecorder(redis, self.keys, self._log, history_length=self.history_length)
            monitor = SyncMonitor(
                redis, self.keys, self._watch, self.metrics, self.windows, self._log
            )

            matcher = self.matcher(store)

            async def handle_events(entries: Sequence[Entry]) -> None:
                recorded = await matcher.handle(entries)
                # What the dashboard and the sync findings read, and the acknowledgement,
                # in one round trip; only a failed acknowledgement fails the batch.
                async with redis.pipeline(transaction=False) as pipe:
                    decisions.queue(pipe, self.keys, recorded)
                    self._watch.queue(pipe)
                    pipe.xack(events.stream, events.group, *(entry_id for entry_id, _ in entries))
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

            self._redis = redis
            self._dashboard = DashboardData(redis, self.keys, client, self.sync_state)
            self._log.info("broker.started", stream=self.keys.events, group=BROKER_GROUP)
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(Housekeeping(store, self.metrics, self._log).run)
                tg.start_soon(self._refresh_cluster_stats, redis)
                tg.start_soon(monitor.run)
                tg.start_soon(syncs.run, handle_syncs)
                await events.run(handle_events)
                tg.cancel_scope.cancel()  # stopped: the rest is housekeeping
        finally:
            self._redis = self._events = self._dashboard = None
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await redis.aclose()
            self.stopped.set()
            self._log.info("broker.stopped")

    def _poison_handler(self, redis: RedisClient, stream: str) -> Any:
        async def park(entries: Sequence[Entry]) -> None:
            for entry_id, fields in entries:
                detail = f"delivered more than {MAX_DELIVERIES} times without being handled"
                await self._dead_letter(redis, entry_id, fields, "poison", f"{stream}: {detail}")

        return park

    def matcher(self, store: RunStore) -> Matcher:
        """What decides this broker's batches of events, over ``store``."""

        async def dead_letter(
            entry_id: str, fields: dict[str, str] | None, reason: str, detail: str
        ) -> None:
            await self._dead_letter(store.redis, entry_id, fields, reason, detail)

        return Matcher(
            store,
            metrics=self.metrics,
            watch=self._watch,
            dead_letter=dead_letter,
            max_event_bytes=self.max_event_bytes,
            tombstone_ms=self.tombstone_ms,
            log=self._log,
            consumer=self.consumer,
        )

    async def readiness(self) -> tuple[bool, str]:
        """Whether this broker can do its work now: RedisClient answers and its groups exist."""
        redis = self._redis
        if redis is None:
            return False, "the broker is not running"
        try:
            with anyio.fail_after(2):
                groups = {g["name"] for g in await redis.xinfo_groups(self.keys.events)}
        except (*REDIS_ERRORS, TimeoutError) as exc:
            return False, f"Redis is unreachable: {exc!r}"
        if BROKER_GROUP not in groups:
            return False, f"consumer group {BROKER_GROUP!r} is missing on {self.keys.events}"
        return True, "ready"

    async def sync_state(self) -> SyncState:
        """Registrations and stale-configuration findings, computed now."""
        if self._redis is None:
            raise RuntimeError("the broker is not running")
        return await collect_state(self._redis, self.keys, windows=self.windows)

    def dashboard(self) -> DashboardData:
        """What the dashboard reads and cancels through, while the broker runs."""
        if self._dashboard is None:
            raise RuntimeError("the broker is not running")
        return self._dashboard

    async def _wait_for_redis(self, redis: RedisClient) -> None:
        """Create the group, retrying while Redis is unreachable: the broker waits, not dies."""
        backoff = Backoff(self._log, "broker.startup", hooks=self._backoff_hooks)
        while True:
            try:
                await create_group(redis, self.keys.events, BROKER_GROUP)
                await create_group(redis, self.keys.syncs, BROKER_GROUP)
            except REDIS_ERRORS as exc:
                await backoff.failed(exc)
                continue
            backoff.succeeded()
            return

    async def _refresh_cluster_stats(self, redis: RedisClient) -> None:
        while True:
            try:
                await self.metrics.cluster.refresh(redis, self.keys)
            except REDIS_ERRORS as exc:  # the event loop reports outages; try next round
                self._log.debug("stats.refresh_failed", error=repr(exc))
            await anyio.sleep(STATS_REFRESH_S)

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
