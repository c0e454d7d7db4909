"""Listing runs: the unfinished ones newest first, then the recently finished, filtered by
app, function and status. The dashboard's ``/v1/runs`` and ``cancel-broker runs`` read
through it; every read is bounded, whatever the number of runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Final, cast

import msgspec

from sdk.connection import RedisClient
from sdk.keys import Keys, check_name
from sdk.partitions import Partitions
from sdk.wire import TERMINAL_STATUSES, RunInfo, decode_run

#: Runs listed per request at most, and run ids read per round trip while filtering.
MAX_RUNS: Final = 500
DEFAULT_RUNS: Final = 100
#: Ids looked at per sorted set while filtering, at most: a filter that matches nothing
#: costs a bounded amount of work, whatever the number of runs.
MAX_SCANNED: Final = 2_000
ACTIVE_STATUSES: Final = frozenset({"running", "cancelling"})
STATUSES: Final = ("running", "cancelling", "cancelled", "completed", "failed", "lost")


class InvalidQueryError(ValueError):
    """A query parameter (of the dashboard, or of ``cancel-broker runs``) that cannot be used."""


class RunsQuery(msgspec.Struct, frozen=True, kw_only=True):
    app: str | None = None
    function: str | None = None
    status: str | None = None
    limit: int = DEFAULT_RUNS

    def __post_init__(self) -> None:
        for kind, value in (("app id", self.app), ("function id", self.function)):
            if value is not None:
                try:
                    check_name(kind, value)
                except ValueError as exc:
                    raise InvalidQueryError(str(exc)) from None
        if self.status is not None and self.status not in STATUSES:
            raise InvalidQueryError(f"status must be one of {', '.join(STATUSES)}")
        if not 1 <= self.limit <= MAX_RUNS:
            raise InvalidQueryError(f"limit must be between 1 and {MAX_RUNS}")

    def wants(self, run: RunInfo) -> bool:
        return (
            (self.app is None or run.app_id == self.app)
            and (self.function is None or run.function_id == self.function)
            and (self.status is None or run.status == self.status)
        )


class RunsPage(msgspec.Struct, frozen=True, kw_only=True):
    #: Unfinished runs (newest first), then recently finished ones (latest end first).
    runs: list[RunInfo]
    #: Unfinished runs in the whole namespace, filtered or not.
    active_total: int
    #: Finished runs still listed in ``{ns}:runs:finished`` (the most recent ones).
    finished_total: int


def _started(run: RunInfo) -> datetime:
    return run.started_at


def _finished(run: RunInfo) -> datetime:
    return run.finished_at or run.started_at


async def list_runs(redis: RedisClient, partitions: Partitions, query: RunsQuery) -> RunsPage:
    """The runs ``query`` wants, across every partition."""
    async with redis.pipeline(transaction=False) as pipe:
        for keys in partitions.keys:
            pipe.zcard(keys.active_runs)
            pipe.zcard(keys.finished_runs)
        totals = cast(list[int], await pipe.execute())
    active_total, finished_total = sum(totals[0::2]), sum(totals[1::2])
    runs: list[RunInfo] = []
    if query.status is None or query.status in ACTIVE_STATUSES:
        # One function's runs have a set of their own: no need to filter the others out.
        active = [
            keys.function_runs(query.app, query.function)
            if query.app and query.function
            else keys.active_runs
            for keys in partitions.keys
        ]
        runs += await _collect_all(redis, partitions, active, query, query.limit, _started)
    if (query.status is None or query.status in TERMINAL_STATUSES) and len(runs) < query.limit:
        finished = await _collect_all(
            redis,
            partitions,
            [keys.finished_runs for keys in partitions.keys],
            query,
            query.limit - len(runs),
            _finished,
        )
        # A run that ended between the two reads is in both: once, as it ended.
        ended = {run.run_id for run in finished}
        runs = [run for run in runs if run.run_id not in ended] + finished
    return RunsPage(runs=runs, active_total=active_total, finished_total=finished_total)


async def _collect_all(
    redis: RedisClient,
    partitions: Partitions,
    zsets: list[str],
    query: RunsQuery,
    limit: int,
    newest: Callable[[RunInfo], datetime],
) -> list[RunInfo]:
    """:func:`_collect` over one sorted set per partition, merged newest first."""
    found: list[RunInfo] = []
    for partition, zset in enumerate(zsets):
        found += await _collect(redis, partitions.keys[partition], zset, query, limit)
    return sorted(found, key=newest, reverse=True)[:limit]


async def _collect(
    redis: RedisClient, keys: Keys, zset: str, query: RunsQuery, limit: int
) -> list[RunInfo]:
    """Up to ``limit`` runs of ``zset`` (highest score first) that ``query`` wants."""
    found: list[RunInfo] = []
    chunk = max(limit, 100)
    start = 0
    while len(found) < limit and start < MAX_SCANNED:
        ids = cast(list[str], await redis.zrevrange(zset, start, start + chunk - 1))
        if not ids:
            break
        async with redis.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.hgetall(keys.run(run_id))
            records = cast(list[dict[str, str]], await pipe.execute())
        for fields in records:
            if not fields:
                continue  # its record expired, or it ended between the two reads
            try:
                run = decode_run(fields)
            except (KeyError, ValueError, msgspec.ValidationError):
                continue  # a record written by an incompatible version: skip, not fail
            if query.wants(run):
                found.append(run)
        start += chunk
    return found[:limit]
