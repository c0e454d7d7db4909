"""`make demo`: a report run cancelled end to end, broker and worker as separate processes.

Starts a private Redis, `cancel-broker run`, and the example report worker; starts two
reports, cancels one in the middle of a long call, and shows what each run recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from redis.asyncio import Redis

from broker.embedded import EmbeddedRedis
from broker.sync_state import collect_state
from sdk import Client, RunInfo
from sdk.keys import Keys

HERE = Path(__file__).resolve().parent
TRIGGER = "report/generate.requested"


def spawn(args: list[str], log: Path, url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CANCEL_BROKER_REDIS_URL": url, "PYTHONPATH": str(HERE.parents[1])}
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


async def wait_for_run(client: Client, event_id: str) -> RunInfo:
    while not (runs := await client.runs_for_event(event_id)):
        await anyio.sleep(0.01)
    return runs[0]


async def wait_for_status(client: Client, run_id: str, statuses: set[str]) -> RunInfo:
    while True:
        run = await client.get_run(run_id)
        if run is not None and run.status in statuses:
            return run
        await anyio.sleep(0.001)


async def wait_for_worker(url: str) -> None:
    """Until a worker of the reports app is registered (it syncs once it is listening)."""
    redis = Redis.from_url(url, decode_responses=True)
    try:
        while not any(w.app_id == "reports" for w in (await collect_state(redis, Keys())).workers):
            await anyio.sleep(0.05)
    finally:
        await redis.aclose()


async def demo(url: str) -> None:
    async with Client(url) as client:
        await wait_for_worker(url)
        print("1. Two reports start (each: an outline, then three 2-second sections).")
        r1 = await wait_for_run(
            client, await client.send("report/generate.requested", {"reportId": "r1"})
        )
        r2 = await wait_for_run(
            client, await client.send("report/generate.requested", {"reportId": "r2"})
        )
        print(f"   r1 -> run {r1.run_id}\n   r2 -> run {r2.run_id}")
        await anyio.sleep(1.5)

        print("2. The user cancels r1 while its first section is being written:")
        print('   send("report/cancel.requested", {"reportId": "r1"})')
        sent = time.monotonic()
        await client.send("report/cancel.requested", {"reportId": "r1"})
        stopped = await wait_for_status(client, r1.run_id, {"cancelled", "completed", "failed"})
        print(
            f"   r1 is {stopped.status} after {(time.monotonic() - sent) * 1000:.1f} ms"
            f" (reason: {stopped.cancel_reason}); the 2-second call was interrupted."
        )

        print("3. r2 was not targeted and runs to the end:")
        done = await wait_for_status(client, r2.run_id, {"cancelled", "completed", "failed"})
        print(f"   r2 is {done.status}")

        print("4. Cancelling r1 again changes nothing, and says so:")
        result = await client.cancel(r1.run_id)
        print(f"   cancel({r1.run_id[:8]}...) -> {result.outcome}, status {result.status}")


async def with_deadline(url: str) -> None:
    with anyio.fail_after(60):  # a demo that hangs helps nobody: fail with a traceback
        await demo(url)


def main() -> int:
    logs = Path(tempfile.mkdtemp(prefix="cancel-broker-demo-"))
    with EmbeddedRedis() as server:
        print(f"Redis at {server.url}; broker and worker logs in {logs}/")
        broker = spawn(
            [sys.executable, "-m", "broker", "run", "--http-port", "0", "--log-format", "json"],
            logs / "broker.log",
            server.url,
        )
        worker = spawn(
            [sys.executable, str(HERE / "report_worker.py")], logs / "worker.log", server.url
        )
        try:
            anyio.run(with_deadline, server.url)
        finally:
            for process in (worker, broker):
                process.terminate()
                process.wait(timeout=40)
    print(f"\nThe broker's decision, from {logs}/broker.log:")
    for line in (logs / "broker.log").read_text().splitlines():
        if "cancel.decided" in line:
            print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
