"""Cancel latency against the Python peers on Redis, side by side on one redis-server.

cancel-broker, arq, dramatiq with dramatiq-abort, Celery (prefork) and rq run one after
the other against one private redis-server (each system in its own database), each with
its worker as a separate process. For every system and workload, each trial starts a job,
waits until the job's own code says it is running, waits a random 0-1000 ms (so a poll or
a step is met at any phase), reads CLOCK_MONOTONIC and cancels the job the system's way,
then takes the CLOCK_MONOTONIC time that the job's own code recorded on seeing the
cancellation (its except clause). rq's stop SIGKILLs the job's process without telling
the job, so rq's figure is when the job's status turns ``stopped`` (the benchmark polls
``job.get_status()`` back to back). Workloads: ``long``, one 60 s call (awaited in
cancel-broker and arq, a blocking ``time.sleep`` in the others); ``steps``, a loop of
10 ms steps. A miss is a cancellation not seen within 5 s, except for a blocking call that
the system cannot interrupt (dramatiq): there the benchmark waits for the call to end and
counts the trial as seen late.

    python tests/benchmarks/peers.py [--trials 100] [--systems cancel-broker,arq,...]
        [--workloads long,steps] [--trials-for dramatiq:long=12] [--write-docs]

The peers are the ``bench`` extra (``pip install -e '.[bench]'``; ``make bench`` does it).
Job and worker code for them is in ``tests/benchmarks/peer_apps/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import pydoc
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from broker.embedded import EmbeddedRedis  # noqa: E402
from tests.benchmarks import latency  # noqa: E402
from tests.benchmarks.peer_apps import (  # noqa: E402
    LONG_CALL_S,
    URL_ENV,
    observed_key,
)
from tests.processes import ProcessHandle  # noqa: E402

WORKLOADS = ["long", "steps"]
PAUSE_MAX_S = 1.0
MISS_AFTER_S = latency.MISS_AFTER_S
READY_TIMEOUT_S = 60.0
DOCS = ROOT / "docs" / "benchmarks.md"
START_MARKER, END_MARKER = "<!-- peers:start -->", "<!-- peers:end -->"


@dataclass(frozen=True)
class Outcome:
    """One trial: seconds from the cancel to the job seeing it (None: a miss), and what the
    job saw (the class of the exception its code caught, or what else happened)."""

    latency: float | None
    saw: str


@dataclass
class Samples:
    trials: int = 0
    latencies: list[float] = field(default_factory=list)
    misses: int = 0
    saw: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        self.trials += 1
        self.saw[outcome.saw] += 1
        if outcome.latency is None:
            self.misses += 1
        else:
            self.latencies.append(outcome.latency)

    @property
    def late(self) -> int:
        return sum(1 for value in self.latencies if value > MISS_AFTER_S)


def describe(class_path: str) -> str:
    """``asyncio.exceptions.CancelledError`` -> ``CancelledError (BaseException)``: whether
    an ``except Exception`` in the job's code would swallow the cancellation."""
    found = pydoc.locate(class_path)
    name = class_path.rsplit(".", 1)[-1]
    if not isinstance(found, type):
        return name
    return f"{name} ({'Exception' if issubclass(found, Exception) else 'BaseException'})"


class System:
    """One system under test: its worker processes, its client, and how one trial runs."""

    name: ClassVar[str]
    db: ClassVar[int]
    libraries: ClassVar[tuple[str, ...]] = ()
    #: What the figure measures up to.
    until: ClassVar[str] = "job's except clause"
    #: How it is set up and how the cancel reaches the job (for the table's notes).
    configuration: ClassVar[str]

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url.rsplit("/", 1)[0]
        self.url = f"{self.server_url}/{self.db}"

    @contextmanager
    def running(self) -> Iterator[None]:
        yield

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        yield

    async def ready(self) -> None:
        """Return once the worker consumes jobs."""

    async def trial(self, key: str, workload: str) -> Outcome:
        raise NotImplementedError


