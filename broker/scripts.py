"""The broker's Lua scripts (``broker/lua``): matching cancel events to the cancel index, and
re-sending signals no worker acknowledged. Loaded and called as the SDK's are
(:class:`sdk.scripts.Script`, with the shared library in front); this module alone calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from sdk.connection import RedisClient
from sdk.keys import Keys
from sdk.rules import Lookup
from sdk.scripts import Call, Script, ScriptArg, cancel_context, cancel_results
from sdk.wire import CancelResult, Event, decode_stored_event, encode_stored_event, entry_timestamp

MATCH_EVENT: Final = Script("match_event.lua", package="broker")
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


def _match_call(keys: Keys, event: Event, found: Sequence[Lookup], tombstone_ms: int) -> Call:
    with_expression = any(lookup.selector.expression_id for lookup in found)
    script_keys = [
        keys.cancelling_runs,
        keys.tombstone_event(event.id),
        keys.early_match(event.id),
        *(key for lookup in found for key in (lookup.key, lookup.tombstone)),
    ]
    args: list[ScriptArg] = [
        *cancel_context(keys),
        event.id,
        event.name,
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
    return script_keys, args


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
    whole batch in one round trip (Redis runs the scripts in order, each in the partition
    whose keys it is given).

    Runs under a selector with an expression come back as candidates to evaluate. A script
    that failed comes back as its exception, in its place.
    """
    if not batch:
        return []
    calls = [_match_call(keys, event, found, tombstone_ms) for keys, event, found in batch]
    replies = await MATCH_EVENT.call_many(redis, calls)
    return [
        reply if isinstance(reply, Exception) else _matched(keys, found, reply)
        for (keys, _, found), reply in zip(batch, replies, strict=True)
    ]


async def resend_signals(
    redis: RedisClient, keys: Keys, *, after_ms: int, limit: int = 1_000
) -> list[str]:
    """Re-send the cancel signals of one partition unacknowledged for ``after_ms``;
    returns those run ids."""
    reply = await RESEND_SIGNALS.call(
        redis, [keys.cancelling_runs], [*cancel_context(keys), after_ms, limit]
    )
    return msgspec.convert(reply, list[str])
