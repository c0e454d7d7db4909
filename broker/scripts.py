"""The broker's Lua scripts (``broker/lua``): matching cancel events to the cancel index, and
re-sending signals no worker acknowledged. Loaded and called as the SDK's are
(:class:`sdk.scripts.Script`, with the shared library in front); this module alone calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
from redis.exceptions import ResponseError

from sdk.connection import RedisClient
from sdk.keys import Keys
from sdk.rules import Lookup
from sdk.scripts import Call, Script, ScriptArg, cancel_context, cancel_results
from sdk.wire import CancelResult, Event, decode_stored_event, encode_stored_event, entry_timestamp

MATCH_EVENTS: Final = Script("match_events.lua", package="broker")
RESEND_SIGNALS: Final = Script("resend_signals.lua", package="broker")


class MatchCandidate(msgspec.Struct, frozen=True):
    """A running run whose rule's key matched a cancel event; its expression must decide."""

    run_id: str
    lookup: Lookup
    trigger: Event
    #: The partition holding the run.
    partition: int = 0


#: What one cancel event did in one partition: the runs decided, and the candidates the
#: broker evaluates.
Matched = tuple[list[CancelResult], list[MatchCandidate]]


class _Candidate(msgspec.Struct, array_like=True, frozen=True):
    run_id: str
    #: The lookup's number, from 1.
    lookup: int
    trigger: str


class _MatchReply(msgspec.Struct, array_like=True, frozen=True):
    results: list[Any]
    candidates: list[_Candidate]


_batch_encoder = msgspec.json.Encoder()


def _event_line(event: Event, found: Sequence[Lookup]) -> tuple[object, ...]:
    """One event of ``match_events.lua``'s batch (see its header)."""
    with_expression = any(lookup.selector.expression_id for lookup in found)
    return (
        event.id,
        event.name,
        entry_timestamp(event.id),
        encode_stored_event(event).decode() if with_expression else "",
        [
            (
                lookup.key,
                lookup.tombstone,
                "m" if lookup.selector.expression_id is None else "c",
                lookup.selector.expiry,
            )
            for lookup in found
        ],
    )


def _batch_call(
    keys: Keys,
    batch: Sequence[tuple[Event, Sequence[Lookup]]],
    lines: Sequence[tuple[object, ...]],
    tombstone_ms: int,
) -> Call:
    # Every key the script names is declared too, though it reads them from the batch: a
    # node whose slot is half migrated then answers ASK or TRYAGAIN for the whole call
    # (the broker retries) instead of running it on the keys that are still there.
    declared = [keys.cancelling_runs]
    for event, found in batch:
        declared += [key for lookup in found for key in (lookup.key, lookup.tombstone)]
        declared += [keys.tombstone_event(event.id), keys.early_match(event.id)]
    args: list[ScriptArg] = [
        *cancel_context(keys),
        tombstone_ms,
        keys.tombstone_event(""),
        keys.early_match(""),
        _batch_encoder.encode(lines),
    ]
    return declared, args


def _matched(keys: Keys, found: Sequence[Lookup], reply: Any) -> Matched:
    decoded = msgspec.convert(reply, _MatchReply)
    # 'evaluated': the candidates, which the caller decides.
    decided = [line for line in decoded.results if line[1] != "evaluated"]
    return cancel_results(decided), [
        MatchCandidate(
            c.run_id, found[c.lookup - 1], decode_stored_event(c.trigger), keys.partition
        )
        for c in decoded.candidates
    ]


async def match_events(
    redis: RedisClient,
    batch: Sequence[tuple[Keys, Event, Sequence[Lookup]]],
    *,
    tombstone_ms: int,
) -> list[Matched | Exception]:
    """Leave tombstones for each cancel event and cancel the runs its lookups find, for a
    whole batch in one round trip: one script per partition, which applies that
    partition's events in order.

    Runs under a selector with an expression come back as candidates to evaluate. An event
    whose matching failed comes back as its error, in its place (the script goes on with
    the next); a partition's whole script that failed, as its error for each of its events.
    """
    if not batch:
        return []
    groups: dict[int, list[int]] = {}
    for i, (keys, _, _) in enumerate(batch):
        groups.setdefault(keys.partition, []).append(i)
    lines = [_event_line(event, found) for _, event, found in batch]
    ordered = list(groups.values())
    calls = [
        _batch_call(
            batch[indexes[0]][0],
            [(batch[i][1], batch[i][2]) for i in indexes],
            [lines[i] for i in indexes],
            tombstone_ms,
        )
        for indexes in ordered
    ]
    replies = await MATCH_EVENTS.call_many(redis, calls)
    matched: dict[int, Matched | Exception] = {}
    for indexes, reply in zip(ordered, replies, strict=True):
        if isinstance(reply, Exception):
            matched.update(dict.fromkeys(indexes, reply))
            continue
        for i, one in zip(indexes, msgspec.convert(reply, list[list[Any]]), strict=True):
            keys, _, found = batch[i]
            matched[i] = ResponseError(one[1]) if one[0] is None else _matched(keys, found, one)
    return [matched[i] for i in range(len(batch))]


async def resend_signals(
    redis: RedisClient, keys: Keys, *, after_ms: int, limit: int = 1_000
) -> list[str]:
    """Re-send the cancel signals of one partition unacknowledged for ``after_ms``;
    returns those run ids."""
    reply = await RESEND_SIGNALS.call(
        redis, [keys.cancelling_runs], [*cancel_context(keys), after_ms, limit]
    )
    return msgspec.convert(reply, list[str])
