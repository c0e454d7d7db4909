"""Job and worker code for the peers in ``tests/benchmarks/peers.py``, one module per system.

Every job records what its own code observed as JSON entries RPUSHed to the list
``peers:observed:{key}`` in its system's Redis database: ``started``; ``cancelled``, from
the except clause that caught the cancellation, with the CLOCK_MONOTONIC time it ran and
the class of the exception; ``completed`` when the work ran to its end; ``ended`` from its
``finally``. Workers and the benchmark find the redis-server in ``PEERS_REDIS_URL``
(``redis://host:port``, no database); each system keeps to its own database number.

Workloads (the job's argument): ``long``, one 60 s call (an awaited sleep in async jobs,
a blocking ``time.sleep`` in sync ones); ``steps``, a loop of 10 ms steps for 60 s;
``ping``, no work (the benchmark's check that a worker is consuming).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

URL_ENV = "PEERS_REDIS_URL"
LONG_CALL_S = 60.0
STEP_S = 0.01


def redis_url(db: int) -> str:
    return f"{os.environ[URL_ENV].rstrip('/')}/{db}"


def observed_key(key: str) -> str:
    return f"peers:observed:{key}"


def entry(what: str, **extra: Any) -> str:
    """An observation stamped with CLOCK_MONOTONIC now (system-wide on Linux)."""
    return json.dumps({"what": what, "monotonic": time.monotonic(), **extra})


def class_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def blocking_work(workload: str) -> None:
    if workload == "long":
        time.sleep(LONG_CALL_S)
    elif workload == "steps":
        deadline = time.monotonic() + LONG_CALL_S
        while time.monotonic() < deadline:
            time.sleep(STEP_S)


def observed_blocking_job(
    recorder: Any, key: str, workload: str, cancellation: type[BaseException]
) -> None:
    """A sync job's body: the work, and what its code observed of it. ``cancellation`` is
    what the system raises in the job to cancel it (caught, recorded, raised again)."""
    recorder.rpush(observed_key(key), entry("started"))
    try:
        blocking_work(workload)
    except cancellation as exc:
        recorder.rpush(observed_key(key), entry("cancelled", exception=class_name(exc)))
        raise
    else:
        recorder.rpush(observed_key(key), entry("completed"))
    finally:
        recorder.rpush(observed_key(key), entry("ended"))


async def awaited_work(workload: str) -> None:
    if workload == "long":
        await asyncio.sleep(LONG_CALL_S)
    elif workload == "steps":
        deadline = time.monotonic() + LONG_CALL_S
        while time.monotonic() < deadline:
            await asyncio.sleep(STEP_S)