class CancelBroker(System):
    """``tests/apps/reports.py`` and ``cancel-broker run``, as ``latency.py`` runs them."""

    name = "cancel-broker"
    db = 0
    #: Cancelled by run id (``Client.cancel``) rather than by a cancel event.
    by_id: ClassVar[bool] = False
    libraries = ("cancel-broker",)
    configuration = (
        "`cancel-broker run` and the report worker of `tests/apps/reports.py` (as"
        " `tests/benchmarks/latency.py` runs them); the cancel is"
        ' `Client.send("report/cancel.requested", ...)`, matched by the run\'s'
        ' `CancelOn(event=..., match="data.reportId")`; the broker signals the worker\'s'
        " stream, which cancels the run's anyio scope. `long` is `await anyio.sleep(60)` in"
        " a step; `steps` a loop of 10 ms `step.run` calls."
    )

    @contextmanager
    def running(self) -> Iterator[None]:
        with latency.serving(self.url):
            yield

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        async with latency.connected(self.url) as (self.client, self.redis):
            yield

    async def trial(self, key: str, workload: str) -> Outcome:
        mode = "sleep" if workload == "long" else workload
        seen = await latency.trial(
            self.client, self.redis, key, mode, max_pause=PAUSE_MAX_S, by_id=self.by_id
        )
        if seen is None:
            return Outcome(None, "nothing within 5 s")
        return Outcome(seen.latency, describe(str(seen.record.get("exception", "?"))))


class CancelBrokerById(CancelBroker):
    """The same, cancelled by run id: what ``revoke``, ``abort`` and ``send_stop_job_command``
    are (the job's id names it; nothing is matched)."""

    name = "cancel-broker-by-id"
    by_id = True
    configuration = (
        "as cancel-broker, but the cancel is `Client.cancel(run_id)`: one script"
        " (`request_cancel.lua`) moves the run to cancelling and signals its worker, with no"
        " event and no broker on the way, like the peers' cancels by job id."
    )


class Peer(System):
    """A peer whose worker is a separate process running ``peer_apps/{module}.py`` and whose
    jobs record what they saw in the list ``peers:observed:{key}``."""

    module: ClassVar[str]
    #: Signals that stop the worker (to its whole process group).
    stop_signals: ClassVar[tuple[signal.Signals, ...]] = (signal.SIGTERM,)

    def __init__(self, server_url: str) -> None:
        super().__init__(server_url)
        os.environ[URL_ENV] = self.server_url  # read by the app module on import
        self.peer_app: Any = importlib.import_module(f"tests.benchmarks.peer_apps.{self.module}")

    def worker_command(self) -> list[str]:
        raise NotImplementedError

    @contextmanager
    def running(self) -> Iterator[None]:
        self.worker = ProcessHandle(
            self.worker_command(), env={URL_ENV: self.server_url}, new_session=True
        )
        try:
            yield
        finally:
            self.worker.stop_group(self.stop_signals)

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        # No socket timeout: the benchmark's BLPOPs may block for longer than redis-py's 5 s.
        self.observations = Redis.from_url(self.url, decode_responses=True, socket_timeout=None)
        try:
            yield
        finally:
            await self.observations.aclose()

    async def enqueue(self, key: str, workload: str) -> None:
        raise NotImplementedError

    async def cancel(self, key: str) -> None:
        raise NotImplementedError

    def observe_timeout(self, workload: str) -> float:
        return MISS_AFTER_S

    async def next_observation(self, key: str, timeout: float) -> dict[str, Any] | None:
        popped = await self.observations.blpop([observed_key(key)], timeout=timeout)
        return None if popped is None else dict(json.loads(popped[1]))

    async def ready(self) -> None:
        """A ``ping`` job (no work) went through: the worker consumes."""
        await self.enqueue("ready", "ping")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.worker.process.poll() is not None:
                raise RuntimeError(f"{self.name} worker exited:\n{self.worker.output}")
            seen = await self.next_observation("ready", 1.0)
            if seen is not None and seen["what"] == "ended":
                return
        raise TimeoutError(f"{self.name} worker ran no job:\n{self.worker.output}")

    async def trial(self, key: str, workload: str) -> Outcome:
        await self.enqueue(key, workload)
        started = await self.next_observation(key, MISS_AFTER_S)
        if started is None or started["what"] != "started":
            return Outcome(None, "job did not start within 5 s")
        # A random phase, so any periodic behaviour (a poll, a step boundary) is sampled fairly.
        await anyio.sleep(random.uniform(0, PAUSE_MAX_S))
        sent = time.monotonic()
        await self.cancel(key)
        outcome = await self.observe(key, workload, sent)
        if outcome.latency is None:
            await self.drain(key)
        return outcome

    async def observe(self, key: str, workload: str, sent: float) -> Outcome:
        seen = await self.next_observation(key, self.observe_timeout(workload))
        if seen is None:
            return Outcome(None, f"nothing within {self.observe_timeout(workload):.0f} s")
        if seen["what"] != "cancelled":
            return Outcome(None, f"{seen['what']}, not cancelled")
        return Outcome(float(seen["monotonic"]) - sent, describe(str(seen["exception"])))

    async def drain(self, key: str) -> None:
        """After a miss the job may still be working: wait (boundedly) for it to end, so that
        the next trial's job is not queued behind it."""
        deadline = time.monotonic() + LONG_CALL_S + MISS_AFTER_S
        while (remaining := deadline - time.monotonic()) > 0:
            seen = await self.next_observation(key, min(remaining, 1.0))
            if seen is not None and seen["what"] == "ended":
                return


