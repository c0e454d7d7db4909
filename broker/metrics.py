"""The broker's Prometheus metrics, in a registry of its own (one per broker instance).

Counters and histograms here count what this broker process did: sum them across
replicas. The cluster's view read from Redis (``broker/stats.py``) and the sync gauges
are the same on every replica: aggregate those with ``max``. docs/metrics.md lists all.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import sdk
from broker.stats import ClusterStats
from sdk.metrics import LATENCY_BUCKETS

#: Why an entry is dead-lettered (docs/protocol.md#dead-letters).
DEAD_LETTER_REASONS: Final = (
    "missing_field",
    "invalid_encoding",
    "invalid_json",
    "invalid_shape",
    "invalid_name",
    "unsupported_version",
    "too_large",
    "too_deep",
    "broker_error",
    "poison",
)
#: What the broker did with an event (``cancel_broker_events_total{result}``).
EVENT_RESULTS: Final = (
    "matched",
    "tombstoned",
    "unmatched",
    "ignored",
    "unserved",
    "dead_lettered",
    "moved",
)
#: Most distinct event names used as label values; the rest count as "other".
MAX_EVENT_LABELS: Final = 100
OTHER_EVENTS: Final = "other"


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events = Counter(
            "cancel_broker_events",
            "Events consumed from the events stream, by what the broker did with them"
            " (matched: found at least one run; tombstoned: rules listen to the name, no run"
            " matched, a tombstone waits for runs that register later; unmatched: no run"
            " matched and no tombstone was left (no value at any rule's path, or tombstones"
            " off); ignored: no rule listens to the name (a trigger, an outcome event);"
            " unserved: no rule listens to it and no declared function triggers on it;"
            " dead_lettered: malformed; moved: published without a partition, appended to"
            " its own).",
            ["result"],
            registry=self.registry,
        )
        self.events_consumed = Counter(
            "cancel_broker_events_consumed",
            "Events consumed, by name: names rules listen to or that look like cancels (at"
            f" most {MAX_EVENT_LABELS}); every other name counts as {OTHER_EVENTS!r}.",
            ["event"],
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
            "Redis errors seen by the broker's loops (each is retried with backoff).",
            registry=self.registry,
        )
        self.redis_reconnects = Counter(
            "cancel_broker_redis_reconnects",
            "A loop succeeded talking to Redis again after errors (a reconnection).",
            registry=self.registry,
        )
        self.cancel_latency = Histogram(
            "cancel_broker_cancel_latency_seconds",
            "From a cancel's publication to the run's body stopping, on the Redis clock; from"
            " the cancel/run.cancelled events this broker consumed.",
            buckets=LATENCY_BUCKETS,
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
        self.pending_cancels_expired = Counter(
            "cancel_broker_pending_cancels_expired",
            "Cancels by run id kept for a run that never registered within the pending-cancel"
            " lookback: they expired having cancelled nothing (a cancel.pending_expired"
            " warning names them).",
            registry=self.registry,
        )
        self.redis_data_lost = Counter(
            "cancel_broker_redis_data_lost",
            "Times this broker found that Redis had lost its data (a restart without"
            " persistence) and recreated its groups; workers register their runs again.",
            registry=self.registry,
        )
        self.redis_server_changes = Counter(
            "cancel_broker_redis_server_changes",
            "Times another Redis server started answering this broker (a failover, a"
            " restart) and it read again the cancel events it had in hand.",
            registry=self.registry,
        )
        self.redis_evicting = Gauge(
            "cancel_broker_redis_evicting",
            "1 while the broker's Redis evicts keys when full (maxmemory-policy other than"
            " noeviction): runs and cancels can vanish (docs/operations.md).",
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
        for result in EVENT_RESULTS:
            self.events.labels(result=result)
        # Present from the start at 0, so that increase() sees the first dead letter.
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        self.cluster = ClusterStats()
        self.registry.register(self.cluster)
        self._event_labels: set[str] = set()

    def event_label(self, name: str, *, named: bool) -> str:
        """``name`` as a label value if it is to be ``named`` and the label set has room."""
        if named and (name in self._event_labels or len(self._event_labels) < MAX_EVENT_LABELS):
            self._event_labels.add(name)
            return name
        return OTHER_EVENTS
