"""Run state in Redis: registration, cancel requests and outcomes.

Every change of a run's status happens in one of three Lua scripts (``sdk/lua``), so
each transition is atomic and terminal states are final whoever races whom.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from importlib import resources
from typing import Final, Literal, cast

import msgspec
from redis.asyncio import Redis

from sdk.keys import Keys
from sdk.rules import IndexEntry
from sdk.wire import (
    CancelOutcome,
    CancelResult,
    Event,
    RunInfo,
    RunStatus,
    decode_run,
    encode_json,
    encode_stored_event,
)

#: How long a finished run's record stays readable (``Client.get_run``).
DEFAULT_RETENTION: Final = timedelta(days=1)
#: Approximate cap on a worker's signal stream; signals are read within milliseconds.
SIGNAL_STREAM_MAXLEN: Final = 10_000

Outcome = Literal["completed", "cancelled", "failed", "lost"]


def _script(name: str) -> str:
    return (resources.files("sdk") / "lua" / name).read_text()


ScriptArg = str | int


def _pairs(fields: Mapping[str, str | None]) -> list[ScriptArg]:
    return [item for key, value in fields.items() if value is not None for item in (key, value)]


class RunStore:
    """Reads and writes run records under one namespace."""

    def __init__(self, redis: Redis, keys: Keys, *, retention: timedelta = DEFAULT_RETENTION):
        self.redis = redis
        self.keys = keys
        self.retention_s = max(1, int(retention.total_seconds()))
        self._register = redis.register_script(_script("register_run.lua"))
        self._finish = redis.register_script(_script("finish_run.lua"))
        self._request_cancel = redis.register_script(_script("request_cancel.lua"))
        self._resend = redis.register_script(_script("resend_signals.lua"))

    async def register(
        self,
        *,
        run_id: str,
        app_id: str,
        function_id: str,
        config_hash: str,
        worker_id: str,
        event: Event,
        entries: Sequence[IndexEntry],
    ) -> str:
        """Register a running run. Returns ``registered`` or the status of the existing run."""
        fields = {
            "run_id": run_id,
            "app_id": app_id,
            "function_id": function_id,
            "config_hash": config_hash,
            "worker_id": worker_id,
            "event_id": event.id,
            "event": encode_stored_event(event).decode(),
            # Where the run waits in the index, so whoever reaps it can clean up after it.
            "index": encode_json([[e.key, e.listeners_key, e.path] for e in entries]).decode(),
        }
        keys = [
            self.keys.run(run_id),
            self.keys.active_runs,
            self.keys.event_runs(event.id),
            self.keys.run_configs(app_id),
            self.keys.worker_runs(worker_id),
            *(e.key for e in entries),
            *(e.listeners_key for e in entries),
        ]
        args: list[ScriptArg] = [
            run_id,
            f"{function_id}:{config_hash}",
            worker_id,
            len(entries),
            *(e.path for e in entries),
            self.retention_s,
            *_pairs(fields),
        ]
        return str(await self._register(keys=keys, args=args))

    async def finish(
        self,
        run_id: str,
        outcome: Outcome,
        entries: Sequence[IndexEntry],
        *,
        app_id: str,
        worker_id: str,
        error: str | None = None,
        cancel_reason: str | None = None,
        abandoned_thread: bool = False,
        on_cancel_error: str | None = None,
    ) -> str | None:
        """Record the run's outcome; returns its previous status (None if unknown).

        A run already in a terminal state keeps it: the returned status tells.
        """
        keys = [
            self.keys.run(run_id),
            self.keys.active_runs,
            self.keys.run_configs(app_id),
            self.keys.worker_runs(worker_id),
            self.keys.cancelling_runs,
            *(e.key for e in entries),
            *(e.listeners_key for e in entries),
        ]
        extra = _pairs(
            {
                "error": error,
                "cancel_reason": cancel_reason,
                "abandoned_thread": "1" if abandoned_thread else None,
                "on_cancel_error": on_cancel_error,
            }
        )
        args: list[ScriptArg] = [
            run_id,
            outcome,
            self.retention_s,
            len(entries),
            *(e.path for e in entries),
            *extra,
        ]
        previous = await self._finish(keys=keys, args=args)
        return None if previous is None else str(previous)

    async def request_cancel(
        self,
        *,
        index_keys: Iterable[str] = (),
        run_ids: Iterable[str] = (),
        event_id: str = "",
        reason: str = "",
        cancelled_by: str,
    ) -> list[CancelResult]:
        """Move matching running runs to ``cancelling`` and signal their workers."""
        args: list[ScriptArg] = [
            self.keys.run_prefix,
            self.keys.signal_prefix,
            event_id,
            reason,
            cancelled_by,
            SIGNAL_STREAM_MAXLEN,
            self.keys.cancelling_runs,
            *run_ids,
        ]
        flat = await self._request_cancel(keys=list(index_keys), args=args)
        return [
            CancelResult(
                run_id=flat[i],
                outcome=cast(CancelOutcome, flat[i + 1]),
                status=cast(RunStatus, flat[i + 2]) or None,
            )
            for i in range(0, len(flat), 3)
        ]

    async def acknowledge_signals(
        self, run_ids: Iterable[str], *, worker_id: str, read_up_to: str
    ) -> None:
        """A worker read its signals up to ``read_up_to`` and cancelled ``run_ids``.

        Their signals are no longer re-sent, and the read entries leave the worker's signal
        stream: Redis keeps only the signals not yet read.
        """
        ordered = list(run_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            if ordered:
                pipe.zrem(self.keys.cancelling_runs, *ordered)
            pipe.xtrim(self.keys.signals(worker_id), minid=read_up_to, approximate=True)
            await pipe.execute()

    async def resend_signals(self, *, after_ms: int, limit: int = 1_000) -> list[str]:
        """Re-send cancel signals unacknowledged for ``after_ms``; returns those run ids."""
        resent = await self._resend(
            keys=[self.keys.cancelling_runs],
            args=[
                self.keys.run_prefix,
                self.keys.signal_prefix,
                after_ms,
                limit,
                SIGNAL_STREAM_MAXLEN,
            ],
        )
        return [str(run_id) for run_id in resent]

    async def status(self, run_id: str) -> tuple[str | None, str | None]:
        """The run's status and cancel reason, read in one round trip."""
        reply = await self.redis.hmget(self.keys.run(run_id), "status", "cancel_reason")
        status, reason = cast(list[str | None], reply)
        return status, reason

    async def reap(self, run_id: str, *, worker_id: str, error: str) -> str | None:
        """Record a run whose worker died as ``lost`` and take it out of the index."""
        fields = cast(dict[str, str], await self.redis.hgetall(self.keys.run(run_id)))
        if not fields:
            await self.redis.srem(self.keys.worker_runs(worker_id), run_id)
            return None
        entries = [
            IndexEntry(event_name="", path=path, key=key, listeners_key=listeners)
            for key, listeners, path in msgspec.json.decode(fields.get("index", "[]"))
        ]
        return await self.finish(
            run_id, "lost", entries, app_id=fields["app_id"], worker_id=worker_id, error=error
        )

    async def listened_paths(self, event_name: str) -> list[str]:
        """Match paths that rules of active runs listen on for this event name."""
        # The clients decode responses, so every reply string is a str.
        return cast(list[str], await self.redis.hkeys(self.keys.listeners(event_name)))

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
