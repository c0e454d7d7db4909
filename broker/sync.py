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
    collect_state,
    config_changes,
    is_cancel_like,
    load_configs,
)
from broker.metrics import BrokerMetrics
from sdk.connection import REDIS_ERRORS, RedisClient, RedisPipeline
from sdk.keys import Keys
from sdk.streams import Entry
from sdk.wire import Event, decode_worker, encode_json

#: Syncs kept per app.
HISTORY_MAXLEN: Final = 100
#: Most distinct orphan event names tracked (event names are user input).
MAX_ORPHAN_NAMES: Final = 1_000
SCAN_INTERVAL_S: Final = 5.0


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


class EventWatch:
    """What the broker notices about event names while it consumes events."""

    def __init__(self, keys: Keys, cancel_event_names: frozenset[str], log: Any) -> None:
        self.keys = keys
        self.cancel_event_names = cancel_event_names
        #: Event names live rules listen to (refreshed by the monitor and on every sync).
        self.rule_events: frozenset[str] = frozenset()
        self._orphan_names: set[str] = set()
        self._last_seen: dict[str, int] = {}
        self._orphans: Counter[str] = Counter()
        self._log = log
        self._capped = False

    def observe(self, event: Event) -> None:
        """Note one consumed event.

        An orphan is a cancel-like event no *live* rule listens to. Selectors declared by
        workers that are gone linger in Redis, so whether the broker found selectors says
        nothing here. A rule a worker declared moments ago may not be in ``rule_events``
        yet: the count it adds is forgotten at the next scan (``SyncMonitor._tidy``).
        """
        cancel_like = is_cancel_like(event.name, self.cancel_event_names)
        if not cancel_like and event.name not in self.rule_events:
            return
        self._last_seen[event.name] = max(event.ts, self._last_seen.get(event.name, 0))
        if cancel_like and event.name not in self.rule_events:
            if event.name in self._orphan_names or len(self._orphan_names) < MAX_ORPHAN_NAMES:
                self._orphan_names.add(event.name)
                self._orphans[event.name] += 1
            elif not self._capped:
                self._capped = True
                self._log.warning("sync.orphan_names_capped", limit=MAX_ORPHAN_NAMES)

    def queue(self, pipe: RedisPipeline) -> None:
        """Add to ``pipe`` what was noticed since the last call (sent once per batch)."""
        last_seen: dict[Any, Any] = self._last_seen
        orphans = self._orphans
        self._last_seen, self._orphans = {}, Counter()
        if last_seen:
            pipe.hset(self.keys.event_last_seen, mapping=last_seen)
        for name, count in orphans.items():
            pipe.hincrby(self.keys.orphan_events, name, count)

    def refresh(self, state: SyncState, orphan_names: set[str]) -> None:
        self.rule_events = state.listened_events
        self._orphan_names = orphan_names


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
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.watch = watch
        self.windows = windows
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
            with anyio.move_on_after(SCAN_INTERVAL_S):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def scan(self) -> SyncState:
        state = await collect_state(self.redis, self.keys, windows=self.windows)
        await self._tidy(state)
        orphans = cast(list[str], await self.redis.hkeys(self.keys.orphan_events))
        self.watch.refresh(state, set(orphans))
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
        """Forget orphan counts once a live rule listens to the name.

        (Workers that went silent are removed by the reaper in broker/housekeeping.py.)
        """
        if state.listened_events:
            await self.redis.hdel(self.keys.orphan_events, *state.listened_events)
