"""The broker's record of sync and registration state.

- :class:`SyncRecorder` consumes the sync notices workers post when they start and keeps
  each app's bounded history: every sync, with what it added, removed and changed.
- :class:`EventWatch` notes, for the events the broker consumes, when each watched name
  was last published and how many cancel-like events arrived that no live rule listens to.
- :class:`SyncMonitor` recomputes the findings periodically, sets the gauges, logs each
  new finding once (and its resolution), and tidies registrations that expired.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Final, cast

import anyio
import msgspec

from broker.findings import (
    FINDING_KINDS,
    Finding,
    SyncState,
    Windows,
    config_changes,
    is_cancel_like,
)
from broker.metrics import BrokerMetrics
from broker.sync_state import collect_state, load_configs
from sdk.connection import REDIS_ERRORS, RedisClient, RedisPipeline
from sdk.keys import Keys
from sdk.streams import Entry
from sdk.wire import SYSTEM_EVENT_PREFIX, Event, decode_worker, encode_json

#: Syncs kept per app.
HISTORY_MAXLEN: Final = 100
#: Most distinct orphan event names tracked (event names are user input).
MAX_ORPHAN_NAMES: Final = 1_000


class SyncRecorder:
    """Turns sync notices into per-app history entries (the last ``history_length``)."""

    def __init__(
        self, redis: RedisClient, keys: Keys, log: Any, *, history_length: int = HISTORY_MAXLEN
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.history_length = history_length
        self._log = log

    async def record(self, entries: Sequence[Entry]) -> None:
        for entry_id, fields in entries:
            try:
                info = decode_worker((fields or {})["worker"])
            except (KeyError, msgspec.ValidationError, msgspec.DecodeError) as exc:
                self._log.warning("sync.malformed_notice", entry_id=entry_id, error=str(exc))
                continue
            before = cast(
                dict[str, str], await self.redis.hgetall(self.keys.app_functions(info.app_id))
            )
            after = info.functions
            changed_ids = sorted(f for f in set(before) & set(after) if before[f] != after[f])
            configs = await load_configs(
                self.redis,
                self.keys,
                {before[f] for f in changed_ids} | {after[f] for f in changed_ids},
            )
            changed = {
                f: {
                    "from": before[f],
                    "to": after[f],
                    **config_changes(configs.get(before[f]), configs.get(after[f])),
                }
                for f in changed_ids
            }
            added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self.keys.app_history(info.app_id),
                    {
                        "at": info.started_at,
                        "worker_id": info.worker_id,
                        "app_version": info.app_version or "",
                        "sdk_version": info.sdk_version,
                        "added": encode_json(added),
                        "removed": encode_json(removed),
                        "changed": encode_json(changed),
                    },
                    maxlen=self.history_length,
                    approximate=False,
                )
                pipe.delete(self.keys.app_functions(info.app_id))
                if after:
                    functions: dict[Any, Any] = dict(after)  # redis-py's mapping type is invariant
                    pipe.hset(self.keys.app_functions(info.app_id), mapping=functions)
                await pipe.execute()
            if added or removed or changed:
                self._log.info(
                    "sync.changed",
                    app_id=info.app_id,
                    worker_id=info.worker_id,
                    app_version=info.app_version,
                    added=added,
                    removed=removed,
                    changed=changed,
                )


class _NameCounts:
    """Events counted by name, the names capped (event names are user input)."""

    def __init__(self, what: str, log: Any) -> None:
        self.what = what
        self.names: set[str] = set()
        self.counts: Counter[str] = Counter()
        self._log = log
        self._capped = False

    def add(self, name: str) -> None:
        if name in self.names or len(self.names) < MAX_ORPHAN_NAMES:
            self.names.add(name)
            self.counts[name] += 1
        elif not self._capped:
            self._capped = True
            self._log.warning(f"sync.{self.what}_names_capped", limit=MAX_ORPHAN_NAMES)

    def take(self) -> Counter[str]:
        counts, self.counts = self.counts, Counter()
        return counts


class EventWatch:
    """What the broker notices about event names while it consumes events."""

    def __init__(self, keys: Keys, cancel_event_names: frozenset[str], log: Any) -> None:
        self.keys = keys
        self.cancel_event_names = cancel_event_names
        #: Event names live rules listen to (refreshed by the monitor and on every sync).
        self.rule_events: frozenset[str] = frozenset()
        #: Triggers of the functions apps declare (refreshed likewise).
        self.trigger_events: frozenset[str] = frozenset()
        #: False until the first refresh: until then nothing is known to be unserved.
        self.ready = False
        self._last_seen: dict[str, int] = {}
        self._orphans = _NameCounts("orphan", log)
        self._unserved = _NameCounts("unserved", log)

    def unserved(self, name: str) -> bool:
        """An event no declared function triggers on and no live rule listens to, and that
        does not look like a cancel (those are orphans) nor is cancel-broker's own: nothing
        will run or cancel because of it (a misspelt trigger, a function never deployed)."""
        return (
            self.ready
            and name not in self.trigger_events
            and name not in self.rule_events
            and not name.startswith(SYSTEM_EVENT_PREFIX)
            and not is_cancel_like(name, self.cancel_event_names)
        )

    def observe(self, event: Event) -> None:
        """Note one consumed event.

        An orphan is a cancel-like event no *live* rule listens to. Selectors declared by
        workers that are gone linger in Redis, so whether the broker found selectors says
        nothing here. A rule (or a function) a worker declared moments ago may not be in
        ``rule_events`` (``trigger_events``) yet: the count it adds is forgotten at the next
        scan (``SyncMonitor._tidy``).
        """
        cancel_like = is_cancel_like(event.name, self.cancel_event_names)
        unserved = self.unserved(event.name)
        if not cancel_like and not unserved and event.name not in self.rule_events:
            return
        self._last_seen[event.name] = max(event.ts, self._last_seen.get(event.name, 0))
        if cancel_like and event.name not in self.rule_events:
            self._orphans.add(event.name)
        elif unserved:
            self._unserved.add(event.name)

    def queue(self, pipe: RedisPipeline) -> None:
        """Add to ``pipe`` what was noticed since the last call (sent once per batch)."""
        last_seen: dict[Any, Any] = self._last_seen
        self._last_seen = {}
        if last_seen:
            pipe.hset(self.keys.event_last_seen, mapping=last_seen)
        for name, count in self._orphans.take().items():
            pipe.hincrby(self.keys.orphan_events, name, count)
        for name, count in self._unserved.take().items():
            pipe.hincrby(self.keys.unserved_events, name, count)

    def refresh(self, state: SyncState, orphan_names: set[str], unserved_names: set[str]) -> None:
        self.rule_events = state.listened_events
        self.trigger_events = state.declared_triggers
        self._orphans.names = orphan_names
        self._unserved.names = unserved_names
        self.ready = True


def _who(finding: Finding) -> dict[str, str | None]:
    return {
        "kind": finding.kind,
        "app_id": finding.app_id,
        "function_id": finding.function_id,
        "event_name": finding.event_name,
    }


class SyncMonitor:
    """Recomputes the findings, keeps the gauges, logs each new finding once."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        watch: EventWatch,
        metrics: BrokerMetrics,
        windows: Windows,
        log: Any,
        *,
        trigger_lookback_s: float | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.watch = watch
        self.windows = windows
        self.trigger_lookback_s = trigger_lookback_s
        self._log = log
        self._known: dict[tuple[str, str | None, str | None, str | None], Finding] = {}
        self._wake = anyio.Event()
        self.findings_gauge = metrics.stale_findings
        self.workers_gauge = metrics.live_workers

    def wake(self) -> None:
        """Recompute now (a worker synced)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.scan()
            except REDIS_ERRORS as exc:  # the event loop reports outages; try next round
                self._log.debug("sync.scan_failed", error=repr(exc))
            with anyio.move_on_after(self.windows.rescan_s):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def scan(self) -> SyncState:
        state = await collect_state(
            self.redis,
            self.keys,
            windows=self.windows,
            trigger_lookback_s=self.trigger_lookback_s,
        )
        await self._tidy(state)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hkeys(self.keys.orphan_events)
            pipe.hkeys(self.keys.unserved_events)
            orphans, unserved = cast(list[list[str]], await pipe.execute())
        self.watch.refresh(state, set(orphans), set(unserved))
        self.workers_gauge.set(len(state.workers))
        by_kind = Counter(f.kind for f in state.findings)
        for kind in FINDING_KINDS:
            self.findings_gauge.labels(kind=kind).set(by_kind[kind])
        current = {f.key: f for f in state.findings}
        for key, finding in current.items():
            if key not in self._known:
                self._log.warning(
                    "sync.stale", message=finding.message, details=finding.details, **_who(finding)
                )
        for key, finding in self._known.items():
            if key not in current:
                self._log.info("sync.resolved", **_who(finding))
        self._known = current
        return state

    async def _tidy(self, state: SyncState) -> None:
        """Forget orphan counts once a live rule listens to the name, and unserved counts
        once a function triggers on it (or a rule listens to it).

        (Workers that went silent are removed by the reaper in broker/housekeeping.py.)
        """
        if state.listened_events:
            await self.redis.hdel(self.keys.orphan_events, *state.listened_events)
        served = state.listened_events | state.declared_triggers
        if served:
            await self.redis.hdel(self.keys.unserved_events, *served)
