"""Stale-configuration findings and the sync state they come with: the types.

A *finding* says that something registered in Redis means a cancel will not do what the
code declares (a deploy that left an old worker, a rule nobody publishes to, a run no rule
can reach, a stream nobody reads). :mod:`broker.sync_state` reads the state from Redis
and :mod:`broker.finding_checks` derives each kind of finding from it; ``cancel-broker
sync status``, ``GET /v1/sync``, the dashboard, the gauges and the warning logs all use
them, so they never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

import msgspec

from sdk.wire import SYSTEM_EVENT_PREFIX, FunctionConfig, RuleConfig

FindingKind = Literal[
    "drift",
    "unsynced_run",
    "gone_function",
    "orphan_cancel_event",
    "dead_rule",
    "namespace_mismatch",
    "misnamed_stream",
    "unserved_trigger",
    "uncancellable_run",
]
FINDING_KINDS: Final[tuple[FindingKind, ...]] = get_args(FindingKind)
#: Event names that look like cancellations even when no rule mentions them: the last
#: segment of the name, after any separator ("report/cancel.requested", "order.cancelled").
CANCEL_SUFFIXES: Final = ("cancelled", "canceled", "cancel.requested")
_SEPARATORS: Final = "./-_:"


def is_cancel_like(name: str, extra_names: frozenset[str] = frozenset()) -> bool:
    if name in extra_names:
        return True
    if name.startswith(SYSTEM_EVENT_PREFIX):
        return False  # our own outcome events ("cancel/run.cancelled") ask for nothing
    for suffix in CANCEL_SUFFIXES:
        if name.endswith(suffix):
            head = name[: -len(suffix)]
            return not head or head[-1] in _SEPARATORS
    return False


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    kind: FindingKind
    message: str
    app_id: str | None = None
    function_id: str | None = None
    event_name: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str | None, str | None, str | None]:
        """What makes two findings the same finding (for logging each one once)."""
        return (self.kind, self.app_id, self.function_id, self.event_name)


class WorkerView(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    app_id: str
    app_version: str | None
    sdk_version: str
    host: str
    pid: int
    started_at: int
    heartbeat_at: int
    functions: dict[str, str]


class FunctionView(msgspec.Struct, frozen=True, kw_only=True):
    app_id: str
    function_id: str
    #: config hash -> ids of the live workers serving it
    served: dict[str, list[str]]
    #: config hash -> number of active runs registered with it
    active_runs: dict[str, int]
    #: config hash as of the app's latest sync (None: the latest sync does not declare it)
    synced: str | None


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    at: int
    worker_id: str
    app_version: str | None
    sdk_version: str
    added: list[str]
    removed: list[str]
    changed: dict[str, dict[str, Any]]


class SyncState(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: int
    workers: list[WorkerView]
    functions: list[FunctionView]
    configs: dict[str, FunctionConfig]
    findings: list[Finding]
    history: dict[str, list[HistoryEntry]]

    @property
    def stale(self) -> bool:
        return bool(self.findings)

    @property
    def declared_triggers(self) -> frozenset[str]:
        """Triggers of the functions apps declare: in their latest sync, or served by a
        live worker (a trigger of any other name runs nothing)."""
        return declared_triggers(self.functions, self.configs)

    @property
    def listened_events(self) -> frozenset[str]:
        """Event names the rules of live workers' configurations listen to."""
        served = {h for view in self.functions for h in view.served}
        return frozenset(
            rule.event for h in served if h in self.configs for rule in self.configs[h].cancel_on
        )


def declared_triggers(
    functions: list[FunctionView], configs: dict[str, FunctionConfig]
) -> frozenset[str]:
    """See :attr:`SyncState.declared_triggers`."""
    hashes = {h for view in functions for h in view.served}
    hashes |= {view.synced for view in functions if view.synced}
    return frozenset(configs[h].trigger for h in hashes if h in configs)


@dataclass(frozen=True, slots=True)
class Windows:
    """How long before silence becomes a finding."""

    #: A rule whose event has not been published for this long is dead.
    dead_rule_after_s: float = 86_400.0
    #: Orphan cancel events older than this are no longer reported.
    orphan_window_s: float = 3_600.0
    #: The broker computes the findings again this often (at once when a worker syncs).
    rescan_s: float = 5.0


DEFAULT_WINDOWS: Final = Windows()


def rule_text(rule: RuleConfig) -> str:
    """The whole rule, on one line: two rules that differ never read the same."""
    if rule.all_runs:
        return f"{rule.event} (all runs)"
    parts = [rule.event]
    if rule.match is not None:
        parts.append(f"match {rule.match}")
    if rule.if_ is not None:
        parts.append(f"if {rule.if_}")
    if rule.timeout_s is not None:
        parts.append(f"timeout {rule.timeout_s:g}s")
    if rule.until_ms is not None:
        at = datetime.fromtimestamp(rule.until_ms / 1000, tz=UTC).isoformat()
        parts.append(f"until {at.replace('+00:00', 'Z')}")
    return " ".join(parts)


#: The fields of a configuration, besides its rules, that a drift diff compares.
COMPARED_FIELDS: Final = ("trigger", "trigger_if", "cancel_mode", "interrupt_after_s", "owner")


def config_changes(old: FunctionConfig | None, new: FunctionConfig | None) -> dict[str, Any]:
    """How ``new`` differs from ``old``: rules added and removed, other fields changed."""
    old_rules = set(old.cancel_on) if old else set()
    new_rules = set(new.cancel_on) if new else set()
    changes: dict[str, Any] = {
        "rules_added": sorted(rule_text(r) for r in new_rules - old_rules),
        "rules_removed": sorted(rule_text(r) for r in old_rules - new_rules),
    }
    if old and new:
        for field in COMPARED_FIELDS:
            before, after = getattr(old, field), getattr(new, field)
            if before != after:
                changes[field] = [before, after]
    return changes
