"""The broker's Prometheus metrics, in a registry of its own (one per broker instance)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import sdk

#: From half a millisecond (a cancel on loopback) up to a minute.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "cancel_broker_events",
            "Events consumed from the events stream, by what the broker did with them"
            " (matched: found at least one run; unmatched: rules listen to the name but no run"
            " matched; ignored: no rule listens to the name; dead_lettered: malformed).",
            ["result"],
            registry=self.registry,
        )
        self.runs_matched = Counter(
            "cancel_broker_runs_matched",
            "Runs found by matching cancel events, whatever their state.",
            registry=self.registry,
        )
        self.signals_sent = Counter(
            "cancel_broker_signals_sent",
            "Cancel signals sent to workers.",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "cancel_broker_dead_letters",
            "Entries moved to the dead-letter stream, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "cancel_broker_redis_errors",
            "Redis errors seen while handling events (the event is retried).",
            registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "cancel_broker_event_handling_seconds",
            "Time from reading a cancel event to having signalled its runs.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.signals_resent = Counter(
            "cancel_broker_signals_resent",
            "Cancel signals sent again because no worker acknowledged them in time.",
            registry=self.registry,
        )
        self.runs_lost = Counter(
            "cancel_broker_runs_lost",
            "Runs recorded as lost because their worker stopped heartbeating.",
            registry=self.registry,
        )
        self.workers_lost = Counter(
            "cancel_broker_workers_lost",
            "Workers that stopped heartbeating without leaving (killed, host lost).",
            registry=self.registry,
        )
        self.stale_findings = Gauge(
            "cancel_broker_stale_findings",
            "Stale-configuration findings present now, by kind (see docs/operations.md).",
            ["kind"],
            registry=self.registry,
        )
        self.live_workers = Gauge(
            "cancel_broker_live_workers",
            "Workers whose last heartbeat is younger than 2.5 heartbeat intervals.",
            registry=self.registry,
        )
        self.build = Info(
            "cancel_broker_build", "Version of the running broker.", registry=self.registry
        )
        self.build.info({"version": sdk.__version__})
        for result in ("matched", "unmatched", "ignored", "dead_lettered"):
            self.events.labels(result=result)
