"""A namespace's partitions: how many, and which one each event and run belongs to.

One namespace's run state can be split over several Redis Cluster slots (and so nodes):
partition ``p`` holds its own events stream, runs, cancel index, tombstones and signal
streams (``sdk/keys.py``). Every process must agree on their number, so it is stored in
Redis (``{ns}:partitions``): the first process to start stores what it was configured with
(``CANCEL_BROKER_PARTITIONS``, ``--partitions``, ``partitions=``; 1 if nothing says), and
a process configured otherwise refuses to start instead of placing events elsewhere.

An event's partition is a stable hash of its value at its name's *placement path* (the
match path its rules use, recorded at sync by ``declare_placements.lua``), so a run and the
cancel events that match it by key meet in one partition, and events about one key stay
in order. A spawned child lives with its parent (cancelling the parent cascades in one
script). Events with no placement path are spread at random; the broker looks their
cancel rules up in every partition (broadcast).
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Final, cast

from redis.typing import EncodableT, FieldT

from sdk.connection import RedisClient
from sdk.errors import ConfigurationError, PartitionCountError
from sdk.function import Function
from sdk.keys import EVENT_FIELD, PARTITION_FIELD, PLACEMENT_BROADCAST, PLACEMENT_PATH, Keys
from sdk.rules import CancelOn, parse_path, value_token
from sdk.scripts import declare_function_placement
from sdk.store import DEFAULT_RETENTION, RunStore
from sdk.wire import Event, event_id

#: Environment variable every process reads for the number of partitions it expects.
PARTITIONS_ENV: Final = "CANCEL_BROKER_PARTITIONS"
#: Each partition costs every worker one blocking read per function (and one for signals).
MAX_PARTITIONS: Final = 256


def check_partitions(value: int | str | None) -> int | None:
    """A configured number of partitions, validated (None: whatever is stored)."""
    if value is None or value == "":
        return None
    try:
        count = int(value)
    except ValueError:
        raise ConfigurationError(f"partitions must be a whole number, not {value!r}") from None
    if not 1 <= count <= MAX_PARTITIONS:
        raise ConfigurationError(f"partitions must be between 1 and {MAX_PARTITIONS}, not {count}")
    return count


def configured_partitions(value: int | None = None) -> int | None:
    """``value`` if given, else the environment's ``CANCEL_BROKER_PARTITIONS``, else None."""
    if value is not None:
        return check_partitions(value)
    return check_partitions(os.environ.get(PARTITIONS_ENV))


async def agree_partitions(
    redis: RedisClient, keys: Keys, configured: int | None, *, store: bool = True
) -> int | None:
    """The namespace's number of partitions; stores ``configured`` (or 1) if none is, or
    with ``store=False`` (a publisher, which may only read) returns None.

    Raises :class:`~sdk.errors.PartitionCountError` when Redis holds another number.
    """
    wanted = configured_partitions(configured)
    if store:
        await redis.set(keys.partitions, wanted or 1, nx=True)
    count = await _stored(redis, keys)
    if count is not None and wanted is not None and wanted != count:
        raise PartitionCountError(keys.namespace, count, wanted)
    return count


async def _stored(redis: RedisClient, keys: Keys) -> int | None:
    stored = await redis.get(keys.partitions)
    return None if stored is None else int(cast(str, stored))


async def stored_partition_keys(redis: RedisClient, keys: Keys) -> list[Keys]:
    """The keys of each of the namespace's partitions, as stored (one if none is): for
    readers that sum over partitions."""
    return [keys.in_partition(p) for p in range((await _stored(redis, keys)) or 1)]


def partition_of_token(token: str, count: int) -> int:
    """The partition of a value token: CRC-32, the same in every process and language."""
    return zlib.crc32(token.encode()) % count


def _first_match_path(fn: Function) -> str:
    return next((rule.match for rule in fn.cancel_on if rule.match is not None), None) or ""


async def declare_placements(redis: RedisClient, keys: Keys, functions: Iterable[Function]) -> None:
    """Record the placement paths of these functions' events (part of a worker's sync)."""
    for fn in functions:
        rules = [(rule.event, rule.match or "") for rule in fn.cancel_on]
        await declare_function_placement(redis, keys, fn.trigger, _first_match_path(fn), rules)


