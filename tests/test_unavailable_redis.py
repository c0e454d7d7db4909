"""A worker or a client that cannot reach Redis, or whose password is refused, says so in
one line with the URL (its password masked) and a hint: a worker run as a program
(``worker.main()``) prints that line and exits 2, with the traceback only when asked."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest

from broker import EmbeddedRedis
from sdk import Client, RedisUnavailableError
from tests.processes import ROOT
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
