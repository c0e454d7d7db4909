"""The broker's and the worker's Prometheus metrics, read the way Prometheus reads them:
the text exposition of their registries, after real cancellations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from broker import Broker
from broker.metrics import DEAD_LETTER_REASONS, MAX_EVENT_LABELS, BrokerMetrics
from sdk import Client, Worker
from sdk.connection import Backoff, BackoffHooks
from sdk.keys import Keys
from tests.helpers import broker_drained, report_worker, run_of, serving, wait_until

pytestmark = pytest.mark.anyio


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, keyed by (name, labels)."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry).get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def worker(redis_url: str, namespace: str, broker: Broker) -> AsyncIterator[Worker]:
    worker = report_worker(redis_url, namespace, shutdown_timeout=0.1)
    async with serving(worker.serve):
        yield worker


async def test_cancellations_show_in_both_registries(
    broker: Broker, worker: Worker, client: Client, redis: Redis, namespace: str
) -> None:
    runs = [
        await run_of(client, await client.send("report/generate.requested", {"reportId": f"m{i}"}))
        for i in range(3)
    ]
    for i in range(2):
        await client.send("report/cancel.requested", {"reportId": f"m{i}"})
    for run_id in runs[:2]:
        assert (await client.wait(run_id, timeout=10)).status == "cancelled"
    await client.send("report/cancel.requested", {"reportId": "nobody"})  # tombstoned
    await wait_until(lambda: broker_drained(redis, namespace))
    await broker.metrics.cluster.refresh(redis, broker.keys)

    b = broker.metrics.registry
    assert value(b, "cancel_broker_events_total", result="matched") == 2
    assert value(b, "cancel_broker_events_total", result="tombstoned") == 1
    assert value(b, "cancel_broker_events_consumed_total", event="report/cancel.requested") == 3
    # Triggers, and the outcome events, are names no rule listens to: bounded as "other".
    assert value(b, "cancel_broker_events_consumed_total", event="other") >= 3 + 2
    assert value(b, "cancel_broker_signals_sent_total") == 2
    # From the outcome events the broker consumed: one latency per cancelled run.
    assert value(b, "cancel_broker_cancel_latency_seconds_count") == 2
    assert 0 < value(b, "cancel_broker_cancel_latency_seconds_sum") < 2
    # The cluster's view, read from Redis.
    labels = {"app": "reports", "function": "generate-report"}
    assert value(b, "cancel_broker_runs_finished_total", outcome="cancelled", **labels) == 2
    assert value(b, "cancel_broker_runs_active", **labels) == 1
    assert value(b, "cancel_broker_signals_acknowledged_total") == 2
    assert value(b, "cancel_broker_signal_delivery_seconds_count") == 2
    assert value(b, "cancel_broker_signal_delivery_seconds_bucket", le="+Inf") == 2
    stream = f"{Keys(namespace).prefix}events"
    assert value(b, "cancel_broker_pending_entries", stream=stream, group="broker") == 0
    assert value(b, "cancel_broker_consumer_lag", stream=stream, group="broker") == 0

    w = worker.metrics.registry
    assert (
        value(
            w, "cancel_broker_runs_finished_total", function="generate-report", outcome="cancelled"
        )
        == 2
    )
    assert value(w, "cancel_broker_runs_active", function="generate-report") == 1
    assert value(w, "cancel_broker_cancel_latency_seconds_count") == 2
    assert value(w, "cancel_broker_signals_received_total") == 2
    assert value(w, "cancel_broker_signals_acknowledged_total") == 2
    assert value(w, "cancel_broker_signal_delivery_seconds_count") == 2
    # Both measure the same cancels on the Redis clock: the worker's figure is the run's.
    assert value(w, "cancel_broker_cancel_latency_seconds_sum") == pytest.approx(
        value(b, "cancel_broker_cancel_latency_seconds_sum"), abs=0.001
    )


def test_every_dead_letter_reason_is_exported_from_the_start() -> None:
    exported = {
        dict(labels)["reason"]
        for name, labels in samples(BrokerMetrics().registry)
        if name == "cancel_broker_dead_letters_total"
    }
    assert exported == set(DEAD_LETTER_REASONS)


def test_no_run_or_event_id_becomes_a_label(redis_url: str) -> None:
    metrics = BrokerMetrics()
    names = [f"tenant-{i}/order.cancelled" for i in range(MAX_EVENT_LABELS + 50)]
    labels = {metrics.event_label(name, named=True) for name in names}
    assert len(labels) == MAX_EVENT_LABELS + 1
    assert "other" in labels
    assert metrics.event_label("report/generate.requested", named=False) == "other"


async def test_backoff_counts_errors_and_reconnects() -> None:
    failures, recoveries = [], []
    hooks = BackoffHooks(
        on_failure=lambda: failures.append(1), on_recovery=lambda: recoveries.append(1)
    )
    backoff = Backoff(_Silent(), "x", cap=0.0, hooks=hooks)
    backoff.succeeded()
    assert (failures, recoveries) == ([], [])
    await backoff.failed(ConnectionError("down"))
    await backoff.failed(ConnectionError("down"))
    backoff.succeeded()
    backoff.succeeded()
    assert (len(failures), len(recoveries)) == (2, 1)


class _Silent:
    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


async def test_every_cancel_decision_is_one_audit_line(
    broker: Broker, worker: Worker, client: Client, redis: Redis, namespace: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        event_id = await client.send("report/generate.requested", {"reportId": "a1"})
        run_id = await run_of(client, event_id)
        cancel_id = await client.send("report/cancel.requested", {"reportId": "a1"})
        await client.wait(run_id, timeout=10)
        await client.send("report/cancel.requested", {"reportId": "nobody"})
        await client.cancel(run_id, reason="again")  # refused: already cancelled
        await wait_until(lambda: broker_drained(redis, namespace))
    decided = {e["event_id"]: e for e in logs if e["event"] == "cancel.decided"}
    matched = decided[cancel_id]
    assert (matched["decision"], matched["runs_matched"], matched["signals_sent"]) == (
        "matched",
        1,
        1,
    )
    assert matched["rules"] == ["data.reportId"]
    assert matched["outcomes"] == {"signalled": 1}
    assert matched["latency_ms"] >= 0
    assert [e["decision"] for e in decided.values()] == ["matched", "tombstoned"]
    (requested,) = [e for e in logs if e["event"] == "cancel.requested"]
    assert (requested["run_id"], requested["outcome"], requested["previous_status"]) == (
        run_id,
        "already_cancelled",
        "cancelled",
    )
