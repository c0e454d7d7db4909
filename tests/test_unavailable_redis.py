"""A worker or a client that cannot reach Redis, or whose password is refused, says so in
one line with the URL (its password masked) and a hint: a worker run as a program
(``worker.main()``) prints that line and exits 2, with the traceback only when asked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import anyio
import httpx
import pytest

from broker import EmbeddedRedis
from sdk import Client, RedisUnavailableError
from tests.processes import ROOT, ProcessHandle
from tests.test_cli import acl_user

pytestmark = pytest.mark.e2e

PROGRAM = """
import sys
from sdk import Worker
worker = Worker("reports", sys.argv[1])
worker.declare(id="generate-report", trigger="report/generate.requested")
worker.main()
"""


def run_worker(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def gone_url() -> str:
    with EmbeddedRedis() as server:
        return server.url  # nothing listens on its port once it stopped


def test_a_worker_that_cannot_reach_redis_says_so_in_one_line() -> None:
    url = gone_url()
    done = run_worker(url)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"reports: error: cannot reach Redis at {url}")
    assert "(hint: is Redis running there?" in line
    debug = run_worker(url, CANCEL_BROKER_DEBUG="1")
    assert "Traceback (most recent call last)" in debug.stderr
    assert "RedisUnavailableError" in debug.stderr


def test_a_worker_whose_password_is_refused_says_so_without_the_password(
    redis_url: str, namespace: str
) -> None:
    anyio.run(acl_user, redis_url, namespace, "+@all")
    url = redis_url.replace("redis://", f"redis://{namespace}:s3cret-wrong@")
    done = run_worker(url)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "refused the credentials" in line
    assert "s3cret-wrong" not in line
    assert "redis://USER:PASSWORD@HOST:PORT/0" in line


@pytest.mark.anyio
async def test_a_client_that_cannot_reach_redis_raises_one_clear_error() -> None:
    url = gone_url()
    async with Client(url, namespace="t") as client:
        with pytest.raises(RedisUnavailableError, match=f"cannot reach Redis at {url}") as raised:
            await client.send("report/cancel.requested", {"reportId": "r1"})
    assert "CANCEL_BROKER_REDIS_URL" in raised.value.hint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_broker_whose_password_is_refused_says_so_in_its_log_readyz_and_dashboard(
    redis_url: str, namespace: str
) -> None:
    anyio.run(acl_user, redis_url, namespace, "+@all")
    url = redis_url.replace("redis://", f"redis://{namespace}:s3cret-wrong@")
    port = free_port()
    args = [sys.executable, "-m", "broker", "run", "--redis-url", url, "--namespace", namespace]
    broker = ProcessHandle([*args, "--http-port", str(port), "--log-format", "json"])
    try:
        waiting = broker.wait_for_log("broker.waiting_for_redis")
        assert "refused the credentials" in waiting["reason"]
        assert "s3cret-wrong" not in json.dumps(waiting)
        deadline = time.monotonic() + 10
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert ready.status_code == 503
        assert "waiting for Redis" in ready.json()["reason"]
        assert "refused the credentials" in ready.json()["reason"]
        runs = httpx.get(f"http://127.0.0.1:{port}/v1/runs", timeout=2)
        assert runs.status_code == 503
        assert "refused the credentials" in runs.text
        assert "s3cret-wrong" not in ready.text + runs.text
    finally:
        broker.terminate()