class Arq(Peer):
    name = "arq"
    db = 1
    module = "arq_app"
    libraries = ("arq",)
    configuration = (
        "one worker process, `allow_abort_jobs=True`, `poll_delay=0.5` (arq's default;"
        " the worker reads the abort set once per poll), `max_jobs=10` (default); the"
        " cancel is `Job.abort()` (a ZADD to `arq:abort`, then it waits for the result);"
        " the worker cancels the job's asyncio task. `long` is `await asyncio.sleep(60)`."
    )

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "arq", f"{self.peer_app.__name__}.WorkerSettings"]

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        from arq import create_pool

        self.jobs: dict[str, Any] = {}
        async with super().connected():
            self.pool = await create_pool(self.peer_app.settings())
            try:
                async with anyio.create_task_group() as self.aborts:
                    yield
                    self.aborts.cancel_scope.cancel()
            finally:
                await self.pool.aclose()

    async def enqueue(self, key: str, workload: str) -> None:
        self.jobs[key] = await self.pool.enqueue_job("job", key, workload, _job_id=key)

    async def cancel(self, key: str) -> None:
        # Job.abort() waits for the job's result after its ZADD: it runs beside the trial.
        self.aborts.start_soon(self._abort, self.jobs.pop(key))

    async def _abort(self, job: Any) -> None:
        with contextlib.suppress(TimeoutError):
            await job.abort(timeout=MISS_AFTER_S)


class Dramatiq(Peer):
    name = "dramatiq"
    db = 2
    module = "dramatiq_app"
    libraries = ("dramatiq", "dramatiq-abort")
    configuration = (
        "`dramatiq --processes 1 --threads 1`, `RedisBroker`, the `Abortable` middleware"
        " with its `RedisBackend` (defaults: abort TTL 90 s; its watcher BLPOPs the abort"
        " keys of messages in flight, re-armed every 1 s, and sleeps 1 s when none is);"
        " actor `max_retries=0`; the cancel is `dramatiq_abort.abort(message_id)`; the"
        " watcher raises `Abort` in the job's thread (`PyThreadState_SetAsyncExc`), which"
        " takes effect when the thread next runs Python code: never inside a blocking call,"
        " so `long` (`time.sleep(60)`) sees it only when the call returns (waited for, and"
        " counted as late)."
    )

    def worker_command(self) -> list[str]:
        return [
            sys.executable, "-m", "dramatiq", self.peer_app.__name__,
            "--processes", "1", "--threads", "1",
        ]  # fmt: skip

    def __init__(self, server_url: str) -> None:
        super().__init__(server_url)
        self.message_ids: dict[str, str] = {}

    async def enqueue(self, key: str, workload: str) -> None:
        self.message_ids[key] = self.peer_app.job.send(key, workload).message_id

    async def cancel(self, key: str) -> None:
        from dramatiq_abort import abort

        abort(self.message_ids.pop(key), middleware=self.peer_app.abortable)

    def observe_timeout(self, workload: str) -> float:
        # The blocking call cannot be interrupted: wait for it to end.
        return LONG_CALL_S + MISS_AFTER_S if workload == "long" else MISS_AFTER_S


