"""Runs no rule can ever reach, and cancel events that match nothing: said, with why.

``report_id`` in the trigger, ``data.reportId`` in the rule: the run is indexed under
nothing, and no cancel event will ever stop it by that rule. The worker says so when the
run registers, and the broker reports it (``uncancellable_run``). A cancel event with no
value at a declared rule's path is ``unmatched`` with the reason, in its decision, on the
dashboard and in the decision's log line. A worker and a broker as separate processes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from broker import EmbeddedRedis
from sdk import CancelOn, Client
from sdk.rules import unreachable_rules
from sdk.wire import Event
from tests.helpers import run_of, wait_until
from tests.processes import ProcessHandle, start_broker, start_worker, sync_status

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def processes(
    redis_server: EmbeddedRedis, namespace: str
) -> Iterator[tuple[ProcessHandle, str, ProcessHandle]]:
    broker, base = start_broker(redis_server.url, namespace)
    worker = start_worker(redis_server.url, namespace)
    yield broker, base, worker
    worker.terminate()
    broker.terminate()


@pytest.mark.e2e
async def test_a_run_whose_trigger_lacks_its_rules_key_is_reported(
    redis_server: EmbeddedRedis,
    namespace: str,
    processes: tuple[ProcessHandle, str, ProcessHandle],
) -> None:
    _, base, worker = processes
    async with Client(redis_server.url, namespace=namespace) as client:
        # `quiet`: the test worker's body records nothing (it would read data.reportId).
        data = {"report_id": "r1", "quiet": True, "seconds": 30}
        run_id = await run_of(client, await client.send("report/generate.requested", data))
        warning = worker.wait_for_log("run.uncancellable")
        assert (warning["run_id"], warning["rule"]) == (
            run_id,
            "report/cancel.requested match data.reportId",
        )
        assert warning["suggestion"] == "data.report_id"

        async def reported() -> bool:
            code, state = await sync_status(redis_server.url, namespace)
            return code == 1 and any(f["kind"] == "uncancellable_run" for f in state["findings"])

        await wait_until(reported, timeout=20, interval=0.2)
        _, state = await sync_status(redis_server.url, namespace)
        (finding,) = [f for f in state["findings"] if f["kind"] == "uncancellable_run"]
        assert (finding["app_id"], finding["function_id"]) == ("reports", "generate-report")
        assert finding["details"]["last_run_id"] == run_id
        assert finding["details"]["trigger_keys"] == ["quiet", "report_id", "seconds"]
        assert "did you mean data.report_id?" in finding["message"]
        async with httpx.AsyncClient(base_url=base) as http:
            page = (await http.get("/v1/functions")).json()
        (row,) = [f for f in page["functions"] if f["function_id"] == "generate-report"]
        assert "uncancellable_run" in {f["kind"] for f in row["findings"]}
        await client.cancel(run_id)


@pytest.mark.e2e
async def test_a_cancel_event_without_the_rules_key_says_why_it_matched_nothing(
    redis_server: EmbeddedRedis,
    redis: Redis,
    namespace: str,
    processes: tuple[ProcessHandle, str, ProcessHandle],
) -> None:
    broker, base, _ = processes
    async with Client(redis_server.url, namespace=namespace) as client:
        event_id = await client.send("report/cancel.requested", {"report_id": "r9"})
        expected = "no value at data.reportId for reports/generate-report's rule"
        async with httpx.AsyncClient(base_url=base) as http:

            async def decided() -> bool:
                page = (await http.get("/v1/decisions")).json()
                return any(d["event_id"] == event_id for d in page["decisions"])

            await wait_until(decided, timeout=10)
            page = (await http.get("/v1/decisions")).json()
        (decision,) = [d for d in page["decisions"] if d["event_id"] == event_id]
        assert (decision["decision"], decision["detail"]) == ("unmatched", expected)
        (line,) = [line for line in broker.logs("cancel.decided") if line["event_id"] == event_id]
        assert (line["decision"], line["detail"]) == ("unmatched", expected)


def test_unreachable_rules_name_the_near_miss() -> None:
    rules = (
        CancelOn(event="report/cancel.requested", match="data.reportId"),
        CancelOn(event="user/deleted", match="data.user.id"),
        CancelOn(event="account/closed", match="data.accountId"),
        CancelOn(event="all/stop", if_="true"),
    )
    trigger = Event(name="x", data={"report_id": "r1", "user": {"uid": 7}, "accountId": 3})
    found = {u.rule.event: (u.keys, u.suggestion) for u in unreachable_rules(rules, trigger)}
    assert found == {
        "report/cancel.requested": (("accountId", "report_id", "user"), "data.report_id"),
        "user/deleted": (("uid",), "data.user.uid"),
    }
    assert (
        unreachable_rules(
            rules, Event(name="x", data={"reportId": 1, "user": {"id": 2}, "accountId": 3})
        )
        == []
    )
