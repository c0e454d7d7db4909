"""dramatiq with dramatiq-abort: a blocking job aborted by ``abort(message_id)``.

The worker is ``python -m dramatiq tests.benchmarks.peer_apps.dramatiq_app --processes 1
--threads 1``. The ``Abortable`` middleware's watcher thread BLPOPs the abort keys of the
messages in flight (re-armed every second; it sleeps a second when none is in flight) and
raises ``Abort`` in the job's thread with ``PyThreadState_SetAsyncExc``, which takes effect
only when that thread next runs Python code: a blocking call is never interrupted.
``max_retries=0``: an aborted message would otherwise be retried (dramatiq-abort #30).
"""

from __future__ import annotations

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq_abort import Abort, Abortable
from dramatiq_abort.backends import RedisBackend

from tests.benchmarks.peer_apps import observed_blocking_job, redis_url

DB = 2

broker = RedisBroker(url=redis_url(DB))
abortable = Abortable(backend=RedisBackend(client=redis.Redis.from_url(redis_url(DB))))
broker.add_middleware(abortable)
dramatiq.set_broker(broker)
recorder = redis.Redis.from_url(redis_url(DB))


@dramatiq.actor(actor_name="peers_job", max_retries=0)
def job(key: str, workload: str) -> None:
    observed_blocking_job(recorder, key, workload, cancellation=Abort)
