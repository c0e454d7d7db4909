"""What a process step costs, and how fast a cancel stops one that does not cooperate.

- Start-up: ``ctx.step.run(name, fn, process=True)`` of a function that returns at once,
  ``--runs`` times; the first call also starts the worker's fork server. Compared with the
  same function as a thread step.
- Stop: a child that ignores SIGTERM and spins, its step's scope cancelled; the figure is
  the time until the child is gone (the grace, ``--grace``, then SIGKILL and the reap).
- Escalation: a ``between_steps`` run with ``interrupt_after`` (``--interrupt-after``)
  whose step awaits 60 s, cancelled; the figure is the time until the step raised.

    python tests/benchmarks/process_steps.py [--runs 50] [--grace 0.5] [--interrupt-after 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdk.context import CancelState, Step  # noqa: E402
from tests.apps.spinning import spin, square  # noqa: E402


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


async def start_up(step: Step, runs: int, *, process: bool) -> list[float]:
    times = []
    for value in range(runs):
        started = time.perf_counter()
        assert await step.run("square", square, value, process=process) == value * value
        times.append(time.perf_counter() - started)
    return times


async def spin_step(step: Step, pid_file: Path) -> None:
    await step.run("spin", spin, str(pid_file), process=True)


async def stop(grace: float, trials: int) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(trials):
            pid_file = Path(tmp) / f"pid-{trial}"
            step = Step("bench", CancelState(), thread_grace=grace)
            async with anyio.create_task_group() as tg:
                tg.start_soon(spin_step, step, pid_file)
                while not pid_file.exists() or not pid_file.read_text():
                    await anyio.sleep(0.005)
                started = time.perf_counter()
                tg.cancel_scope.cancel()
            times.append(time.perf_counter() - started)  # the step returns once it is reaped
    return times


async def escalate(interrupt_after: float, trials: int) -> list[float]:
    times = []
    for _ in range(trials):
        state = CancelState("between_steps", interrupt_after=interrupt_after)
        state.body_started = True
        step = Step("bench", state)
        with state.scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(step.run, "call", anyio.sleep, 60)
                while step.current != "call":
                    await anyio.sleep(0.001)
                started = time.perf_counter()
                state.receive("bench")  # in the step: no boundary comes, the deadline does
        times.append(time.perf_counter() - started)
        assert state.escalated
    return times


async def main(runs: int, grace: float, interrupt_after: float) -> None:
    step = Step("bench", CancelState())
    first = time.perf_counter()
    await step.run("warm", square, 0, process=True)
    first_s = time.perf_counter() - first
    process = await start_up(step, runs, process=True)
    thread = await start_up(step, runs, process=False)
    stops = await stop(grace, 5)
    escalations = await escalate(interrupt_after, 5)
    print("| what | runs | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    print(f"| first process step (starts the fork server) | 1 | {ms(first_s)} | {ms(first_s)} |")
    for name, times in (("process step", process), ("thread step", thread)):
        p99 = statistics.quantiles(times, n=100)[98] if len(times) > 1 else times[0]
        print(f"| {name} | {len(times)} | {ms(statistics.median(times))} | {ms(p99)} |")
    print(
        f"| stop of a child ignoring SIGTERM (grace {grace} s) | {len(stops)}"
        f" | {ms(statistics.median(stops))} | {ms(max(stops))} |"
    )
    print(
        f"| escalation of an awaited step (interrupt_after {interrupt_after} s)"
        f" | {len(escalations)} | {ms(statistics.median(escalations))} | {ms(max(escalations))} |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--grace", type=float, default=0.5)
    parser.add_argument("--interrupt-after", type=float, default=0.5)
    arguments = parser.parse_args()
    anyio.run(main, arguments.runs, arguments.grace, arguments.interrupt_after)
