"""The Lua scripts of the run protocol, and the one place they are called.

Every change of a run's status happens in a script (``sdk/lua``; the broker's own in
``broker/lua``, called from ``broker/scripts.py`` through :class:`Script`), so each
transition is atomic and terminal states are final whoever races whom. Each script is loaded
with the shared library (``lib.lua``: the clock, the statuses, the signal, the reasons) in
front of it. Here each one gets a typed call, which spells its KEYS and ARGV in the order
its header documents, and a typed reply, converted by msgspec at this edge: a reply of
another shape is an error here, not a wrong value further on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final, Literal, cast, get_args

import msgspec
from redis.exceptions import NoScriptError

from sdk.connection import RedisClient, SyncRedisClient
from sdk.keys import EVENT_FIELD, PLACEMENT_BROADCAST, PLACEMENT_PATH, Keys, run_config_field
from sdk.metrics import LATENCY_BUCKETS
from sdk.rules import IndexEntry, Lookup
from sdk.wire import (
    RUN_CANCELLED_EVENT,
    BulkCancel,
    CancelOutcome,
    CancelResult,
    Event,
    RunStatus,
    decode_stored_event,
    encode_json,
    encode_stored_event,
)

ScriptArg = str | bytes | int | float
#: One script call: its KEYS and its ARGV.
Call = tuple[list[str], list[ScriptArg]]

#: Approximate cap on a worker's signal stream; signals are read within milliseconds.
SIGNAL_STREAM_MAXLEN: Final = 10_000
#: Most cancels by id kept per partition for runs not registered yet (``pending``); beyond,
#: the one closest to its end is dropped: about 150 bytes each, 15 MB at most.
PENDING_CANCELS_KEPT: Final = 100_000
#: Recently finished runs listed in ``{ns}:runs:finished`` (the dashboard's history); the
#: records themselves stay readable for the retention, listed or not.
FINISHED_RUNS_KEPT: Final = 1_000
#: How long the runs an SDK publisher signalled are kept for the broker's decision on the
#: event (it takes them within milliseconds when it runs).
EARLY_MATCH_KEPT_MS: Final = 600_000
#: ``actor`` that may cancel any run, whatever owner its function declares.
OPERATOR_ACTOR: Final = "*"
#: ``cancelled_by`` of a cancel by run id (``BY.api`` in lib.lua).
CANCELLED_BY_API: Final = "api"

Outcome = Literal["completed", "cancelled", "failed", "lost"]

_LIB: Final = (resources.files("sdk") / "lua" / "lib.lua").read_text()


def event_reason(event_name: str) -> str:
    """The reason a run cancelled by a cancel event gives (``REASON.event`` in lib.lua)."""
    return f"cancel event {event_name}"


def tombstone_reason(event_name: str) -> str:
    """The reason of a run cancelled, as it registers, by a cancel event that came first
    (``REASON.tombstone`` in lib.lua)."""
    return f"{event_reason(event_name)} (it arrived before the run registered)"


class Script:
    """One Lua script of a package's ``lua/`` directory, with the shared library in front.

    Called with plain ``EVALSHA`` commands, pipelined, not redis-py's script objects: those
    ask the server which scripts it knows first (``SCRIPT EXISTS``, one more round trip per
    batch), and a cluster pipeline refuses them altogether. A server that does not know the
    script (restarted, or a replica promoted after a failover) answers NOSCRIPT without
    running anything: the script is loaded and those calls sent again.
    """

    def __init__(self, name: str, *, package: str = "sdk") -> None:
        self.name = name
        self.source = _LIB + (resources.files(package) / "lua" / name).read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def call(self, redis: RedisClient, keys: list[str], args: list[ScriptArg]) -> Any:
        """One call (no pipeline: the cheapest round trip); its error is raised."""
        try:
            return await redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def call_many(self, redis: RedisClient, calls: Iterable[Call]) -> list[Any]:
        """One call per ``(keys, args)``, in one round trip; Redis runs them in order, each
        in its own slot, and a call that failed answers its exception, in its place."""
        batch = list(calls)
        replies: list[Any] = [None] * len(batch)
        pending = list(range(len(batch)))
        for attempt in range(2):
            async with redis.pipeline(transaction=False) as pipe:
                for i in pending:
                    keys, args = batch[i]
                    pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
                answered = await pipe.execute(raise_on_error=False)
            for i, reply in zip(pending, answered, strict=True):
                replies[i] = reply
            pending = [i for i in pending if isinstance(replies[i], NoScriptError)]
            if not pending or attempt:
                break
            await redis.script_load(self.source)
        return replies

    def call_blocking(self, client: SyncRedisClient, keys: list[str], args: list[ScriptArg]) -> Any:
        """One call with a blocking client (from a thread the event loop does not serve)."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


