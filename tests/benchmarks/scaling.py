"""Brokers on a Redis Cluster: cancel events per second with 1, 2 and 4 broker processes,
one namespace in one partition and in several.

A private 3-master Redis Cluster (``tests/cluster.py``). For each broker count N and each
number of partitions P: a fresh namespace of P partitions holding ``--runs`` running runs
(each in its partition) and a backlog of ``--events`` cancel events (half naming one of
1,000 of those runs, half naming none, each in its partition, as ``Client.send`` places
it), published once N ``cancel-broker run`` processes sharing the consumer groups are
ready; the clock runs from the first publication until the groups have acknowledged the
whole backlog. A last row runs one namespace per primary at once, one broker each.

On this 2-core machine the brokers, the three Redis primaries and the benchmark share two
cores, so the curve flattens early: the figures show the mechanism, not the capacity of a
cluster of real machines (docs/scaling.md).

    python tests/benchmarks/scaling.py [--brokers 1,2,4] [--partitions 1,6]
        [--events 20000] [--runs 10000]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdk.connection import RedisClient, command_client  # noqa: E402
from sdk.keys import BROKER_GROUP, Keys  # noqa: E402
from tests.benchmarks.registered import register_runs  # noqa: E402
from tests.benchmarks.throughput import drained, publish_cancels  # noqa: E402
from tests.cluster import RedisClusterServer  # noqa: E402
from tests.processes import start_broker  # noqa: E402

TARGETS = 1_000


async def prepare(redis: RedisClient, namespace: str, runs: int, partitions: int = 1) -> None:
    """The namespace's partitions, their consumer groups and its running runs."""
    keys = Keys(namespace)
    await redis.set(keys.partitions, partitions)
    for p in range(partitions):
        await redis.xgroup_create(keys.in_partition(p).events, BROKER_GROUP, id="$", mkstream=True)
    await register_runs(redis, keys, runs, partitions=partitions)


async def drain(
    url: str, namespaces: list[str], brokers_each: int, events: int, partitions: int = 1
) -> float:
    """Start ``brokers_each`` brokers per namespace and wait until they are ready; then
    publish each namespace's backlog and return the seconds until every one is handled."""
    redis = command_client(url)
    try:
        with ExitStack() as stack:
            for namespace in namespaces:
                for i in range(brokers_each):
                    broker, _ = start_broker(url, namespace, "--consumer", f"b{i}")
                    stack.callback(broker.terminate)
            started = time.perf_counter()
            last_ids = {
                ns: await publish_cancels(redis, Keys(ns), TARGETS, events, partitions=partitions)
                for ns in namespaces
            }
            with anyio.fail_after(900):
                for namespace, lasts in last_ids.items():
                    for p, last_id in lasts.items():
                        keys = Keys(namespace, p)
                        while not await drained(redis, keys, last_id):
                            await anyio.sleep(0.005)
            return time.perf_counter() - started
    finally:
        await redis.aclose()


def namespaces_on_distinct_primaries(cluster: RedisClusterServer, prefix: str) -> list[str]:
    """One namespace per primary: names whose hash tag lands on each master in turn."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(cluster.masters()):
        name = f"{prefix}{i}"
        found.setdefault(cluster.owner_of(cluster.slot_of(Keys(name).events)).port, name)
        i += 1
    return list(found.values())


async def measure(
    cluster: RedisClusterServer,
    counts: list[int],
    partition_counts: list[int],
    runs: int,
    events: int,
) -> list[tuple[str, int, float]]:
    """(what, events handled, seconds) per row."""
    redis = command_client(cluster.url)
    rows = []
    try:
        for partitions in partition_counts:
            for n in counts:
                namespace = f"scale{partitions}x{n}"
                await prepare(redis, namespace, runs, partitions)
                if partitions > 1:
                    nodes = {
                        cluster.owner_of(cluster.slot_of(Keys(namespace, p).events)).port
                        for p in range(partitions)
                    }
                    spread = f", on {len(nodes)} primaries"
                else:
                    spread = ""
                seconds = await drain(cluster.url, [namespace], n, events, partitions)
                what = f"1 namespace, {partitions} partition(s){spread}, {n} broker(s)"
                rows.append((what, events, seconds))
                print(f"  {what}: {events / seconds:,.0f} events/s", flush=True)
        spread = namespaces_on_distinct_primaries(cluster, "spread")
        for namespace in spread:
            await prepare(redis, namespace, runs)
        seconds = await drain(cluster.url, spread, 1, events)
        rows.append(
            (
                f"{len(spread)} namespaces on {len(spread)} primaries, 1 broker each",
                events * len(spread),
                seconds,
            )
        )
        print(f"  {rows[-1][0]}: {rows[-1][1] / seconds:,.0f} events/s", flush=True)
    finally:
        await redis.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", default="1,2,4", help="broker counts, comma-separated")
    parser.add_argument(
        "--partitions", default="1,6", help="partitions per namespace, comma-separated"
    )
    parser.add_argument("--events", type=int, default=20_000, help="backlog per namespace")
    parser.add_argument("--runs", type=int, default=10_000, help="active runs per namespace")
    args = parser.parse_args()
    counts = [int(n) for n in args.brokers.split(",")]
    partition_counts = [int(n) for n in args.partitions.split(",")]
    with RedisClusterServer(masters=3) as cluster:
        rows = anyio.run(measure, cluster, counts, partition_counts, args.runs, args.events)
    print(
        f"\nbrokers on a 3-master Redis Cluster ({args.events:,} cancel events per namespace,"
        f" {args.runs:,} active runs each)"
    )
    print("| setup | events | events/s | us per event |")
    print("|---|---|---|---|")
    for what, handled, seconds in rows:
        print(
            f"| {what} | {handled:,} | {handled / seconds:,.0f} | {seconds / handled * 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
