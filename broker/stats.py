"""The cluster's view, read from Redis and exported by every broker.

What no single process sees (runs active and finished in every worker, signals every
worker acknowledged and how long they took to arrive, the consumer groups' lag) is kept
in Redis by the scripts that change it, and read here every few seconds. Every broker
replica exports the same figures: aggregate them with ``max``, not ``sum``.

prometheus_client collects synchronously, so :meth:`ClusterStats.refresh` (a loop in the
broker) reads Redis and :meth:`ClusterStats.collect` only hands out the last snapshot.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sdk.connection import RedisClient
from sdk.keys import Keys, delivery_field, parse_finished_field
from sdk.metrics import LATENCY_BUCKETS
from sdk.partitions import stored_partition_keys

#: Seconds between two reads of the cluster's figures.
REFRESH_INTERVAL_S: Final = 2.0


@dataclass
class Snapshot:
    #: (app, function) -> unfinished runs
    runs_active: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (app, function, outcome) -> runs finished so
    runs_finished: dict[tuple[str, str, str], int] = field(default_factory=dict)
    signals_acknowledged: int = 0
    #: per-bucket (not cumulative) counts, the last one for +Inf
    delivery_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    delivery_sum: float = 0.0
    #: (stream, group) -> entries not yet delivered to the group (None: RedisClient < 7)
    consumer_lag: dict[tuple[str, str], int | None] = field(default_factory=dict)
    #: (stream, group) -> entries delivered and not acknowledged
    pending: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Cancels by id kept for runs not registered yet (each partition keeps its own copy:
    #: the largest count).
    pending_cancels: int = 0


class ClusterStats(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    async def refresh(self, redis: RedisClient, keys: Keys) -> None:
        """Read every partition's figures and sum them."""
        partitions = await stored_partition_keys(redis, keys)
        snapshot = Snapshot()
        functions: set[tuple[str, str]] = set()
        for app in cast(set[str], await redis.smembers(keys.apps)):
            for function in cast(list[str], await redis.hkeys(keys.app_functions(app))):
                functions.add((app, function))
        signals: defaultdict[str, float] = defaultdict(float)
        for part in partitions:
            finished = cast(dict[str, str], await redis.hgetall(part.finished_stats))
            for field_name, count in finished.items():
                labels = parse_finished_field(field_name)
                app, function, _ = labels
                snapshot.runs_finished[labels] = snapshot.runs_finished.get(labels, 0) + int(count)
                functions.add((app, function))
            for name, value in cast(dict[str, str], await redis.hgetall(part.signal_stats)).items():
                signals[name] += float(value)
        ordered = sorted(functions)
        async with redis.pipeline(transaction=False) as pipe:
            for app, function in ordered:
                for part in partitions:
                    pipe.zcard(part.function_runs(app, function))
            counts = cast(list[int], await pipe.execute())
        width = len(partitions)
        snapshot.runs_active = {
            name: sum(counts[i * width : (i + 1) * width]) for i, name in enumerate(ordered)
        }
        snapshot.signals_acknowledged = int(signals["acknowledged"])
        snapshot.delivery_sum = float(signals[delivery_field("sum")])
        snapshot.delivery_buckets = [
            int(signals[delivery_field(index)])
            for index in [*map(str, range(1, len(LATENCY_BUCKETS) + 1)), "inf"]
        ]
        async with redis.pipeline(transaction=False) as pipe:
            for part in partitions:
                pipe.zcard(part.pending_cancel_deadlines)
            snapshot.pending_cancels = max(cast(list[int], await pipe.execute()), default=0)
        for stream in (keys.syncs, *(part.events for part in partitions)):
            for group in await redis.xinfo_groups(stream):
                name = str(group["name"])
                lag = group.get("lag")
                snapshot.consumer_lag[(stream, name)] = None if lag is None else int(lag)
                snapshot.pending[(stream, name)] = int(group["pending"])
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        active = GaugeMetricFamily(
            "cancel_broker_runs_active",
            "Unfinished runs in the whole namespace, by app and function (cluster view).",
            labels=["app", "function"],
        )
        for (app, function), count in sorted(snap.runs_active.items()):
            active.add_metric([app, function], count)
        yield active
        finished = CounterMetricFamily(
            "cancel_broker_runs_finished",
            "Runs finished in the whole namespace, by app, function and outcome (cluster view).",
            labels=["app", "function", "outcome"],
        )
        for labels, count in sorted(snap.runs_finished.items()):
            finished.add_metric(list(labels), count)
        yield finished
        yield CounterMetricFamily(
            "cancel_broker_signals_acknowledged",
            "Cancel signals workers acknowledged (cluster view).",
            value=snap.signals_acknowledged,
        )
        bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
        cumulative, running = [], 0
        for bound, count in zip(bounds, snap.delivery_buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "cancel_broker_signal_delivery_seconds",
            "From a cancel signal being sent to its worker acting on it, on the Redis clock"
            " (cluster view).",
            buckets=cumulative,
            sum_value=snap.delivery_sum,
        )
        lag = GaugeMetricFamily(
            "cancel_broker_consumer_lag",
            "Entries of a stream not yet delivered to a consumer group (XINFO GROUPS; Redis 7).",
            labels=["stream", "group"],
        )
        pending = GaugeMetricFamily(
            "cancel_broker_pending_entries",
            "Entries delivered to a consumer group and not yet acknowledged.",
            labels=["stream", "group"],
        )
        for (stream, group), value in sorted(snap.consumer_lag.items()):
            if value is not None:
                lag.add_metric([stream, group], value)
        for (stream, group), value in sorted(snap.pending.items()):
            pending.add_metric([stream, group], value)
        yield lag
        yield pending
        yield GaugeMetricFamily(
            "cancel_broker_pending_cancels",
            "Cancels by run id kept for runs that have not registered yet (outcome pending),"
            " each until the pending-cancel lookback ends (cluster view).",
            value=snap.pending_cancels,
        )
