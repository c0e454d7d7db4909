"""The record of recent cancel decisions, in Redis, readable by every broker replica.

The matcher logs one audit line per cancel event; logs are per process and hard to query,
so the same decision also goes to ``{ns}:decisions``, a list capped at ``DECISIONS_KEPT``
entries (newest first), which the dashboard reads together with the dead letters
(``{ns}:events:dead``).

A batch's decisions cost two commands whatever the batch's size, one ``LPUSH`` of them
all and one ``LTRIM``, sent in the round trip that acknowledges the batch. (A stream
would take one ``XADD`` per decision, and packing that many commands in redis-py
measurably slowed the broker down.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, cast

import msgspec

from sdk.connection import RedisClient, RedisPipeline
from sdk.keys import EVENT_FIELD, Keys
from sdk.wire import CancelOutcome, Event, encode_json

#: Decisions kept in ``{ns}:decisions``.
DECISIONS_KEPT: Final = 1_000
#: Matched run ids kept per decision (the count is exact; the list shows the first ones).
RUN_IDS_KEPT: Final = 20
#: A cancel event's data longer than this (JSON bytes) is recorded as ``{"truncated": true}``.
DATA_BYTES_KEPT: Final = 1_024


class Recorded(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One cancel event and what a broker decided for it, as recorded (JSON, one list
    element; fields with their default value are left out)."""

    #: When it was decided (ms since the epoch, the deciding broker's clock).
    at: int
    event_id: str
    event_name: str | None = None
    #: ``matched``, ``tombstoned``, ``unmatched`` or ``dead_lettered``
    decision: str
    data: dict[str, Any] | None = None
    runs_matched: int = 0
    signals_sent: int = 0
    outcomes: dict[str, int] = msgspec.field(default_factory=dict)
    rules: list[str] = msgspec.field(default_factory=list)
    run_ids: list[str] = msgspec.field(default_factory=list)
    #: Dead letters: why the event was refused, and what exactly was wrong. Other
    #: decisions: why a declared rule could not match (``no value at data.reportId for
    #: reports/generate-report's rule``).
    reason: str | None = None
    detail: str | None = None
    consumer: str | None = None
    latency_ms: float | None = None


class Decision(Recorded, frozen=True, kw_only=True, omit_defaults=False):
    """A recorded decision or a dead letter, as the dashboard serves it (every field)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Recorded)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _data(data: dict[str, Any]) -> dict[str, Any]:
    return data if len(encode_json(data)) <= DATA_BYTES_KEPT else {"truncated": True}


def decided(
    event: Event,
    decision: str,
    *,
    rules: list[str],
    matched: Iterable[str],
    outcomes: Mapping[CancelOutcome, int],
    signals_sent: int,
    latency_ms: float,
    consumer: str,
    detail: str | None = None,
) -> Recorded:
    """The record of one decided cancel event."""
    run_ids = list(matched)
    return Recorded(
        at=_now_ms(),
        event_id=event.id,
        event_name=event.name,
        decision=decision,
        data=_data(event.data),
        runs_matched=len(run_ids),
        signals_sent=signals_sent,
        outcomes={str(outcome): count for outcome, count in outcomes.items()},
        rules=rules,
        run_ids=run_ids[:RUN_IDS_KEPT],
        latency_ms=round(latency_ms, 3),
        consumer=consumer,
        detail=detail,
    )


def failed(event: Event, reason: str, detail: str, consumer: str) -> Recorded:
    """The record of a cancel event whose handling failed (it was dead-lettered)."""
    return Recorded(
        at=_now_ms(),
        event_id=event.id,
        event_name=event.name,
        decision="dead_lettered",
        data=_data(event.data),
        reason=reason,
        detail=detail[:500],
        consumer=consumer,
    )


def queue(pipe: RedisPipeline, keys: Keys, batch: Sequence[Recorded]) -> None:
    """Add to ``pipe`` the commands that prepend a batch's decisions (the last one first)
    and cap the list: two commands, whatever the batch's size."""
    if batch:
        pipe.lpush(keys.decisions, *(_encoder.encode(decision) for decision in batch))
        pipe.ltrim(keys.decisions, 0, DECISIONS_KEPT - 1)


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return default


def _decided(body: str) -> Decision:
    try:
        recorded = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        recorded = Recorded(at=0, event_id="", decision="unreadable")
    return Decision(**msgspec.structs.asdict(recorded))


def _original(fields: dict[str, str]) -> tuple[str | None, dict[str, Any] | None]:
    """A dead letter's original event name and data, when readable (never more than
    ``DATA_BYTES_KEPT`` of data: a hostile event must not make every read large)."""
    original = _json(fields.get("fields"), {})
    body = _json(original.get(EVENT_FIELD), None) if isinstance(original, dict) else None
    name = body.get("name") if isinstance(body, dict) else None
    data = body.get("data") if isinstance(body, dict) else None
    return (name if isinstance(name, str) else None), (
        _data(data) if isinstance(data, dict) else None
    )


def _dead_letter(entry_id: str, fields: dict[str, str]) -> Decision:
    """A dead letter as a decision; the original event's name and data when readable."""
    name, data = _original(fields)
    return Decision(
        at=int(entry_id.partition("-")[0]),
        event_id=fields.get("entry_id", ""),
        event_name=name,
        decision="dead_lettered",
        data=data,
        reason=fields.get("reason"),
        detail=fields.get("detail"),
        consumer=fields.get("consumer"),
    )


def dead_letter_view(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """A dead letter as ``cancel-broker dead-letters`` shows it (``id`` is the dead
    letter's own, to publish it again; ``original_id`` the refused entry's)."""
    name, data = _original(fields)
    return {
        "id": entry_id,
        "at": int(entry_id.partition("-")[0]),
        "reason": fields.get("reason"),
        "detail": fields.get("detail"),
        "original_id": fields.get("entry_id"),
        "event_name": name,
        "data": data,
        "consumer": fields.get("consumer"),
        "truncated": fields.get("truncated") == "1",
    }


async def recent(redis: RedisClient, keys: Keys, limit: int) -> list[Decision]:
    """The latest ``limit`` decisions and dead letters, newest first (one round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lrange(keys.decisions, 0, limit - 1)
        pipe.xrevrange(keys.dead_letters, count=limit)
        decided, dead = cast(
            tuple[list[str], list[tuple[str, dict[str, str]]]], await pipe.execute()
        )
    merged = [_decided(body) for body in decided] + [_dead_letter(i, f) for i, f in dead]
    # Stable: decisions of one batch keep their order (the list is newest first already).
    merged.sort(key=lambda d: d.at, reverse=True)
    return merged[:limit]
