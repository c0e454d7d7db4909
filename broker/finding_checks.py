"""Each kind of finding, derived from the sync state (:mod:`broker.sync_state`).

One function per kind (or per family of kinds): what makes it, its message and details.
docs/operations.md has a runbook section for each kind.
"""

from __future__ import annotations

import difflib
from typing import Any

import msgspec

from broker.findings import Finding, FunctionView, Windows, WorkerView, config_changes
from sdk.config import TRIGGER_LOOKBACK
from sdk.connection import RedisClient
from sdk.keys import Keys, parse_presence_field
from sdk.unreachable import UnreachableLast
from sdk.wire import FunctionConfig


def _versions(workers: list[str], versions: dict[str, str | None]) -> list[str]:
    return sorted({versions.get(w) or "-" for w in workers})


def _short(config_hash: str) -> str:
    return config_hash[:12]


def function_findings(
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


def orphan_findings(
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


def dead_rule_findings(
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


def namespace_findings(
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
        role, other = parse_presence_field(field)
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


async def misnamed_stream_findings(
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


def unserved_findings(
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


def uncancellable_findings(
    recorded: dict[str, str],
    functions: list[FunctionView],
    configs: dict[str, FunctionConfig],
    now: int,
    windows: Windows,
) -> list[Finding]:
    """Runs registered with no value at a rule's ``match`` path (workers record them in
    ``{ns}:uncancellable``): that rule can never cancel them. Reported while the function
    still declares the rule, for ``orphan_window`` after the latest such run."""
    declared: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for view in functions:
        hashes = set(view.served) | ({view.synced} if view.synced else set())
        declared[(view.app_id, view.function_id)] = {
            (rule.event, rule.match)
            for h in hashes
            if h in configs
            for rule in configs[h].cancel_on
            if rule.match is not None
        }
    findings = []
    for field, raw in sorted(recorded.items()):
        base, _, part = field.rpartition("#")
        if part != "last":
            continue
        name, event_name, path = [*base.split("|"), "", ""][:3]
        app_id, _, function_id = name.partition("/")
        try:
            last = msgspec.json.decode(raw, type=UnreachableLast)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if now - last.at > windows.orphan_window_s * 1000:
            continue
        if (event_name, path) not in declared.get((app_id, function_id), set()):
            continue  # the function no longer declares the rule: a deploy fixed it
        runs = int(recorded.get(f"{base}#runs", "0") or 0)
        keys = ", ".join(last.keys) if last.keys else "none"
        hint = f"; did you mean {last.suggestion}?" if last.suggestion else ""
        findings.append(
            Finding(
                kind="uncancellable_run",
                app_id=app_id,
                function_id=function_id,
                event_name=event_name,
                message=f"{name}: {runs} run(s) registered with no value at {path} in their"
                f" trigger (the keys there: {keys}), so its rule on {event_name} can never"
                f" cancel them{hint}",
                details={
                    "runs": runs,
                    "rule": f"{event_name} match {path}",
                    "path": path,
                    "last_run_id": last.run_id,
                    "last_at": last.at,
                    "trigger_keys": last.keys,
                    "suggestion": last.suggestion,
                },
            )
        )
    return findings
