"""The sync state, read from Redis: registrations, configurations, active runs per
configuration, what the broker observed, and every finding it reveals.

One function, :func:`collect_state`, does it all in a few round trips; the checks that
turn the state into findings are in :mod:`broker.finding_checks`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Final, cast

import msgspec

from broker import finding_checks as checks
from broker.findings import (
    DEFAULT_WINDOWS,
    Finding,
    FunctionView,
    HistoryEntry,
    SyncState,
    Windows,
    WorkerView,
    declared_triggers,
)
from sdk.connection import RedisClient, redis_now_ms
from sdk.keys import PRESENCE, Keys, parse_run_config_field
from sdk.partitions import stored_partition_keys
from sdk.registration import LIVE_INTERVALS
from sdk.wire import FunctionConfig, decode_config, decode_worker

#: Syncs of each app's history shown.
HISTORY_SHOWN: Final = 10


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
    windows: Windows = DEFAULT_WINDOWS,
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
        for stream in checks.lookalike_streams(keys.namespace):
            pipe.type(stream)
        pipe.hgetall(keys.uncancellable)
        pipe.hgetall(keys.unserved_events)
        pipe.hgetall(PRESENCE)
        pipe.hgetall(keys.rule_events)
        pipe.hgetall(keys.event_last_seen)
        pipe.hgetall(keys.orphan_events)
        replies: list[Any] = await pipe.execute()
    presence = {k: int(v) for k, v in replies[-4].items() if v.isdigit()}
    unserved_counts = {k: int(v) for k, v in replies[-5].items()}
    uncancellable = cast(dict[str, str], replies[-6])
    lookalikes = checks.lookalike_streams(keys.namespace)
    types = replies[-6 - len(lookalikes) : -6]
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
                function_id, config = parse_run_config_field(field)
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
            findings += checks.function_findings(view, configs, workers)

    live_rules: dict[str, list[str]] = defaultdict(list)
    for (app_id, function_id), by_hash in served.items():
        for config in by_hash:
            for rule in configs[config].cancel_on if config in configs else ():
                live_rules[rule.event].append(f"{app_id}/{function_id}")
    findings += checks.orphan_findings(orphan_counts, last_seen, live_rules, now, windows)
    findings += checks.dead_rule_findings(live_rules, rule_since, last_seen, now, windows)
    findings += checks.namespace_findings(keys.namespace, bool(workers), presence, now)
    findings += await checks.misnamed_stream_findings(redis, keys, misnamed, now)
    findings += checks.unserved_findings(
        unserved_counts,
        last_seen,
        declared_triggers(functions, configs),
        frozenset(live_rules),
        now,
        windows,
        trigger_lookback_s,
    )
    findings += checks.uncancellable_findings(uncancellable, functions, configs, now, windows)
    return SyncState(
        generated_at=now,
        workers=workers,
        functions=functions,
        configs=configs,
        findings=findings,
        history=history,
    )
