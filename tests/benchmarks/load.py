"""Cancel latency under load: runs starting and cancel events flowing at a steady rate.

One private redis-server, one ``cancel-broker run`` process and ``--workers`` report
worker processes (``tests/apps/reports.py``). For ``--seconds``, this process publishes
``--starts`` run triggers and ``--cancels`` cancel events per second, in 10 ms ticks:
each run lasts ``--run-seconds`` unless cancelled; half the cancel events name a run
whose trigger went out ``--cancel-after`` seconds earlier (so it is mid-call), half name
no run at all (each of those leaves a tombstone, as a real unmatched cancel does).

The latency of each cancelled run is the one ``finish_run.lua`` publishes in its
``cancel/run.cancelled`` outcome event: from the cancel event's publication (its stream
id, so millisecond resolution) to the moment the run's body stopped, both on the Redis
clock. A named run without that outcome is a miss.

    python tests/benchmarks/load.py [--seconds 20] [--starts 1000] [--cancels 1000]
        [--publisher xadd|sdk]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from broker.output import progress_bar  # noqa: E402
from sdk import RUN_CANCELLED_EVENT, Client  # noqa: E402
from sdk.connection import command_client  # noqa: E402
from sdk.keys import EVENT_FIELD, Keys  # noqa: E402
from sdk.wire import encode_event  # noqa: E402
from tests.benchmarks.latency import percentile  # noqa: E402
from tests.processes import cpu_seconds, start_broker, start_worker  # noqa: E402

NAMESPACE = "load"
REPORT_STARTED = "report/generate.requested"
CANCEL = "report/cancel.requested"
TICK_S = 0.010
#: How long after the load the last outcomes may take before a named run counts as missed.
SETTLE_S = 5.0


@dataclass
class Published:
    """What the generator sent: counts, and the report ids it asked to cancel."""

    starts: int = 0
    cancels: int = 0
    targeted: set[str] = field(default_factory=set)
    #: Ticks that went out more than one tick late: the generator itself falling behind.
    late_ticks: int = 0
    elapsed: float = 0.0


async def generate(
    redis: Redis,
    keys: Keys,
    args: argparse.Namespace,
    progress: Callable[[int, int], None],
    client: Client | None = None,
) -> Published:
    """Publish at the asked rates on an absolute schedule, so a slow tick is caught up.
    With ``client``, cancel events go out through ``Client.send`` (matched as published),
    else as plain ``XADD`` s, like triggers."""
    out = Published()
    started_at: list[float] = []  # monotonic publication time of run i
    next_target = 0
    began = time.monotonic()
    tick = 0
    while True:
        tick += 1
        due = began + tick * TICK_S
        now = time.monotonic()
        if due > now:
            await anyio.sleep(due - now)
        elif now - due > TICK_S:
            out.late_ticks += 1
        now = time.monotonic()
        elapsed = min(now - began, args.seconds)
        starts = int(elapsed * args.starts) - out.starts
        cancels = int(elapsed * args.cancels) - out.cancels
        by_sdk: list[str] = []
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(out.starts, out.starts + starts):
                data = {"reportId": f"run-{i}", "seconds": args.run_seconds, "quiet": True}
                pipe.xadd(keys.events, {EVENT_FIELD: encode_event(REPORT_STARTED, data)})
                started_at.append(now)
            for j in range(out.cancels, out.cancels + cancels):
                report = f"nobody-{j}"
                # Every other run is cancelled, once it has been running long enough.
                if (
                    j % 2 == 0
                    and next_target < len(started_at)
                    and now - started_at[next_target] >= args.cancel_after
                ):
                    report = f"run-{next_target}"
                    out.targeted.add(report)
                    next_target += 2
                if client is not None:
                    by_sdk.append(report)
                else:
                    body = encode_event(CANCEL, {"reportId": report})
                    pipe.xadd(keys.events, {EVENT_FIELD: body})
            await pipe.execute()
        if by_sdk:
            assert client is not None
            # Concurrently, as an app's requests are: one after the other, a tick's sends
            # would hold the schedule back on a loaded machine.
            async with anyio.create_task_group() as tg:
                for report in by_sdk:
                    tg.start_soon(client.send, CANCEL, {"reportId": report})
        out.starts += starts
        out.cancels += cancels
        progress(int(elapsed), int(args.seconds))
        if elapsed >= args.seconds:
            out.elapsed = time.monotonic() - began
            return out


async def outcomes(redis: Redis, keys: Keys) -> dict[str, float]:
    """Report id -> cancel latency in ms, from every outcome event on the stream."""
    latencies: dict[str, float] = {}
    start = "-"
    while True:
        entries = await redis.xrange(keys.events, min=start, count=10_000)
        for _entry_id, fields in entries:
            body: dict[str, Any] = msgspec.json.decode(fields[EVENT_FIELD])
            if body.get("name") != RUN_CANCELLED_EVENT:
                continue
            data = body["data"]
            report = ((data.get("event") or {}).get("data") or {}).get("reportId")
            if report is not None and data.get("latency_ms") is not None:
                latencies[report] = float(data["latency_ms"])
        if len(entries) < 10_000:
            return latencies
        start = "(" + entries[-1][0]


@contextmanager
def serving(url: str, workers: int, concurrency: int) -> Iterator[dict[str, list[int]]]:
    """The broker and the workers; yields their pids by role."""
    with ExitStack() as stack:
        broker, _ = start_broker(url, NAMESPACE)
        stack.callback(broker.terminate)
        pids = {"broker": [broker.process.pid], "workers": []}
        for _ in range(workers):
            worker = start_worker(
                url, NAMESPACE, shutdown_timeout="0.5", concurrency=str(concurrency)
            )
            stack.callback(worker.terminate)
            pids["workers"].append(worker.process.pid)
        yield pids


async def measure(url: str, args: argparse.Namespace, pids: dict[str, list[int]]) -> dict[str, Any]:
    keys = Keys(NAMESPACE)
    redis = command_client(url)
    try:
        load_before = os.getloadavg()[0]
        cpu_before = {role: sum(map(cpu_seconds, ids)) for role, ids in pids.items()}
        async with Client(url, namespace=NAMESPACE) as client:
            with progress_bar("seconds of load") as tick:
                sender = client if args.publisher == "sdk" else None
                published = await generate(redis, keys, args, tick, sender)
        cpu = {role: sum(map(cpu_seconds, ids)) - cpu_before[role] for role, ids in pids.items()}
        load_during = os.getloadavg()[0]
        deadline = time.monotonic() + args.run_seconds + SETTLE_S
        latencies = await outcomes(redis, keys)
        while not published.targeted <= latencies.keys() and time.monotonic() < deadline:
            await anyio.sleep(0.5)
            latencies = await outcomes(redis, keys)
        finished = await redis.hgetall(keys.finished_stats)
    finally:
        await redis.aclose()
    seen = sorted(latencies[report] for report in published.targeted if report in latencies)
    return {
        "published": published,
        "latencies": seen,
        "misses": len(published.targeted) - len(seen),
        "finished": {key.rsplit("/", 1)[-1]: int(value) for key, value in finished.items()},
        "load": (load_before, load_during),
        # CPU per second of load, by role: what the rates cost, whatever else the machine ran.
        "cpu": {role: seconds / published.elapsed for role, seconds in cpu.items()},
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    published: Published = result["published"]
    ms: list[float] = result["latencies"]
    rates = (
        f"{published.starts / published.elapsed:,.0f} run starts/s and"
        f" {published.cancels / published.elapsed:,.0f} cancel events/s for"
        f" {published.elapsed:.1f} s ({published.late_ticks} late ticks)"
    )
    finished = ", ".join(f"{count:,} {status}" for status, count in result["finished"].items())
    lines = [
        f"cancel latency under load: {rates} ({args.publisher}); {args.workers} worker process(es),"
        f" runs of {args.run_seconds} s, cancels {args.cancel_after} s into a run",
        f"runs finished: {finished}; load average {result['load'][0]:.2f} before,"
        f" {result['load'][1]:.2f} at the end",
        "CPU used during the load: "
        + ", ".join(f"{role} {share:.0%} of a core" for role, share in result["cpu"].items()),
        "| runs cancelled | p50 ms | p90 ms | p99 ms | max ms | misses |",
        "|---|---|---|---|---|---|",
    ]
    if ms:
        lines.append(
            f"| {len(ms):,} | {percentile(ms, 0.5):.1f} | {percentile(ms, 0.9):.1f}"
            f" | {percentile(ms, 0.99):.1f} | {ms[-1]:.1f} | {result['misses']} |"
        )
    else:
        lines.append(f"| 0 | - | - | - | - | {result['misses']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--starts", type=int, default=1_000, help="run starts per second")
    parser.add_argument("--cancels", type=int, default=1_000, help="cancel events per second")
    parser.add_argument("--run-seconds", type=float, default=2.0)
    parser.add_argument("--cancel-after", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--publisher",
        choices=["xadd", "sdk"],
        default="xadd",
        help="cancel events as plain XADDs (any language; the broker matches them) or through"
        " Client.send (matched as published)",
    )
    parser.add_argument("--concurrency", type=int, default=5_000, help="runs per worker")
    args = parser.parse_args()
    with EmbeddedRedis() as server, serving(server.url, args.workers, args.concurrency) as pids:
        result = anyio.run(measure, server.url, args, pids)
    print(report(args, result))


if __name__ == "__main__":
    main()
