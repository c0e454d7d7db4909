"""Keeping run state and streams honest while the broker runs.

- **Reaping**: a worker whose heartbeat is older than ``LIVE_INTERVALS`` intervals is gone;
  each of its runs is recorded ``lost`` (never silence) and leaves the index, and the
  worker's registration and signal stream are deleted.
- **Re-sending**: a cancel signal no worker acknowledged within ``RESEND_AFTER_MS`` is sent
  again, until the run finishes or its worker is reaped (delivery is at least once).
- **Trimming**: events every consumer group has acknowledged, and older than the trigger
  lookback, are trimmed from the stream.
- **Expiring kept cancels**: a cancel by id kept for a run that never registered within
  its lookback is removed and reported (a warning naming the run ids, and a counter): it
  cancelled nothing, and says so.

Every loop survives anything Redis answers; several brokers doing the same work is
harmless, as each step is idempotent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Final, cast

import anyio
import msgspec

from broker.metrics import BrokerMetrics
from broker.scripts import resend_signals
from sdk.connection import REDIS_ERRORS, is_transient, redis_now_ms
from sdk.registration import DEFAULT_HEARTBEAT_INTERVAL, LIVE_INTERVALS, deregister
from sdk.store import RunStore
from sdk.streams import trim_acknowledged
from sdk.wire import decode_worker

#: A cancel signal unacknowledged this long is sent again.
RESEND_AFTER_MS: Final = 2_000
RESEND_INTERVAL_S: Final = 0.5
TRIM_INTERVAL_S: Final = 60.0
EXPIRE_INTERVAL_S: Final = 5.0
#: Kept cancels removed per partition and round (the next round takes the rest).
EXPIRE_BATCH: Final = 1_000
#: Bounds of the reaper's sleep, which follows the shortest heartbeat interval it sees.
REAP_SLEEP_S: Final = (0.05, 1.0)


class Housekeeping:
    def __init__(
        self, stores: Sequence[RunStore], metrics: BrokerMetrics, log: Any, *, keep_ms: int = 0
    ) -> None:
        #: One run store per partition: every step goes over all of them.
        self.stores = tuple(stores)
        self.keys = self.stores[0].keys
        self.redis = self.stores[0].redis
        self.metrics = metrics
        #: The events streams keep this long of what every group has read (the trigger
        #: lookback: a function's first worker reads that far back).
        self.keep_ms = keep_ms
        self._log = log
        # During a Redis outage nobody can heartbeat: silence is counted from the moment
        # Redis answered again, not from the last heartbeat before the outage.
        self._outage = False
        self._reachable_since = 0

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._forever, self.reap_once, "reap")
            tg.start_soon(self._forever, self.resend_once, "resend")
            tg.start_soon(self._forever, self.trim_once, "trim")
            tg.start_soon(self._forever, self.expire_pending_once, "expire")

    async def _forever(self, step: Any, name: str) -> None:
        while True:
            try:
                pause = await step()
            except Exception as exc:  # housekeeping must never stop the broker
                if isinstance(exc, REDIS_ERRORS):
                    self.metrics.redis_errors.inc()
                self._log.warning("housekeeping.failed", step=name, error=repr(exc))
                pause = 1.0
            await anyio.sleep(pause)

    async def reap_once(self) -> float:
        """Record the runs of workers that stopped heartbeating as lost; returns the pause.

        An outage, or Redis refusing writes (OOM, READONLY: no worker can write its
        heartbeat either), restarts the count of silence once Redis answers again."""
        try:
            return await self._reap_silent()
        except REDIS_ERRORS as exc:
            if is_transient(exc):
                self._outage = True
            raise

    async def _reap_silent(self) -> float:
        now = await redis_now_ms(self.redis)
        if self._outage:
            self._outage, self._reachable_since = False, now
        workers = cast(
            list[tuple[str, float]],
            await self.redis.zrange(self.keys.workers, 0, -1, withscores=True),
        )
        if not workers:
            return REAP_SLEEP_S[1]
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id, _score in workers:
                pipe.hmget(self.keys.worker(worker_id), "info", "heartbeat_at")
            records = cast(list[list[str | None]], await pipe.execute())
        shortest = DEFAULT_HEARTBEAT_INTERVAL
        for (worker_id, score), (info, heartbeat_at) in zip(workers, records, strict=True):
            interval = DEFAULT_HEARTBEAT_INTERVAL
            if info:
                with contextlib.suppress(msgspec.DecodeError):
                    interval = decode_worker(info).heartbeat_interval_s
            shortest = min(shortest, interval)
            last = max(int(heartbeat_at) if heartbeat_at else int(score), self._reachable_since)
            if now - last > LIVE_INTERVALS * interval * 1000:
                await self._reap(worker_id, silent_ms=now - last)
        return min(max(shortest / 10, REAP_SLEEP_S[0]), REAP_SLEEP_S[1])

    async def _reap(self, worker_id: str, *, silent_ms: int) -> None:
        error = f"worker {worker_id} stopped heartbeating {silent_ms / 1000:.1f} s ago"
        lost = 0
        for store in self.stores:
            keys = store.keys
            run_ids = cast(set[str], await self.redis.smembers(keys.worker_runs(worker_id)))
            for run_id in sorted(run_ids):
                finished = await store.record_lost(run_id, worker_id=worker_id, error=error)
                if finished.previous in ("running", "cancelling"):
                    lost += 1
            # One slot per transaction: each partition's keys, then the worker's record.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.worker_runs(worker_id), keys.signals(worker_id))
                await pipe.execute()
        async with self.redis.pipeline(transaction=True) as pipe:
            deregister(pipe, self.keys, worker_id)
            await pipe.execute()
        self.metrics.runs_lost.inc(lost)
        self.metrics.workers_lost.inc()
        self._log.warning("worker.lost", worker_id=worker_id, runs_lost=lost, silent_ms=silent_ms)

    async def resend_once(self) -> float:
        resent = [
            run_id
            for store in self.stores
            for run_id in await resend_signals(store.redis, store.keys, after_ms=RESEND_AFTER_MS)
        ]
        if resent:
            self.metrics.signals_resent.inc(len(resent))
            self._log.warning("signals.resent", runs=len(resent), sample=resent[:5])
        return RESEND_INTERVAL_S

    async def expire_pending_once(self) -> float:
        """Remove and report the cancels by id whose run never registered in time."""
        now = await redis_now_ms(self.redis)
        expired: set[str] = set()
        for store in self.stores:
            keys = store.keys
            run_ids = cast(
                list[str],
                await self.redis.zrangebyscore(
                    keys.pending_cancel_deadlines, "-inf", now, start=0, num=EXPIRE_BATCH
                ),
            )
            if not run_ids:
                continue
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(keys.pending_cancels, *run_ids)
                pipe.zrem(keys.pending_cancel_deadlines, *run_ids)
                await pipe.execute()
            expired.update(run_ids)
        if len(self.stores) > 1 and expired:
            # Kept in every partition; a run that registered in one took only that copy.
            registered = await self._registered(sorted(expired))
            expired -= registered
        if expired:
            self.metrics.pending_cancels_expired.inc(len(expired))
            self._log.warning(
                "cancel.pending_expired",
                runs=len(expired),
                run_ids=sorted(expired)[:20],
                reason="a cancel by id was kept for each of these runs, and no run registered"
                " with the id within the pending-cancel lookback: it cancelled nothing",
            )
        return EXPIRE_INTERVAL_S

    async def _registered(self, run_ids: list[str]) -> set[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                for store in self.stores:
                    pipe.exists(store.keys.run(run_id))
            found = cast(list[int], await pipe.execute())
        width = len(self.stores)
        return {
            run_id for i, run_id in enumerate(run_ids) if any(found[i * width : (i + 1) * width])
        }

    async def trim_once(self) -> float:
        """Drop what every consumer group has acknowledged, from each consumed stream (the
        events streams keep the trigger lookback's worth)."""
        streams = [(self.keys.syncs, 0), *((s.keys.events, self.keep_ms) for s in self.stores)]
        for stream, keep_ms in streams:
            try:
                trimmed = await trim_acknowledged(self.redis, stream, keep_ms=keep_ms)
            except REDIS_ERRORS as exc:
                self._log.debug("stream.trim_failed", stream=stream, error=repr(exc))
            else:
                if trimmed:
                    self._log.debug("stream.trimmed", stream=stream, entries=trimmed)
        return TRIM_INTERVAL_S
