"""A worker's watch over its own event loop.

A body that blocks the loop (``time.sleep(3)`` in an ``async def``, a CPU-bound loop, a
blocking client) delays every cancel of the worker by as long, which is the body's doing;
but nothing said so, and the heartbeats it also delayed got the worker reaped, every run
it held recorded ``lost``. The watch:

- measures the loop's lag (a tick every ``TICK_S``: how late it comes) into the histogram
  ``cancel_broker_event_loop_lag_seconds``, and logs ``worker.loop_blocked`` for a lag of
  ``BLOCKED_S`` or more, naming the run and step that blocked (read off the loop
  thread's stack, by a watchdog thread, while it is blocked) and the code it was in;
- keeps the worker live while its loop is blocked but has ticked in the last
  ``MAX_BLOCKED_S``: the watchdog thread sends the heartbeats the loop cannot. A loop
  blocked longer than that is stuck, not slow: the heartbeats stop, and the worker is
  reaped 2.5 heartbeat intervals later, as a dead one.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

import anyio

from sdk.context import RunContext, Step
from sdk.metrics import WorkerMetrics

#: How often the loop ticks (and the watchdog looks).
TICK_S: Final = 0.1
#: A tick this late is reported.
BLOCKED_S: Final = 0.5
#: How long a blocked loop is kept live by the watchdog's heartbeats.
MAX_BLOCKED_S: Final = 60.0


class Culprit:
    """What the loop was doing when the watchdog found it blocked."""

    def __init__(self, run_id: str | None, step: str | None, where: str) -> None:
        self.run_id = run_id
        self.step = step
        self.where = where


def find_culprit(frame: FrameType | None) -> Culprit:
    """The run and step on a blocked thread's stack, and the innermost code it is in."""
    where = ""
    if frame is not None:
        summary = traceback.extract_stack(frame, limit=1)[-1]
        where = f"{summary.filename}:{summary.lineno} in {summary.name}"
    run_id = step = None
    while frame is not None:
        try:
            values = list(frame.f_locals.values())
        except Exception:  # a frame going away under us: what was found so far
            break
        for value in values:
            if isinstance(value, Step) and run_id is None:
                run_id, step = value._run_id, value.current
            elif isinstance(value, RunContext) and run_id is None:
                run_id, step = value.run_id, value.step.current
        if run_id is not None:
            break
        frame = frame.f_back
    return Culprit(run_id, step, where)


class LoopWatch:
    """Measures one worker's loop lag, says what blocked it, heartbeats while it is."""

    def __init__(
        self,
        log: Any,
        metrics: WorkerMetrics,
        *,
        heartbeat: Callable[[], None] | None,
        heartbeat_interval: float,
    ) -> None:
        self._log = log
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._interval = heartbeat_interval
        self._ticked_at = time.monotonic()
        self._culprit: Culprit | None = None
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()

    async def run(self) -> None:
        """Tick in the loop, with the watchdog beside it, until cancelled."""
        self._loop_thread = threading.get_ident()
        self._ticked_at = time.monotonic()
        watchdog = threading.Thread(target=self._watch, name="cancel-broker-loop-watch")
        watchdog.daemon = True
        watchdog.start()
        try:
            while True:
                before = time.monotonic()
                await anyio.sleep(TICK_S)
                self._ticked_at = now = time.monotonic()
                lag = max(0.0, now - before - TICK_S)
                self._metrics.loop_lag.observe(lag)
                if lag >= BLOCKED_S:
                    self._blocked(lag)
        finally:
            self._stop.set()

    def _blocked(self, lag: float) -> None:
        culprit, self._culprit = self._culprit, None
        self._log.warning(
            "worker.loop_blocked",
            blocked_s=round(lag, 3),
            run_id=culprit.run_id if culprit else None,
            step=culprit.step if culprit else None,
            where=culprit.where if culprit else None,
            hint="a blocking call in an async body delays every cancel of this worker:"
            " await an async client, or run it as a thread step (ctx.step.run with a plain"
            " function)",
        )

    def _watch(self) -> None:
        """The watchdog thread: who blocks the loop, and the heartbeats it cannot send."""
        heartbeat_at = 0.0
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            stale = now - self._ticked_at
            if stale < BLOCKED_S:
                continue
            if self._culprit is None:
                self._culprit = find_culprit(sys._current_frames().get(self._loop_thread))
            if (
                self._heartbeat is not None
                and stale < MAX_BLOCKED_S
                and now - heartbeat_at >= self._interval / 2
            ):
                heartbeat_at = now
                try:
                    self._heartbeat()
                except Exception as exc:  # the loop's own heartbeat says more, once back
                    self._log.debug("worker.watchdog_heartbeat_failed", error=repr(exc))
