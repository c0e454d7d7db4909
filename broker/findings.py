"""Sync state and stale-configuration findings, computed from what workers registered.

One function, :func:`collect_state`, reads the registrations, the configurations, the
active runs per configuration and the broker's event observations, and says what is
stale. ``cancel-broker sync status``, ``GET /v1/sync``, the gauges and the warning logs
all use it, so they never disagree.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import msgspec

from sdk.config import TRIGGER_LOOKBACK
from sdk.connection import RedisClient, redis_now_ms
from sdk.keys import PRESENCE, Keys
from sdk.partitions import stored_partition_keys
from sdk.registration import LIVE_INTERVALS
from sdk.wire import (
    SYSTEM_EVENT_PREFIX,
    FunctionConfig,
    RuleConfig,
    decode_config,
    decode_worker,
)

FindingKind = Literal[
    "drift",
    "unsynced_run",
    "gone_function",
    "orphan_cancel_event",
    "dead_rule",
    "namespace_mismatch",
    "misnamed_stream",
    "unserved_trigger",
]
FINDING_KINDS: Final[tuple[FindingKind, ...]] = (
    "drift",
    "unsynced_run",
    "gone_function",
    "orphan_cancel_event",
    "dead_rule",
    "namespace_mismatch",
    "misnamed_stream",
    "unserved_trigger",
)
#: Event names that look like cancellations even when no rule mentions them: the last
#: segment of the name, after any separator ("report/cancel.requested", "order.cancelled").
CANCEL_SUFFIXES: Final = ("cancelled", "canceled", "cancel.requested")
_SEPARATORS: Final = "./-_:"
HISTORY_SHOWN: Final = 10


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


DEFAULT_WINDOWS: Final = Windows()


def rule_text(rule: RuleConfig) -> str:
    if rule.all_runs:
        return f"{rule.event} (all runs)"
    return f"{rule.event} match {rule.match}"


def config_changes(old: FunctionConfig | None, new: FunctionConfig | None) -> dict[str, Any]:
    """How ``new`` differs from ``old``: rules added and removed, other fields changed."""
    old_rules = set(old.cancel_on) if old else set()
    new_rules = set(new.cancel_on) if new else set()
    changes: dict[str, Any] = {
        "rules_added": sorted(rule_text(r) for r in new_rules - old_rules),
        "rules_removed": sorted(rule_text(r) for r in old_rules - new_rules),
    }
    if old and new:
        for field in ("trigger", "cancel_mode", "owner"):
            before, after = getattr(old, field), getattr(new, field)
            if before != after:
                changes[field] = [before, after]
    return changes


def _versions(workers: list[str], versions: dict[str, str | None]) -> list[str]:
    return sorted({versions.get(w) or "-" for w in workers})


def _short(config_hash: str) -> str:
    return config_hash[:12]


async def load_configs(
    redis: RedisClient, keys: Keys, hashes: set[str]
) -> dict[str, FunctionConfig]:
    ordered = sorted(hashes)
    if not ordered:
        return {}
    raw = cast(list[str | None], await redis.mget([keys.config(h) for h in ordered]))
    return {h: decode_config(body) for h, body in zip(ordered, raw, strict=True) if body}


async def live_workers(redis: RedisClient, keys: Keys, now: int) -> list[WorkerView]:
    ids = cast(list[str], await redis.zrange(keys.workers, 0, -1))
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.hgetall(keys.worker(worker_id))
        records = cast(list[dict[str, str]], await pipe.execute())
    live = []
    for record in records:
        if "info" not in record:
            continue
        info = decode_worker(record["info"])
        heartbeat_at = int(record.get("heartbeat_at", info.started_at))
        if now - heartbeat_at > LIVE_INTERVALS * info.heartbeat_interval_s * 1000:
            continue
        live.append(
            WorkerView(
                worker_id=info.worker_id,
                app_id=info.app_id,
                app_version=info.app_version,
                sdk_version=info.sdk_version,
                host=info.host,
                pid=info.pid,
                started_at=info.started_at,
                heartbeat_at=heartbeat_at,
                functions=info.functions,
            )
        )
    return sorted(live, key=lambda w: (w.app_id, w.worker_id))


def decode_history(entry_id: str, fields: dict[str, str]) -> HistoryEntry:
    return HistoryEntry(
        id=entry_id,
        at=int(fields["at"]),
        worker_id=fields["worker_id"],
        app_version=fields.get("app_version") or None,
        sdk_version=fields.get("sdk_version", ""),
        added=msgspec.json.decode(fields.get("added", "[]")),
        removed=msgspec.json.decode(fields.get("removed", "[]")),
        changed=msgspec.json.decode(fields.get("changed", "{}")),
    )


async def collect_state(
    redis: RedisClient,
    keys: Keys,
    *,
    windows: Windows = Windows(),
    cancel_event_names: frozenset[str] = frozenset(),
    trigger_lookback_s: float | None = None,
) -> SyncState:
    """Everything registered, and every stale configuration it reveals.

    ``trigger_lookback_s``: how far back a function's first worker reads (named in the
    ``unserved_trigger`` finding; default: this process's setting)."""
    now = await redis_now_ms(redis)
    workers = await live_workers(redis, keys, now)
    apps = set(cast(set[str], await redis.smembers(keys.apps))) | {w.app_id for w in workers}
    ordered_apps = sorted(apps)
    parts = await stored_partition_keys(redis, keys)
    async with redis.pipeline(transaction=False) as pipe:
        for app_id in ordered_apps:
            pipe.hgetall(keys.app_functions(app_id))
            pipe.xrevrange(keys.app_history(app_id), count=HISTORY_SHOWN)
            for part in parts:
                pipe.hgetall(part.run_configs(app_id))
        for stream in lookalike_streams(keys.namespace):
            pipe.type(stream)
        pipe.hgetall(keys.unserved_events)
        pipe.hgetall(PRESENCE)
        pipe.hgetall(keys.rule_events)
        pipe.hgetall(keys.event_last_seen)
        pipe.hgetall(keys.orphan_events)
        replies: list[Any] = await pipe.execute()
    presence = {k: int(v) for k, v in replies[-4].items() if v.isdigit()}
    unserved_counts = {k: int(v) for k, v in replies[-5].items()}
    lookalikes = lookalike_streams(keys.namespace)
    types = replies[-5 - len(lookalikes) : -5]
    misnamed = [name for name, kind in zip(lookalikes, types, strict=True) if kind == "stream"]
    rule_since = {k: int(v) for k, v in replies[-3].items()}
    last_seen = {k: int(v) for k, v in replies[-2].items()}
    orphan_counts = {k: int(v) for k, v in replies[-1].items()}

    synced: dict[str, dict[str, str]] = {}
    runs: dict[str, dict[str, dict[str, int]]] = {}
    history: dict[str, list[HistoryEntry]] = {}
    width = 2 + len(parts)
    for i, app_id in enumerate(ordered_apps):
        synced[app_id] = replies[width * i]
        history[app_id] = [decode_history(eid, f) for eid, f in replies[width * i + 1]]
        per_function: dict[str, dict[str, int]] = defaultdict(dict)
        for counts in replies[width * i + 2 : width * (i + 1)]:
            for field, count in counts.items():
                function_id, _, config = field.partition(":")
                if int(count) > 0:
                    total = per_function[function_id].get(config, 0) + int(count)
                    per_function[function_id][config] = total
        runs[app_id] = per_function

    served: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for worker in workers:
        for function_id, config in worker.functions.items():
            served[(worker.app_id, function_id)][config].append(worker.worker_id)

    hashes = {h for by_hash in served.values() for h in by_hash}
    hashes |= {h for per_fn in runs.values() for by_hash in per_fn.values() for h in by_hash}
    hashes |= {h for functions in synced.values() for h in functions.values()}
    configs = await load_configs(redis, keys, hashes)

    functions: list[FunctionView] = []
    findings: list[Finding] = []
    for app_id in ordered_apps:
        names = (
            {fn for (app, fn) in served if app == app_id} | set(runs[app_id]) | set(synced[app_id])
        )
        for function_id in sorted(names):
            view = FunctionView(
                app_id=app_id,
                function_id=function_id,
                served={h: sorted(ws) for h, ws in served.get((app_id, function_id), {}).items()},
                active_runs=runs[app_id].get(function_id, {}),
                synced=synced[app_id].get(function_id),
            )
            functions.append(view)
            findings += _function_findings(view, configs, workers)

    live_rules: dict[str, list[str]] = defaultdict(list)
    for (app_id, function_id), by_hash in served.items():
        for config in by_hash:
            for rule in configs[config].cancel_on if config in configs else ():
                live_rules[rule.event].append(f"{app_id}/{function_id}")
    findings += _orphan_findings(orphan_counts, last_seen, live_rules, now, windows)
    findings += _dead_rule_findings(live_rules, rule_since, last_seen, now, windows)
    findings += _namespace_findings(keys.namespace, bool(workers), presence, now)
    findings += await _misnamed_stream_findings(redis, keys, misnamed, now)
    findings += _unserved_findings(
        unserved_counts,
        last_seen,
        declared_triggers(functions, configs),
        frozenset(live_rules),
        now,
        windows,
        trigger_lookback_s,
    )
    return SyncState(
        generated_at=now,
        workers=workers,
        functions=functions,
        configs=configs,
        findings=findings,
        history=history,
    )