class Partitions:
    """The partitions of one namespace, as one process sees them."""

    def __init__(self, redis: RedisClient, keys: Keys, count: int, *, known: bool = True) -> None:
        self.redis = redis
        #: False until a worker or broker stored the number: a publisher then writes every
        #: event to partition 0's stream, unplaced, for a broker to move (always safe).
        self.known = known
        self.base = keys.in_partition(0)
        self.count = count
        self.keys: tuple[Keys, ...] = tuple(self.base.in_partition(p) for p in range(count))
        #: Placement paths, cached once seen: a path never changes once set.
        self._paths: dict[str, str] = {}
        #: Cancel events this process marked broadcast (a mark is never taken back).
        self._marked: set[str] = set()

    @classmethod
    async def open(
        cls, redis: RedisClient, keys: Keys, configured: int | None = None, *, store: bool = True
    ) -> Partitions:
        """The namespace's partitions (see :func:`agree_partitions`)."""
        count = await agree_partitions(redis, keys, configured, store=store)
        return cls(redis, keys, count or 1, known=count is not None)

    @property
    def partitioned(self) -> bool:
        return self.count > 1

    def stores(self, *, retention: timedelta = DEFAULT_RETENTION) -> tuple[RunStore, ...]:
        """One run store per partition, indexed by partition."""
        return tuple(RunStore(self.redis, keys, retention=retention) for keys in self.keys)

    async def publish(
        self, body: bytes, event: Event, *, parent_partition: int | None = None
    ) -> str:
        """Append an encoded event to its partition's stream; returns its id."""
        partition = await self.of_event(event, parent_partition=parent_partition)
        fields: dict[FieldT, EncodableT] = {EVENT_FIELD: body}
        if self.partitioned:
            fields[PARTITION_FIELD] = str(partition)
        entry_id = await self.redis.xadd(self.keys[partition].events, fields)
        return event_id(str(entry_id), partition)

    async def placement_paths(self, names: Iterable[str]) -> dict[str, str]:
        """The placement path of each of these event names that has one."""
        wanted = list(dict.fromkeys(names))
        unknown = [name for name in wanted if name not in self._paths]
        if unknown:
            found = cast(
                list[str | None],
                await self.redis.hmget(
                    self.base.placements, [PLACEMENT_PATH + name for name in unknown]
                ),
            )
            for name, path in zip(unknown, found, strict=True):
                if path is not None:
                    self._paths[name] = path
        return {name: self._paths[name] for name in wanted if name in self._paths}

    async def of_event(
        self, event: Event, *, parent_partition: int | None = None, fallback: str | None = None
    ) -> int:
        """The partition an event belongs in (see the module's docstring). An event with no
        value to place it by goes to the partition of ``fallback`` if given (so that moving
        an entry twice moves it to the same place), else to a random one."""
        if self.count == 1:
            return 0
        if parent_partition is None and event.parent is not None:
            parent_partition = (await self.locate([event.parent])).get(event.parent)
        if parent_partition is not None:
            return parent_partition
        path = (await self.placement_paths([event.name])).get(event.name)
        token = None if path is None else value_token(parse_path(path).lookup(event))
        if token is None and fallback is not None:
            token = fallback
        if token is None:
            return random.randrange(self.count)
        return partition_of_token(token, self.count)

    async def locate(self, run_ids: Sequence[str]) -> dict[str, int]:
        """The partition holding each of these runs' records (runs not found are left out)."""
        if self.count == 1:
            return {run_id: 0 for run_id in run_ids}
        # One EXISTS per (run, partition), sent in one pipeline: one round trip per node.
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                for keys in self.keys:
                    pipe.exists(keys.run(run_id))
            found = cast(list[int], await pipe.execute())
        located: dict[str, int] = {}
        for i, run_id in enumerate(run_ids):
            row = found[i * self.count : (i + 1) * self.count]
            if 1 in row:
                located[run_id] = row.index(1)
        return located

    async def keep_reachable(
        self, rules: Iterable[CancelOn], trigger: Event, partition: int
    ) -> None:
        """Before a run registers in ``partition``: if a rule's value places its cancel
        events elsewhere (a child lives with its parent, not with its own key), those
        cancel events are looked up in every partition from now on."""
        if self.count == 1:
            return
        names = []
        for rule in rules:
            if rule.match is None or rule.event in self._marked:
                continue
            token = value_token(parse_path(rule.match).lookup(trigger))
            if token is not None and partition_of_token(token, self.count) != partition:
                names.append(rule.event)
        if names:
            await self.redis.hset(
                self.base.placements, mapping={PLACEMENT_BROADCAST + name: "1" for name in names}
            )
            self._marked.update(names)

    async def broadcast(self, event_names: Iterable[str]) -> set[str]:
        """Which of these event names the broker must look up in every partition: those
        marked so, and those without a placement path (declared by an older SDK)."""
        names = list(dict.fromkeys(event_names))
        if self.count == 1 or not names:
            return set()
        fields = [f for name in names for f in (PLACEMENT_BROADCAST + name, PLACEMENT_PATH + name)]
        found = cast(list[str | None], await self.redis.hmget(self.base.placements, fields))
        return {
            name
            for i, name in enumerate(names)
            if found[2 * i] is not None or found[2 * i + 1] is None
        }