class Celery(Peer):
    name = "celery"
    db = 3
    module = "celery_app"
    libraries = ("celery", "kombu", "billiard")
    configuration = (
        "`celery worker --pool prefork --concurrency 1 --without-gossip --without-mingle"
        " --without-heartbeat`, Redis transport, `worker_prefetch_multiplier=1`; the"
        ' cancel is `app.control.revoke(task_id, terminate=True, signal="SIGUSR1")` (a'
        " pidbox broadcast over PUBLISH); the worker signals the pool process, whose"
        " handler raises `SoftTimeLimitExceeded` in the task, even inside `time.sleep(60)`."
    )

    def worker_command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", self.peer_app.__name__, "worker",
            "--pool", "prefork", "--concurrency", "1", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"peers-{os.getpid()}@%h",
        ]  # fmt: skip

    async def enqueue(self, key: str, workload: str) -> None:
        self.peer_app.job.apply_async((key, workload), task_id=key)

    async def cancel(self, key: str) -> None:
        self.peer_app.app.control.revoke(key, terminate=True, signal="SIGUSR1")


class Rq(Peer):
    name = "rq"
    db = 4
    module = "rq_app"
    libraries = ("rq",)
    until = "status `stopped` (job not told)"
    # rq's first SIGTERM waits for the job in flight; the second kills its work horse.
    stop_signals = (signal.SIGTERM, signal.SIGTERM)
    configuration = (
        "`rq worker` (`rq.Worker`, a work horse forked per job); the cancel is"
        " `send_stop_job_command(connection, job_id)` (a PUBLISH to the worker), on which"
        " the worker SIGKILLs the work horse and marks the job `stopped`. The job's code is"
        " never told (its `except BaseException` and `finally` do not run), so the figure"
        " is the moment `job.get_status()`, polled back to back by the benchmark, reads"
        " `stopped`."
    )

    def worker_command(self) -> list[str]:
        return [
            sys.executable, "-m", "rq.cli", "worker", "--url", self.url,
            "--logging_level", "WARNING", "--name", f"peers-{os.getpid()}", self.peer_app.QUEUE,
        ]  # fmt: skip

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        import redis
        from rq import Queue

        self.jobs: dict[str, Any] = {}
        async with super().connected():
            self.redis = redis.Redis.from_url(self.url)
            self.queue = Queue(self.peer_app.QUEUE, connection=self.redis)
            try:
                yield
            finally:
                self.redis.close()

    async def enqueue(self, key: str, workload: str) -> None:
        self.jobs[key] = self.queue.enqueue(self.peer_app.job, key, workload, job_id=key)

    async def cancel(self, key: str) -> None:
        from rq.command import send_stop_job_command

        send_stop_job_command(self.redis, key)

    async def observe(self, key: str, workload: str, sent: float) -> Outcome:
        job = self.jobs.pop(key)
        deadline = sent + MISS_AFTER_S
        while (status := job.get_status(refresh=True)) != "stopped":
            if time.monotonic() > deadline:
                return Outcome(None, f"status {status} after 5 s")
        changed = time.monotonic()
        # The work horse has been reaped before the status is set: anything its code
        # recorded on the way out is in the list by now.
        entries = await self.observations.lrange(observed_key(key), 0, -1)
        after = [json.loads(entry)["what"] for entry in entries]
        return Outcome(changed - sent, "nothing (SIGKILL)" if not after else ", ".join(after))


SYSTEMS: dict[str, type[System]] = {
    system.name: system for system in (CancelBroker, CancelBrokerById, Arq, Dramatiq, Celery, Rq)
}


async def measure(system: System, plan: dict[str, int], progress: Any = None) -> dict[str, Samples]:
    """One discarded warm-up trial, then the planned trials of each workload in turn."""
    results: dict[str, Samples] = {}
    async with system.connected():
        await system.ready()
        await system.trial("warmup", "steps")
        for workload, trials in plan.items():
            samples = results[workload] = Samples()
            began = time.monotonic()
            for i in range(trials):
                samples.add(await system.trial(f"{workload}-{i}", workload))
            if progress is not None:
                progress(system.name, workload, samples, time.monotonic() - began)
    return results


def ms(value: float) -> str:
    value *= 1000
    return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"


