"""Run state in Redis: registration, cancel requests and outcomes.

Every change of a run's status happens in a Lua script (``sdk/lua``), so each transition
is atomic and terminal states are final whoever races whom.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final, Literal, cast

import msgspec
import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from sdk.connection import RedisClient
from sdk.keys import EVENT_FIELD, Keys
from sdk.metrics import LATENCY_BUCKETS
from sdk.rules import IndexEntry, Lookup
from sdk.wire import (
    RUN_CANCELLED_EVENT,
    BulkCancel,
    CancelOutcome,
    CancelResult,
    Event,
    RunInfo,
    RunStatus,
    decode_run,
    decode_stored_event,
    encode_json,
    encode_stored_event,
    entry_timestamp,
)

#: How long a finished run's record stays readable (``Client.get_run``).
DEFAULT_RETENTION: Final = timedelta(days=1)
#: Recently finished runs listed in ``{ns}:runs:finished`` (the dashboard's history); the
#: records themselves stay readable for the retention, listed or not.
FINISHED_RUNS_KEPT: Final = 1_000
#: Approximate cap on a worker's signal stream; signals are read within milliseconds.
SIGNAL_STREAM_MAXLEN: Final = 10_000
#: Most cancels by id kept per partition for runs not registered yet (``pending``); beyond,
#: the one closest to its end is dropped: about 150 bytes each, 15 MB at most.
PENDING_CANCELS_KEPT: Final = 100_000
#: Most bulk cancels kept per function for runs not registered yet.
BULK_CANCELS_KEPT: Final = 100

Outcome = Literal["completed", "cancelled", "failed", "lost"]


log = structlog.get_logger("sdk.store")
_bulk_decoder = msgspec.json.Decoder(BulkCancel)


def _script(name: str) -> str:
    return (resources.files("sdk") / "lua" / name).read_text()


#: Functions the scripts that cancel runs share (cancel_run, id_after, ...).
_LIB: Final = _script("lib.lua")

ScriptArg = str | int | float
#: ``actor`` that may cancel any run, whatever owner its function declares.
OPERATOR_ACTOR: Final = "*"


def _pairs(fields: Mapping[str, str | None]) -> list[ScriptArg]:
    return [item for key, value in fields.items() if value is not None for item in (key, value)]


def _datetime(ms: object) -> datetime | None:
    return datetime.fromtimestamp(int(str(ms)) / 1000, tz=UTC) if ms not in (None, "") else None


def _results(replies: Sequence[Sequence[object]]) -> list[CancelResult]:
    """The ``{run id, outcome, previous, status, cascaded[, kept until]}`` replies of the
    cancel scripts."""
    return [
        CancelResult(
            run_id=str(run_id),
            outcome=cast(CancelOutcome, outcome),
            previous_status=cast(RunStatus, previous) or None,
            status=cast(RunStatus, status) or None,
            cascaded=tuple(str(child) for child in cast(list[str], cascaded)),
            kept_until=_datetime(kept[0]) if kept else None,
        )
        for run_id, outcome, previous, status, cascaded, *kept in replies
    ]


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """What a cancel asks of the runs it names (``request_cancel.lua``)."""

    #: The cancel event's id, or ``"api"`` for a cancel by run id.
    cancelled_by: str
    reason: str = ""
    #: The cancel event's id ("" for a cancel by run id): never its own trigger's run,
    #: nor a run triggered after it.
    event_id: str = ""
    #: When the cancel was published (ms; None: now).
    cancel_at_ms: int | None = None
    #: The canonical value token of who asks, checked against the owner of functions that
    #: declare one; ``""`` for nobody, :data:`OPERATOR_ACTOR` for anyone.
    actor: str = OPERATOR_ACTOR
    #: The calling worker, which cancels the runs it holds itself (no signal).
    holder: str = ""
    #: A cancel by id of a run that does not exist yet is kept this long (``pending``),
    #: and cancels the run when it registers; 0 keeps none.
    keep_ms: int = 0


class Registration(msgspec.Struct, frozen=True):
    """What registering a run did: ``registered``, ``cancelled`` at once, or the status of
    another run that already has the id (``taken``)."""

    outcome: Literal["registered", "cancelled", "taken"]
    status: str = "running"
    reason: str = ""
    cancelled_by: str = ""
    #: Tombstoned cancel events newer than the trigger, under entries with an expression:
    #: (entry, cancel event). The worker evaluates them.
    tombstones: tuple[tuple[IndexEntry, Event], ...] = ()
    #: Bulk cancels covering the run whose condition (``if``) must hold: the worker decides.
    bulk_cancels: tuple[BulkCancel, ...] = ()
    #: The actor of a cancel by id kept for this run, which the function's owner refused.
    refused_actor: str = ""


class RegisterRequest(msgspec.Struct, frozen=True):
    """A run to register: who runs it, what triggered it, where it waits in the index.

    ``owner``: the function's owner path and the trigger's value token there.
    """

    run_id: str
    app_id: str
    function_id: str
    config_hash: str
    worker_id: str
    event: Event
    entries: Sequence[IndexEntry]
    parent_run_id: str | None = None
    owner: tuple[str, str | None] | None = None
    #: When a trigger that did not come through the stream was triggered (a job's enqueue
    #: time, ms); it orders the run against cancel events (tombstones).
    trigger_ms: int | None = None


def _registration(request: RegisterRequest, reply: Any) -> Registration:
    """``register_run.lua``'s reply."""
    if reply[0] == "taken":
        return Registration("taken", str(reply[1]))
    if reply[0] == "cancelled":
        return Registration("cancelled", "cancelling", str(reply[1]), str(reply[2]))
    tombstones = tuple(
        (request.entries[int(index) - 1], decode_stored_event(body))
        for index, _id, body in reply[1]
    )
    bulk = tuple(_bulk_decoder.decode(body) for body in reply[2])
    return Registration(
        "registered", tombstones=tombstones, bulk_cancels=bulk, refused_actor=str(reply[3])
    )


