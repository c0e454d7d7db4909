"""docs/examples/celery_pipeline.py runs as its docstring says: a real ``celery worker``
(prefork) and the broker as processes on a Redis of this module's own, where cancelling
the video task stops every scene task it spawned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from broker import EmbeddedRedis
from sdk import RunInfo, SyncClient
from sdk.integrations.celery import SENT_HEADER
from tests.processes import ROOT, ProcessHandle, start_broker

pytestmark = pytest.mark.e2e

EXAMPLES = ROOT / "docs" / "examples"


@dataclass
class Pipeline:
    env: dict[str, str]
    worker: ProcessHandle
    celery: Celery
    client: SyncClient

    def render(self, video_id: str, scenes: int) -> AsyncResult:
        # What render_video.delay sends (the test does not import the example, whose
        # Celery app reads its configuration from the environment when imported).
        return self.celery.send_task(
            "pipeline.render_video",
            kwargs={"video_id": video_id, "scenes": scenes},
            headers={SENT_HEADER: int(time.time() * 1000)},
        )

    def scenes_running(self, video: AsyncResult, count: int) -> list[AsyncResult]:
        deadline = time.monotonic() + 15
        while video.state != "RENDERING":
            assert time.monotonic() < deadline, f"the video is {video.state}"
            time.sleep(0.05)
        info: dict[str, Any] = video.info
        scenes = [AsyncResult(task_id, app=self.celery) for task_id in info["scenes"]]
        assert len(scenes) == count
        while any(self.client.get_run(scene.id) is None for scene in scenes):
            assert time.monotonic() < deadline, "the scenes never all ran"
            time.sleep(0.05)
        return scenes


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    # A Redis of its own: the example uses Celery's default queue, which no other test's
    # messages may reach.
    with EmbeddedRedis() as redis_server:
        namespace = f"t{uuid.uuid4().hex[:12]}"
        env = {
            "CANCEL_BROKER_REDIS_URL": redis_server.url,
            "CANCEL_BROKER_NAMESPACE": namespace,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{EXAMPLES}",
        }
        broker, _ = start_broker(redis_server.url, namespace)
        celery = Celery("sender", broker=redis_server.url, backend=redis_server.url)
        client = SyncClient(redis_server.url, namespace=namespace)
        args = [sys.executable, "-m", "celery", "-A", "celery_pipeline", "worker"]
        args += ["--pool", "prefork", "--concurrency", "4", "--loglevel", "INFO"]
        args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        worker = ProcessHandle(args, env=env, new_session=True)
        try:
            worker.wait_for_line(r"celery@\S+ ready\.", timeout=30)
            yield Pipeline(env, worker, celery, client)
        finally:
            worker.stop_group()
            client.close()
            celery.close()
            broker.terminate()


def wait_revoked(task: AsyncResult, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while task.state != "REVOKED":
        assert time.monotonic() < deadline, f"{task.id} is {task.state}, not REVOKED"
        time.sleep(0.05)


def test_the_example_cancels_a_video_and_its_scenes(pipeline: Pipeline) -> None:
    """`python celery_pipeline.py`, as the docstring runs it."""
    result = subprocess.run(
        [sys.executable, "celery_pipeline.py"],
        cwd=EXAMPLES,
        env={**os.environ, **pipeline.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "cancel -> signalled, 3 scenes cancelled with it" in out, out
    assert "  video: REVOKED, run cancelled (the user cancelled the video)" in out, out
    for n in range(3):
        assert f"  scene {n}: REVOKED, run cancelled (parent run " in out, out


def test_a_cancel_event_for_the_video_stops_every_running_scene(pipeline: Pipeline) -> None:
    video = pipeline.render("v2", scenes=3)
    scenes = pipeline.scenes_running(video, 3)
    pipeline.worker.wait_for_line(r"scene v2/2: rendering")

    sent = time.monotonic()
    pipeline.client.send("video/cancel.requested", {"video_id": "v2"})
    outcomes: dict[str, RunInfo] = {}
    for task in (video, *scenes):
        wait_revoked(task)
        outcomes[task.id] = pipeline.client.wait(task.id, timeout=5)
    assert time.monotonic() - sent < 5  # not the scenes' 30-second renders

    assert outcomes[video.id].cancel_reason == "cancel event video/cancel.requested"
    for scene in scenes:
        info = outcomes[scene.id]
        assert info.status == "cancelled"
        assert info.parent_run_id == video.id
        assert info.cancel_reason == f"parent run {video.id} was cancelled"
    # Four tasks at once on four pool processes, each with a worker identity of its own.
    assert len({info.worker_id for info in outcomes.values()}) == 4
    # Each scene was interrupted inside its blocking call, in its own pool process.
    for n in range(3):
        pipeline.worker.wait_for_line(rf"scene v2/{n}: interrupted, partial frames discarded")

    # None is retried (render_scene retries any Exception): no second attempt, no new run.
    time.sleep(0.5)
    for scene in scenes:
        assert scene.state == "REVOKED"
        assert pipeline.client.get_run(f"{scene.id}-retry-1") is None
    rendering = [
        line for line in pipeline.worker.lines if "scene v2/" in line and "rendering" in line
    ]
    assert len(rendering) == 3, rendering