REGISTER_RUN: Final = Script("register_run.lua")
FINISH_RUN: Final = Script("finish_run.lua")
REQUEST_CANCEL: Final = Script("request_cancel.lua")
ACKNOWLEDGE_SIGNALS: Final = Script("acknowledge_signals.lua")
HEARTBEAT: Final = Script("heartbeat.lua")
DECLARE_PLACEMENTS: Final = Script("declare_placements.lua")
PUBLISH_EVENT: Final = Script("publish_event.lua")


def cancel_context(keys: Keys) -> list[ScriptArg]:
    """ARGV[1..4] of every script that signals workers (``cancel_context`` in lib.lua)."""
    return [keys.run_prefix, keys.signal_prefix, keys.children(""), SIGNAL_STREAM_MAXLEN]


def _pairs(fields: Mapping[str, str | None]) -> list[ScriptArg]:
    return [item for key, value in fields.items() if value is not None for item in (key, value)]


def _datetime(ms: str) -> datetime | None:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC) if ms else None


# -- replies ---------------------------------------------------------------------------


_OUTCOMES: Final = frozenset(get_args(CancelOutcome))
#: A run's statuses, and "" for none.
_STATUSES: Final = frozenset((*get_args(RunStatus), ""))


class _Result(msgspec.Struct, array_like=True, frozen=True):
    """One run's line in a cancelling script's reply."""

    run_id: str
    outcome: str
    previous: str
    status: str
    cascaded: list[str]
    kept_until: str = ""

    def decode(self) -> CancelResult:
        # Checked against the literals' values (msgspec.convert with a Literal type costs
        # a hash of the type per call: the broker's hot path).
        if self.outcome not in _OUTCOMES or not {self.previous, self.status} <= _STATUSES:
            raise msgspec.ValidationError(f"unexpected cancel result {self!r}")
        return CancelResult(
            run_id=self.run_id,
            outcome=cast(CancelOutcome, self.outcome),
            previous_status=cast(RunStatus, self.previous) or None,
            status=cast(RunStatus, self.status) or None,
            cascaded=tuple(self.cascaded),
            kept_until=_datetime(self.kept_until),
        )


def cancel_results(lines: Sequence[Any]) -> list[CancelResult]:
    """The per-run lines of ``request_cancel.lua`` and ``match_events.lua``."""
    return [line.decode() for line in msgspec.convert(lines, list[_Result])]


class _RequestCancelReply(msgspec.Struct, array_like=True, frozen=True):
    results: list[Any]
    dropped: int


class Registered(msgspec.Struct, frozen=True, tag="registered"):
    """The run is registered, running: cancels reach it from now on."""

    #: Tombstoned cancel events newer than the trigger, under entries with an expression:
    #: (entry, cancel event). The worker evaluates them.
    tombstones: tuple[tuple[IndexEntry, Event], ...] = ()
    #: Bulk cancels covering the run whose condition (``if``) must hold: the worker decides.
    bulk_cancels: tuple[BulkCancel, ...] = ()
    #: The actor of a cancel by id kept for this run, which the function's owner refused.
    refused_actor: str = ""


class CancelledOnRegistration(msgspec.Struct, array_like=True, frozen=True, tag="cancelled"):
    """The run registered ``cancelling``: a cancel came first (by its id, a tombstone, a
    bulk cancel, its cancelled parent). Its body stops at its first await."""

    reason: str
    cancelled_by: str


class Taken(msgspec.Struct, array_like=True, frozen=True, tag="taken"):
    """Another run has the id (a trigger delivered twice never starts a second run)."""

    status: str


#: What registering a run did.
RunRegistration = Registered | CancelledOnRegistration | Taken


class _RegisteredReply(msgspec.Struct, array_like=True, frozen=True, tag="registered"):
    #: (entry number from 1, cancel event id, its JSON)
    hits: list[tuple[int, str, str]]
    bulk: list[str]
    refused: str


_bulk_decoder = msgspec.json.Decoder(BulkCancel)


class Finished(msgspec.Struct, frozen=True):
    """What recording a run's end did: its status before (None: no such run) and, for a
    run that ended cancelled now, the latency from the cancel's publication (ms)."""

    previous: str | None
    cancel_latency_ms: float | None = None


# -- requests --------------------------------------------------------------------------


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


# -- register_run.lua ------------------------------------------------------------------


