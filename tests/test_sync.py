"""Sync and registration state: what workers declare, and every stale finding."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import anyio
import httpx
import msgspec
import pytest
import structlog
from redis.asyncio import Redis

from broker import Broker, BrokerMetrics
from broker.findings import SyncState, Windows, config_changes
from broker.http import create_app
from broker.sync import EventWatch, SyncMonitor
from broker.sync_state import collect_state
from sdk import CancelOn, Client, Event, RunCancelled, RunContext, Worker
from sdk.function import Function, canonical_config
from sdk.keys import Keys
from sdk.rules import index_entries
from sdk.scripts import RegisterRequest
from sdk.store import RunStore
from sdk.wire import decode_config, decode_worker
from tests.helpers import serving, wait_until

pytestmark = pytest.mark.anyio

RULE = CancelOn(event="report/cancel.requested", match="data.reportId")


async def body(ctx: RunContext) -> None:
    await anyio.sleep(60)


def make_worker(
    redis_url: str,
    namespace: str,
    *,
    rules: tuple[CancelOn, ...] = (RULE,),
    app_version: str | None = None,
    functions: tuple[str, ...] = ("generate-report",),
    heartbeat_interval: float = 5.0,
) -> Worker:
    worker = Worker(
        "reports",
        redis_url,
        namespace=namespace,
        app_version=app_version,
        heartbeat_interval=heartbeat_interval,
    )
    for function_id in functions:
        worker.function(id=function_id, trigger=f"{function_id}/requested", cancel_on=rules)(body)
    return worker


def findings(state: SyncState, kind: str) -> list[msgspec.Struct]:
    return [f for f in state.findings if f.kind == kind]


async def state_of(redis: Redis, namespace: str) -> SyncState:
    return await collect_state(redis, Keys(namespace))


def test_config_hash_ignores_rule_order_and_changes_with_rules() -> None:
    other = CancelOn(event="report/deleted", match="data.reportId")

    def declare(*rules: CancelOn) -> Function:
        return Function.declare(id="f", trigger="t", cancel_on=rules, handler=body)

    assert declare(RULE, other).config_hash == declare(other, RULE).config_hash
    assert declare(RULE).config_hash != declare(other).config_hash
    assert declare().config_hash != declare(RULE).config_hash
    assert len(declare(RULE).config_hash) == 64


async def test_worker_registers_heartbeats_and_leaves(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    keys = Keys(namespace)
    worker = make_worker(redis_url, namespace, app_version="abc123", heartbeat_interval=0.05)
    fn = worker.functions["generate-report"]
    async with worker:
        record = await redis.hgetall(keys.worker(worker.worker_id))
        info = decode_worker(record["info"])
        assert info.app_id == "reports"
        assert info.app_version == "abc123"
        assert info.functions == {"generate-report": fn.config_hash}
        # The stored text is what the hash is of, and holds the whole configuration.
        stored = await redis.get(keys.config(fn.config_hash))
        assert hashlib.sha256(stored.encode()).hexdigest() == fn.config_hash
        assert decode_config(stored) == fn.config
        first = int(record["heartbeat_at"])

        async def heartbeat_moved() -> bool:
            return int(await redis.hget(keys.worker(worker.worker_id), "heartbeat_at")) > first

        await wait_until(heartbeat_moved, timeout=2)
        assert await redis.zscore(keys.workers, worker.worker_id) is not None
    assert await redis.zscore(keys.workers, worker.worker_id) is None
    assert not await redis.exists(keys.worker(worker.worker_id))


async def test_app_version_from_the_environment(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANCEL_APP_VERSION", "deadbeef")
    async with (
        make_worker(redis_url, namespace) as worker,
        Redis.from_url(redis_url, decode_responses=True) as redis,
    ):
        info = decode_worker(await redis.hget(Keys(namespace).worker(worker.worker_id), "info"))
    assert info.app_version == "deadbeef"


async def test_rolling_deploy_drift_is_reported_then_cleared(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    v1 = make_worker(redis_url, namespace, rules=(), app_version="v1")
    v2 = make_worker(redis_url, namespace, app_version="v2")
    async with v2:
        async with v1:
            state = await state_of(redis, namespace)
            (drift,) = findings(state, "drift")
            assert state.stale
            old, new = (w.functions["generate-report"].config_hash for w in (v1, v2))
            assert drift.details["configs"] == {
                old: {"workers": [v1.worker_id], "app_versions": ["v1"]},
                new: {"workers": [v2.worker_id], "app_versions": ["v2"]},
            }
            (changes,) = drift.details["differences"].values()
            assert changes["rules_added"] + changes["rules_removed"] == [
                "report/cancel.requested match data.reportId"
            ]
        state = await state_of(redis, namespace)
        assert findings(state, "drift") == []
        assert [w.worker_id for w in state.workers] == [v2.worker_id]


async def test_a_worker_is_live_for_two_and_a_half_heartbeat_intervals(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    keys = Keys(namespace)
    async with make_worker(redis_url, namespace) as v2:
        # A v1 worker that stopped heartbeating without leaving (kill -9): its record stays.
        info = decode_worker(await redis.hget(keys.worker(v2.worker_id), "info"))
        ghost = msgspec.structs.replace(
            info,
            worker_id="ghost",
            heartbeat_interval_s=0.1,
            functions={"generate-report": "0" * 64},
        )
        now = (await state_of(redis, namespace)).generated_at
        for age_ms, drift_expected in ((200, True), (300, False)):
            await redis.hset(
                keys.worker("ghost"),
                mapping={"info": msgspec.json.encode(ghost), "heartbeat_at": now - age_ms},
            )
            await redis.zadd(keys.workers, {"ghost": now - age_ms})
            assert bool(findings(await state_of(redis, namespace), "drift")) is drift_expected


async def register_run(
    redis: Redis, namespace: str, run_id: str, *, function_id: str, config_hash: str
) -> RunStore:
    store = RunStore(redis, Keys(namespace))
    event = Event(name=f"{function_id}/requested", data={"reportId": run_id}, id=f"1-{run_id}")
    await store.register(
        RegisterRequest(
            run_id=run_id,
            app_id="reports",
            function_id=function_id,
            config_hash=config_hash,
            worker_id="elsewhere",
            event=event,
            entries=index_entries((RULE,), event, store.keys),
        )
    )
    return store


async def test_a_run_with_a_configuration_no_live_worker_declares(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    async with make_worker(redis_url, namespace) as worker:
        store = await register_run(
            redis, namespace, "r1", function_id="generate-report", config_hash="f" * 64
        )
        (unsynced,) = findings(await state_of(redis, namespace), "unsynced_run")
        assert unsynced.function_id == "generate-report"
        assert unsynced.details["config_hash"] == "f" * 64
        assert unsynced.details["active_runs"] == 1
        assert unsynced.details["served"] == [worker.functions["generate-report"].config_hash]
        await store.finish(
            "r1", "completed", [], app_id="reports", function_id="f", worker_id="elsewhere"
        )
        assert findings(await state_of(redis, namespace), "unsynced_run") == []


async def test_runs_of_a_function_the_app_no_longer_declares(
    redis_url: str, namespace: str, redis: Redis, broker: Broker
) -> None:
    keys = Keys(namespace)
    old = make_worker(redis_url, namespace, functions=("generate-report", "old-export"))
    async with old:
        old_export = old.functions["old-export"].config_hash
    store = await register_run(
        redis, namespace, "r9", function_id="old-export", config_hash=old_export
    )
    async with make_worker(redis_url, namespace):

        async def synced() -> bool:
            return await redis.hkeys(keys.app_functions("reports")) == ["generate-report"]

        await wait_until(synced)
        (gone,) = findings(await state_of(redis, namespace), "gone_function")
        assert (gone.app_id, gone.function_id) == ("reports", "old-export")
        assert gone.details["active_runs"] == 1
        await store.finish(
            "r9", "completed", [], app_id="reports", function_id="f", worker_id="elsewhere"
        )
        assert not findings(await state_of(redis, namespace), "gone_function")


async def test_sync_history_records_what_each_sync_changed(
    redis_url: str, namespace: str, redis: Redis, broker: Broker
) -> None:
    keys = Keys(namespace)
    async with make_worker(redis_url, namespace, rules=(), app_version="v1"):
        pass
    async with make_worker(
        redis_url, namespace, app_version="v2", functions=("generate-report", "export")
    ):
        pass

    async def two_syncs() -> bool:
        return await redis.xlen(keys.app_history("reports")) == 2

    await wait_until(two_syncs)
    history = (await state_of(redis, namespace)).history["reports"]
    latest, first = history
    assert (first.app_version, first.added, first.removed, first.changed) == (
        "v1",
        ["generate-report"],
        [],
        {},
    )
    assert latest.app_version == "v2"
    assert latest.added == ["export"]
    change = latest.changed["generate-report"]
    assert change["rules_added"] == ["report/cancel.requested match data.reportId"]
    assert change["rules_removed"] == []


@pytest.fixture
async def fast_broker(redis_url: str, namespace: str) -> AsyncIterator[Broker]:
    broker = Broker(
        redis_url,
        namespace=namespace,
        windows=Windows(dead_rule_after_s=0.3, orphan_window_s=60),
        cancel_event_names=frozenset({"render/stop"}),
    )
    async with serving(broker.run):
        yield broker


async def test_cancel_events_nobody_listens_to_are_reported(
    redis_url: str, namespace: str, redis: Redis, client: Client, fast_broker: Broker
) -> None:
    for _ in range(3):
        await client.send("report/cancel.requested", {"reportId": "r1"})
    await client.send("render/stop", {"id": 1})  # named cancel-like by configuration
    await client.send("report/generate.requested", {"reportId": "r1"})  # not cancel-like

    async def reported() -> bool:
        return len(findings(await fast_broker.sync_state(), "orphan_cancel_event")) == 2

    await wait_until(reported)
    orphans = {
        f.event_name: f for f in findings(await fast_broker.sync_state(), "orphan_cancel_event")
    }
    assert orphans["report/cancel.requested"].details["count"] == 3
    assert orphans["render/stop"].details["count"] == 1
    assert orphans["report/cancel.requested"].details["last_seen"] > 0

    async with make_worker(redis_url, namespace):  # now a live rule listens

        async def cleared() -> bool:
            names = {
                f.event_name
                for f in findings(await fast_broker.sync_state(), "orphan_cancel_event")
            }
            return names == {"render/stop"}

        await wait_until(cleared)


async def test_cancel_events_become_orphans_again_when_a_deploy_drops_the_rule(
    redis_url: str, namespace: str, redis: Redis, client: Client, fast_broker: Broker
) -> None:
    """The rule's selector stays declared in Redis after its last worker left; what
    decides is whether a live worker's rule listens."""
    async with make_worker(redis_url, namespace):
        await fast_broker_scanned(fast_broker, "report/cancel.requested", listened=True)
    assert await redis.hkeys(Keys(namespace).rules("report/cancel.requested"))
    async with make_worker(redis_url, namespace, rules=()):  # the deploy without cancel_on
        await fast_broker_scanned(fast_broker, "report/cancel.requested", listened=False)
        await client.send("report/cancel.requested", {"reportId": "r1"})

        async def reported() -> bool:
            names = [
                f.event_name
                for f in findings(await fast_broker.sync_state(), "orphan_cancel_event")
            ]
            return names == ["report/cancel.requested"]

        await wait_until(reported)


