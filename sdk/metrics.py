"""A worker's Prometheus metrics, in a registry of its own that the host app can mount.

    from prometheus_client import make_asgi_app
    app.mount("/metrics", make_asgi_app(registry=worker.metrics.registry))

The names are the broker's (prefix ``cancel_broker_``); these count what this worker
process saw. No run or event id is ever a label.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: From half a millisecond (a cancel on loopback) up to a minute.
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.runs_active = Gauge(
            "cancel_broker_runs_active",
            "Runs this worker holds now, by function.",
            ["function"],
            registry=self.registry,
        )
        self.runs_finished = Counter(
            "cancel_broker_runs_finished",
            "Runs this worker finished, by function and outcome (completed, cancelled, failed).",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.cancel_latency = Histogram(
            "cancel_broker_cancel_latency_seconds",
            "From a cancel's publication to the run's body stopping (Redis clock).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.signals_received = Counter(
            "cancel_broker_signals_received",
            "Cancel signals this worker read (re-sent ones included).",
            registry=self.registry,
        )
        self.signals_acknowledged = Counter(
            "cancel_broker_signals_acknowledged",
            "Cancel signals this worker acknowledged (they are not re-sent).",
            registry=self.registry,
        )
        self.signal_delivery = Histogram(
            "cancel_broker_signal_delivery_seconds",
            "From a cancel signal being sent to this worker acting on it (Redis clock).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "cancel_broker_event_loop_lag_seconds",
            "How late this worker's event loop runs a 100 ms tick: a body blocking the loop"
            " (a blocking call in an async def) delays every cancel by as much.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.redis_data_lost = Counter(
            "cancel_broker_redis_data_lost",
            "Times this worker found that Redis had lost its data (a restart without"
            " persistence) and registered its runs again.",
            registry=self.registry,
        )
        self.redis_server_changes = Counter(
            "cancel_broker_redis_server_changes",
            "Times another Redis server started answering this worker (a failover, a"
            " restart) and it reconciled its runs with what Redis holds.",
            registry=self.registry,
        )
        self.runs_reconciled = Counter(
            "cancel_broker_runs_reconciled",
            "Runs a reconciliation repaired, by what it did: registered_again (record gone),"
            " stopped (a cancel whose signal was lost), recorded_again (outcome lost),"
            " recorded_lost (outcome lost and no longer known).",
            ["action"],
            registry=self.registry,
        )
        self.redis_evicting = Gauge(
            "cancel_broker_redis_evicting",
            "1 while this worker's Redis evicts keys when full (maxmemory-policy other than"
            " noeviction): runs and cancels can vanish.",
            registry=self.registry,
        )
        self.abandoned_threads = Counter(
            "cancel_broker_abandoned_threads",
            "Thread steps that ignored their run's cancel past thread_grace.",
            registry=self.registry,
        )
        self.on_cancel_errors = Counter(
            "cancel_broker_on_cancel_errors",
            "on_cancel hooks that raised or ran past their deadline.",
            registry=self.registry,
        )