def _register_call(keys: Keys, retention_s: int, r: RegisterRequest) -> Call:
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
    script_keys = [
        keys.run(r.run_id),
        keys.active_runs,
        keys.event_runs(r.event.id),
        keys.run_configs(r.app_id),
        keys.worker_runs(r.worker_id),
        keys.function_runs(r.app_id, r.function_id),
        keys.run(parent),
        keys.children(parent),
        keys.pending_cancels,
        keys.pending_cancel_deadlines,
        keys.bulk_cancels(r.function_id),
        *(key for e in r.entries for key in (e.key, e.tombstone)),
    ]
    args: list[ScriptArg] = [
        r.run_id,
        run_config_field(r.function_id, r.config_hash),
        r.worker_id,
        len(r.entries),
        retention_s,
        keys.tombstone_event(""),
        r.parent_run_id or "",
        *(a for e in r.entries for a in ("m" if e.expression is None else "c", e.event_name)),
        encode_json({key: value for key, value in fields.items() if value is not None}),
    ]
    return script_keys, args


def _registration(request: RegisterRequest, reply: Any) -> RunRegistration:
    decoded: _RegisteredReply | CancelledOnRegistration | Taken = msgspec.convert(
        reply, _RegisteredReply | CancelledOnRegistration | Taken
    )
    if not isinstance(decoded, _RegisteredReply):
        return decoded
    return Registered(
        tombstones=tuple(
            (request.entries[index - 1], decode_stored_event(body))
            for index, _id, body in decoded.hits
        ),
        bulk_cancels=tuple(_bulk_decoder.decode(body) for body in decoded.bulk),
        refused_actor=decoded.refused,
    )


async def register_run(
    redis: RedisClient, keys: Keys, request: RegisterRequest, *, retention_s: int
) -> RunRegistration:
    """Register one run (a retry by the same worker gets the same answer)."""
    reply = await REGISTER_RUN.call(redis, *_register_call(keys, retention_s, request))
    return _registration(request, reply)


async def register_runs(
    redis: RedisClient, keys: Keys, requests: Sequence[RegisterRequest], *, retention_s: int
) -> list[RunRegistration | Exception]:
    """Register runs of one partition in one round trip; each gets its registration or the
    error its script raised; a connection error fails them all."""
    calls = [_register_call(keys, retention_s, request) for request in requests]
    replies = await REGISTER_RUN.call_many(redis, calls)
    return [
        reply if isinstance(reply, Exception) else _registration(request, reply)
        for request, reply in zip(requests, replies, strict=True)
    ]


# -- finish_run.lua --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunEnd:
    """What ``finish_run.lua`` records of a run's end (see ``RunStore.finish``)."""

    run_id: str
    outcome: Outcome
    index_keys: Sequence[str]
    app_id: str
    function_id: str
    worker_id: str
    #: How long ago the body stopped (ms), for the cancel latency.
    stopped_ago_ms: float | None = None
    #: Fields added to the run's record (error, cancel_reason, escalated, ...).
    fields: Mapping[str, str | None] = field(default_factory=dict)


async def finish_run(redis: RedisClient, keys: Keys, end: RunEnd, *, retention_s: int) -> Finished:
    """Record a run's end; a run already in a terminal state keeps it."""
    script_keys = [
        keys.run(end.run_id),
        keys.active_runs,
        keys.run_configs(end.app_id),
        keys.worker_runs(end.worker_id),
        keys.cancelling_runs,
        keys.function_runs(end.app_id, end.function_id),
        keys.children(end.run_id),
        keys.events,
        keys.finished_stats,
        keys.finished_runs,
        *end.index_keys,
    ]
    args: list[ScriptArg] = [
        end.run_id,
        end.outcome,
        retention_s,
        "" if end.stopped_ago_ms is None else f"{end.stopped_ago_ms:.3f}",
        keys.finished(end.run_id),
        RUN_CANCELLED_EVENT,
        EVENT_FIELD,
        FINISHED_RUNS_KEPT,
        *_pairs(end.fields),
    ]
    reply = await FINISH_RUN.call(redis, script_keys, args)
    if reply is None:
        return Finished(None)
    previous, latency = msgspec.convert(reply, tuple[str, str])
    return Finished(previous, float(latency) if latency else None)


# -- request_cancel.lua ----------------------------------------------------------------


