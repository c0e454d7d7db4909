"""Process steps (``ctx.step.run(..., process=True)``): code that does not cooperate still
stops, with cleanup, and no child process outlives its step."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from sdk import Client, NotPicklableError, ProcessStepCrashed
from sdk.context import CancelState, Step
from tests.apps.spinning import crash, fail, spin, square
from tests.helpers import run_of, status_is, wait_until
from tests.processes import alive, start_broker, start_worker

pytestmark = pytest.mark.anyio


async def child_pid(pid_file: Path) -> int:
    await wait_until(lambda: _now(written(pid_file)), timeout=15)
    return int(pid_file.read_text())  # noqa: ASYNC240 - a few bytes from tmpfs


def written(pid_file: Path) -> bool:
    return pid_file.exists() and pid_file.read_text() != ""


async def _now(value: bool) -> bool:
    return value


async def test_a_process_step_returns_its_result_and_raises_its_exception() -> None:
    step = Step("r1", CancelState())
    assert await step.run("square", square, 7, process=True) == 49
    with pytest.raises(ValueError, match="bad frame") as raised:
        await step.run("fail", fail, "bad frame", process=True)
    # The child's traceback comes along, as a note.
    assert any("in the process of step 'fail'" in note for note in raised.value.__notes__)


async def test_what_cannot_cross_processes_is_refused_at_the_call() -> None:
    step = Step("r1", CancelState())
    with pytest.raises(NotPicklableError, match="step 'inline' runs in a process"):
        await step.run("inline", lambda: 1, process=True)
    with pytest.raises(TypeError, match="plain functions"):
        await step.run("async", anyio.sleep, 0, process=True)


async def test_a_child_killed_by_a_signal_fails_the_step_naming_it(tmp_path: Path) -> None:
    step = Step("r1", CancelState())
    with pytest.raises(ProcessStepCrashed, match="killed by SIGKILL") as raised:
        await step.run("render", crash, str(tmp_path / "pid"), process=True)
    assert (raised.value.signal, raised.value.exitcode) == ("SIGKILL", -signal.SIGKILL)


async def test_a_scope_cancelled_from_outside_kills_a_child_that_ignores_sigterm(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "pid"
    step = Step("r1", CancelState(), thread_grace=0.3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: step.run("spin", spin, str(pid_file), process=True))
        pid = await child_pid(pid_file)
        cancelled_at = time.monotonic()
        tg.cancel_scope.cancel()
    stopped = time.monotonic() - cancelled_at
    assert not alive(pid)
    assert 0.3 <= stopped < 1.3  # SIGTERM ignored for the grace, then SIGKILL


async def observed(redis: Redis, namespace: str, render_id: str) -> list[str]:
    entries = await redis.lrange(f"{namespace}:test:observed:{render_id}", 0, -1)
    return [json.loads(entry)["what"] for entry in entries]


async def test_a_cancel_event_stops_a_spinning_process_step_within_the_grace(
    redis_url: str, namespace: str, redis: Redis, tmp_path: Path
) -> None:
    broker, _ = start_broker(redis_url, namespace)
    worker = start_worker(redis_url, namespace, app="renders", thread_grace="1")
    try:
        async with Client(redis_url, namespace=namespace) as client:
            pid_file = tmp_path / "pid"
            data = {"renderId": "v1", "pid_file": str(pid_file)}
            run_id = await run_of(client, await client.send("render/requested", data))
            pid = await child_pid(pid_file)
            sent_at = time.monotonic()
            await client.send("render/cancel.requested", {"renderId": "v1"})
            await wait_until(lambda: _now(not alive(pid)), timeout=5, interval=0.01)
            gone_after = time.monotonic() - sent_at
            await wait_until(lambda: status_is(client, run_id, "cancelled"), timeout=10)
            assert gone_after < 1 + 1, gone_after  # the grace, plus a second
            await wait_until(lambda: _observed_cleanup(redis, namespace), timeout=5)
            assert await observed(redis, namespace, "v1") == ["started", "cleanup"]
            info = await client.get_run(run_id)
            assert info is not None
            assert info.error is None
    finally:
        worker.terminate()
        broker.terminate()


async def _observed_cleanup(redis: Redis, namespace: str) -> bool:
    return "cleanup" in await observed(redis, namespace, "v1")


async def test_a_crashed_child_fails_its_run_with_the_signal(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    worker = start_worker(redis_url, namespace, app="renders")
    try:
        async with Client(redis_url, namespace=namespace) as client:
            data = {"renderId": "v2", "mode": "crash", "pid_file": str(tmp_path / "pid")}
            run_id = await run_of(client, await client.send("render/requested", data))
            await wait_until(lambda: status_is(client, run_id, "failed"), timeout=15)
            info = await client.get_run(run_id)
            assert info is not None
            assert info.error is not None
            assert "killed by SIGKILL" in info.error
    finally:
        worker.terminate()


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_no_child_outlives_its_worker(
    redis_url: str, namespace: str, tmp_path: Path, how: str
) -> None:
    worker = start_worker(redis_url, namespace, app="renders", shutdown_timeout="0.2")
    try:
        async with Client(redis_url, namespace=namespace) as client:
            pid_file = tmp_path / "pid"
            data = {"renderId": "v3", "pid_file": str(pid_file)}
            await run_of(client, await client.send("render/requested", data))
            pid = await child_pid(pid_file)
            if how == "stopped":
                worker.terminate()  # SIGTERM: the runs are interrupted after shutdown_timeout
            else:
                worker.kill()  # SIGKILL: nothing of the worker runs; the kernel cleans up
            await wait_until(lambda: _now(not alive(pid)), timeout=5, interval=0.02)
    finally:
        if worker.process.poll() is None:
            worker.terminate()
