"""What the dashboard shows: runs, functions and their sync state, recent cancel decisions.

Everything is read from Redis at each request, so every broker replica shows the same
thing; nothing is kept in the broker's memory. Cancel goes through
:meth:`sdk.Client.cancel`, the SDK's own cancel by id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Final, cast

import msgspec

from broker import decisions
from broker.decisions import Decision
from broker.findings import Finding, SyncState, WorkerView
from sdk import OPERATOR, Client
from sdk.connection import RedisClient
from sdk.keys import Keys, check_name
from sdk.partitions import Partitions
from sdk.wire import TERMINAL_STATUSES, CancelResult, RuleConfig, RunInfo, decode_run

#: Runs listed per request at most, and run ids read per round trip while filtering.
MAX_RUNS: Final = 500
DEFAULT_RUNS: Final = 100
#: Ids looked at per sorted set while filtering, at most: a filter that matches nothing
#: costs a bounded amount of work, whatever the number of runs.
MAX_SCANNED: Final = 2_000
MAX_DECISIONS: Final = 200
DEFAULT_DECISIONS: Final = 50
ACTIVE_STATUSES: Final = frozenset({"running", "cancelling"})
STATUSES: Final = ("running", "cancelling", "cancelled", "completed", "failed", "lost")


class InvalidQueryError(ValueError):
    """A dashboard query parameter that cannot be used."""


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


class ConfigRow(msgspec.Struct, frozen=True, kw_only=True):
    """One configuration of a function: its rules as declared, who serves it, its runs."""

    config_hash: str
    #: False when the configuration's record expired (its rules cannot be shown).
    known: bool
    trigger: str | None
    cancel_on: list[RuleConfig]
    cancel_mode: str | None
    owner: str | None
    workers: list[str]
    active_runs: int
    #: The configuration of the app's latest sync.
    synced: bool
    interrupt_after_s: float | None = None
    trigger_if: str | None = None


class FunctionRow(msgspec.Struct, frozen=True, kw_only=True):
    app_id: str
    function_id: str
    configs: list[ConfigRow]
    #: The stale findings about this function.
    findings: list[Finding]


class FunctionsPage(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: int
    functions: list[FunctionRow]
    workers: list[WorkerView]
    #: Every stale finding, those about no single function (orphan cancel events) too.
    findings: list[Finding]
    #: What is wrong with the broker's Redis now (an evicting policy): the page's banner.
    warnings: list[str] = msgspec.field(default_factory=list)


def functions_page(state: SyncState) -> FunctionsPage:
    """The sync state arranged by function, each with its findings."""
    rows = []
    for view in state.functions:
        name = f"{view.app_id}/{view.function_id}"
        hashes = sorted(
            set(view.served) | set(view.active_runs) | ({view.synced} if view.synced else set())
        )
        configs = []
        for config_hash in hashes:
            config = state.configs.get(config_hash)
            configs.append(
                ConfigRow(
                    config_hash=config_hash,
                    known=config is not None,
                    trigger=config.trigger if config else None,
                    cancel_on=list(config.cancel_on) if config else [],
                    cancel_mode=config.cancel_mode if config else None,
                    owner=config.owner if config else None,
                    interrupt_after_s=config.interrupt_after_s if config else None,
                    trigger_if=config.trigger_if if config else None,
                    workers=view.served.get(config_hash, []),
                    active_runs=view.active_runs.get(config_hash, 0),
                    synced=config_hash == view.synced,
                )
            )
        findings = [
            finding
            for finding in state.findings
            if (finding.app_id, finding.function_id) == (view.app_id, view.function_id)
            or name in finding.details.get("functions", ())
        ]
        rows.append(
            FunctionRow(
                app_id=view.app_id,
                function_id=view.function_id,
                configs=configs,
                findings=findings,
            )
        )
    return FunctionsPage(
        generated_at=state.generated_at,
        functions=rows,
        workers=state.workers,
        findings=state.findings,
    )


def _started(run: RunInfo) -> datetime:
    return run.started_at


def _finished(run: RunInfo) -> datetime:
    return run.finished_at or run.started_at


class DashboardData:
    """The dashboard's reads, and its one write (Cancel), over one broker's connection."""

    def __init__(
        self,
        redis: RedisClient,
        partitions: Partitions,
        client: Client,
        sync_state: Callable[[], Awaitable[SyncState]],
        *,
        warnings: Callable[[], list[str]] = list,
    ) -> None:
        self.redis = redis
        self.partitions = partitions
        self.keys = partitions.base
        self.client = client
        self._sync_state = sync_state
        self._warnings = warnings

    async def runs(self, query: RunsQuery) -> RunsPage:
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys in self.partitions.keys:
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
                for keys in self.partitions.keys
            ]
            runs += await self._collect_all(active, query, query.limit, newest=_started)
        if (query.status is None or query.status in TERMINAL_STATUSES) and len(runs) < query.limit:
            finished = await self._collect_all(
                [keys.finished_runs for keys in self.partitions.keys],
                query,
                query.limit - len(runs),
                newest=_finished,
            )
            # A run that ended between the two reads is in both: once, as it ended.
            ended = {run.run_id for run in finished}
            runs = [run for run in runs if run.run_id not in ended] + finished
        return RunsPage(runs=runs, active_total=active_total, finished_total=finished_total)

    async def _collect_all(
        self,
        zsets: list[str],
        query: RunsQuery,
        limit: int,
        *,
        newest: Callable[[RunInfo], datetime],
    ) -> list[RunInfo]:
        """:meth:`_collect` over one sorted set per partition, merged newest first."""
        found: list[RunInfo] = []
        for partition, zset in enumerate(zsets):
            found += await self._collect(self.partitions.keys[partition], zset, query, limit)
        return sorted(found, key=newest, reverse=True)[:limit]

    async def _collect(self, keys: Keys, zset: str, query: RunsQuery, limit: int) -> list[RunInfo]:
        """Up to ``limit`` runs of ``zset`` (highest score first) that ``query`` wants."""
        found: list[RunInfo] = []
        chunk = max(limit, 100)
        start = 0
        while len(found) < limit and start < MAX_SCANNED:
            ids = cast(list[str], await self.redis.zrevrange(zset, start, start + chunk - 1))
            if not ids:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
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

    async def functions(self) -> FunctionsPage:
        page = functions_page(await self._sync_state())
        return msgspec.structs.replace(page, warnings=self._warnings())

    async def decisions(self, limit: int = DEFAULT_DECISIONS) -> list[Decision]:
        if not 1 <= limit <= MAX_DECISIONS:
            raise InvalidQueryError(f"limit must be between 1 and {MAX_DECISIONS}")
        return await decisions.recent(self.redis, self.keys, limit)

    async def cancel(self, run_id: str, *, reason: str) -> CancelResult:
        """Cancel one run by id, as an operator (see docs/dashboard.md: the dashboard has
        no end user to check an owner against; who may press Cancel is its access rule)."""
        return await self.client.cancel(run_id, reason=reason, actor=OPERATOR)