def _function_findings(
    view: FunctionView, configs: dict[str, FunctionConfig], workers: list[WorkerView]
) -> list[Finding]:
    findings: list[Finding] = []
    name = f"{view.app_id}/{view.function_id}"
    versions = {w.worker_id: w.app_version for w in workers}
    if len(view.served) > 1:
        # Compare every other configuration with the one most workers serve.
        ranked = sorted(view.served, key=lambda h: (-len(view.served[h]), h))
        base = ranked[0]
        findings.append(
            Finding(
                kind="drift",
                app_id=view.app_id,
                function_id=view.function_id,
                message=f"{name}: live workers serve {len(ranked)} configurations: "
                + "; ".join(
                    f"{_short(h)} (app {', '.join(_versions(view.served[h], versions))})"
                    f" on {', '.join(view.served[h])}"
                    for h in ranked
                ),
                details={
                    "configs": {
                        h: {
                            "workers": view.served[h],
                            "app_versions": _versions(view.served[h], versions),
                        }
                        for h in ranked
                    },
                    "differences": {
                        h: config_changes(configs.get(base), configs.get(h)) for h in ranked[1:]
                    },
                    "compared_with": base,
                },
            )
        )
    for config, count in sorted(view.active_runs.items()):
        if config in view.served:
            continue
        if not view.served and view.synced is None:
            findings.append(
                Finding(
                    kind="gone_function",
                    app_id=view.app_id,
                    function_id=view.function_id,
                    message=f"{name}: {count} run(s) running, but {view.app_id} no longer"
                    " declares this function",
                    details={"config_hash": config, "active_runs": count},
                )
            )
        else:
            findings.append(
                Finding(
                    kind="unsynced_run",
                    app_id=view.app_id,
                    function_id=view.function_id,
                    message=f"{name}: {count} run(s) registered with configuration"
                    f" {_short(config)}, which no live worker of {view.app_id} declares",
                    details={
                        "config_hash": config,
                        "active_runs": count,
                        "served": sorted(view.served),
                        "differences": {
                            h: config_changes(configs.get(config), configs.get(h))
                            for h in sorted(view.served)
                        },
                    },
                )
            )
    return findings


