"""The broker: reads cancel events, finds the runs they target, signals their workers.

For each event: validate it (malformed entries go to the dead-letter stream with the
reason), read the selectors rules declared for its name, turn them into index keys with
the event's values, and let one Lua script leave a tombstone under each (for runs that
register later) and move every running run under those keys to ``cancelling``,
signalling its worker. Runs under a rule with an expression come back as candidates: the
broker evaluates the expression on each and cancels those it holds for. Then
acknowledge. Handling an event twice (after a crash, or by two brokers) changes nothing:
a run already cancelling is not signalled again.
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

from broker.findings import DEFAULT_WINDOWS, SyncState, Windows, collect_state, is_cancel_like
from broker.housekeeping import Housekeeping
from broker.metrics import BrokerMetrics
from broker.stats import REFRESH_INTERVAL_S as STATS_REFRESH_S
from broker.sync import HISTORY_MAXLEN, EventWatch, SyncMonitor, SyncRecorder
from sdk.connection import REDIS_ERRORS, Backoff, BackoffHooks, command_client, is_transient
from sdk.errors import ConfigurationError, InvalidEventError
from sdk.expressions import Expression, compile_rule_expression, describe_error, event_variable
from sdk.keys import BROKER_GROUP, DEFAULT_NAMESPACE, Keys
from sdk.rules import lookups
from sdk.store import MatchCandidate, RunStore
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
    RUN_CANCELLED_EVENT,
    CancelOutcome,
    CancelResult,
    Event,
    decode_event,
    entry_timestamp,
)

BLOCK_MS: Final = 5_000
BATCH: Final = 200
#: Entries a broker read and left unacknowledged this long are taken over by another.
CLAIM_IDLE_MS: Final = 30_000
#: How long a cancel event keeps cancelling runs that register after it was handled.
TOMBSTONE_LOOKBACK_S: Final = 600.0
#: Outcomes that mean the cancel event did target the run.
MATCHED: Final[frozenset[CancelOutcome]] = frozenset(
    {
        "signalled",
        "already_cancelling",
        "already_completed",
        "already_cancelled",
        "already_failed",
        "lost",
    }
)
_EXPRESSIONS_CACHED: Final = 4096


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
        self._expressions: dict[str, Expression | str] = {}
        self._log = structlog.get_logger(
            "broker", consumer=self.consumer, namespace=self.keys.namespace
        )
        self._watch = EventWatch(self.keys, cancel_event_names, self._log)
        self._backoff_hooks = BackoffHooks(
            on_failure=self.metrics.redis_errors.inc, on_recovery=self.metrics.redis_reconnects.inc
        )
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
                    backoff_hooks=self._backoff_hooks,
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
                tg.start_soon(self._refresh_cluster_stats, redis)
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

    async def _handle(self, store: RunStore, entry_id: str, fields: dict[str, str] | None) -> None:
        started = time.perf_counter()
        try:
            result = await self._decide(store, entry_id, fields)
        except Exception as exc:
            if is_transient(exc):
                raise  # not acknowledged: handled again once Redis can answer (and counted)
            # A bug, or a reply that will not change: park the entry with the reason rather
            # than stop the broker or lose the entry.
            self._log.exception("event.handling_failed", entry_id=entry_id)
            await self._dead_letter(store.redis, entry_id, fields, "broker_error", repr(exc))
            result = "dead_lettered"
        self.metrics.events.labels(result=result).inc()
        if result in ("matched", "tombstoned", "unmatched"):
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
        if event.name == RUN_CANCELLED_EVENT:
            self._observe_outcome(event)
        selectors = await store.declared_selectors(event.name)
        self._watch.observe(event)
        named = bool(selectors) or is_cancel_like(event.name, self._watch.cancel_event_names)
        self.metrics.events_consumed.labels(self.metrics.event_label(event.name, named=named)).inc()
        if not selectors:
            return "ignored"
        started = time.perf_counter()
        found = lookups(event, selectors, self.keys)
        results: list[CancelResult] = []
        if found:
            results, candidates = await store.match_event(
                event, found, tombstone_ms=self.tombstone_ms
            )
            if candidates:
                results += await self._evaluate(store, event, candidates)
        outcomes = Counter(result.outcome for result in results)
        matched = sum(outcomes[o] for o in MATCHED)
        signalled = outcomes["signalled"]
        cascaded = sum(len(result.cascaded) for result in results)
        self.metrics.runs_matched.inc(matched)
        self.metrics.signals_sent.inc(signalled + cascaded)
        if matched:
            decision = "matched"
        else:
            decision = "tombstoned" if found and self.tombstone_ms else "unmatched"
        # The audit line: one per cancel event, whatever it did.
        self._log.info(
            "cancel.decided",
            event_id=event.id,
            event_name=event.name,
            decision=decision,
            rules=[lookup.selector.text for lookup in found],
            runs_matched=matched,
            signals_sent=signalled + cascaded,
            cascaded=cascaded,
            outcomes=dict(outcomes),
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return decision

    def _observe_outcome(self, event: Event) -> None:
        """A run ended cancelled: its latency, from the cancel's publication to its stop."""
        latency_ms = event.data.get("latency_ms")
        if isinstance(latency_ms, int | float) and not isinstance(latency_ms, bool):
            self.metrics.cancel_latency.observe(max(0.0, latency_ms) / 1000)

    async def _refresh_cluster_stats(self, redis: Redis) -> None:
        while True:
            try:
                await self.metrics.cluster.refresh(redis, self.keys)
            except REDIS_ERRORS as exc:  # the event loop reports outages; try next round
                self._log.debug("stats.refresh_failed", error=repr(exc))
            await anyio.sleep(STATS_REFRESH_S)

    async def _evaluate(
        self,
        store: RunStore,
        event: Event,
        candidates: Sequence[MatchCandidate],
    ) -> list[CancelResult]:
        """Evaluate each candidate's rule expression; cancel the runs it holds for.

        An expression that fails to evaluate never matches: the error is recorded on the run.
        """
        cancel = event_variable(event)
        matched: list[str] = []
        final: dict[str, CancelOutcome] = {}
        errors: dict[str, str] = {}
        for candidate in candidates:
            if candidate.run_id in matched:
                continue  # another of its rules already holds
            expression_id = candidate.lookup.selector.expression_id
            assert expression_id is not None
            expression = await self._expression(store, expression_id)
            try:
                if isinstance(expression, str):
                    raise ConfigurationError(expression)
                holds = expression.evaluate(
                    {"event": event_variable(candidate.trigger), "async": cancel}
                )
            except Exception as exc:
                errors[candidate.run_id] = (
                    f"rule on {event.name} ({expression_id}), event {event.id}: "
                    + describe_error(exc)
                )
                final.setdefault(candidate.run_id, "rule_error")
                continue
            if holds:
                matched.append(candidate.run_id)
            else:
                final[candidate.run_id] = "condition_false"
        await store.record_rule_errors(errors)
        results = await store.request_cancel(
            matched,
            event_id=event.id,
            reason=f"cancel event {event.name}",
            cancelled_by=event.id,
            cancel_at_ms=entry_timestamp(event.id),
        )
        return results + [
            CancelResult(
                run_id=run_id, outcome=outcome, status="running", previous_status="running"
            )
            for run_id, outcome in final.items()
            if run_id not in matched
        ]

    async def _expression(self, store: RunStore, expression_id: str) -> Expression | str:
        """A rule expression by id (as workers declared it), compiled once; or why not."""
        cached = self._expressions.get(expression_id)
        if cached is not None:
            return cached
        source = await store.redis.hget(self.keys.expressions, expression_id)
        compiled: Expression | str
        if source is None:
            compiled = f"expression {expression_id} was never declared"
        else:
            try:
                compiled = compile_rule_expression(str(source))
            except ConfigurationError as exc:
                compiled = str(exc)
        if len(self._expressions) >= _EXPRESSIONS_CACHED:
            self._expressions.clear()
        self._expressions[expression_id] = compiled
        return compiled

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
