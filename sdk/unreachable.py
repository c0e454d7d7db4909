"""Runs that no rule can ever cancel, said out loud.

A rule ``CancelOn(event=..., match="data.reportId")`` indexes a run under its trigger's
value at ``data.reportId``. A trigger without one (``report_id`` instead) is indexed under
nothing: no cancel event will ever match the run by that rule, and nothing used to say
so. The worker now logs it when such a run registers (``run.uncancellable``, at most once
a minute per function and rule, with how many since) and records it in
``{ns}:uncancellable``, from which the broker reports the finding ``uncancellable_run``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from sdk.connection import REDIS_ERRORS, RedisClient
from sdk.keys import Keys, uncancellable_field
from sdk.rules import Unreachable
from sdk.wire import encode_json

#: Seconds between two warnings about the same function and rule, in one process.
LOG_EVERY_S: Final = 60.0


class UnreachableLast(msgspec.Struct, frozen=True, kw_only=True):
    """The latest run registered with no value at a rule's path (``...#last``)."""

    at: int
    run_id: str
    #: The trigger's keys where the path found none.
    keys: list[str]
    suggestion: str | None = None


class UnreachableRuns:
    """One worker's record of runs registered out of their rules' reach."""

    def __init__(self, app_id: str, keys: Keys, log: Any) -> None:
        self.app_id = app_id
        self.keys = keys
        self._log = log
        #: field -> (runs since the last write, the latest run)
        self._pending: dict[str, tuple[int, UnreachableLast]] = {}
        #: field -> (when last logged, runs since)
        self._logged: dict[str, tuple[float, int]] = {}

    def note(self, function_id: str, run_id: str, unreachable: Sequence[Unreachable]) -> None:
        """A run registers with these rules out of reach: log (rate-limited), and keep it
        for :meth:`flush`."""
        now = time.monotonic()
        for item in unreachable:
            rule = item.rule
            assert rule.match is not None
            field = uncancellable_field(self.app_id, function_id, rule.event, rule.match)
            last = UnreachableLast(
                at=int(time.time() * 1000),
                run_id=run_id,
                keys=list(item.keys),
                suggestion=item.suggestion,
            )
            runs, _ = self._pending.get(field, (0, last))
            self._pending[field] = (runs + 1, last)
            logged_at, since = self._logged.get(field, (0.0, 0))
            if logged_at and now - logged_at < LOG_EVERY_S:
                self._logged[field] = (logged_at, since + 1)
                continue
            self._logged[field] = (now, 0)
            self._log.warning(
                "run.uncancellable",
                run_id=run_id,
                function_id=function_id,
                rule=f"{rule.event} match {rule.match}",
                trigger_keys=list(item.keys),
                suggestion=item.suggestion,
                more_since_last_warning=since,
                reason=f"the trigger has no value at {rule.match}, so no {rule.event} event"
                " can ever cancel this run by that rule",
            )

    async def flush(self, redis: RedisClient) -> None:
        """Record what was noted in ``{ns}:uncancellable`` (one round trip; an error leaves
        it for the next flush)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for field, (runs, last) in pending.items():
                    pipe.hincrby(self.keys.uncancellable, f"{field}#runs", runs)
                    pipe.hset(self.keys.uncancellable, f"{field}#last", encode_json(last))
                await pipe.execute()
        except REDIS_ERRORS as exc:
            for field, (runs, last) in pending.items():
                more, newer = self._pending.get(field, (0, last))
                self._pending[field] = (runs + more, newer)
            self._log.debug("run.uncancellable_unrecorded", error=repr(exc))
