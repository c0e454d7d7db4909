"""How long a Celery prefork task that ignores its cancel takes to be stopped by force.

A real ``celery worker`` (prefork, one pool process, ``thread_grace`` 1 s), a broker
process and a private redis-server. Each trial starts ``stubborn_report`` (from
``tests/apps/celery_tasks.py``) in a mode no interrupt stops, ``swallow`` (catches every
``TaskCancelled``) or ``c-loop`` (C code holding the GIL), publishes its cancel event, and
takes the time until the task's state is ``REVOKED`` (its pool process killed by Celery's
main process), then until the next task runs in the new pool process. Expected: the grace
plus ``TERMINATE_MARGIN_S`` (2 s), plus at most one look of the supervisor (0.25 s).

    python tests/benchmarks/hard_stop.py [--trials 3] [--modes swallow,c-loop]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from tests.celery_workers import (  # noqa: E402
    BLOCKING,
    STUBBORN,
    Setup,
    app_with_broker,
    start_celery,
)


def trial(setup: Setup, queue: str, mode: str, number: int) -> tuple[float, float]:
    report_id = f"{mode}-{number}"
    result = setup.send(STUBBORN, queue, report_id=report_id, mode=mode)
    setup.wait_observed(report_id, "started", timeout=30)
    sent = time.monotonic()
    setup.client.send("report/cancel.requested", {"report_id": report_id})
    setup.wait_state(result, "REVOKED", timeout=20)
    revoked = time.monotonic() - sent
    after = setup.send(BLOCKING, queue, report_id=f"{report_id}-next", seconds=0)
    after.get(timeout=30)
    return revoked, time.monotonic() - sent


def main(trials: int, modes: list[str]) -> None:
    rows = []
    with EmbeddedRedis() as server, app_with_broker(server.url) as setup:
        queue = f"{setup.namespace}-bench"
        celery = start_celery(setup, "prefork", queue, 1, env={"HEARTBEAT_INTERVAL": "5"})
        try:
            for mode in modes:
                times = [trial(setup, queue, mode, n) for n in range(trials)]
                rows.append((mode, [t[0] for t in times], [t[1] for t in times]))
        finally:
            celery.stop_group()
    print("| task | trials | REVOKED after, p50 s | max s | next task ran after, p50 s |")
    print("|---|---|---|---|---|")
    for mode, revoked, next_ran in rows:
        print(
            f"| {mode} | {len(revoked)} | {statistics.median(revoked):.2f}"
            f" | {max(revoked):.2f} | {statistics.median(next_ran):.2f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--modes", default="swallow,c-loop")
    arguments = parser.parse_args()
    main(arguments.trials, arguments.modes.split(","))
