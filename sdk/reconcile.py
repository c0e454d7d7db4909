"""Making Redis agree again with the runs a worker process holds, after Redis lost writes.

A failover promotes a replica that may lag its primary: whatever the old primary
acknowledged in its last moments (a run's registration, its outcome, a cancel's signal)
can be missing on the new one. The worker notices that another server answers
(``sdk/server_watch.py``) and compares what Redis holds with what it runs:

- a run it holds whose record is gone is registered again, as it first was (a cancel
  kept for it, a tombstone, a bulk cancel apply as it registers);
- a run it holds whose record says ``cancelling`` is stopped (its signal was lost);
- a run Redis lists as this worker's whose body is gone has its outcome recorded again,
  as it was recorded (:class:`RecentOutcomes` keeps them a while), or, if it is older
  than that, recorded ``lost`` with the reason: no record stays ``running`` for ever and
  ``Client.wait`` returns.

Every step is idempotent (terminal states are final; a registration by the same worker
answers the same): reconciling when nothing was lost changes nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

import msgspec

from sdk.scripts import Outcome
from sdk.wire import TERMINAL_STATUSES

if TYPE_CHECKING:
    from sdk.runner import Runner

#: Outcomes kept to be recorded again: at most this many, for at most this long.
RECENT_OUTCOMES_KEPT: Final = 10_000
RECENT_OUTCOMES_S: Final = 600.0
GONE_REASON: Final = (
    "the worker no longer runs it and its outcome was lost with writes Redis did not keep"
    " (a failover to a replica that lagged, a restart from an old snapshot)"
)


class RecordedOutcome(msgspec.Struct, frozen=True, gc=False):
    """A run's end, as its worker records it (and records it again if Redis lost it).

    Not tracked by the garbage collector (``gc=False``: it holds strings, numbers and a
    tuple of strings, never a cycle): a busy worker remembers thousands, and every full
    collection would scan each of them.
    """

    run_id: str
    partition: int
    function_id: str
    outcome: Outcome
    index_keys: tuple[str, ...]
    error: str | None = None
    cancel_reason: str | None = None
    abandoned_thread: bool = False
    escalated: bool = False
    terminated: bool = False
    on_cancel_error: str | None = None
    continued_by: str | None = None


class RecentOutcomes:
    """The outcomes a worker process recorded lately, newest last, bounded in number and age."""

    def __init__(self, *, kept: int = RECENT_OUTCOMES_KEPT, for_s: float = RECENT_OUTCOMES_S):
        self._kept = kept
        self._for_s = for_s
        self._outcomes: OrderedDict[str, tuple[float, RecordedOutcome]] = OrderedDict()

    def remember(self, outcome: RecordedOutcome) -> None:
        now = time.monotonic()
        self._outcomes[outcome.run_id] = (now, outcome)
        self._outcomes.move_to_end(outcome.run_id)
        while self._outcomes and (
            len(self._outcomes) > self._kept
            or next(iter(self._outcomes.values()))[0] < now - self._for_s
        ):
            self._outcomes.popitem(last=False)

    def get(self, run_id: str) -> RecordedOutcome | None:
        entry = self._outcomes.get(run_id)
        return None if entry is None or entry[0] < time.monotonic() - self._for_s else entry[1]

    def __len__(self) -> int:
        return len(self._outcomes)


@dataclass(slots=True)
class Reconciled:
    """What one reconciliation changed."""

    registered_again: int = 0
    stopped: int = 0
    recorded_again: int = 0
    recorded_lost: int = 0

    @property
    def changed(self) -> bool:
        return any((self.registered_again, self.stopped, self.recorded_again, self.recorded_lost))


async def reconcile(runner: Runner) -> Reconciled:
    """Compare, partition by partition, the runs ``runner`` holds with what Redis holds of
    them, and repair what Redis lost (see the module's docstring)."""
    done = Reconciled()
    for partition, store in enumerate(runner.stores):
        # Listed before the held runs are read: a run admitted meanwhile is held, and one
        # that finished meanwhile has its outcome among the recent ones.
        listed = cast(
            set[str], await store.redis.smembers(store.keys.worker_runs(runner.worker_id))
        )
        held = runner.held(partition)
        async with store.redis.pipeline(transaction=False) as pipe:
            for run in held:
                pipe.hmget(store.keys.run(run.run_id), "status", "cancel_reason")
            records = cast(list[list[str | None]], await pipe.execute())
        missing = []
        for run, (status, reason) in zip(held, records, strict=True):
            if status is None:
                missing.append(run)
            elif status == "cancelling" and not run.state.cancelled:
                runner.log.warning("run.cancel_seen_on_reconcile", run_id=run.run_id)
                run.state.receive(reason or "cancelled")
                done.stopped += 1
        if missing:
            done.registered_again += await runner.register_again(missing)
        for run_id in sorted(listed - runner.held_ids()):
            outcome = runner.recent.get(run_id)
            if outcome is not None:
                finished = await runner.write_outcome(outcome)
                done.recorded_again += finished.previous not in (None, *TERMINAL_STATUSES)
                continue
            finished = await store.record_lost(
                run_id, worker_id=runner.worker_id, error=GONE_REASON
            )
            if finished.previous not in (None, *TERMINAL_STATUSES):
                runner.log.error("run.recorded_lost_on_reconcile", run_id=run_id, error=GONE_REASON)
                done.recorded_lost += 1
    return done
