"""Redis Sentinel: a real primary, replica and three Sentinels (tests/sentinel.py), the
broker and a worker as separate processes given a ``redis+sentinel://`` URL.

- ``redis+sentinel://`` URLs, read as redis-py's Sentinel support needs them.
- A publisher that waits for replicas (``wait_replicas``) reports a write no replica
  acknowledged in time, with its result.
- A failover to a replica that lagged: the worker reconciles the runs it holds with what
  the new primary holds, so that no record stays unfinished once its body is gone and a
  run whose record was lost is cancellable again; cancels published after the failover
  land.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from sdk import Client, ConfigurationError, InvalidRedisUrlError, NotReplicatedError
from sdk.keys import Keys
from sdk.reconcile import GONE_REASON, RecentOutcomes, RecordedOutcome
from sdk.sentinel import parse_sentinel_url
from sdk.urls import redact_url
from tests.helpers import run_of, wait_for_status
from tests.processes import start_broker, start_worker
from tests.sentinel import SentinelSetup


@pytest.fixture
def sentinel() -> Iterator[SentinelSetup]:
    with SentinelSetup() as setup:
        yield setup


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_primarys_options() -> None:
    parts = parse_sentinel_url(
        "rediss+sentinel://app:s3cret@10.0.0.1:26379,[::1]:26380/my%20service/3"
        "?sentinel_password=other&socket_timeout=4&ssl_cert_reqs=none"
    )
    assert parts is not None
    assert parts.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert parts.service == "my service"
    assert parts.primary["username"] == "app"
    assert parts.primary["password"] == "s3cret"
    assert parts.primary["db"] == 3
    assert parts.primary["ssl"] is True
    assert parts.primary["ssl_cert_reqs"] == "none"
    assert "sentinel_password" not in parts.primary
    assert parts.sentinel_options["password"] == "other"
    assert parse_sentinel_url("redis://localhost:6379/0") is None
    for wrong in ("redis+sentinel:///cancel", "redis+sentinel://h:1", "redis+sentinel://h/x"):
        with pytest.raises(InvalidRedisUrlError):
            parse_sentinel_url(wrong)
    shown = redact_url("redis+sentinel://u:pw@h:1/cancel?sentinel_password=x")
    assert "pw" not in shown
    assert "=x" not in shown


def test_recent_outcomes_are_bounded_in_number() -> None:
    recent = RecentOutcomes(kept=3)
    for i in range(5):
        recent.remember(RecordedOutcome(f"r{i}", 0, "generate", "completed", ()))
    assert len(recent) == 3
    assert recent.get("r0") is None
    assert recent.get("r4") is not None


def test_waiting_for_replicas_is_refused_on_a_cluster() -> None:
    with pytest.raises(ConfigurationError, match="not supported on Redis Cluster"):
        Client("redis+cluster://127.0.0.1:1", wait_replicas=1)
    with pytest.raises(ConfigurationError, match="wait_timeout"):
        Client("redis://127.0.0.1:1/0", wait_replicas=1, wait_timeout=30)


@pytest.mark.anyio
@pytest.mark.e2e
async def test_a_publisher_waiting_for_a_replica_reports_a_cancel_it_did_not_get(
    sentinel: SentinelSetup,
) -> None:
    """With the replica stopped, a cancel is applied by the primary and the publisher that
    waits for one replica says so (the result included) after its timeout; one that does
    not wait says nothing, as before. Once the replica is back, the same cancel passes."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    async with (
        Client(sentinel.url, namespace=namespace, wait_replicas=1, wait_timeout=0.3) as durable,
        Client(sentinel.url, namespace=namespace) as plain,
    ):
        assert await durable.send("report/generate.requested", {"reportId": "w"})
        sentinel.pause_replica()
        try:
            started = time.monotonic()
            with pytest.raises(NotReplicatedError) as refused:
                await durable.cancel("job-1")
            waited = time.monotonic() - started
            assert (refused.value.wanted, refused.value.acknowledged) == (1, 0)
            assert refused.value.result.outcome == "pending"  # applied by the primary
            assert 0.25 < waited < 2.0
            assert (await plain.cancel("job-2")).outcome == "pending"
        finally:
            sentinel.resume_replica()
        result = await durable.cancel("job-1")
        assert result.outcome == "pending"
        print(f"a cancel no replica acknowledged was reported after {waited:.2f} s")