async def fast_broker_scanned(broker: Broker, event_name: str, *, listened: bool) -> None:
    """Wait until the broker's monitor knows whether a live rule listens to ``event_name``."""

    async def known() -> bool:
        return (event_name in broker._watch.rule_events) is listened

    await wait_until(known)


async def test_a_rule_whose_event_never_arrives_is_dead_with_a_suggestion(
    redis_url: str, namespace: str, client: Client, fast_broker: Broker
) -> None:
    typo = CancelOn(event="report/cancel.request", match="data.reportId")
    async with make_worker(redis_url, namespace, rules=(typo,)):
        await client.send("report/cancel.requested", {"reportId": "r1"})

        async def dead() -> bool:
            return bool(findings(await fast_broker.sync_state(), "dead_rule"))

        await wait_until(dead, timeout=5)
        (finding,) = findings(await fast_broker.sync_state(), "dead_rule")
        assert finding.event_name == "report/cancel.request"
        assert finding.details["suggestion"] == "report/cancel.requested"
        assert finding.details["functions"] == ["reports/generate-report"]
        assert "did you mean 'report/cancel.requested'" in finding.message


async def test_a_rule_whose_event_arrives_is_alive(
    redis_url: str, namespace: str, client: Client, fast_broker: Broker
) -> None:
    async with make_worker(redis_url, namespace):
        await anyio.sleep(0.2)
        for _ in range(4):
            await client.send("report/cancel.requested", {"reportId": "nobody"})
            await anyio.sleep(0.1)
        state = await fast_broker.sync_state()
        assert findings(state, "dead_rule") == []


