"""Run state in Redis: registration, cancel requests, outcomes, and the reads of runs.

Every change of a run's status is a Lua script, called through ``sdk/scripts.py``; what
this module adds is which partition's keys, and the records a script needs read first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, Final, cast

import msgspec
import structlog

from sdk.connection import RedisClient
from sdk.keys import Keys
from sdk.scripts import (
    PENDING_CANCELS_KEPT,
    CancelRequest,
    Finished,
    Outcome,
    RegisterRequest,
    RunEnd,
    RunRegistration,
    finish_run,
    register_run,
    register_runs,
    request_cancels,
)
from sdk.scripts import acknowledge_signals as acknowledge_signals_script
from sdk.wire import BulkCancel, CancelResult, RunInfo, decode_run, encode_json

#: How long a finished run's record stays readable (``Client.get_run``).
DEFAULT_RETENTION: Final = timedelta(days=1)

#: Most bulk cancels kept per function for runs not registered yet.
BULK_CANCELS_KEPT: Final = 100

log = structlog.get_logger("sdk.store")


class RunStore:
    """Reads and writes run records in one partition of one namespace."""

    def __init__(self, redis: RedisClient, keys: Keys, *, retention: timedelta = DEFAULT_RETENTION):
        self.redis = redis
        self.keys = keys
        self.retention_s = max(1, int(retention.total_seconds()))

    async def register(self, request: RegisterRequest) -> RunRegistration:
        """Register a running run (cancelled at once if a tombstone or its parent says so)."""
        return await register_run(self.redis, self.keys, request, retention_s=self.retention_s)

    async def register_many(
        self, requests: Sequence[RegisterRequest]
    ) -> list[RunRegistration | Exception]:
        """Register several runs in one round trip (a worker's batch of triggers).

        Each gets its registration or the error its script raised; a connection error
        fails them all.
        """
        return await register_runs(self.redis, self.keys, requests, retention_s=self.retention_s)

    async def finish(
        self,
        run_id: str,
        outcome: Outcome,
        index_keys: Sequence[str],
        *,
        app_id: str,
        function_id: str,
        worker_id: str,
        error: str | None = None,
        cancel_reason: str | None = None,
        stopped_ago_ms: float | None = None,
        abandoned_thread: bool = False,
        escalated: bool = False,
        terminated: bool = False,
        on_cancel_error: str | None = None,
        continued_by: str | None = None,
    ) -> Finished:
        """Record the run's outcome.

        A run already in a terminal state keeps it: the returned previous status tells.
        ``stopped_ago_ms``: how long ago the body stopped (for the cancel latency).
        ``continued_by``: the run that continues this one (a retry): a cancel by this
        run's id reaches it.
        """
        fields = {
            "error": error,
            "cancel_reason": cancel_reason,
            "abandoned_thread": "1" if abandoned_thread else None,
            "escalated": "1" if escalated else None,
            "terminated": "1" if terminated else None,
            "on_cancel_error": on_cancel_error,
            "continued_by": continued_by,
        }
        end = RunEnd(
            run_id, outcome, index_keys, app_id, function_id, worker_id, stopped_ago_ms, fields
        )
        return await finish_run(self.redis, self.keys, end, retention_s=self.retention_s)

    async def request_cancel(
        self, run_ids: Iterable[str], request: CancelRequest
    ) -> list[CancelResult]:
        """Move these runs, if running, to ``cancelling`` and signal their workers (see
        :class:`~sdk.scripts.CancelRequest` for what else a request says)."""
        (done,) = await request_cancels(self.redis, [(self.keys, list(run_ids), request)])
        self._log_dropped(done.dropped)
        return done.results

    def _log_dropped(self, dropped: int) -> None:
        if dropped:
            log.warning(
                "cancel.pending_dropped",
                partition=self.keys.partition,
                dropped=dropped,
                kept=PENDING_CANCELS_KEPT,
            )

    async def keep_bulk_cancel(self, bulk: BulkCancel, *, keep_ms: int) -> None:
        """Keep a bulk cancel of ``bulk.function_id`` for ``keep_ms``, for the runs of it
        that register later (register_run.lua)."""
        key = self.keys.bulk_cancels(bulk.function_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {encode_json(bulk).decode(): bulk.at + keep_ms})
            pipe.zremrangebyscore(key, "-inf", bulk.at)
            pipe.zremrangebyrank(key, 0, -(BULK_CANCELS_KEPT + 1))
            pipe.pexpire(key, keep_ms)
            await pipe.execute()

    async def acknowledge_signals(
        self, signals: Sequence[tuple[str, int]], *, worker_id: str, read_up_to: str
    ) -> list[float]:
        """A worker read its signals up to ``read_up_to`` and acted on ``signals``
        (run id, ``sent_at`` ms).

        Their signals are no longer re-sent, the read entries leave the worker's signal
        stream (Redis keeps only the signals not yet read), and their delivery is counted.
        Returns each signal's delivery time in seconds, measured on the Redis clock.
        """
        return await acknowledge_signals_script(
            self.redis, self.keys, signals, worker_id=worker_id, read_up_to=read_up_to
        )

    async def status(self, run_id: str) -> tuple[str | None, str | None]:
        """The run's status and cancel reason, read in one round trip."""
        reply = await self.redis.hmget(self.keys.run(run_id), "status", "cancel_reason")
        status, reason = cast(list[str | None], reply)
        return status, reason

    async def record_lost(self, run_id: str, *, worker_id: str, error: str) -> Finished:
        """Record a run whose worker is gone (dead, or restarted without it) as ``lost``,
        and take it out of the index."""
        return await self._finish_from_record(run_id, "lost", worker_id=worker_id, error=error)

    async def record_terminated(self, run_id: str, *, worker_id: str) -> Finished:
        """A cancelled run whose process was terminated after its grace (Celery's prefork
        pool): ``cancelled`` with ``terminated``. A run its worker already recorded
        (``cancelled`` with ``abandoned_thread``, the body running on) is marked
        ``terminated``; another outcome is left as it is."""
        record = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        status = record.get("status")
        if status == "cancelled":
            await self.redis.hset(self.keys.run(run_id), "terminated", "1")
            return Finished(status)
        if status != "cancelling":
            return Finished(status)
        return await self._finish_from_record(
            run_id, "cancelled", worker_id=worker_id, record=record, terminated=True
        )

    async def _finish_from_record(
        self,
        run_id: str,
        outcome: Outcome,
        *,
        worker_id: str,
        record: dict[str, str] | None = None,
        **fields: Any,
    ) -> Finished:
        """Record an outcome for a run whose worker is gone: what ``finish`` needs is
        read from the run's record (``record``, when the caller has just read it)."""
        if record is None:
            record = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        if not record:
            await self.redis.srem(self.keys.worker_runs(worker_id), run_id)
            return Finished(None)
        index_keys = msgspec.json.decode(record.get("index", "[]"), type=list[str])
        return await self.finish(
            run_id,
            outcome,
            index_keys,
            app_id=record["app_id"],
            function_id=record["function_id"],
            worker_id=worker_id,
            cancel_reason=record.get("cancel_reason") if outcome == "cancelled" else None,
            stopped_ago_ms=0 if outcome == "cancelled" else None,
            **fields,
        )

    async def get(self, run_id: str) -> RunInfo | None:
        fields = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        return decode_run(fields) if fields else None

    async def runs_for_event(self, event_id: str) -> list[RunInfo]:
        members = cast(set[str], await self.redis.smembers(self.keys.event_runs(event_id)))
        run_ids = sorted(members)
        if not run_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hgetall(self.keys.run(run_id))
            records = cast(list[dict[str, str]], await pipe.execute())
        return [decode_run(fields) for fields in records if fields]


async def request_cancel_everywhere(
    stores: Sequence[RunStore], run_id: str, request: CancelRequest
) -> list[CancelResult]:
    """:meth:`RunStore.request_cancel` of one run id in every partition (one store each), in
    one round trip: for a run that is in none of them yet, and will register in one (each
    script, atomic in its partition, either finds it there or keeps the cancel for it)."""
    done = await request_cancels(
        stores[0].redis, [(store.keys, [run_id], request) for store in stores]
    )
    results = []
    for store, cancelled in zip(stores, done, strict=True):
        store._log_dropped(cancelled.dropped)
        results += cancelled.results
    return results
