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

import anyio
import pytest
from redis.asyncio import Redis

from broker import EmbeddedRedis
from broker.findings import collect_state
from sdk.keys import Keys
from tests.processes import ROOT, ProcessHandle, start_broker

pytestmark = pytest.mark.e2e

QUICKSTART = ROOT / "docs" / "quickstart.md"
#: A fenced block with a title: ```python title="worker.py" ... ```
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def titled_blocks() -> dict[str, str]:
    return {title: body for _, title, body in BLOCK.findall(QUICKSTART.read_text())}


def test_the_quickstart_has_the_blocks_this_test_runs() -> None:
    assert set(titled_blocks()) == {"worker.py", "app.py", "output"}


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


def test_quickstart_worker_and_app_run_as_written(tmp_path: Path) -> None:
    blocks = titled_blocks()
    for name in ("worker.py", "app.py"):
        (tmp_path / name).write_text(blocks[name])
    with EmbeddedRedis() as server:
        env = {"CANCEL_BROKER_REDIS_URL": server.url}
        broker, _ = start_broker(server.url, "cancel")
        worker = ProcessHandle([sys.executable, "-u", str(tmp_path / "worker.py")], env=env)
        try:
            anyio.run(wait_for_worker, server.url, "reports", time.monotonic() + 30)
            app = subprocess.run(
                [sys.executable, str(tmp_path / "app.py")],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert app.returncode == 0, app.stdout + app.stderr
            assert normalized(app.stdout) == normalized(blocks["output"]), app.stdout
            # The on_cancel hook ran in the worker's process, as the page says.
            deadline = time.monotonic() + 10
            hook_line = "cleaning up the draft of r1 (cancel event report/cancel.requested)"
            while not any(hook_line in line for line in worker.lines):
                assert time.monotonic() < deadline, worker.output
                time.sleep(0.05)
        finally:
            assert worker.terminate() == 0, worker.output
            broker.terminate()
