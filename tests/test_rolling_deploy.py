"""A rolling deploy with real processes: the stale configuration is impossible to miss.

Worker v1 runs the old code (no ``cancel_on``), worker v2 the new; while both are live
the drift shows in ``cancel-broker sync status`` (exit 1), ``GET /v1/sync``, the gauge and
one warning log line; when v1 goes (a clean stop, or kill -9) it clears.
"""

from __future__ import annotations

import json
import subprocess
import sys

import anyio
import httpx
import pytest

from tests.helpers import wait_until
from tests.processes import ROOT, ProcessHandle, start_broker, start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

HEARTBEAT = "0.2"


def sync_status(redis_url: str, namespace: str, *extra: str) -> tuple[int, str]:
    args = ["sync", "status", "--redis-url", redis_url, "--namespace", namespace, *extra]
    result = subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not result.stderr, result.stderr
    return result.returncode, result.stdout


async def gauge(http: str, kind: str) -> float:
    async with httpx.AsyncClient(base_url=http) as web:
        text = (await web.get("/metrics")).text
    line = f'cancel_broker_stale_findings{{kind="{kind}"}} '
    return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])


def start_version(redis_url: str, namespace: str, version: str) -> ProcessHandle:
    return start_worker(
        redis_url,
        namespace,
        reports_version=version,
        cancel_app_version=version,
        heartbeat_interval=HEARTBEAT,
        shutdown_timeout="0.2",
    )


async def test_rolling_deploy_is_reported_and_cleared(redis_url: str, namespace: str) -> None:
    # Findings computed again every 0.5 s, not 5 s: each step below waits for one.
    broker, http = start_broker(redis_url, namespace, "--sync-rescan", "0.5")
    workers: list[ProcessHandle] = []
    try:
        workers.append(start_version(redis_url, namespace, "v2"))
        code, out = await anyio.to_thread.run_sync(sync_status, redis_url, namespace)
        assert code == 0, out
        assert "OK: no stale configuration" in out

        v1 = start_version(redis_url, namespace, "v1")
        workers.append(v1)
        code, out = await anyio.to_thread.run_sync(sync_status, redis_url, namespace)
        assert code == 1, out
        assert "drift" in out
        assert "reports/generate-report: live workers serve 2 configurations" in out
        assert "rule report/cancel.requested match data.reportId" in out

        code, raw = await anyio.to_thread.run_sync(sync_status, redis_url, namespace, "--json")
        assert code == 1
        state = json.loads(raw)
        (drift,) = state["findings"]
        versions = sorted(c["app_versions"][0] for c in drift["details"]["configs"].values())
        assert versions == ["v1", "v2"]

        async with httpx.AsyncClient(base_url=http) as web:
            body = (await web.get("/v1/sync")).json()
        assert [f["kind"] for f in body["findings"]] == ["drift"]

        async def gauge_is(value: float) -> bool:
            return await gauge(http, "drift") == value

        await wait_until(lambda: gauge_is(1.0))
        assert len(broker.logs("sync.stale")) == 1  # one line per finding, not per scan

        # v1 stops cleanly: deregistered at once.
        assert await anyio.to_thread.run_sync(v1.terminate) == 0
        code, out = await anyio.to_thread.run_sync(sync_status, redis_url, namespace)
        assert code == 0, out
        await wait_until(lambda: gauge_is(0.0))
        assert [e["kind"] for e in broker.logs("sync.resolved")] == ["drift"]

        # A v1 pod killed with -9 leaves its registration behind; three missed heartbeats
        # later it no longer counts.
        straggler = start_version(redis_url, namespace, "v1")
        workers.append(straggler)
        await wait_until(lambda: gauge_is(1.0))
        straggler.kill()
        await wait_until(lambda: gauge_is(0.0), timeout=10)
        code, out = await anyio.to_thread.run_sync(sync_status, redis_url, namespace)
        assert code == 0, out
    finally:
        for worker in workers:
            worker.terminate()
        assert broker.terminate() == 0, broker.output