async def test_monitor_logs_each_finding_once_and_sets_gauges(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    metrics = BrokerMetrics()
    keys = Keys(namespace)
    monitor = SyncMonitor(
        redis,
        keys,
        EventWatch(keys, frozenset(), structlog.get_logger()),
        metrics,
        Windows(),
        structlog.get_logger(),
    )
    v1 = make_worker(redis_url, namespace, rules=())
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(make_worker(redis_url, namespace))
        with structlog.testing.capture_logs() as logs:
            await stack.enter_async_context(v1)
            await monitor.scan()
            await monitor.scan()
            assert metrics.stale_findings.labels(kind="drift")._value.get() == 1
            assert metrics.live_workers._value.get() == 2
            await v1.__aexit__(None, None, None)
            stack.pop_all()
            await monitor.scan()
    stale = [entry for entry in logs if entry["event"] == "sync.stale"]
    resolved = [entry for entry in logs if entry["event"] == "sync.resolved"]
    assert [(e["kind"], e["function_id"]) for e in stale] == [("drift", "generate-report")]
    assert stale[0]["log_level"] == "warning"
    assert [e["kind"] for e in resolved] == ["drift"]
    assert metrics.stale_findings.labels(kind="drift")._value.get() == 0


async def test_sync_endpoint_serves_the_state(redis_url: str, namespace: str, redis: Redis) -> None:
    class Status:
        async def sync_state(self) -> SyncState:
            return await state_of(redis, namespace)

        async def readiness(self) -> tuple[bool, str]:
            return True, "ready"

    app = create_app(BrokerMetrics().registry, Status())
    async with make_worker(redis_url, namespace, rules=()), make_worker(redis_url, namespace):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as web:
            response = await web.get("/v1/sync")
    assert response.status_code == 200
    body = response.json()
    assert [f["kind"] for f in body["findings"]] == ["drift"]
    assert len(body["workers"]) == 2
    assert body["functions"][0]["function_id"] == "generate-report"


async def test_a_run_is_matched_only_against_its_own_configuration(
    redis_url: str, namespace: str, client: Client, broker: Broker
) -> None:
    # Mid rolling deploy: v1's runs declared no cancel rule, v2's do. The cancel event stops
    # the v2 run and, truthfully, not the v1 run, whose code never asked to be cancelled.
    v1 = make_worker(redis_url, namespace, rules=())
    v2 = make_worker(redis_url, namespace)
    event = Event(name="generate-report/requested", data={"reportId": "r1"})
    async with v1, v2, anyio.create_task_group() as tg:
        outcomes: dict[str, str] = {}

        async def run(worker: Worker, name: str) -> None:
            try:
                async with worker.run("generate-report", event) as ctx:
                    outcomes[name] = ctx.run_id
                    await anyio.sleep(60)
            except RunCancelled:
                outcomes[name] = "cancelled"

        tg.start_soon(run, v1, "v1")
        tg.start_soon(run, v2, "v2")
        await wait_until(lambda: _both_started(outcomes))
        v1_run = outcomes["v1"]
        await client.send("report/cancel.requested", {"reportId": "r1"})
        await wait_until(lambda: _is(outcomes, "v2", "cancelled"))
        info = await client.get_run(v1_run)
        assert info is not None
        assert info.status == "running"
        assert info.config_hash == v1.functions["generate-report"].config_hash
        tg.cancel_scope.cancel()


async def _both_started(outcomes: dict[str, str]) -> bool:
    return len(outcomes) == 2


async def _is(outcomes: dict[str, str], key: str, value: str) -> bool:
    return outcomes.get(key) == value


async def test_sync_history_keeps_the_configured_number_of_syncs(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    broker = Broker(redis_url, namespace=namespace, history_length=2)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        for version in ("v1", "v2", "v3", "v4"):
            async with make_worker(redis_url, namespace, app_version=version):
                pass

        async def last_recorded() -> bool:
            history = await redis.xrevrange(Keys(namespace).app_history("reports"), count=1)
            return bool(history) and history[0][1]["app_version"] == "v4"

        await wait_until(last_recorded)
        tg.cancel_scope.cancel()
    history = (await state_of(redis, namespace)).history["reports"]
    assert [entry.app_version for entry in history] == ["v4", "v3"]


def test_a_drift_diff_shows_the_whole_rule() -> None:
    """Rules that differ only in their expression or timeout read differently."""
    old = canonical_config("f", "a/b", (CancelOn(event="c/d", match="data.id", timeout="1h"),))
    new = canonical_config(
        "f", "a/b", (CancelOn(event="c/d", match="data.id", if_="async.data.hard == true"),)
    )
    changes = config_changes(old, new)
    assert changes["rules_removed"] == ["c/d match data.id timeout 3600s"]
    assert changes["rules_added"] == ["c/d match data.id if async.data.hard == true"]
    at = canonical_config(
        "f", "a/b", (CancelOn(event="c/d", match="data.id", timeout="2026-12-31T23:00:00Z"),)
    )
    assert config_changes(None, at)["rules_added"] == [
        "c/d match data.id until 2026-12-31T23:00:00Z"
    ]
