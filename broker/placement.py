"""Moving entries to their partition.

With several partitions, publishers that know the namespace (the SDK) append each event
to its own partition's stream and say so (``partition`` field). An entry without it, a
plain ``XADD`` from any language into partition 0's stream, or a run's outcome event
written where the run lives, is appended by the broker that reads it to the partition its
event belongs in, keeping the id it was published under (``origin``), and handled there
only. Moving is at least once: an entry moved twice lands twice in the same partition,
with the same id, and its second copy changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdk.errors import InvalidEventError
from sdk.keys import EVENT_FIELD, ORIGIN_FIELD, PARTITION_FIELD
from sdk.partitions import Partitions
from sdk.streams import Entry
from sdk.wire import decode_event


def is_placed(partitions: Partitions, fields: dict[str, str] | None, partition: int) -> bool:
    """Whether an entry read from ``partition``'s stream is to be handled there."""
    return not partitions.partitioned or (fields or {}).get(PARTITION_FIELD) == str(partition)


async def move_unplaced(
    partitions: Partitions, entries: Sequence[Entry], partition: int
) -> list[Entry]:
    """Append the entries of a batch read from ``partition`` that belong elsewhere to
    their own partition; returns those to handle here. A malformed entry stays, for the
    matcher to dead-letter with its reason. Raises if Redis does not take the moves
    (nothing is acknowledged then)."""
    placed: list[Entry] = []
    moves: list[tuple[int, str, str]] = []
    for entry_id, fields in entries:
        if is_placed(partitions, fields, partition):
            placed.append((entry_id, fields))
            continue
        try:
            event = decode_event(entry_id, fields, partition=partition)
        except InvalidEventError:
            placed.append((entry_id, fields))
            continue
        assert fields is not None  # decoded
        target = await partitions.of_event(event, fallback=event.id)
        moves.append((target, fields[EVENT_FIELD], event.id))
    if moves:
        async with partitions.redis.pipeline(transaction=False) as pipe:
            for target, body, origin in moves:
                pipe.xadd(
                    partitions.keys[target].events,
                    {EVENT_FIELD: body, PARTITION_FIELD: str(target), ORIGIN_FIELD: origin},
                )
            await pipe.execute()
    return placed
