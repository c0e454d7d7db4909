"""What the dashboard shows: runs, functions and their sync state, recent cancel decisions.

Everything is read from Redis at each request, so every broker replica shows the same
thing; nothing is kept in the broker's memory. Cancel goes through
:meth:`sdk.Client.cancel`, the SDK's own cancel by id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import msgspec

from broker import decisions
from broker.activity import Activity, activity
from broker.decisions import Decision
from broker.findings import Finding, SyncState, WorkerView
from broker.run_listing import InvalidQueryError, RunsPage, RunsQuery, list_runs
from sdk import OPERATOR, Client
from sdk.connection import RedisClient
from sdk.partitions import Partitions
from sdk.wire import CancelResult, RuleConfig

MAX_DECISIONS: Final = 200
DEFAULT_DECISIONS: Final = 50


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
        return await list_runs(self.redis, self.partitions, query)

    async def activity(self) -> Activity:
        return await activity(self.redis, self.partitions)

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