def _orphan_findings(
    counts: dict[str, int],
    last_seen: dict[str, int],
    live_rules: dict[str, list[str]],
    now: int,
    windows: Windows,
) -> list[Finding]:
    findings = []
    for name, count in sorted(counts.items()):
        seen = last_seen.get(name, 0)
        if count <= 0 or name in live_rules or now - seen > windows.orphan_window_s * 1000:
            continue
        findings.append(
            Finding(
                kind="orphan_cancel_event",
                event_name=name,
                message=f"{count} {name!r} event(s) arrived while no live rule listens to"
                " that name (the cancel button does nothing)",
                details={"count": count, "last_seen": seen},
            )
        )
    return findings


def _dead_rule_findings(
    live_rules: dict[str, list[str]],
    rule_since: dict[str, int],
    last_seen: dict[str, int],
    now: int,
    windows: Windows,
) -> list[Finding]:
    findings = []
    for name, functions in sorted(live_rules.items()):
        seen = last_seen.get(name)
        reference = max(seen or 0, rule_since.get(name, now))
        if now - reference <= windows.dead_rule_after_s * 1000:
            continue
        # Names the broker has seen published (cancel-like or listened to): a typo's twin.
        close = difflib.get_close_matches(name, [n for n in last_seen if n != name], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        findings.append(
            Finding(
                kind="dead_rule",
                event_name=name,
                message=f"rules of {', '.join(sorted(functions))} listen to {name!r}, which"
                f" has not been published for {windows.dead_rule_after_s:g} s{hint}",
                details={
                    "functions": sorted(functions),
                    "last_seen": seen,
                    "listening_since": rule_since.get(name),
                    "suggestion": close[0] if close else None,
                },
            )
        )
    return findings


def _namespace_findings(
    namespace: str, has_workers: bool, presence: dict[str, int], now: int
) -> list[Finding]:
    """Workers and brokers split over two namespaces of one Redis (``CANCEL_BROKER_NAMESPACE``
    set on one side only, or to different values): no cancel event ever reaches a run.

    Reported from the namespace on either side of the split: the one with live brokers and
    no worker, and the one with workers and no broker, while another namespace has brokers
    and no worker. (A namespace with neither is nobody's: nothing is said about it.)
    """
    present: dict[str, set[str]] = {"worker": set(), "broker": set()}
    for field, until in presence.items():
        role, _, other = field.partition(":")
        if role in present and until > now:
            present[role].add(other)
    workers_only = present["worker"] - present["broker"] - {namespace}
    brokers_only = present["broker"] - present["worker"] - {namespace}
    here_broker = namespace in present["broker"]
    if not has_workers and here_broker and workers_only:
        others = sorted(workers_only)
        message = (
            f"no live worker uses namespace {namespace!r}, but workers use"
            f" {', '.join(map(repr, others))}, which no broker reads: give workers, clients"
            " and brokers the same CANCEL_BROKER_NAMESPACE"
        )
    elif has_workers and not here_broker and brokers_only:
        others = sorted(brokers_only)
        message = (
            f"live workers use namespace {namespace!r}, which no broker reads, but brokers"
            f" read {', '.join(map(repr, others))}, where no worker is: give workers, clients"
            " and brokers the same CANCEL_BROKER_NAMESPACE"
        )
    else:
        return []
    return [
        Finding(
            kind="namespace_mismatch",
            message=message,
            details={
                "namespace": namespace,
                "other_namespaces": others,
                "workers_in": sorted(present["worker"]),
                "brokers_in": sorted(present["broker"]),
            },
        )
    ]


def lookalike_streams(namespace: str) -> list[str]:
    """Names a publisher writing by hand may give the events stream instead of
    ``{namespace}:events``: without the braces (a doc's old typo), or one character off.
    ``cancel-broker`` reads none of them."""
    tagged = f"{{{namespace}}}"
    return [
        *(f"{namespace}{separator}events" for separator in ":.-_"),
        f"{namespace}:event",
        f"{tagged}:event",
        f"{tagged}events",
    ]


async def _misnamed_stream_findings(
    redis: RedisClient, keys: Keys, streams: list[str], now: int
) -> list[Finding]:
    """A stream named like the events stream, which no broker reads: every event appended
    to it (a plain ``XADD`` to ``cancel:events``) is lost without a word."""
    if not streams:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xrevrange(stream, count=1)
        replies: list[Any] = await pipe.execute()
    findings = []
    for i, stream in enumerate(streams):
        length, last = int(replies[2 * i]), replies[2 * i + 1]
        last_ms = int(str(last[0][0]).partition("-")[0]) if last else None
        ago = "" if last_ms is None else f", the last {max(0, now - last_ms) / 1000:.0f} s ago"
        findings.append(
            Finding(
                kind="misnamed_stream",
                message=f"stream {stream!r} holds {length} event(s){ago}, which no broker"
                f" reads: events go to {keys.events!r} (the braces are part of the name);"
                " publish there, then move these events and delete the stream",
                details={
                    "stream": stream,
                    "length": length,
                    "last_entry_at": last_ms,
                    "events_stream": keys.events,
                },
            )
        )
    return findings


def _unserved_findings(
    counts: dict[str, int],
    last_seen: dict[str, int],
    declared_triggers: frozenset[str],
    listened: frozenset[str],
    now: int,
    windows: Windows,
    trigger_lookback_s: float | None,
) -> list[Finding]:
    """Events no declared function triggers on and no rule listens to: nothing ran or
    cancelled because of them (a misspelt trigger name, a function that was never
    deployed, the web app publishing before the first worker of a new function)."""
    lookback = TRIGGER_LOOKBACK.resolve(trigger_lookback_s)
    findings = []
    for name, count in sorted(counts.items()):
        seen = last_seen.get(name, 0)
        if count <= 0 or name in declared_triggers or name in listened:
            continue
        if now - seen > windows.orphan_window_s * 1000:
            continue
        close = difflib.get_close_matches(name, sorted(declared_triggers), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        findings.append(
            Finding(
                kind="unserved_trigger",
                event_name=name,
                message=f"{count} {name!r} event(s) arrived while no declared function triggers"
                " on that name and no rule listens to it: nothing ran or cancelled because of"
                f" them. A function declared on it within {lookback:g} s (the trigger lookback)"
                f" of an event still runs that event{hint}",
                details={
                    "count": count,
                    "last_seen": seen,
                    "trigger_lookback_s": lookback,
                    "suggestion": close[0] if close else None,
                },
            )
        )
    return findings
