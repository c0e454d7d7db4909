"""What every run pays, cancelled or not: wall time and Redis round trips of registering and
finishing it, and Redis memory while it is active.

- Overhead: ``async with worker.run(...)`` with an empty body, ``--runs`` times, against a
  private redis-server; the figure is the whole block (register, execute, record). Round
  trips are what this process's connections sent meanwhile (a pipeline is one); Redis's
  ``commandstats`` would also count the commands each script runs inside Redis.
- Memory: ``--active`` runs with one rule registered and left running; Redis
  ``used_memory`` grows by the figure per run, and ``MEMORY USAGE`` says which keys hold it.

    python tests/benchmarks/overhead.py [--runs 2000] [--active 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from redis.asyncio.connection import AbstractConnection

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from sdk import Event, RunContext, Worker  # noqa: E402
from sdk.connection import command_client  # noqa: E402
from sdk.keys import Keys  # noqa: E402
from sdk.logs import configure_logging  # noqa: E402
from sdk.rules import index_entries  # noqa: E402
from tests.benchmarks.registered import RULES, register_runs, report_id, run_id, trigger  # noqa: E402


class SentCounter:
    """Counts what redis-py's connections send to Redis: one per command, or per pipeline."""

    def __init__(self) -> None:
        self.sent = 0
        self._original = AbstractConnection.send_packed_command

    def __enter__(self) -> SentCounter:
        original = self._original

        async def counting(
            connection: AbstractConnection, command: Any, check_health: bool = True
        ) -> None:
            self.sent += 1
            await original(connection, command, check_health)

        AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AbstractConnection.send_packed_command = self._original  # type: ignore[method-assign]


async def overhead(url: str, runs: int) -> dict[str, float]:
    worker = Worker("bench", url, namespace="overhead")

    @worker.function(id="generate-report", trigger="report/generate.requested", cancel_on=RULES)
    async def generate_report(ctx: RunContext) -> None:
        return None

    durations: list[float] = []
    async with worker:
        for i in range(50):  # warm up: connections, script loading
            async with worker.run("generate-report", _trigger(i)):
                pass
        with SentCounter() as counter:
            for i in range(runs):
                started = time.perf_counter()
                async with worker.run("generate-report", _trigger(i)):
                    pass
                durations.append(time.perf_counter() - started)
    # The worker's own loops (a heartbeat, a blocking read) may add one or two in all.
    commands = counter.sent
    durations.sort()
    return {
        "p50_us": statistics.median(durations) * 1e6,
        "p99_us": durations[int(len(durations) * 0.99)] * 1e6,
        "round_trips": commands / runs,
    }


def _trigger(i: int) -> Event:
    """A trigger that did not come through the stream (``worker.run``)."""
    return Event(name="report/generate.requested", data={"reportId": report_id(i)})


async def memory(url: str, active: int) -> tuple[float, dict[str, int]]:
    redis = command_client(url)
    keys = Keys("memory")
    try:
        await redis.flushall()
        before = int((await redis.info("memory"))["used_memory"])
        await register_runs(redis, keys, active)
        used = int((await redis.info("memory"))["used_memory"]) - before
        one = {
            "run hash": keys.run(run_id(7)),
            "trigger's runs (event-runs)": keys.event_runs(trigger(7).id),
            "index set": index_entries(RULES, trigger(7), keys)[0].key,
        }
        breakdown = {name: int(await redis.memory_usage(key) or 0) for name, key in one.items()}
    finally:
        await redis.aclose()
    return used / active, breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2_000)
    parser.add_argument("--active", type=int, default=20_000)
    args = parser.parse_args()
    # As a deployed worker logs: a JSON line on stderr as each run starts and ends.
    configure_logging("info", "json")
    with EmbeddedRedis() as server:
        cost = anyio.run(overhead, server.url, args.runs)
        per_run, breakdown = anyio.run(memory, server.url, args.active)
    print(f"\nper-run overhead ({args.runs:,} runs of an empty body, one rule)")
    print("| p50 us | p99 us | Redis round trips per run |")
    print("|---|---|---|")
    print(f"| {cost['p50_us']:.0f} | {cost['p99_us']:.0f} | {cost['round_trips']:.2f} |")
    print(f"\nRedis memory per active run ({args.active:,} runs, one rule)")
    print("| bytes per run (used_memory) | " + " | ".join(breakdown) + " |")
    print("|---|" + "---|" * len(breakdown))
    print(f"| {per_run:,.0f} | " + " | ".join(f"{v:,}" for v in breakdown.values()) + " |")


if __name__ == "__main__":
    main()
