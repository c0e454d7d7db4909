"""The broker: reads cancel events, finds the runs they target, signals their workers.

For each event: validate it (malformed entries go to the dead-letter stream with the
reason), look up which match paths rules listen on for its name, turn those paths into
index keys with the event's values, and let one Lua script move every running run under
those keys to ``cancelling`` and signal its worker. Then acknowledge. Handling an event
twice (after a crash) changes nothing: a run already cancelling is not signalled again.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

import anyio
import structlog
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from broker.findings import DEFAULT_WINDOWS, SyncState, Windows, collect_state
from broker.housekeeping import Housekeeping
from broker.metrics import BrokerMetrics
from broker.sync import HISTORY_MAXLEN, EventWatch, SyncMonitor, SyncRecorder
from sdk.connection import REDIS_ERRORS, Backoff, command_client, is_transient
from sdk.errors import InvalidEventError
from sdk.keys import BROKER_GROUP, DEFAULT_NAMESPACE, Keys
from sdk.rules import lookup_keys
from sdk.store import RunStore
from sdk.streams import (
    DEAD_LETTER_MAXLEN,
    MAX_DELIVERIES,
    Entry,
    GroupConsumer,
    create_group,
    dead_letter,
)
from sdk.wire import MAX_EVENT_BYTES, decode_event

BLOCK_MS: Final = 5_000
BATCH: Final = 200
#: Entries a broker read and left unacknowledged this long are taken over by another.
CLAIM_IDLE_MS: Final = 30_000


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
        self._log = structlog.get_logger(
            "broker", consumer=self.consumer, namespace=self.keys.namespace
        )
        self._watch = EventWatch(self.keys, cancel_event_names, self._log)
        self._redis: Redis | None = None
        self._events: GroupConsumer | None = None
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
                )
                for stream in (self.keys.events, self.keys.syncs)
            )
            self._events = events
            recorder = SyncRecorder(redis, self.keys, self._log, history_length=self.history_length)
            monitor = SyncMonitor(
                redis, self.keys, self._watch, self.metrics, self.windows, self._log
            )

            async def handle_events(entries: Sequence[Entry]) -> None:
                for entry_id, fields in entries:
                    await self._handle(store, entry_id, fields)
                await self._watch.flush(redis)
                await events.ack(*(entry_id for entry_id, _ in entries))

            async def handle_syncs(entries: Sequence[Entry]) -> None:
                await recorder.record(entries)
                await syncs.ack(*(entry_id for entry_id, _ in entries))
                monitor.wake()

            self._redis = redis
            self._log.info("broker.started", stream=self.keys.events, group=BROKER_GROUP)
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(Housekeeping(store, self.metrics, self._log).run)
                tg.start_soon(monitor.run)
                tg.start_soon(syncs.run, handle_syncs)
                await events.run(handle_events)
                tg.cancel_scope.cancel()  # stopped: the rest is housekeeping
        finally:
            self._redis = self._events = None
            with anyio.CancelScope(shield=True):
                await redis.aclose()
            self.stopped.set()
            self._log.info("broker.stopped")

    def _poison_handler(self, redis: Redis, stream: str) -> Any:
        async def park(entries: Sequence[Entry]) -> None:
            for entry_id, fields in entries:
                detail = f"delivered more than {MAX_DELIVERIES} times without being handled"
                await self._dead_letter(redis, entry_id, fields, "poison", f"{stream}: {detail}")

        return park

    async def readiness(self) -> tuple[bool, str]:
        """Whether this broker can do its work now: Redis answers and its groups exist."""
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

    async def _wait_for_redis(self, redis: Redis) -> None:
        """Create the group, retrying while Redis is unreachable: the broker waits, not dies."""
        backoff = Backoff(self._log, "broker.startup")
        while True:
            try:
                await create_group(redis, self.keys.events, BROKER_GROUP)
                await create_group(redis, self.keys.syncs, BROKER_GROUP)
            except REDIS_ERRORS as exc:
                await backoff.failed(exc)
                continue
            backoff.succeeded()
            return

    async def _handle(self, store: RunStore, entry_id: str, fields: dict[str, str] | None) -> None:
        started = time.perf_counter()
        try:
            result = await self._decide(store, entry_id, fields)
        except Exception as exc:
            if is_transient(exc):
                self.metrics.redis_errors.inc()
                raise  # not acknowledged: handled again once Redis can answer
            # A bug, or a reply that will not change: park the entry with the reason rather
            # than stop the broker or lose the entry.
            self._log.exception("event.handling_failed", entry_id=entry_id)
            await self._dead_letter(store.redis, entry_id, fields, "broker_error", repr(exc))
            result = "dead_lettered"
        self.metrics.events.labels(result=result).inc()
        if result in ("matched", "unmatched"):
            self.metrics.handling_seconds.observe(time.perf_counter() - started)

    async def _decide(self, store: RunStore, entry_id: str, fields: dict[str, str] | None) -> str:
        if not fields:
            return "ignored"  # deleted from the stream after it was delivered: nothing to do
        try:
            event = decode_event(entry_id, fields, max_bytes=self.max_event_bytes)
        except InvalidEventError as exc:
            self._log.warning(
                "event.dead_lettered", entry_id=entry_id, reason=exc.reason, detail=exc.detail
            )
            await self._dead_letter(store.redis, entry_id, fields, exc.reason, exc.detail)
            return "dead_lettered"
        paths = await store.listened_paths(event.name)
        self._watch.observe(event, listened=bool(paths))
        if not paths:
            return "ignored"
        started = time.perf_counter()
        index_keys = lookup_keys(event, paths, self.keys)
        results = (
            await store.request_cancel(
                index_keys=index_keys,
                event_id=event.id,
                reason=f"cancel event {event.name}",
                cancelled_by=event.id,
            )
            if index_keys
            else []
        )
        outcomes = Counter(result.outcome for result in results)
        matched = len(results) - sum(
            outcomes[o] for o in ("not_found", "own_trigger", "started_after_cancel")
        )
        signalled = outcomes["signalled"]
        self.metrics.runs_matched.inc(matched)
        self.metrics.signals_sent.inc(signalled)
        self._log.info(
            "cancel.decided",
            event_id=event.id,
            event_name=event.name,
            runs_matched=matched,
            signals_sent=signalled,
            outcomes=dict(outcomes),
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return "matched" if matched else "unmatched"

    async def _dead_letter(
        self, redis: Redis, entry_id: str, fields: dict[str, str] | None, reason: str, detail: str
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
