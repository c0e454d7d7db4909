"""The peers' own cases, end to end: a broker and the worker of ``tests/apps/conformance.py``
as processes, each case's trigger and cancel published through the client. A case that
differs on purpose is checked against our documented outcome, and its documentation line
must exist."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from sdk import Client
from tests.conformance_cases import CASES, Case
from tests.helpers import broker_drained, run_of, status_is, topology_url, wait_until
from tests.processes import ROOT, broker_and_worker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture(scope="module")
def namespace() -> str:
    return "conformance"


@pytest.fixture(scope="module", autouse=True)
def processes(request: pytest.FixtureRequest, topology: str, namespace: str) -> Iterator[None]:
    with broker_and_worker(topology_url(request, topology), namespace, app="conformance"):
        yield


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_a_peer_case(case: Case, redis_url: str, namespace: str, redis: Redis) -> None:
    async with Client(redis_url, namespace=namespace) as client:
        run_id = await run_of(client, await client.send(case.trigger_name, case.trigger))
        await client.send(case.cancel_name, case.cancel)
        if case.expected == "cancelled":
            await wait_until(lambda: status_is(client, run_id, "cancelled"), timeout=10)
        else:
            await wait_until(lambda: broker_drained(redis, namespace), timeout=10)
        info = await client.get_run(run_id)
        assert info is not None
        assert info.status == case.expected, case.source
        if case.rule_error is not None:
            assert info.rule_error is not None
            assert case.rule_error in info.rule_error
        elif case.expected == "running":
            assert info.rule_error is None, info.rule_error
        if info.status == "running":
            await client.cancel(run_id)  # the worker stops with nothing left behind


async def test_singleton_cancel_mode_latest_wins(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    """Inngest's singleton ``mode: "cancel"`` (the latest run of a key wins), as a rule on
    the function's own trigger: each trigger cancels the older runs of its key, never its
    own, and never a newer one. inngest/inngest tests/golang/singleton_test.go:
    TestSingletonCancelMode (one run of the key finishes, the earlier are cancelled) and
    TestSingletonDifferentKeysBothRun (another key is untouched: ``u2`` here)."""
    trigger = "conformance/singleton.requested"
    async with Client(redis_url, namespace=namespace) as client:
        first = await run_of(client, await client.send(trigger, {"userId": "u1"}))
        other = await run_of(client, await client.send(trigger, {"userId": "u2"}))
        second_event = await client.send(trigger, {"userId": "u1"})
        second = await run_of(client, second_event)
        await wait_until(lambda: status_is(client, first, "cancelled"), timeout=10)
        third_event = await client.send(trigger, {"userId": "u1"})
        third = await run_of(client, third_event)
        await wait_until(lambda: status_is(client, second, "cancelled"), timeout=10)
        await wait_until(lambda: broker_drained(redis, namespace), timeout=10)
        runs = {run_id: await client.get_run(run_id) for run_id in (first, second, third, other)}
        assert {run_id: info.status for run_id, info in runs.items() if info} == {
            first: "cancelled",
            second: "cancelled",
            third: "running",
            other: "running",
        }
        assert runs[second].cancelled_by == third_event  # type: ignore[union-attr]
        for run_id in (third, other):
            await client.cancel(run_id)


@pytest.mark.parametrize("case", [c for c in CASES if c.differs], ids=lambda c: c.id)
def test_a_case_that_differs_on_purpose_is_documented(case: Case) -> None:
    assert case.peer is not None
    assert case.peer != case.expected
    page, anchor = str(case.differs).split("#")
    text = (ROOT / page).read_text()
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    slugs = {_slug(heading) for heading in headings}
    assert anchor in slugs, f"{page} has no heading for #{anchor}"


def _slug(heading: str) -> str:
    kept = "".join(ch for ch in heading.lower() if ch.isalnum() or ch in " -_")
    return "-".join(kept.split())
