"""A Celery pipeline with parent/child cancel: one cancel of the video stops every scene.

``render_video`` (the parent) starts one ``render_scene`` task per scene with
``render_scene.spawn(...)``: each scene's run is a *child* of the video's run. Cancelling
the video (by task id, or with a ``video/cancel.requested`` event) stops the video task
and every scene still running or queued, at once, even inside a blocking call (prefork
pool); each ends ``REVOKED`` and its run ``cancelled``, and none is retried, although
``render_scene`` retries any ``Exception``. Run it:

    make run                       # the broker, on an embedded Redis it advertises
    .venv/bin/pip install -e '.[celery]'                      # in another shell
    cd docs/examples
    ../../.venv/bin/celery -A celery_pipeline worker --pool prefork --concurrency 4
    ../../.venv/bin/python celery_pipeline.py     # another shell, same folder

(Given no Redis URL, each finds the embedded Redis of `make run`; with a Redis of your
own, export ``CANCEL_BROKER_REDIS_URL`` in each shell.)

The last command sends a video of three scenes, waits until they are rendering, cancels
the video by its task id and prints what happened to each task. (Celery uses the same
Redis as its broker and result backend here; ``CANCEL_BROKER_NAMESPACE``, read by the SDK
as by the broker, selects another key namespace.)
"""

from __future__ import annotations

import sys
import time
from typing import Any

from celery import Celery, Task
from celery.result import AsyncResult
from celery.utils.log import get_task_logger

from sdk import CancelOn, SyncClient, Worker
from sdk.connection import resolve_url
from sdk.integrations.celery import CeleryCancellation, current_run

REDIS_URL = resolve_url(None)  # CANCEL_BROKER_REDIS_URL, else the Redis `make run` started

app = Celery("pipeline", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True)
worker = Worker("pipeline", REDIS_URL)  # declares nothing itself
cancels = CeleryCancellation(app, worker)
log = get_task_logger(__name__)


@cancels.task(
    name="pipeline.render_scene",
    trigger="scene/render.requested",
    autoretry_for=(Exception,),  # a render that fails is retried; a cancelled one never is
    max_retries=3,
)
def render_scene(video_id: str, scene: int, seconds: float = 30) -> str:
    log.info("scene %s/%d: rendering", video_id, scene)
    try:
        time.sleep(seconds)  # stands for a blocking render call; prefork interrupts it
    except BaseException:  # TaskCancelled: `except Exception` would not see it
        log.info("scene %s/%d: interrupted, partial frames discarded", video_id, scene)
        raise
    return f"{video_id}/scene-{scene}.mp4"


@cancels.task(
    name="pipeline.render_video",
    trigger="video/render.requested",
    cancel_on=[CancelOn(event="video/cancel.requested", match="data.video_id")],
    bind=True,
)
def render_video(self: Task, video_id: str, scenes: int = 3, seconds: float = 30) -> str:
    # Children of this task's run: cancelling the video cancels them, running or queued.
    parts = [render_scene.spawn(video_id=video_id, scene=n, seconds=seconds) for n in range(scenes)]
    self.update_state(state="RENDERING", meta={"scenes": [part.id for part in parts]})
    run = current_run()
    # Wait for the scenes without blocking on their results (Celery forbids that in a
    # task); run.sleep is cut short by a cancel, in any pool.
    while not all(part.ready() for part in parts):
        run.sleep(0.1)
    files = [part.get(disable_sync_subtasks=False) for part in parts]
    log.info("video %s: stitched %d scenes", video_id, len(files))
    return f"{video_id}.mp4"


def scene_ids(video: AsyncResult, timeout: float = 30) -> list[str]:
    """The scenes' task ids, as the video task reported them (its RENDERING state)."""
    deadline = time.monotonic() + timeout
    while video.state != "RENDERING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"video {video.id} is {video.state}, not rendering")
        time.sleep(0.05)
    info: dict[str, Any] = video.info
    return list(info["scenes"])


def revoked(task: AsyncResult, timeout: float = 10) -> str:
    """The task's Celery state once it is REVOKED (marked just after its run is recorded)."""
    deadline = time.monotonic() + timeout
    while task.state != "REVOKED" and time.monotonic() < deadline:
        time.sleep(0.05)
    return str(task.state)


def main() -> int:
    with SyncClient(REDIS_URL) as client:
        video = render_video.delay(video_id="v1", scenes=3)
        scenes = [AsyncResult(task_id, app=app) for task_id in scene_ids(video)]
        while any(client.get_run(scene.id) is None for scene in scenes):
            time.sleep(0.05)  # until every scene is running in a pool process
        print(f"video v1 (task {video.id}) is rendering {len(scenes)} scenes; cancelling it")
        result = client.cancel(video.id, reason="the user cancelled the video")
        print(f"cancel -> {result.outcome}, {len(result.cascaded)} scenes cancelled with it")
        named = [("video", video)] + [(f"scene {n}", scene) for n, scene in enumerate(scenes)]
        for name, task in named:
            info = client.wait(task.id, timeout=30)
            print(f"  {name}: {revoked(task)}, run {info.status} ({info.cancel_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