def _lagging_copy(record: dict[str, str], run_id: str) -> dict[str, str]:
    return {**record, "run_id": run_id, "status": "running"}


@pytest.mark.anyio
@pytest.mark.e2e
async def test_after_a_failover_to_a_lagging_replica_no_run_is_left_unfinished(
    sentinel: SentinelSetup,
) -> None:
    """The replica lags as the primary crashes: it lacks the outcomes of two runs that
    completed, the registration of a run still running, and has a run record the worker
    never finished. (The lag is made by writing those keys to the replica alone,
    ``replica-read-only no``, as a lagging replica would hold them; the failover itself
    is the Sentinels', after SIGKILL of the primary.) After the failover, the worker
    records the two outcomes again (``Client.wait`` returns), registers the run again (a
    cancel stops it), records the unknown run ``lost`` with the reason, and the untouched
    runs go on; a trigger and cancels published after the failover work."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    keys = Keys(namespace)
    broker, _ = start_broker(sentinel.url, namespace)
    worker = start_worker(sentinel.url, namespace, heartbeat_interval="1", shutdown_timeout="0.2")
    try:
        async with Client(sentinel.url, namespace=namespace) as client:

            async def start(report: str, **data: Any) -> str:
                event = await client.send("report/generate.requested", {"reportId": report, **data})
                return await run_of(client, event)

            short = [await start(f"short-{i}", seconds=0) for i in range(2)]
            long = {f"long-{i}": await start(f"long-{i}") for i in range(4)}
            for run_id in short:
                await wait_for_status(client, run_id, "completed")
            for run_id in long.values():
                await wait_for_status(client, run_id, "running")
            assert sentinel.replica is not None
            replica = sentinel.node(sentinel.replica)
            primary = sentinel.node(sentinel.primary)
            worker_id = primary.hget(keys.run(short[0]), "worker_id")
            assert worker_id
            # What a replica that lagged holds: the short runs' registrations but not their
            # outcomes, not long-0's registration, and a run its worker no longer knows.
            replica.config_set("replica-read-only", "no")
            lost_record = long["long-0"]
            ghost = f"ghost-{uuid.uuid4().hex[:8]}"
            for run_id in short:
                replica.hset(keys.run(run_id), mapping={"status": "running"})
                replica.hdel(keys.run(run_id), "finished_at")
                replica.sadd(keys.worker_runs(worker_id), run_id)
            replica.delete(keys.run(lost_record))
            replica.hset(
                keys.run(ghost), mapping=_lagging_copy(primary.hgetall(keys.run(short[1])), ghost)
            )
            replica.sadd(keys.worker_runs(worker_id), ghost)
            for run_id in short:
                assert replica.hget(keys.run(run_id), "status") == "running"
            replica.close()
            primary.close()

            failover_s = await anyio.to_thread.run_sync(sentinel.fail_over)
            failed_over = time.monotonic()
            line = await anyio.to_thread.run_sync(
                lambda: worker.wait_for_log("worker.reconciled", timeout=20)
            )
            reconciled_s = time.monotonic() - failed_over
            assert (line["recorded_again"], line["registered_again"], line["recorded_lost"]) == (
                2,
                1,
                1,
            )
            for run_id in short:
                info = await client.wait(run_id, timeout=5)
                assert info.status == "completed"
            gone = await client.wait(ghost, timeout=5)
            assert (gone.status, gone.error) == ("lost", GONE_REASON)
            info = await client.get_run(lost_record)
            assert info is not None
            assert info.status == "running"

            cancelled_at = time.monotonic()
            for report in ("long-0", "long-1"):
                await client.send("report/cancel.requested", {"reportId": report})
            for report in ("long-0", "long-1"):
                info = await wait_for_status(client, long[report], "cancelled")
                assert info.cancel_reason == "cancel event report/cancel.requested"
            cancel_s = time.monotonic() - cancelled_at
            for report in ("long-2", "long-3"):
                assert (await client.get_run(long[report])).status == "running"  # type: ignore[union-attr]
            after = await start("after", seconds=0)
            await wait_for_status(client, after, "completed")
            assert broker.logs("redis.server_changed")
            assert not broker.logs("worker.lost")
            print(
                f"failover {failover_s:.2f} s; reconciled {reconciled_s:.2f} s later"
                f" (2 outcomes recorded again, 1 run registered again, 1 recorded lost);"
                f" 2 cancels landed {cancel_s:.2f} s after publishing"
            )
    finally:
        worker.terminate()
        broker.terminate()
