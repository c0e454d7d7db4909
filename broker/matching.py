"""Turning a batch of events into cancel decisions.

For a batch read from the events stream:

1. validate every entry (a malformed one goes to the dead letters with the reason);
2. read the selectors declared for the batch's event names, in one round trip;
3. turn each cancel event's selectors into index keys with its own values, and run
   ``match_events.lua`` for every event, in one pipelined round trip: each leaves its
   tombstones and cancels the runs its keys name;
4. evaluate rule expressions on the candidates the scripts return (rare), and cancel
   those they hold for;
5. count, and write one audit line per cancel event;
6. return the batch's decisions, which the broker records in ``{ns}:decisions`` (for
   the dashboard: :mod:`broker.decisions`) in the round trip that acknowledges the
   batch.

Three round trips per batch, its acknowledgement included, instead of two per event:
what lets one broker keep up with tens of thousands of cancel events per second.
Handling a batch again (a crash, a transient error) changes nothing: a run already
cancelling is not signalled again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, cast

from broker import decisions
from broker.findings import is_cancel_like
from broker.metrics import BrokerMetrics
from broker.scripts import MatchCandidate, match_events
from broker.sync import EventWatch
from sdk.connection import is_transient
from sdk.errors import ConfigurationError, InvalidEventError
from sdk.expressions import Expression, compile_rule_expression, describe_error, event_variable
from sdk.keys import Keys
from sdk.partitions import Partitions
from sdk.rules import Lookup, Selector, lookups, without_value
from sdk.scripts import CancelRequest, event_reason
from sdk.store import RunStore
from sdk.streams import Entry
from sdk.wire import (
    RUN_CANCELLED_EVENT,
    CancelOutcome,
    CancelResult,
    Event,
    decode_event,
    entry_timestamp,
)

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
#: Seconds the functions declaring a cancel event's rules are cached (see _declared_by).
DECLARERS_CACHED_S: Final = 5.0

#: (entry id, original fields, reason, detail) -> parks the entry in the dead letters.
DeadLetter = Callable[[str, dict[str, str] | None, str, str], Awaitable[None]]


class Matcher:
    """One broker's decisions; :meth:`handle` takes a batch of entries."""

    def __init__(
        self,
        partitions: Partitions,
        stores: Sequence[RunStore],
        *,
        metrics: BrokerMetrics,
        watch: EventWatch,
        dead_letter: DeadLetter,
        max_event_bytes: int,
        tombstone_ms: int,
        log: Any,
        consumer: str = "",
    ) -> None:
        self.partitions = partitions
        #: One run store per partition, indexed by partition.
        self.stores = tuple(stores)
        self.store = self.stores[0]
        self.keys: Keys = self.store.keys
        self.metrics = metrics
        self.watch = watch
        self.dead_letter = dead_letter
        self.max_event_bytes = max_event_bytes
        self.tombstone_ms = tombstone_ms
        self._log = log
        self.consumer = consumer
        self._expressions: dict[str, Expression | str] = {}
        self._counters: dict[str, Any] = {}
        #: event name -> (until when it holds, selector -> declaring functions)
        self._declarers: dict[str, tuple[float, dict[str, list[str]]]] = {}

    async def handle(
        self, entries: Sequence[Entry], partition: int = 0
    ) -> list[decisions.Recorded]:
        """Decide every entry of a batch read from ``partition``'s stream; returns the
        decisions to record. Raises (nothing acknowledged) only when Redis cannot answer
        now; the batch is then handled again.

        A cancel event is looked up in its own partition, or in every partition when its
        rules do not all place it with the runs it matches (broadcast).
        """
        started = time.perf_counter()
        events: list[tuple[str, dict[str, str] | None, Event]] = []
        for entry_id, fields in entries:
            event = await self._decode(entry_id, fields, partition)
            if event is not None:
                events.append((entry_id, fields, event))
        names = [event.name for _, _, event in events]
        selectors = await declared_selectors(self.store, names)
        broadcast = await self.partitions.broadcast(names)
        planned: list[tuple[str, dict[str, str] | None, Event, list[Lookup], list[int]]] = []
        calls: list[tuple[Keys, Event, list[Lookup]]] = []
        missing: dict[str, list[Selector]] = {}
        for entry_id, fields, event in events:
            declared = selectors[event.name]
            self._observe(event, declared)
            if not declared:
                # Nothing to cancel. Unserved: no function triggers on it either.
                self._count("unserved" if self.watch.unserved(event.name) else "ignored")
                continue
            if without := without_value(event, declared):
                missing[event.id] = without
            targets = self.stores if event.name in broadcast else (self.stores[partition],)
            # The same selectors in each partition: only the keys' tags differ.
            per_target = [(store, lookups(event, declared, store.keys)) for store in targets]
            found = per_target[0][1]
            slots = []
            for store, store_found in per_target if found else ():
                slots.append(len(calls))
                calls.append((store.keys, event, store_found))
            planned.append((entry_id, fields, event, found, slots))
        replies = await match_events(self.store.redis, calls, tombstone_ms=self.tombstone_ms)
        declared_by = await self._declared_by(
            {event.name for _, _, event in events if event.id in missing}
        )
        recorded: list[decisions.Recorded] = []
        for entry_id, fields, event, found, slots in planned:
            try:
                results: list[CancelResult] = []
                candidates: list[MatchCandidate] = []
                for slot in slots:
                    reply = replies[slot]
                    if isinstance(reply, Exception):
                        raise reply
                    results += reply[0]
                    candidates += reply[1]
                if candidates:
                    results = results + await self._evaluate(event, candidates)
                detail = _no_value(event, missing.get(event.id, []), declared_by)
                recorded.append(self._decided(event, found, results, started, detail))
            except Exception as exc:
                if is_transient(exc):
                    raise  # not acknowledged: handled again once Redis can answer (and counted)
                # A bug, or a reply that will not change: park the entry with the reason
                # rather than stop the broker or lose the entry.
                self._log.exception("event.handling_failed", entry_id=entry_id)
                await self.dead_letter(entry_id, fields, "broker_error", repr(exc))
                self._count("dead_lettered")
                recorded.append(decisions.failed(event, "broker_error", repr(exc), self.consumer))
        return recorded

    async def _decode(
        self, entry_id: str, fields: dict[str, str] | None, partition: int
    ) -> Event | None:
        if not fields:
            self._count("ignored")  # deleted from the stream after delivery: nothing to do
            return None
        try:
            return decode_event(
                entry_id, fields, max_bytes=self.max_event_bytes, partition=partition
            )
        except InvalidEventError as exc:
            self._log.warning(
                "event.dead_lettered", entry_id=entry_id, reason=exc.reason, detail=exc.detail
            )
            await self.dead_letter(entry_id, fields, exc.reason, exc.detail)
            self._count("dead_lettered")
            return None

    def _observe(self, event: Event, declared: list[str]) -> None:
        if event.name == RUN_CANCELLED_EVENT:
            self._observe_outcome(event)
        self.watch.observe(event)
        named = bool(declared) or is_cancel_like(event.name, self.watch.cancel_event_names)
        self.metrics.events_consumed.labels(self.metrics.event_label(event.name, named=named)).inc()

    def _observe_outcome(self, event: Event) -> None:
        """A run ended cancelled: its latency, from the cancel's publication to its stop."""
        latency_ms = event.data.get("latency_ms")
        if isinstance(latency_ms, int | float) and not isinstance(latency_ms, bool):
            self.metrics.cancel_latency.observe(max(0.0, latency_ms) / 1000)

    def _count(self, result: str) -> None:
        counter = self._counters.get(result)
        if counter is None:  # a labels() lookup per event is a visible share of its cost
            counter = self._counters[result] = self.metrics.events.labels(result=result)
        counter.inc()

    async def _declared_by(self, names: set[str]) -> dict[str, dict[str, list[str]]]:
        """For each of these cancel event names: selector -> the functions (``app/fn``)
        that declared it. Cached a few seconds: read only for cancel events that lack a
        value at a declared path (a misnamed key), which a busy broker may see often."""
        now = time.monotonic()
        stale = sorted(name for name in names if self._declarers.get(name, (0.0, {}))[0] < now)
        if stale:
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for name in stale:
                    pipe.hkeys(self.keys.rule_functions(name))
                replies = cast(list[list[str]], await pipe.execute())
            for name, fields in zip(stale, replies, strict=True):
                by_selector: dict[str, list[str]] = {}
                for field in fields:
                    selector, _, function = field.partition(" ")
                    by_selector.setdefault(selector, []).append(function)
                if len(self._declarers) >= _EXPRESSIONS_CACHED:
                    self._declarers.clear()
                self._declarers[name] = (now + DECLARERS_CACHED_S, by_selector)
        return {name: self._declarers[name][1] for name in names if name in self._declarers}

    def _decided(
        self,
        event: Event,
        found: list[Lookup],
        results: list[CancelResult],
        started: float,
        detail: str | None = None,
    ) -> decisions.Recorded:
        """Count the decision, write its audit line; returns its record."""
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
        elapsed = time.perf_counter() - started
        self._count(decision)
        self.metrics.handling_seconds.observe(elapsed)
        rules = [lookup.selector.text for lookup in found]
        # The audit line: one per cancel event, whatever it did.
        self._log.info(
            "cancel.decided",
            event_id=event.id,
            event_name=event.name,
            decision=decision,
            rules=rules,
            runs_matched=matched,
            signals_sent=signalled + cascaded,
            cascaded=cascaded,
            outcomes=dict(outcomes),
            latency_ms=round(elapsed * 1000, 3),
            **({"detail": detail} if detail else {}),
        )
        return decisions.decided(
            event,
            decision,
            rules=rules,
            matched=(result.run_id for result in results if result.outcome in MATCHED),
            outcomes=outcomes,
            signals_sent=signalled + cascaded,
            latency_ms=elapsed * 1000,
            consumer=self.consumer,
            detail=detail,
        )

    async def _evaluate(
        self, event: Event, candidates: Sequence[MatchCandidate]
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
            expression = await self._expression(expression_id)
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
        partition_of = {candidate.run_id: candidate.partition for candidate in candidates}
        results: list[CancelResult] = []
        for partition, store in enumerate(self.stores):
            await record_rule_errors(
                store,
                {run_id: e for run_id, e in errors.items() if partition_of[run_id] == partition},
            )
            held = [run_id for run_id in matched if partition_of[run_id] == partition]
            if held:
                results += await store.request_cancel(
                    held,
                    CancelRequest(
                        cancelled_by=event.id,
                        reason=event_reason(event.name),
                        event_id=event.id,
                        cancel_at_ms=entry_timestamp(event.id),
                    ),
                )
        unmatched = [
            CancelResult(
                run_id=run_id, outcome=outcome, status="running", previous_status="running"
            )
            for run_id, outcome in final.items()
            if run_id not in matched
        ]
        return results + unmatched

    async def _expression(self, expression_id: str) -> Expression | str:
        """A rule expression by id (as workers declared it), compiled once; or why not."""
        cached = self._expressions.get(expression_id)
        if cached is not None:
            return cached
        source = await self.store.redis.hget(self.keys.expressions, expression_id)
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


def _no_value(
    event: Event, missing: list[Selector], declared_by: dict[str, dict[str, list[str]]]
) -> str | None:
    """Why these rules could not match the cancel event: it has no value at their path."""
    if not missing:
        return None
    reasons = []
    for selector in missing:
        functions = sorted(declared_by.get(event.name, {}).get(selector.text, []))
        whose = (
            f"{functions[0]}'s rule"
            if len(functions) == 1
            else f"the rules of {', '.join(functions)}"
            if functions
            else f"the rule on {event.name}"
        )
        reasons.append(f"no value at {selector.path} for {whose}")
    return "; ".join(reasons)


async def declared_selectors(store: RunStore, names: Iterable[str]) -> dict[str, list[str]]:
    """Selectors of the rules workers declared for each of these event names (one round
    trip)."""
    ordered = list(dict.fromkeys(names))
    async with store.redis.pipeline(transaction=False) as pipe:
        for name in ordered:
            pipe.hkeys(store.keys.rules(name))
        # The clients decode responses, so every reply string is a str.
        replies = cast(list[list[str]], await pipe.execute())
    return dict(zip(ordered, replies, strict=True))


async def record_rule_errors(store: RunStore, errors: Mapping[str, str]) -> None:
    """Note on each run why its rule's expression could not be evaluated."""
    if not errors:
        return
    async with store.redis.pipeline(transaction=False) as pipe:
        for run_id, error in errors.items():
            # The run was running a moment ago; its record outlives it by the retention.
            pipe.hset(store.keys.run(run_id), "rule_error", error)
        await pipe.execute()
