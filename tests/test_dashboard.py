"""The dashboard's JSON endpoints and its access rules, over HTTP (httpx), against a broker
and a worker running in this test's event loop and a real Redis.

The browser test (tests/test_dashboard_browser.py) drives the page itself.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from broker import Broker, BrokerMetrics
from broker import decisions as decisions_module
from broker.activity import activity
from broker.dashboard_access import REQUEST_HEADER, TOKEN_HEADER, CancelAccess, DashboardMode
from broker.dashboard_routes import CANCEL_REASON, dashboard_routes
from broker.http import create_app
from sdk import Client, Event, RunContext, Worker
from sdk.keys import Keys
from sdk.partitions import Partitions
from sdk.scripts import RegisterRequest
from sdk.store import RunStore
from tests.helpers import (
    RULE,
    broker_drained,
    report_worker,
    run_of,
    serving,
    wait_for_status,
    wait_until,
)
from tests.processes import start_broker

pytestmark = pytest.mark.anyio

BASE = "http://127.0.0.1:8750"
CANCEL_HEADERS = {REQUEST_HEADER: "dashboard"}


def access(
    mode: DashboardMode = "on", token: str | None = None, loopback: bool = True
) -> CancelAccess:
    return CancelAccess(mode=mode, token=token, loopback=loopback)


@asynccontextmanager
async def web(
    broker: Broker, rules: CancelAccess | None = None, base_url: str = BASE
) -> AsyncIterator[httpx.AsyncClient]:
    routes = dashboard_routes(rules or access(), broker.dashboard, namespace=broker.keys.namespace)
    app = create_app(BrokerMetrics().registry, broker, routes)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
        yield client


async def runs(http: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await http.get("/v1/runs", params=params)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["runs"]
    return found


def by_report(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {run["event"]["data"]["reportId"]: run for run in found}


async def start(client: Client, report_id: str, **data: Any) -> str:
    event_id = await client.send("report/generate.requested", {"reportId": report_id, **data})
    return await run_of(client, event_id)


async def test_runs_lists_running_and_recently_finished_runs_with_filters(
    redis_url: str, namespace: str, client: Client, broker: Broker
) -> None:
    worker = report_worker(redis_url, namespace)
    async with serving(worker.serve), web(broker) as http:
        long_run = await start(client, "r1")
        short_run = await start(client, "r2", seconds=0)
        await wait_for_status(client, short_run, "completed")

        listed = by_report(await runs(http))
        assert listed["r1"]["run_id"] == long_run
        assert listed["r1"]["status"] == "running"
        assert listed["r1"]["worker_id"] == worker.worker_id
        assert listed["r1"]["event"]["name"] == "report/generate.requested"
        assert listed["r2"]["status"] == "completed"
        assert listed["r2"]["finished_at"] is not None
        # Unfinished runs first.
        assert [run["status"] for run in await runs(http)] == ["running", "completed"]

        assert set(by_report(await runs(http, status="completed"))) == {"r2"}
        assert set(by_report(await runs(http, status="running"))) == {"r1"}
        assert await runs(http, app="other-app") == []
        assert set(by_report(await runs(http, app="reports", function="generate-report"))) == {
            "r1",
            "r2",
        }
        assert await runs(http, function="another-function") == []
        assert len(await runs(http, limit="1")) == 1

        page = (await http.get("/v1/runs")).json()
        assert page["active_total"] == 1
        assert page["finished_total"] == 1
        for params, message in [
            ({"status": "sleeping"}, "status must be one of"),
            ({"limit": "0"}, "limit must be between"),
            ({"limit": "ten"}, "limit must be an integer"),
            ({"app": "a b"}, "invalid app id"),
        ]:
            response = await http.get("/v1/runs", params=params)
            assert response.status_code == 400
            assert message in response.json()["error"]


async def test_the_list_of_finished_runs_is_capped(
    redis_url: str,
    namespace: str,
    client: Client,
    broker: Broker,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sdk.scripts.FINISHED_RUNS_KEPT", 3)
    worker = report_worker(redis_url, namespace)
    async with serving(worker.serve), web(broker) as http:
        finished = [await start(client, f"r{i}", seconds=0) for i in range(5)]
        for run_id in finished:
            await wait_for_status(client, run_id, "completed")
        assert await redis.zcard(broker.keys.finished_runs) == 3
        listed = await runs(http)
    # The three that ended last; the others' records are still readable by id.
    assert {run["run_id"] for run in listed} == set(
        await redis.zrevrange(broker.keys.finished_runs, 0, -1)
    )
    assert await client.get_run(finished[0]) is not None


async def test_a_run_that_ends_between_the_two_reads_is_listed_once(
    redis_url: str, namespace: str, client: Client, broker: Broker, redis: Redis
) -> None:
    # What the page sees when a run finishes between its read of the unfinished runs and
    # its read of the finished ones: the run in both lists.
    worker = report_worker(redis_url, namespace)
    async with serving(worker.serve), web(broker) as http:
        run_id = await start(client, "r1", seconds=0)
        await wait_for_status(client, run_id, "completed")
        await redis.zadd(broker.keys.active_runs, {run_id: 1})
        listed = await runs(http)
    assert [(run["run_id"], run["status"]) for run in listed] == [(run_id, "completed")]


async def test_cancel_from_the_dashboard_stops_the_run(
    redis_url: str, namespace: str, client: Client, broker: Broker
) -> None:
    worker = report_worker(redis_url, namespace)
    async with serving(worker.serve), web(broker) as http:
        run_id = await start(client, "r1")
        other = await start(client, "r2")

        response = await http.post(f"/v1/runs/{run_id}/cancel", headers=CANCEL_HEADERS)
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert result["outcome"] == "signalled"
        assert (result["previous_status"], result["status"]) == ("running", "cancelling")

        info = await wait_for_status(client, run_id, "cancelled")
        assert info.cancelled_by == "api"
        assert info.cancel_reason == CANCEL_REASON
        listed = by_report(await runs(http))
        assert listed["r1"]["status"] == "cancelled"
        assert listed["r1"]["cancel_latency_ms"] is not None
        assert listed["r2"]["status"] == "running"
        assert (await client.get_run(other)).status == "running"  # type: ignore[union-attr]

        again = await http.post(f"/v1/runs/{run_id}/cancel", headers=CANCEL_HEADERS)
        assert again.json()["result"]["outcome"] == "already_cancelled"
        # No run with this id yet: the cancel is kept for it, and the answer says so.
        queued = await http.post("/v1/runs/no-such-run/cancel", headers=CANCEL_HEADERS)
        assert queued.json()["result"]["outcome"] == "pending"
        assert queued.json()["result"]["kept_until"] is not None
        invalid = await http.post("/v1/runs/%20bad/cancel", headers=CANCEL_HEADERS)
        assert invalid.status_code == 400


async def test_the_dashboard_cancels_as_an_operator_whatever_the_owner(
    redis_url: str, namespace: str, client: Client, broker: Broker
) -> None:
    worker = Worker("accounts", redis_url, namespace=namespace)

    @worker.function(id="export", trigger="export/requested", owner="data.accountId")
    async def export(ctx: RunContext) -> None:
        await anyio.sleep(60)

    async with serving(worker.serve), web(broker) as http:
        run_id = await run_of(client, await client.send("export/requested", {"accountId": "a1"}))
        assert (await client.cancel(run_id, actor="a2")).outcome == "forbidden"
        response = await http.post(f"/v1/runs/{run_id}/cancel", headers=CANCEL_HEADERS)
        assert response.json()["result"]["outcome"] == "signalled"
        await wait_for_status(client, run_id, "cancelled")


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 403, REQUEST_HEADER),
        ({**CANCEL_HEADERS, "Origin": "https://evil.example"}, 403, "cross-origin"),
        ({**CANCEL_HEADERS, "Sec-Fetch-Site": "cross-site"}, 403, "cross-site"),
    ],
)
async def test_a_cross_site_cancel_is_refused(
    broker: Broker, client: Client, headers: dict[str, str], status: int, message: str
) -> None:
    async with web(broker) as http:
        response = await http.post("/v1/runs/r-1/cancel", headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]


async def test_a_same_origin_cancel_passes_the_origin_check(broker: Broker) -> None:
    async with web(broker) as http:
        headers = {**CANCEL_HEADERS, "Origin": BASE, "Sec-Fetch-Site": "same-origin"}
        response = await http.post("/v1/runs/r-1/cancel", headers=headers)
    assert response.status_code == 200
    assert response.json()["result"]["outcome"] == "pending"


async def test_without_a_token_cancel_answers_only_to_a_loopback_host(broker: Broker) -> None:
    # A DNS name rebound to 127.0.0.1 reaches the broker with its own Host header.
    async with web(broker, base_url="http://rebound.example:8750") as http:
        response = await http.post("/v1/runs/r-1/cancel", headers=CANCEL_HEADERS)
    assert response.status_code == 403
    assert "only to localhost" in response.json()["error"]
    async with web(broker, base_url="http://localhost:8750") as http:
        response = await http.post("/v1/runs/r-1/cancel", headers=CANCEL_HEADERS)
    assert response.status_code == 200


async def test_a_token_is_required_when_given(broker: Broker) -> None:
    rules = access(token="s3cret-token", loopback=False)
    async with web(broker, rules, base_url="http://broker.internal:8750") as http:
        page = (await http.get("/")).text
        assert 'data-cancel="on"' in page
        assert 'data-token-needed="yes"' in page
        for token in (None, "wrong", "s3cret-token "):
            headers = (
                dict(CANCEL_HEADERS) if token is None else {**CANCEL_HEADERS, TOKEN_HEADER: token}
            )
            response = await http.post("/v1/runs/r-1/cancel", headers=headers)
            assert response.status_code == 401, token
            assert TOKEN_HEADER in response.json()["error"]
        response = await http.post(
            "/v1/runs/r-1/cancel", headers={**CANCEL_HEADERS, TOKEN_HEADER: "s3cret-token"}
        )
        assert response.status_code == 200
        assert response.json()["result"]["outcome"] == "pending"


async def test_cancel_is_off_on_a_public_address_without_a_token(broker: Broker) -> None:
    async with web(broker, access(loopback=False)) as http:
        page = (await http.get("/")).text
        response = await http.post("/v1/runs/r-1/cancel", headers=CANCEL_HEADERS)
        assert (await http.get("/v1/runs")).status_code == 200
    assert 'data-cancel="off"' in page
    assert "no --dashboard-token" in page
    assert response.status_code == 403
    assert "--dashboard-token" in response.json()["error"]


async def test_readonly_serves_everything_but_cancel(
    redis_url: str, namespace: str, client: Client, broker: Broker
) -> None:
    worker = report_worker(redis_url, namespace)
    async with serving(worker.serve), web(broker, access("readonly", token="t")) as http:
        run_id = await start(client, "r1")
        page = await http.get("/")
        assert page.status_code == 200
        assert 'data-cancel="off"' in page.text
        assert "read-only" in page.text
        for path in ("/v1/runs", "/v1/functions", "/v1/decisions", "/dashboard/dashboard.js"):
            assert (await http.get(path)).status_code == 200, path
        response = await http.post(
            f"/v1/runs/{run_id}/cancel", headers={**CANCEL_HEADERS, TOKEN_HEADER: "t"}
        )
        assert response.status_code == 403
        assert "read-only" in response.json()["error"]
        assert (await client.get_run(run_id)).status == "running"  # type: ignore[union-attr]
        # The JSON endpoints do not change anything either.
        assert (await http.post("/v1/runs")).status_code == 405


async def test_off_serves_no_dashboard(broker: Broker) -> None:
    async with web(broker, access("off")) as http:
        for path in ("/", "/v1/runs", "/v1/functions", "/v1/decisions", "/dashboard/dashboard.js"):
            assert (await http.get(path)).status_code == 404, path
        assert (await http.post("/v1/runs/r-1/cancel", headers=CANCEL_HEADERS)).status_code == 404
        assert (await http.get("/healthz")).status_code == 200


async def test_the_page_loads_nothing_from_elsewhere(broker: Broker) -> None:
    async with web(broker) as http:
        page = await http.get("/")
        assets = [
            await http.get(f"/dashboard/{name}") for name in ("dashboard.js", "dashboard.css")
        ]
        assert (await http.get("/dashboard/../settings.py")).status_code == 404
        assert (await http.get("/dashboard/index.html")).status_code == 404
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert re.search(r'<script src="/dashboard/dashboard\.js"', page.text)
    assert assets[0].headers["content-type"].startswith("text/javascript")
    for text in [page.text, *(asset.text for asset in assets)]:
        # The SVG namespace is a name (createElementNS), never fetched.
        text = text.replace('"http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|=\"//|@import|url\(", text)
    # Event data comes from any publisher: the script inserts text, never HTML.
    assert "innerHTML" not in assets[0].text


async def test_functions_show_rules_workers_and_stale_findings(
    redis_url: str, namespace: str, broker: Broker
) -> None:
    # Mid-deploy: an old worker declares the function without its cancel rule.
    new = report_worker(redis_url, namespace)
    old = Worker("reports", redis_url, namespace=namespace, app_version="v1")

    @old.function(id="generate-report", trigger="report/generate.requested")
    async def generate_report(ctx: RunContext) -> None:
        await anyio.sleep(60)

    async with serving(new.serve), serving(old.serve), web(broker) as http:
        page = (await http.get("/v1/functions")).json()
    (function,) = page["functions"]
    assert (function["app_id"], function["function_id"]) == ("reports", "generate-report")
    configs = {tuple(c["workers"]): c for c in function["configs"]}
    assert configs[(new.worker_id,)]["cancel_on"] == [
        {
            "event": RULE.event,
            "match": "data.reportId",
            "if": None,
            "timeout_s": None,
            "all_runs": False,
            "until_ms": None,
        }
    ]
    assert configs[(old.worker_id,)]["cancel_on"] == []
    assert [f["kind"] for f in function["findings"]] == ["drift"]
    assert {w["worker_id"] for w in page["workers"]} == {new.worker_id, old.worker_id}
    assert [f["kind"] for f in page["findings"]] == ["drift"]


async def test_decisions_record_what_each_cancel_event_did(
    redis_url: str, namespace: str, client: Client, broker: Broker, redis: Redis
) -> None:
    worker = report_worker(redis_url, namespace)
    async with serving(worker.serve), web(broker) as http:
        run_id = await start(client, "r1")
        matched = await client.send("report/cancel.requested", {"reportId": "r1"})
        tombstoned = await client.send("report/cancel.requested", {"reportId": "queued"})
        await redis.xadd(
            broker.keys.events, {"event": '{"name": "report/cancel.requested", "v": 9}'}
        )
        await wait_until(lambda: broker_drained(redis, namespace))
        await wait_for_status(client, run_id, "cancelled")
        response = await http.get("/v1/decisions", params={"limit": "10"})
        assert (await http.get("/v1/decisions", params={"limit": "1000"})).status_code == 400
    assert response.status_code == 200
    found = response.json()["decisions"]
    by_event = {d["event_id"]: d for d in found if d["decision"] != "dead_lettered"}
    assert by_event[matched]["decision"] == "matched"
    assert by_event[matched]["runs_matched"] == 1
    assert by_event[matched]["run_ids"] == [run_id]
    assert by_event[matched]["outcomes"] == {"signalled": 1}
    assert by_event[matched]["data"] == {"reportId": "r1"}
    assert by_event[matched]["rules"] == ["data.reportId"]
    assert by_event[matched]["consumer"] == broker.consumer
    assert by_event[tombstoned]["decision"] == "tombstoned"
    assert by_event[tombstoned]["runs_matched"] == 0
    (dead,) = [d for d in found if d["decision"] == "dead_lettered"]
    assert dead["reason"] == "unsupported_version"
    assert dead["event_name"] == "report/cancel.requested"
    # Newest first, dead letters and decisions of every broker merged.
    assert [d["at"] for d in found] == sorted((d["at"] for d in found), reverse=True)
    # Triggers are not cancel decisions.
    assert all(d["event_name"] == "report/cancel.requested" for d in found)


async def test_the_decisions_list_is_capped_and_newest_first(
    broker: Broker, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decisions_module, "DECISIONS_KEPT", 200)
    entries = [
        decisions_module.Recorded(at=1_000 + i, event_id=f"{i}-0", decision="unmatched")
        for i in range(1_000)
    ]
    for first in range(0, len(entries), 300):
        async with redis.pipeline(transaction=False) as pipe:
            decisions_module.queue(pipe, broker.keys, entries[first : first + 300])
            await pipe.execute()
    assert await redis.llen(broker.keys.decisions) == 200
    latest = await decisions_module.recent(redis, broker.keys, 3)
    assert [d.event_id for d in latest] == ["999-0", "998-0", "997-0"]


async def test_a_refused_record_does_not_hold_up_the_batch(
    redis_url: str, namespace: str, client: Client, broker: Broker, redis: Redis
) -> None:
    # Something else where the decisions go: LPUSH answers WRONGTYPE (logged as
    # decisions.not_recorded); the acknowledgement in the same round trip still lands, and
    # the cancel itself was applied.
    await redis.set(broker.keys.decisions, "not a list")
    worker = report_worker(redis_url, namespace)
    async with serving(worker.serve):
        run_id = await start(client, "r1")
        await client.send("report/cancel.requested", {"reportId": "r1"})
        await wait_for_status(client, run_id, "cancelled")
        await wait_until(lambda: broker_drained(redis, namespace))
    assert await redis.get(broker.keys.decisions) == "not a list"


async def test_endpoints_answer_503_while_the_broker_is_not_running(
    redis_url: str, namespace: str
) -> None:
    stopped = Broker(redis_url, namespace=namespace, metrics=BrokerMetrics())
    async with web(stopped) as http:
        response = await http.get("/v1/runs")
    assert response.status_code == 503
    assert "not running" in response.json()["error"]


def test_the_assets_ship_inside_the_package() -> None:
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        assert (resources.files("broker") / "web" / name).is_file(), name


@pytest.mark.e2e
def test_the_command_line_turns_cancel_off_on_a_public_address_and_can_turn_it_all_off(
    redis_url: str, namespace: str
) -> None:
    public, http = start_broker(redis_url, namespace, "--http-host", "0.0.0.0")
    try:
        warning = public.wait_for_log("dashboard.cancel_off")
        assert "--dashboard-token" in warning["reason"]
        url = http.replace("0.0.0.0", "127.0.0.1")
        assert 'data-cancel="off"' in httpx.get(url + "/").text
        refused = httpx.post(url + "/v1/runs/r-1/cancel", headers=CANCEL_HEADERS)
        assert refused.status_code == 403
    finally:
        assert public.terminate() == 0, public.output
    off, http = start_broker(redis_url, namespace, "--dashboard", "off")
    try:
        assert httpx.get(http + "/").status_code == 404
        assert httpx.get(http + "/v1/runs").status_code == 404
        assert httpx.get(http + "/healthz").status_code == 200
    finally:
        assert off.terminate() == 0, off.output


async def test_activity_counts_the_runs_that_ended_per_minute(redis: Redis, namespace: str) -> None:
    keys = Keys(namespace)
    store = RunStore(redis, keys)
    event = Event(name="x/requested", data={}, id="1-0")
    for run_id in ("a", "b", "c"):
        await store.register(
            RegisterRequest(
                run_id=run_id,
                app_id="reports",
                function_id="f",
                config_hash="c",
                worker_id="w1",
                event=event,
                entries=[],
            )
        )
    common = {"app_id": "reports", "function_id": "f", "worker_id": "w1"}
    await store.finish("a", "cancelled", [], **common)
    await store.finish("b", "completed", [], **common)
    await store.finish("c", "failed", [], error="E: boom", **common)
    page = await activity(redis, Partitions(redis, keys, 1))
    assert len(page.minutes) == 30
    now = page.minutes[-1]
    assert (now.ended, now.cancelled, now.failed) == (3, 1, 1)
    assert sum(m.ended for m in page.minutes[:-1]) == 0