class Finished(msgspec.Struct, frozen=True):
    """What recording a run's end did: its status before (None: no such run) and, for a
    run that ended cancelled now, the latency from the cancel's publication (ms)."""

    previous: str | None
    cancel_latency_ms: float | None = None


class MatchCandidate(msgspec.Struct, frozen=True):
    """A running run whose rule's key matched a cancel event; its expression must decide."""

    run_id: str
    lookup: Lookup
    trigger: Event
    #: The partition holding the run.
    partition: int = 0


class RunStore:
    """Reads and writes run records under one namespace."""

    def __init__(self, redis: RedisClient, keys: Keys, *, retention: timedelta = DEFAULT_RETENTION):
        self.redis = redis
        self.keys = keys
        self.retention_s = max(1, int(retention.total_seconds()))
        self._register = redis.register_script(_LIB + _script("register_run.lua"))
        self._finish = redis.register_script(_script("finish_run.lua"))
        self._request_cancel = redis.register_script(_LIB + _script("request_cancel.lua"))
        self._match_event = redis.register_script(_LIB + _script("match_event.lua"))
        self._resend = redis.register_script(_script("resend_signals.lua"))
        self._acknowledge = redis.register_script(_script("acknowledge_signals.lua"))

    def _cancel_context(self) -> list[ScriptArg]:
        """ARGV[1..4] of the cancelling scripts (``cancel_context`` in lib.lua)."""
        return [
            self.keys.run_prefix,
            self.keys.signal_prefix,
            self.keys.children(""),
            SIGNAL_STREAM_MAXLEN,
        ]

    async def register(self, request: RegisterRequest) -> Registration:
        """Register a running run (cancelled at once if a tombstone or its parent says so)."""
        keys, args = self._register_call(request)
        reply = await self._register(keys=keys, args=args)
        return _registration(request, reply)

    async def register_many(
        self, requests: Sequence[RegisterRequest]
    ) -> list[Registration | Exception]:
        """Register several runs in one round trip (a worker's batch of triggers).

        Each gets its registration or the error its script raised; a connection error
        fails them all.
        """
        replies = await self._pipelined(self._register, map(self._register_call, requests))
        return [
            reply if isinstance(reply, Exception) else _registration(request, reply)
            for request, reply in zip(requests, replies, strict=True)
        ]

    async def _pipelined(
        self, script: AsyncScript, calls: Iterable[tuple[list[str], list[ScriptArg]]]
    ) -> list[Any]:
        """Call ``script`` once per ``(keys, args)`` in one round trip; Redis runs the calls
        in order, and a call that failed answers its exception, in its place.

        Plain ``EVALSHA`` commands, not redis-py's pipelined scripts: those first ask the
        server which scripts it knows (``SCRIPT EXISTS``, one more round trip per batch),
        and a cluster pipeline refuses them altogether. A server that does not know the
        script (restarted, or a replica promoted after a failover) answers NOSCRIPT
        without running anything: the script is loaded and those calls sent again.
        """
        batch = list(calls)
        replies: list[Any] = [None] * len(batch)
        pending = list(range(len(batch)))
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in pending:
                    keys, args = batch[i]
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                answered = await pipe.execute(raise_on_error=False)
            for i, reply in zip(pending, answered, strict=True):
                replies[i] = reply
            pending = [i for i in pending if isinstance(replies[i], NoScriptError)]
            if not pending or attempt:
                break
            await self.redis.script_load(script.script)
        return replies

    def _register_call(self, r: RegisterRequest) -> tuple[list[str], list[ScriptArg]]:
        fields = {
            "run_id": r.run_id,
            "app_id": r.app_id,
            "function_id": r.function_id,
            "config_hash": r.config_hash,
            "worker_id": r.worker_id,
            "event_id": r.event.id,
            "event": encode_stored_event(r.event).decode(),
            # Where the run waits in the index, so whoever reaps it can clean up after it.
            "index": encode_json([e.key for e in r.entries]).decode(),
            "parent_run_id": r.parent_run_id,
            "owned": None if r.owner is None else "1",
            "owner": None if r.owner is None else r.owner[1],
            "trigger_ms": None if r.trigger_ms is None else str(r.trigger_ms),
        }
        parent = r.parent_run_id or r.run_id
        keys = [
            self.keys.run(r.run_id),
            self.keys.active_runs,
            self.keys.event_runs(r.event.id),
            self.keys.run_configs(r.app_id),
            self.keys.worker_runs(r.worker_id),
            self.keys.function_runs(r.app_id, r.function_id),
            self.keys.run(parent),
            self.keys.children(parent),
            self.keys.pending_cancels,
            self.keys.pending_cancel_deadlines,
            self.keys.bulk_cancels(r.function_id),
            *(key for e in r.entries for key in (e.key, e.tombstone)),
        ]
        args: list[ScriptArg] = [
            r.run_id,
            f"{r.function_id}:{r.config_hash}",
            r.worker_id,
            len(r.entries),
            self.retention_s,
            self.keys.tombstone_event(""),
            r.parent_run_id or "",
            *(a for e in r.entries for a in ("m" if e.expression is None else "c", e.event_name)),
            *_pairs(fields),
        ]
        return keys, args

    async def finish(
        self,
        run_id: str,
        outcome: Outcome,
        index_keys: Sequence[str],
        *,
        app_id: str,
        function_id: str,
        worker_id: str,
        error: str | None = None,
        cancel_reason: str | None = None,
        stopped_ago_ms: float | None = None,
        abandoned_thread: bool = False,
        escalated: bool = False,
        terminated: bool = False,
        on_cancel_error: str | None = None,
        continued_by: str | None = None,
    ) -> Finished:
        """Record the run's outcome.

        A run already in a terminal state keeps it: the returned previous status tells.
        ``stopped_ago_ms``: how long ago the body stopped (for the cancel latency).
        ``continued_by``: the run that continues this one (a retry): a cancel by this
        run's id reaches it.
        """
        keys = [
            self.keys.run(run_id),
            self.keys.active_runs,
            self.keys.run_configs(app_id),
            self.keys.worker_runs(worker_id),
            self.keys.cancelling_runs,
            self.keys.function_runs(app_id, function_id),
            self.keys.children(run_id),
            self.keys.events,
            self.keys.finished_stats,
            self.keys.finished_runs,
            *index_keys,
        ]
        extra = _pairs(
            {
                "error": error,
                "cancel_reason": cancel_reason,
                "abandoned_thread": "1" if abandoned_thread else None,
                "escalated": "1" if escalated else None,
                "terminated": "1" if terminated else None,
                "on_cancel_error": on_cancel_error,
                "continued_by": continued_by,
            }
        )
        args: list[ScriptArg] = [
            run_id,
            outcome,
            self.retention_s,
            "" if stopped_ago_ms is None else f"{stopped_ago_ms:.3f}",
            self.keys.finished(run_id),
            RUN_CANCELLED_EVENT,
            EVENT_FIELD,
            FINISHED_RUNS_KEPT,
            *extra,
        ]
        reply = await self._finish(keys=keys, args=args)
        if reply is None:
            return Finished(None)
        previous, latency = cast(list[str], reply)
        return Finished(previous, float(latency) if latency else None)

    async def request_cancel(
        self, run_ids: Iterable[str], request: CancelRequest
    ) -> list[CancelResult]:
        """Move these runs, if running, to ``cancelling`` and signal their workers (see
        :class:`CancelRequest` for what else a request says)."""
        (reply,) = await self._pipelined(
            self._request_cancel, [self._request_cancel_call(run_ids, request)]
        )
        if isinstance(reply, Exception):
            raise reply
        return self._cancelled(reply)

    def _request_cancel_call(
        self, run_ids: Iterable[str], request: CancelRequest
    ) -> tuple[list[str], list[ScriptArg]]:
        keys = [
            self.keys.cancelling_runs,
            self.keys.pending_cancels,
            self.keys.pending_cancel_deadlines,
        ]
        args: list[ScriptArg] = [
            *self._cancel_context(),
            request.event_id,
            request.reason,
            request.cancelled_by,
            "" if request.cancel_at_ms is None else request.cancel_at_ms,
            request.actor,
            request.holder,
            request.keep_ms,
            PENDING_CANCELS_KEPT,
            *run_ids,
        ]
        return keys, args

    def _cancelled(self, reply: Any) -> list[CancelResult]:
        results, dropped = cast(tuple[list[list[object]], int], reply)
        if dropped:
            log.warning(
                "cancel.pending_dropped",
                partition=self.keys.partition,
                dropped=int(dropped),
                kept=PENDING_CANCELS_KEPT,
            )
        return _results(results)

    async def keep_bulk_cancel(self, bulk: BulkCancel, *, keep_ms: int) -> None:
        """Keep a bulk cancel of ``bulk.function_id`` for ``keep_ms``, for the runs of it
        that register later (register_run.lua)."""
        key = self.keys.bulk_cancels(bulk.function_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {encode_json(bulk).decode(): bulk.at + keep_ms})
            pipe.zremrangebyscore(key, "-inf", bulk.at)
            pipe.zremrangebyrank(key, 0, -(BULK_CANCELS_KEPT + 1))
            pipe.pexpire(key, keep_ms)
            await pipe.execute()

    async def match_events(
        self, batch: Sequence[tuple[Event, Sequence[Lookup]]], *, tombstone_ms: int
    ) -> list[tuple[list[CancelResult], list[MatchCandidate]] | Exception]:
        """Leave tombstones for each event and cancel the runs its lookups find, for a whole
        batch in one round trip (Redis runs the scripts in order).

        Runs under a selector with an expression come back as candidates to evaluate. A
        script that failed comes back as its exception, in its place.
        """
        return await match_events(
            [(self, event, found) for event, found in batch], tombstone_ms=tombstone_ms
        )

    async def match_event(
        self, event: Event, found: Sequence[Lookup], *, tombstone_ms: int
    ) -> tuple[list[CancelResult], list[MatchCandidate]]:
        """:meth:`match_events` for one event (its error is raised)."""
        (reply,) = await self.match_events([(event, found)], tombstone_ms=tombstone_ms)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _match_call(
        self, event: Event, found: Sequence[Lookup], tombstone_ms: int
    ) -> tuple[list[str], list[ScriptArg]]:
        with_expression = any(lookup.selector.expression_id for lookup in found)
        keys = [
            self.keys.cancelling_runs,
            self.keys.tombstone_event(event.id),
            *(key for lookup in found for key in (lookup.key, lookup.tombstone)),
        ]
        args: list[ScriptArg] = [
            *self._cancel_context(),
            event.id,
            f"cancel event {event.name}",
            entry_timestamp(event.id),
            tombstone_ms,
            encode_stored_event(event).decode() if with_expression else "",
            len(found),
            *(
                arg
                for lookup in found
                for arg in (
                    "m" if lookup.selector.expression_id is None else "c",
                    lookup.selector.expiry,
                )
            ),
        ]
        return keys, args

    def _matched(
        self, found: Sequence[Lookup], reply: Any
    ) -> tuple[list[CancelResult], list[MatchCandidate]]:
        results, candidates = cast(list[Any], reply)
        # 'evaluated': the candidates below, which the caller decides.
        decided = [result for result in results if result[1] != "evaluated"]
        return _results(decided), [
            MatchCandidate(
                str(run_id),
                found[int(index) - 1],
                decode_stored_event(trigger),
                self.keys.partition,
            )
            for run_id, index, trigger in candidates
        ]

    async def acknowledge_signals(
        self, signals: Sequence[tuple[str, int]], *, worker_id: str, read_up_to: str
    ) -> list[float]:
        """A worker read its signals up to ``read_up_to`` and acted on ``signals``
        (run id, ``sent_at`` ms).

        Their signals are no longer re-sent, the read entries leave the worker's signal
        stream (Redis keeps only the signals not yet read), and their delivery is counted.
        Returns each signal's delivery time in seconds, measured on the Redis clock.
        """
        args: list[ScriptArg] = [read_up_to, len(LATENCY_BUCKETS), *map(float, LATENCY_BUCKETS)]
        for run_id, sent_at in signals:
            args += [run_id, sent_at]
        delays = await self._acknowledge(
            keys=[self.keys.cancelling_runs, self.keys.signals(worker_id), self.keys.signal_stats],
            args=args,
        )
        return [float(delay) for delay in cast(list[str], delays)]

    async def resend_signals(self, *, after_ms: int, limit: int = 1_000) -> list[str]:
        """Re-send cancel signals unacknowledged for ``after_ms``; returns those run ids."""
        resent = await self._resend(
            keys=[self.keys.cancelling_runs],
            args=[
                self.keys.run_prefix,
                self.keys.signal_prefix,
                after_ms,
                limit,
                SIGNAL_STREAM_MAXLEN,
            ],
        )
        return [str(run_id) for run_id in resent]

    async def status(self, run_id: str) -> tuple[str | None, str | None]:
        """The run's status and cancel reason, read in one round trip."""
        reply = await self.redis.hmget(self.keys.run(run_id), "status", "cancel_reason")
        status, reason = cast(list[str | None], reply)
        return status, reason

    async def reap(self, run_id: str, *, worker_id: str, error: str) -> Finished:
        """Record a run whose worker died as ``lost`` and take it out of the index."""
        return await self._finish_from_record(run_id, "lost", worker_id=worker_id, error=error)

    async def record_terminated(self, run_id: str, *, worker_id: str) -> Finished:
        """A cancelled run whose process was terminated after its grace (Celery's prefork
        pool): ``cancelled`` with ``terminated``. A run its worker already recorded
        (``cancelled`` with ``abandoned_thread``, the body running on) is marked
        ``terminated``; another outcome is left as it is."""
        record = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        status = record.get("status")
        if status == "cancelled":
            await self.redis.hset(self.keys.run(run_id), "terminated", "1")
            return Finished(status)
        if status != "cancelling":
            return Finished(status)
        return await self._finish_from_record(
            run_id, "cancelled", worker_id=worker_id, record=record, terminated=True
        )

    async def _finish_from_record(
        self,
        run_id: str,
        outcome: Outcome,
        *,
        worker_id: str,
        record: dict[str, str] | None = None,
        **fields: Any,
    ) -> Finished:
        """Record an outcome for a run whose worker is gone: what ``finish`` needs is
        read from the run's record (``record``, when the caller has just read it)."""
        if record is None:
            record = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        if not record:
            await self.redis.srem(self.keys.worker_runs(worker_id), run_id)
            return Finished(None)
        index_keys = msgspec.json.decode(record.get("index", "[]"), type=list[str])
        return await self.finish(
            run_id,
            outcome,
            index_keys,
            app_id=record["app_id"],
            function_id=record["function_id"],
            worker_id=worker_id,
            cancel_reason=record.get("cancel_reason") if outcome == "cancelled" else None,
            stopped_ago_ms=0 if outcome == "cancelled" else None,
            **fields,
        )

    async def declared_selectors(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Selectors of the rules workers declared for each of these event names (one
        round trip)."""
        ordered = list(dict.fromkeys(names))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in ordered:
                pipe.hkeys(self.keys.rules(name))
            # The clients decode responses, so every reply string is a str.
            replies = cast(list[list[str]], await pipe.execute())
        return dict(zip(ordered, replies, strict=True))

    async def record_rule_errors(self, errors: Mapping[str, str]) -> None:
        """Note on each run why its rule's expression could not be evaluated."""
        if not errors:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id, error in errors.items():
                # The run was running a moment ago; its record outlives it by the retention.
                pipe.hset(self.keys.run(run_id), "rule_error", error)
            await pipe.execute()

    async def get(self, run_id: str) -> RunInfo | None:
        fields = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        return decode_run(fields) if fields else None

    async def runs_for_event(self, event_id: str) -> list[RunInfo]:
        members = cast(set[str], await self.redis.smembers(self.keys.event_runs(event_id)))
        run_ids = sorted(members)
        if not run_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hgetall(self.keys.run(run_id))
            records = cast(list[dict[str, str]], await pipe.execute())
        return [decode_run(fields) for fields in records if fields]


async def match_events(
    batch: Sequence[tuple[RunStore, Event, Sequence[Lookup]]], *, tombstone_ms: int
) -> list[tuple[list[CancelResult], list[MatchCandidate]] | Exception]:
    """:meth:`RunStore.match_events` for calls in several partitions (each ``store`` is
    its partition's), still in one round trip: each script runs in its own partition."""
    if not batch:
        return []
    calls = (store._match_call(event, found, tombstone_ms) for store, event, found in batch)
    first = batch[0][0]
    replies = await first._pipelined(first._match_event, calls)
    return [
        reply if isinstance(reply, Exception) else store._matched(found, reply)
        for (store, _, found), reply in zip(batch, replies, strict=True)
    ]


async def request_cancel_everywhere(
    stores: Sequence[RunStore], run_id: str, request: CancelRequest
) -> list[CancelResult]:
    """:meth:`RunStore.request_cancel` of one run id in every partition (one store each), in
    one round trip: for a run that is in none of them yet, and will register in one (each
    script, atomic in its partition, either finds it there or keeps the cancel for it)."""
    first = stores[0]
    calls = [store._request_cancel_call([run_id], request) for store in stores]
    replies = await first._pipelined(first._request_cancel, calls)
    results = []
    for store, reply in zip(stores, replies, strict=True):
        if isinstance(reply, Exception):
            raise reply
        results += store._cancelled(reply)
    return results