HEADER = (
    "| system | workload | trials | p50 ms | p90 ms | p99 ms | max ms | misses | late (> 5 s)"
    " | measured until | what the job saw |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(system: System, workload: str, samples: Samples) -> str:
    values = sorted(samples.latencies)
    if values:
        figures = [latency.percentile(values, q) for q in (0.5, 0.9, 0.99)] + [values[-1]]
        cells = [ms(value) for value in figures]
    else:
        cells = ["-"] * 4
    saw = "; ".join(
        what if count == samples.trials else f"{what} x{count}"
        for what, count in samples.saw.most_common()
    )
    return (
        f"| {system.name} | {workload} | {samples.trials} | {' | '.join(cells)}"
        f" | {samples.misses} | {samples.late} | {system.until} | {saw} |"
    )


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine(redis_version: str, systems: list[System]) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = found.group(1).strip() if found else cpu
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    libraries = ", ".join(
        f"{name} {version(name)}"
        for name in ["redis", *(lib for system in systems for lib in system.libraries)]
    )
    return (
        f"`nproc` {nproc or os.cpu_count()}, {cpu}; Linux {platform.release()};"
        f" Python {platform.python_version()}; redis-server {redis_version} (one private"
        f" server on 127.0.0.1); {libraries}"
    )


def report(
    results: dict[str, dict[str, Samples]],
    systems: list[System],
    *,
    command: str,
    machine_line: str,
    elapsed: float,
    loads: dict[str, tuple[float, float]],
) -> str:
    # The machine may be shared: the load average says how busy it was besides this run.
    load_line = ", ".join(
        f"{name} {before:.2f} -> {after:.2f}" for name, (before, after) in loads.items()
    )
    lines = [
        f"Measured {datetime.date.today().isoformat()} with `{command}`"
        f" ({elapsed / 60:.1f} minutes in all).",
        "",
        f"Machine: {machine_line}. 1-minute load average when each system's measurement"
        f" began and ended (this run's own processes included): {load_line}.",
        "",
        HEADER,
        *(
            row(system, workload, samples)
            for system in systems
            for workload, samples in results[system.name].items()
        ),
        "",
        "How each system ran:",
        "",
        *(f"- **{system.name}**: {system.configuration}" for system in systems),
    ]
    return "\n".join(lines)


def write_docs(block: str, path: Path = DOCS) -> None:
    text = path.read_text()
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {START_MARKER} ... {END_MARKER} section to write into")
    text = f"{text[: start + len(START_MARKER)]}\n{block}\n{text[end:]}"
    path.write_text(text)


def parse_plan(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown system or workload: {', '.join(unknown)}")
    plan = {system: dict.fromkeys(workloads, args.trials) for system in systems}
    for item in (part for spec in args.trials_for for part in spec.split(",")):
        found = re.fullmatch(r"\s*([\w-]+):(\w+)=(\d+)\s*", item)
        if not found or found[1] not in SYSTEMS or found[2] not in WORKLOADS:
            raise SystemExit(f"--trials-for: expected SYSTEM:WORKLOAD=N, got {item!r}")
        if found[1] in plan and found[2] in plan[found[1]]:
            plan[found[1]][found[2]] = int(found[3])
    return plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="per system and workload")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument(
        "--trials-for",
        action="append",
        default=[],
        metavar="SYSTEM:WORKLOAD=N",
        help="override --trials for one system and workload (repeatable)",
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"write the table into {DOCS.relative_to(ROOT)} between {START_MARKER} markers",
    )
    args = parser.parse_args()
    plan = parse_plan(args)
    command = shlex.join(["python", "tests/benchmarks/peers.py", *sys.argv[1:]])

    def progress(name: str, workload: str, samples: Samples, seconds: float) -> None:
        print(
            f"{name} {workload}: {samples.trials} trials, {samples.misses} misses, {seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    began = time.monotonic()
    results: dict[str, dict[str, Samples]] = {}
    systems: list[System] = []
    loads: dict[str, tuple[float, float]] = {}
    with EmbeddedRedis() as server:
        redis_version = str(_redis_info(server.url)["redis_version"])
        for name, system_plan in plan.items():
            system = SYSTEMS[name](server.url)
            systems.append(system)
            before = os.getloadavg()[0]
            with system.running():
                results[name] = anyio.run(measure, system, system_plan, progress)
            loads[name] = (before, os.getloadavg()[0])
    elapsed = time.monotonic() - began
    block = report(
        results,
        systems,
        command=command,
        machine_line=machine(redis_version, systems),
        elapsed=elapsed,
        loads=loads,
    )
    print(block)
    if args.write_docs:
        write_docs(block)
        print(f"\nwritten to {DOCS.relative_to(ROOT)}", file=sys.stderr)
    return 0


def _redis_info(url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return dict(client.info("server"))
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
