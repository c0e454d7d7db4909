"""Configuration that must not split processes apart: every setting both sides read is read
the same way, and a split (workers and broker in different namespaces) is reported, not
discovered by a user whose Cancel button does nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from redis.asyncio import Redis

from broker import EmbeddedRedis
from broker.embedded import find_redis_cli
from broker.settings import Settings
from sdk import Client, Worker
from sdk.config import (
    NAMESPACE,
    ON_EVICTING_REDIS,
    PENDING_CANCEL_LOOKBACK,
    TRIGGER_LOOKBACK,
    WAIT_REPLICAS,
    WAIT_TIMEOUT,
    SharedSetting,
)
from sdk.connection import DEFAULT_REDIS_URL, REDIS_URL_ENV, resolve_url_source
from sdk.errors import ConfigurationError
from sdk.keys import PRESENCE
from sdk.local_redis import RUNTIME_DIR_ENV, advertised
from tests.helpers import run_of, wait_for_observation, wait_for_status
from tests.processes import ROOT, ProcessHandle, start_broker, start_worker, sync_status

BROKER = (sys.executable, "-m", "broker")
JSON_LOGS = ("--log-format", "json")
SHARED: tuple[SharedSetting[Any], ...] = (
    NAMESPACE,
    TRIGGER_LOOKBACK,
    PENDING_CANCEL_LOOKBACK,
    ON_EVICTING_REDIS,
    WAIT_REPLICAS,
    WAIT_TIMEOUT,
)


@pytest.mark.parametrize("setting", SHARED, ids=lambda s: s.name)
def test_the_broker_reads_each_shared_setting_as_the_sdk_does(
    setting: SharedSetting[Any],
) -> None:
    (spec,) = (s for s in Settings.specs() if s.name == setting.name)
    assert (spec.env, spec.shown, spec.help) == (setting.env, setting.default, setting.help)
    assert spec.parse is setting.parse


def test_the_sdk_reads_the_lookback_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRIGGER_LOOKBACK.env, "90s")
    monkeypatch.setenv(PENDING_CANCEL_LOOKBACK.env, "2m")
    assert Worker("reports", "redis://unused:1/0").trigger_lookback == timedelta(seconds=90)
    assert Client("redis://unused:1/0").pending_cancel_lookback == timedelta(minutes=2)
    settings = Settings.resolve({})
    assert (settings.trigger_lookback, settings.pending_cancel_lookback) == (90.0, 120.0)
    given = Client("redis://unused:1/0", pending_cancel_lookback=timedelta(seconds=5))
    assert given.pending_cancel_lookback == timedelta(seconds=5)
    monkeypatch.setenv(TRIGGER_LOOKBACK.env, "soon")
    with pytest.raises(ConfigurationError, match="CANCEL_BROKER_TRIGGER_LOOKBACK='soon'"):
        Worker("reports", "redis://unused:1/0")


def test_the_sdk_reads_the_namespace_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NAMESPACE.env, "reports-prod")
    assert Worker("reports", "redis://unused:1/0").keys.namespace == "reports-prod"
    assert Client("redis://unused:1/0").keys.namespace == "reports-prod"
    assert Settings.resolve({}).namespace == "reports-prod"
    # An argument wins, as a flag does.
    assert Worker("reports", "redis://unused:1/0", namespace="x").keys.namespace == "x"
    monkeypatch.setenv(NAMESPACE.env, "no spaces")
    with pytest.raises(ConfigurationError, match="CANCEL_BROKER_NAMESPACE='no spaces'"):
        Client("redis://unused:1/0")


@pytest.mark.e2e
@pytest.mark.anyio
async def test_the_namespace_variable_alone_joins_broker_worker_and_client(
    redis_server: EmbeddedRedis, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment that sets CANCEL_BROKER_NAMESPACE everywhere and passes it nowhere."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    env = {NAMESPACE.env: namespace}
    broker = ProcessHandle(
        [
            *BROKER,
            "run",
            "--redis-url",
            redis_server.url,
            "--http-port",
            "0",
            "--log-format",
            "json",
        ],
        env=env,
    )
    worker = ProcessHandle(
        [sys.executable, "-m", "tests.apps.reports", redis_server.url, "-"], env=env
    )
    try:
        broker.wait_for_log("broker.ready")
        worker.wait_for_log("worker.started")
        monkeypatch.setenv(NAMESPACE.env, namespace)
        async with Client(redis_server.url) as client:
            assert client.keys.namespace == namespace
            run_id = await run_of(
                client, await client.send("report/generate.requested", {"reportId": "ns1"})
            )
            await wait_for_observation(redis, namespace, "ns1", "started")
            await client.send("report/cancel.requested", {"reportId": "ns1"})
            info = await wait_for_status(client, run_id, "cancelled")
            assert info.cancel_reason == "cancel event report/cancel.requested"
    finally:
        worker.terminate()
        broker.terminate()


@pytest.mark.e2e
@pytest.mark.anyio
async def test_workers_and_a_broker_in_different_namespaces_are_reported(
    redis_server: EmbeddedRedis, redis: Redis
) -> None:
    """The broker reads one namespace, the workers use another: from both sides, the split
    is a finding (exit 1, the gauge) and the worker says so when it starts."""
    brokers_ns, workers_ns = f"t{uuid.uuid4().hex[:12]}", f"t{uuid.uuid4().hex[:12]}"
    broker, base = start_broker(redis_server.url, brokers_ns, "--sync-rescan", "0.5")
    try:
        with anyio.fail_after(10):
            while not await redis.hexists(PRESENCE, f"broker:{brokers_ns}"):
                await anyio.sleep(0.05)
        worker = start_worker(redis_server.url, workers_ns)
        try:
            warning = worker.wait_for_log("worker.no_broker")
            assert warning["namespace"] == workers_ns
            assert brokers_ns in warning["brokers_read"]
            for namespace, other in ((brokers_ns, workers_ns), (workers_ns, brokers_ns)):
                code, state = await sync_status(redis_server.url, namespace)
                assert code == 1, state
                (finding,) = [f for f in state["findings"] if f["kind"] == "namespace_mismatch"]
                assert other in finding["details"]["other_namespaces"]
                assert "CANCEL_BROKER_NAMESPACE" in finding["message"]
            async with httpx.AsyncClient(base_url=base) as http:
                with anyio.fail_after(15):
                    while True:
                        metrics = (await http.get("/metrics")).text
                        if 'cancel_broker_stale_findings{kind="namespace_mismatch"} 1.0' in metrics:
                            break
                        await anyio.sleep(0.2)
        finally:
            worker.terminate()
        # The last worker left: the split is over (workers of other tests, killed, may still
        # count as present for a few seconds: only this split matters here).
        code, state = await sync_status(redis_server.url, brokers_ns)
        assert not [
            f
            for f in state["findings"]
            if f["kind"] == "namespace_mismatch" and workers_ns in f["details"]["other_namespaces"]
        ]
    finally:
        broker.terminate()


@pytest.mark.e2e
def test_a_second_shell_finds_the_embedded_redis_of_cancel_broker_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make run` starts a Redis on a random port; `cancel-broker send` in another terminal
    (and a Worker or Client there) must use it, not localhost:6379, and say so."""
    shell = {REDIS_URL_ENV: "", RUNTIME_DIR_ENV: str(tmp_path)}
    broker = ProcessHandle([*BROKER, "run", "--http-port", "0", *JSON_LOGS], env=shell)
    try:
        url = broker.wait_for_line(r"started an embedded Redis at (redis://\S+)").group(1)
        broker.wait_for_log("broker.ready")
        monkeypatch.delenv(REDIS_URL_ENV, raising=False)
        monkeypatch.setenv(RUNTIME_DIR_ENV, str(tmp_path))
        # Checked first: were it not found, the command below would go to localhost:6379.
        assert resolve_url_source(None) == (url, "embedded")
        sent = subprocess.run(
            [*BROKER, "send", "report/cancel.requested", '{"reportId": "r1"}'],
            cwd=ROOT,
            env={**os.environ, **shell},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert f"using the embedded Redis of a running `cancel-broker run`: {url}" in sent.stderr
        with redis.Redis.from_url(url, decode_responses=True) as embedded:
            (entry,) = embedded.xrange("{cancel}:events", sent.stdout.strip())
        assert json.loads(entry[1]["event"])["data"] == {"reportId": "r1"}
        # The SDK, given no URL either, finds it the same way.
        assert Client().redis_url == url
        assert Worker("reports").redis_url == url
        assert resolve_url_source("redis://given:1/0") == ("redis://given:1/0", "argument")
    finally:
        broker.terminate()
    # Stopped: its advertisement is gone, and nothing points at its Redis any more.
    assert advertised() is None
    assert resolve_url_source(None) == (DEFAULT_REDIS_URL, "default")


def test_the_help_of_client_commands_says_where_they_connect() -> None:
    text = " ".join(
        subprocess.run(
            [*BROKER, "send", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
        ).stdout.split()
    )
    assert "other commands: the one a running `run` advertises, else redis://localhost:6379/0" in (
        text
    )


@pytest.mark.e2e
@pytest.mark.anyio
async def test_events_appended_to_a_lookalike_stream_are_reported(
    redis_server: EmbeddedRedis, redis: Redis, namespace: str
) -> None:
    """`XADD cancel:events` (no braces), as the docs once taught: no broker reads that
    stream. Reported by `sync status` (exit 1), the dashboard and the gauge."""
    broker, base = start_broker(redis_server.url, namespace, "--sync-rescan", "0.5")
    try:
        body = '{"name":"report/cancel.requested","data":{"reportId":"r1"}}'
        # As any language would: one plain XADD, here from redis-cli.
        command = [find_redis_cli(), "-u", redis_server.url, "XADD", f"{namespace}:events"]
        await anyio.run_process([*command, "*", "event", body])
        code, state = await sync_status(redis_server.url, namespace)
        assert code == 1
        (finding,) = [f for f in state["findings"] if f["kind"] == "misnamed_stream"]
        assert finding["details"]["stream"] == f"{namespace}:events"
        assert finding["details"]["events_stream"] == f"{{{namespace}}}:events"
        assert "the braces are part of the name" in finding["message"]
        async with httpx.AsyncClient(base_url=base) as http:
            page = (await http.get("/v1/functions")).json()
            assert "misnamed_stream" in {f["kind"] for f in page["findings"]}
            with anyio.fail_after(15):
                while (
                    'stale_findings{kind="misnamed_stream"} 1.0'
                    not in (await http.get("/metrics")).text
                ):
                    await anyio.sleep(0.2)
        await redis.delete(f"{namespace}:events")
        code, state = await sync_status(redis_server.url, namespace)
        assert not [f for f in state["findings"] if f["kind"] == "misnamed_stream"]
    finally:
        broker.terminate()