def _request_cancel_call(keys: Keys, run_ids: Iterable[str], request: CancelRequest) -> Call:
    script_keys = [keys.cancelling_runs, keys.pending_cancels, keys.pending_cancel_deadlines]
    args: list[ScriptArg] = [
        *cancel_context(keys),
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
    return script_keys, args


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What one ``request_cancel.lua`` call did: its results, and how many kept cancels by
    id it dropped for room (``PENDING_CANCELS_KEPT``)."""

    results: list[CancelResult]
    dropped: int = 0


async def request_cancels(
    redis: RedisClient, calls: Sequence[tuple[Keys, Sequence[str], CancelRequest]]
) -> list[Cancelled]:
    """Cancel runs by id, one call per ``(partition keys, run ids, request)``, in one round
    trip; the first error is raised."""
    replies = await REQUEST_CANCEL.call_many(
        redis, [_request_cancel_call(keys, run_ids, request) for keys, run_ids, request in calls]
    )
    done = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        decoded = msgspec.convert(reply, _RequestCancelReply)
        done.append(Cancelled(cancel_results(decoded.results), decoded.dropped))
    return done


# -- publish_event.lua -----------------------------------------------------------------


class _PublishReply(msgspec.Struct, array_like=True, frozen=True):
    event_id: str
    #: None when the match failed (see ``error``).
    results: list[Any] | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Published:
    """What publishing a cancel event and matching it at once did: its stream id, and the
    runs it signalled (None, with the error, when the caller may not reach run state: the
    event is published, and the broker matches it)."""

    event_id: str
    results: list[CancelResult] | None
    error: str = ""


async def publish_event(
    redis: RedisClient, keys: Keys, body: bytes, event: Event, found: Sequence[Lookup]
) -> Published:
    """Append a cancel event to ``keys``' events stream and cancel the runs its lookups
    (those the key alone decides) find, in one script."""
    script_keys = [keys.cancelling_runs, keys.events, *(lookup.key for lookup in found)]
    args: list[ScriptArg] = [
        *cancel_context(keys),
        EVENT_FIELD,
        body,
        event.name,
        len(found),
        *(lookup.selector.expiry for lookup in found),
        keys.early_match(""),
        EARLY_MATCH_KEPT_MS,
    ]
    reply = msgspec.convert(await PUBLISH_EVENT.call(redis, script_keys, args), _PublishReply)
    results = None if reply.results is None else cancel_results(reply.results)
    return Published(reply.event_id, results, reply.error)


# -- acknowledge_signals.lua -----------------------------------------------------------


async def acknowledge_signals(
    redis: RedisClient,
    keys: Keys,
    signals: Sequence[tuple[str, int]],
    *,
    worker_id: str,
    read_up_to: str,
) -> list[float]:
    """See ``RunStore.acknowledge_signals``; returns each signal's delivery time (s)."""
    args: list[ScriptArg] = [read_up_to, len(LATENCY_BUCKETS), *map(float, LATENCY_BUCKETS)]
    for run_id, sent_at in signals:
        args += [run_id, sent_at]
    delays = await ACKNOWLEDGE_SIGNALS.call(
        redis, [keys.cancelling_runs, keys.signals(worker_id), keys.signal_stats], args
    )
    return [float(delay) for delay in msgspec.convert(delays, list[str])]


# -- heartbeat.lua ---------------------------------------------------------------------


def _heartbeat_call(keys: Keys, worker_id: str, ttl_s: int) -> Call:
    return [keys.workers, keys.worker(worker_id)], [worker_id, ttl_s]


async def heartbeat(redis: RedisClient, keys: Keys, worker_id: str, *, ttl_s: int) -> int:
    """A worker's heartbeat: when (ms, Redis clock), or 0 when its registration is gone."""
    return int(await HEARTBEAT.call(redis, *_heartbeat_call(keys, worker_id, ttl_s)))


def heartbeat_blocking(client: SyncRedisClient, keys: Keys, worker_id: str, *, ttl_s: int) -> int:
    """:func:`heartbeat` with a blocking client, from another thread."""
    return int(HEARTBEAT.call_blocking(client, *_heartbeat_call(keys, worker_id, ttl_s)))


# -- declare_placements.lua ----------------------------------------------------------------


async def declare_function_placement(
    redis: RedisClient,
    keys: Keys,
    trigger: str,
    first_match_path: str,
    rules: Iterable[tuple[str, str]],
) -> list[str]:
    """Record the placement paths of one function's events: its trigger's name and first
    match path, and each rule's (cancel event name, match path or ``""``). Returns the
    cancel event names that are broadcast."""
    args: list[ScriptArg] = [PLACEMENT_PATH, PLACEMENT_BROADCAST, trigger, first_match_path]
    for name, path in rules:
        args += [name, path]
    reply = await DECLARE_PLACEMENTS.call(redis, [keys.placements], args)
    return msgspec.convert(reply, list[str])
