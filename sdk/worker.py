"""The worker: consumes an app's triggers, runs its functions, and stops a run the
moment its cancel signal arrives.

Three loops, all owned by the worker's task group:

- the *trigger loop* reads the events stream through the app's consumer group,
  registers a run for every trigger it serves, acknowledges the entry, and starts
  the run;
- the *signal loop* reads this worker's signal stream and cancels the scope of the
  run each signal names;
- every *run* executes inside its own cancel scope and records its outcome when it
  ends, and only then leaves the worker's registry.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from datetime import timedelta
from types import TracebackType
from typing import Final, Self, cast

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdk.config import ON_EVICTING_REDIS, TRIGGER_LOOKBACK, resolve_lookback, resolve_namespace
from sdk.connection import (
    REDIS_ERRORS,
    Backoff,
    RedisClient,
    blocking_client,
    command_client,
    resolve_url,
    sync_command_client,
    unavailable,
)
from sdk.context import DEFAULT_THREAD_GRACE, CancelMode, FunctionBody, RunContext
from sdk.epoch import Epoch
from sdk.errors import (
    ConfigurationError,
    RedisUnavailableError,
    RunCancelled,
    UnknownFunctionError,
    WorkerNotStartedError,
    traceback_text,
)
from sdk.function import Function
from sdk.keys import BROKER_GROUP, Keys, check_id, check_name
from sdk.logs import configure_from_environment, held_lines
from sdk.loop_watch import LoopWatch
from sdk.metrics import WorkerMetrics
from sdk.partitions import Partitions, check_partitions
from sdk.reconcile import reconcile
from sdk.redis_health import EvictionWatch, OnEvicting
from sdk.registration import DEFAULT_HEARTBEAT_INTERVAL, WorkerRegistration
from sdk.rules import CancelOn
from sdk.runner import INTERRUPTED_REASON, LOST_REASON, SHUTDOWN_REASON, Run, Runner
from sdk.server_watch import CHECK_EVERY_S as SERVER_CHECK_S
from sdk.server_watch import ServerWatch
from sdk.store import DEFAULT_RETENTION
from sdk.streams import create_group
from sdk.triggers import FunctionTriggers
from sdk.wire import Event, Signal, decode_signal

DEFAULT_CONCURRENCY: Final = 100
#: How long the signal read waits before looping (it returns at once on a signal). Short,
#: with a short margin (SIGNAL_MARGIN_S): a connection that died without a reset (a silent
#: drop) is noticed, and replaced, within a second, instead of leaving the worker deaf to
#: cancels while its heartbeats (another connection) say it is fine.
SIGNAL_BLOCK_MS: Final = 300
SIGNAL_MARGIN_S: Final = 0.5
#: Set to 1: ``worker.main()`` shows the traceback of an error instead of one line.
DEBUG_ENV: Final = "CANCEL_BROKER_DEBUG"
#: The longest pause between two attempts to read signals again after an error: once Redis
#: answers, the reader is back within it.
SIGNAL_RECONNECT_CAP_S: Final = 0.5


@contextmanager
def _os_signals() -> Iterator[AsyncIterator[signal.Signals] | None]:
    """SIGTERM and SIGINT as they arrive, or None off the main thread (the host app's)."""
    with ExitStack() as stack:
        signals: AsyncIterator[signal.Signals] | None
        try:
            signals = stack.enter_context(anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
        except (NotImplementedError, ValueError, RuntimeError):
            signals = None
        yield signals


def _default_worker_id() -> str:
    host = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in socket.gethostname())
    return f"{host[:80] or 'worker'}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs an app's functions and stops them when a matching cancel event arrives.

    ``async with worker:`` starts the signal listener (enough for ``worker.run``);
    ``await worker.serve()`` also consumes the triggers, until SIGTERM/SIGINT or until
    the task awaiting it is cancelled.
    """

    def __init__(
        self,
        app_id: str,
        redis_url: str | None = None,
        *,
        namespace: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        shutdown_timeout: float = 30.0,
        retention: timedelta = DEFAULT_RETENTION,
        worker_id: str | None = None,
        app_version: str | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        metrics_registry: CollectorRegistry | None = None,
        thread_grace: float = DEFAULT_THREAD_GRACE,
        partitions: int | None = None,
        trigger_lookback: float | timedelta | str | None = None,
        on_evicting_redis: OnEvicting | None = None,
        freeze_gc: bool = True,
    ) -> None:
        try:
            self.app_id = check_name("app id", app_id)
            #: An identity the caller chose (then every process using this worker must
            #: choose its own), or None: one of this process's own, see worker_id.
            self._given_id = None if worker_id is None else check_name("worker id", worker_id)
            self.keys = Keys(resolve_namespace(namespace))
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        #: The number of partitions this worker expects (None: whatever the namespace has).
        self.partitions = check_partitions(partitions)
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1, not {concurrency}")
        if not thread_grace >= 0:  # NaN too
            raise ConfigurationError(f"thread_grace must be 0 or more seconds, not {thread_grace}")
        self.redis_url = resolve_url(redis_url)
        self.concurrency = concurrency
        self.shutdown_timeout = shutdown_timeout
        self.retention = retention
        self.app_version = app_version
        self.heartbeat_interval = heartbeat_interval
        #: Seconds a cancelled run's thread step gets to return before it is abandoned.
        self.thread_grace = thread_grace
        #: Whether :meth:`serve` keeps what the process built before it out of the garbage
        #: collector's full collections while it serves (``gc.freeze``).
        self.freeze_gc = freeze_gc
        #: How far back a function's first worker (the one that creates its consumer
        #: group) reads triggers published before it started: ``$CANCEL_BROKER_TRIGGER_LOOKBACK``
        #: unless given, 10 minutes by default. Each is run once whoever reads it.
        self.trigger_lookback = resolve_lookback(TRIGGER_LOOKBACK, trigger_lookback)
        #: ``refuse`` to start on a Redis that evicts keys, or ``warn`` and run degraded
        #: (``$CANCEL_BROKER_ON_EVICTING_REDIS``, else refuse): see sdk/redis_health.py.
        self.on_evicting_redis = cast(OnEvicting, ON_EVICTING_REDIS.resolve(on_evicting_redis))
        #: This process's run metrics; mount ``metrics.registry`` to expose them.
        self.metrics = WorkerMetrics(metrics_registry)
        self._functions: dict[str, Function] = {}
        self._by_trigger: dict[str, list[Function]] = {}
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._triggers: list[FunctionTriggers] = []
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._runner: Runner | None = None
        #: Entering creates the functions' consumer groups, so that triggers wait for a
        #: worker. BlockingWorker turns it off: a group nobody reads (its worker only holds
        #: runs) would keep the events stream from ever being trimmed.
        self._trigger_groups = True
        #: Bumped when Redis lost its data: signal readers start their new streams over.
        self._signals_from_start = 0
        self._own_id = (0, "")  # (pid, id) of this process's default identity, once made
        # A lazy logger: workers are declared at import time, before the app configures logging.
        self._log = structlog.get_logger("sdk.worker", app_id=self.app_id, worker_id=self.worker_id)

    @property
    def worker_id(self) -> str:
        """This process's identity in Redis: its registration, heartbeat and signal stream.

        Unless one was given, it names the host and the process, and is decided in the
        process that asks: a worker declared at import time, before a fork (a Celery
        prefork pool, gunicorn's ``--preload``), has another identity in each child, so a
        child that exits or dies takes only its own runs with it.
        """
        if self._given_id is not None:
            return self._given_id
        pid = os.getpid()
        if self._own_id[0] != pid:
            self._own_id = (pid, _default_worker_id())
        return self._own_id[1]

    # -- declaring functions -------------------------------------------------------

    def function(
        self,
        *,
        id: str,
        trigger: str,
        cancel_on: Iterable[CancelOn] = (),
        cancel_mode: CancelMode = "immediate",
        owner: str | None = None,
        interrupt_after: float | timedelta | str | None = None,
        trigger_if: str | None = None,
    ) -> Callable[[FunctionBody], Function]:
        """Declare a function run for every ``trigger`` event, cancelled by ``cancel_on``.

        ``cancel_mode``: ``"immediate"`` interrupts the body at its current await;
        ``"between_steps"`` lets the step in flight finish and stops the run at its next
        ``ctx.step.run``. ``interrupt_after`` (``between_steps`` only, ``"30s"``): a run
        that has not stopped that long after its cancel is interrupted at its current
        await, as in ``immediate`` mode (a process step is killed). ``owner``: a path in
        the trigger (``data.accountId``) naming who owns each run; a cancel by run id
        must then give that value as its ``actor``. ``trigger_if``: a CEL condition over
        ``event`` a trigger must meet to start a run, as Inngest's trigger ``if``.
        """

        def register(handler: FunctionBody) -> Function:
            return self._add(
                Function.declare(
                    id=id,
                    trigger=trigger,
                    cancel_on=cancel_on,
                    handler=handler,
                    cancel_mode=cancel_mode,
                    owner=owner,
                    interrupt_after=interrupt_after,
                    trigger_if=trigger_if,
                )
            )

        return register

    def declare(
        self,
        *,
        id: str,
        trigger: str,
        cancel_on: Iterable[CancelOn] = (),
        cancel_mode: CancelMode = "immediate",
        owner: str | None = None,
        interrupt_after: float | timedelta | str | None = None,
    ) -> Function:
        """Declare a function without a body: its runs are held by their caller
        (``BlockingWorker.run``, ``async with worker.run(...)``), a Django view or a script,
        under its ``cancel_on`` rules. No trigger event starts one (the worker consumes no
        triggers for it); ``trigger`` still names what its runs answer to (tombstones,
        bulk cancels). The other arguments are as in :meth:`function`."""
        return self._add(
            Function.declare(
                id=id,
                trigger=trigger,
                cancel_on=cancel_on,
                handler=None,
                cancel_mode=cancel_mode,
                owner=owner,
                interrupt_after=interrupt_after,
            )
        )

    def _add(self, fn: Function) -> Function:
        if fn.id in self._functions:
            raise ConfigurationError(f"function {fn.id!r} is declared twice")
        self._functions[fn.id] = fn
        self._by_trigger.setdefault(fn.trigger, []).append(fn)
        return fn

    @property
    def functions(self) -> Mapping[str, Function]:
        return dict(self._functions)

    @property
    def active_runs(self) -> int:
        """Runs this worker holds right now."""
        return len(self._runner) if self._runner is not None else 0

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this worker is already started")
        # Bound now, in the process that runs: after a fork the identity is the child's.
        self._log = structlog.get_logger("sdk.worker", app_id=self.app_id, worker_id=self.worker_id)
        stack = AsyncExitStack()
        try:
            redis = command_client(self.redis_url)
            stack.push_async_callback(redis.aclose)
            eviction = EvictionWatch(self.redis_url, self.on_evicting_redis, self._log)
            await eviction.check_at_start(redis)
            self.metrics.redis_evicting.set(eviction.problem is not None)
            partitions = await Partitions.open(redis, self.keys, self.partitions)
            epoch = Epoch(redis, self.keys, self._log)
            await epoch.join()
            # One blocking read per partition: their streams live in different slots.
            signal_readers = []
            for _ in range(partitions.count):
                reader = blocking_client(self.redis_url, SIGNAL_BLOCK_MS, margin_s=SIGNAL_MARGIN_S)
                stack.push_async_callback(reader.aclose)
                signal_readers.append(reader)
            self._runner = Runner(
                partitions,
                app_id=self.app_id,
                worker_id=self.worker_id,
                log=self._log,
                retention=self.retention,
                thread_grace=self.thread_grace,
                metrics=self.metrics,
            )
            registration = WorkerRegistration(
                redis,
                self.keys,
                app_id=self.app_id,
                worker_id=self.worker_id,
                app_version=self.app_version,
                heartbeat_interval=self.heartbeat_interval,
                log=self._log,
                on_lost=lambda: self._require_runner().deliver_all(LOST_REASON, interrupt=True),
                epoch=epoch,
                on_data_lost=lambda: self._recover(redis, registration, partitions),
            )
            # Synced (rules and placements recorded) before the functions' groups exist: no
            # trigger is read before the broker knows its rules and where its events go.
            await registration.sync(self._functions.values())
            await registration.check_broker_present()
            stack.push_async_callback(registration.leave)
            await self._create_groups(redis)
            stack.push_async_callback(self._delete_signal_stream, redis)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            for partition, reader in enumerate(signal_readers):
                self._tg.start_soon(self._listen_for_signals, reader, partition)
            self._tg.start_soon(registration.heartbeat_forever)
            self._tg.start_soon(self._watch_eviction, eviction, redis)
            self._tg.start_soon(self._watch_server, redis)
            beating = sync_command_client(self.redis_url)
            stack.callback(beating.close)
            loop_watch = LoopWatch(
                self._log,
                self.metrics,
                heartbeat=registration.heartbeat_from(beating),
                heartbeat_interval=self.heartbeat_interval,
            )
            self._tg.start_soon(loop_watch.run)
        except BaseException as exc:
            self._runner = self._tg = None
            await stack.aclose()
            if (explained := unavailable(exc, self.redis_url)) is not None:
                raise explained from exc
            raise
        self._stack = stack
        self._log.info("worker.started", functions=sorted(self._functions))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._stack.aclose()
        finally:
            self._stack = self._tg = self._runner = None
            self._log.info("worker.stopped")

    def main(self) -> None:
        """Serve until SIGTERM/SIGINT, as a program's entry point: ``if __name__ ==
        "__main__": worker.main()``. Logging, unless the program configured structlog
        itself: ``info`` and JSON off a terminal (``CANCEL_BROKER_LOG_LEVEL``,
        ``CANCEL_BROKER_LOG_FORMAT``). An error a person can fix (Redis cannot be reached,
        a password refused, a configuration refused) is one line on stderr with a hint, and
        exit status 2; ``CANCEL_BROKER_DEBUG=1`` shows its traceback instead."""
        try:
            configure_from_environment()
            anyio.run(self.serve)
        except (RedisUnavailableError, ConfigurationError) as exc:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            hint = getattr(exc, "hint", None)
            line = " ".join(str(exc).split())
            print(
                f"{self.app_id}: error: {line}" + (f" (hint: {hint})" if hint else ""),
                file=sys.stderr,
            )
            raise SystemExit(2) from None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume triggers and run functions until SIGTERM/SIGINT or cancellation.

        On the first signal the worker stops taking triggers and gives running runs
        ``shutdown_timeout`` seconds to finish; then (or on a second signal) it cancels
        them. Every run's outcome is recorded before ``serve`` returns.
        ``await task_group.start(worker.serve)`` returns once the worker is listening.
        """
        # Installed before anything else: a SIGTERM from the first moment on (a deploy
        # rolled back as it starts) is a clean stop, never the default action's kill.
        with _os_signals() as signals:
            async with self:
                consuming = anyio.CancelScope()
                with self._startup_frozen():
                    async with anyio.create_task_group() as tg:
                        if signals is not None:
                            tg.start_soon(self._handle_os_signals, signals, consuming)
                        task_status.started()
                        with consuming:
                            await self._consume_triggers()
                        await self._drain()
                        tg.cancel_scope.cancel()

    @contextmanager
    def _startup_frozen(self) -> Iterator[None]:
        """While serving, the objects that exist when the worker starts (the modules, the
        app's own) are out of the garbage collector's full collections.

        Those collections stop every run of a busy worker: at 1,000 runs started a second,
        each scanned about 150,000 objects (some 50 ms, the p99 of a cancel) and freed none;
        most were the process's startup objects, which live as long as it does.
        """
        if not self.freeze_gc:
            yield
            return
        gc.collect()  # nothing that is garbage already is frozen
        gc.freeze()
        self._log.info("worker.gc_frozen", objects=gc.get_freeze_count())
        try:
            yield
        finally:
            gc.unfreeze()

    @asynccontextmanager
    async def run(
        self,
        function_id: str,
        event: Event,
        *,
        run_id: str | None = None,
        parent: RunContext | str | None = None,
    ) -> AsyncIterator[RunContext]:
        """Run a body that something else started under ``function_id``'s cancel rules.

        ``async with worker.run("generate-report", event) as ctx: ...``. A cancel
        interrupts the block as the function's ``cancel_mode`` says; after the block,
        :class:`~sdk.errors.RunCancelled` is raised so the code that follows cannot
        mistake a cancelled block for a finished one; a run cancelled as it registers (a
        cancel by its id or a cancel event that came first, its parent cancelled) raises
        ``RunCancelled`` on entry, and the block never runs. ``parent`` (a run's context or id)
        makes this run its child: cancelling the parent cancels it. An ``event.ts`` (ms)
        says when the run was triggered (a job's enqueue time): a cancel event published
        after it, while the job was queued, cancels the run when it registers (tombstones).
        """
        fn = self._functions.get(function_id)
        if fn is None:
            raise UnknownFunctionError(
                f"function {function_id!r} is not declared on app {self.app_id!r}"
            )
        # A caller's ``ts`` says when the run was triggered (a job's enqueue time): cancel
        # events published since then apply, even those that came before it registered.
        trigger_ms = event.ts or None
        if not event.id:
            event = msgspec.structs.replace(
                event, id=f"local-{uuid.uuid4().hex}", ts=event.ts or int(time.time() * 1000)
            )
        check_id("event id", event.id)
        if run_id is not None:
            check_id("run id", run_id)
        parent_run_id = parent.run_id if isinstance(parent, RunContext) else parent
        if parent_run_id is not None:
            check_id("parent run id", parent_run_id)
        runner = self._require_runner()
        run = await runner.register(
            fn,
            event,
            run_id or uuid.uuid4().hex,
            parent_run_id=parent_run_id,
            trigger_ms=trigger_ms,
        )
        if run.state.cancelled:
            # Cancelled as it registered (a cancel by its id, a cancel event or a bulk cancel
            # came first, or its parent was cancelled): the block must not start. Recorded
            # (and its on_cancel hook run) before RunCancelled is raised.
            async with runner.running(run, interrupted_reason=INTERRUPTED_REASON):
                pass
            raise RunCancelled(run.run_id, run.state.reason)
        async with runner.running(run, interrupted_reason=INTERRUPTED_REASON) as ctx:
            run.state.body_started = True
            yield ctx
        if run.state.cancelled:
            raise RunCancelled(run.run_id, run.state.reason)

    # -- runs ----------------------------------------------------------------------

    def _require_runner(self) -> Runner:
        if self._runner is None:
            raise WorkerNotStartedError(
                "start the worker first: `async with worker:` or `await worker.serve()`"
            )
        return self._runner

    async def _execute(self, run: Run) -> None:
        runner = self._require_runner()
        try:
            # The run's scope is entered before it waits for a slot: a cancel (or the
            # worker's shutdown) while it waits is recorded like any other.
            async with runner.running(run) as ctx, self._limiter:
                run.state.body_started = True
                await run.function.handler(ctx)
        except Exception as exc:
            # The traceback as text, without the frames' locals: whatever the app's logging
            # renders, a trigger's data (a card number) never reaches the log through them.
            self._log.error("run.body_failed", run_id=run.run_id, exception=traceback_text(exc))
        finally:
            runner.notify()  # a slot is free again

    async def _drain(self) -> None:
        runner = self._require_runner()
        while self._starting():  # triggers read before consumption stopped become runs
            await runner.changed()
        if len(runner):
            self._log.info("worker.draining", runs=len(runner), timeout=self.shutdown_timeout)
            with anyio.move_on_after(self.shutdown_timeout):
                await runner.wait_empty()
        runner.deliver_all(SHUTDOWN_REASON, interrupt=True)
        await runner.wait_empty()

    async def _handle_os_signals(
        self, signals: AsyncIterator[signal.Signals], consuming: anyio.CancelScope
    ) -> None:
        async for signum in signals:
            if not consuming.cancel_called:
                self._log.info("worker.stopping", signal=signum.name)
                consuming.cancel()
            else:
                self._log.info("worker.cancelling_runs", signal=signum.name)
                self._require_runner().deliver_all(SHUTDOWN_REASON, interrupt=True)

    async def _recover(
        self, redis: RedisClient, registration: WorkerRegistration, partitions: Partitions
    ) -> None:
        """Redis lost its data (a restart without persistence): nothing was recorded
        against this worker, so it gives nothing up. It stores the namespace's partition
        count again, syncs, recreates its groups from the start of the new streams (all
        of them came after the loss), registers again every run it holds, and reads its
        signals from the start of its new streams. The runs go on; a cancel published
        since reaches them (kept for them, or a tombstone, if it came first)."""
        self.metrics.redis_data_lost.inc()
        await redis.set(self.keys.partitions, partitions.count, nx=True)
        await registration.sync(self._functions.values())
        await self._create_groups(redis, from_start=True)
        runs = await self._require_runner().register_again()
        self._signals_from_start += 1
        self._log.warning("worker.rebuilt_after_data_loss", runs_registered_again=runs)

    async def _watch_eviction(self, eviction: EvictionWatch, redis: RedisClient) -> None:
        """Read the Redis's eviction policy now and then: it can change under a running
        worker (a CONFIG SET, a failover to a replica configured otherwise)."""
        while True:
            await anyio.sleep(eviction.every_s)
            problem = await eviction.check(redis)
            self.metrics.redis_evicting.set(problem is not None)

    async def _watch_server(self, redis: RedisClient) -> None:
        """Reconcile the runs this process holds whenever another Redis server answers (a
        failover to a replica that may lag, a restart): see sdk/reconcile.py."""
        watch = ServerWatch(self._log)
        await watch.changed(redis)
        while True:
            await anyio.sleep(SERVER_CHECK_S)
            if not await watch.changed(redis):
                continue
            try:
                done = await reconcile(self._require_runner())
            except REDIS_ERRORS as exc:  # the server changes again, or fails: next look
                self._log.warning("worker.reconcile_failed", error=repr(exc))
                watch.known = None
                continue
            self.metrics.redis_server_changes.inc()
            for action in ("registered_again", "stopped", "recorded_again", "recorded_lost"):
                if count := getattr(done, action):
                    self.metrics.runs_reconciled.labels(action).inc(count)
            (self._log.warning if done.changed else self._log.info)(
                "worker.reconciled",
                registered_again=done.registered_again,
                stopped=done.stopped,
                recorded_again=done.recorded_again,
                recorded_lost=done.recorded_lost,
            )

    # -- the signal loop -----------------------------------------------------------

    async def _listen_for_signals(self, reader: RedisClient, partition: int) -> None:
        """Apply the signals of one partition's runs as they arrive."""
        stream = self.keys.in_partition(partition).signals(self.worker_id)
        # This stream is new with this worker id; reading from its start loses nothing,
        # and the last id carried across reconnects makes every signal arrive once.
        last_id, generation = "0-0", self._signals_from_start
        backoff = Backoff(self._log, "signals", cap=SIGNAL_RECONNECT_CAP_S)
        while True:
            if generation != self._signals_from_start:  # Redis lost its data: a new stream
                last_id, generation = "0-0", self._signals_from_start
            try:
                reply = await reader.xread({stream: last_id}, count=100, block=SIGNAL_BLOCK_MS)
            except REDIS_ERRORS as exc:
                # A read unanswered past its block: the connection is dead (a silent drop),
                # and redis-py dropped it. Read again at once, on a new one.
                await backoff.failed(exc, pause=not isinstance(exc, RedisTimeoutError))
                continue
            backoff.succeeded()
            received: list[Signal] = []
            # The cancelled runs go first: their bodies see the cancellation before this
            # task writes its log lines and packs the acknowledgement.
            with held_lines():
                for _stream, entries in cast(
                    list[tuple[str, list[tuple[str, dict[str, str]]]]], reply
                ):
                    for entry_id, fields in entries:
                        last_id = entry_id
                        if (sig := self._apply_signal(entry_id, fields)) is not None:
                            received.append(sig)
                await anyio.lowlevel.checkpoint()
            if received:
                await self._acknowledge(received, last_id, partition)

    def _apply_signal(self, entry_id: str, fields: dict[str, str]) -> Signal | None:
        """Cancel the run a signal names; returns the signal, to be acknowledged."""
        try:
            sig: Signal = decode_signal(fields)
        except msgspec.ValidationError as exc:
            self._log.error("signal.malformed", entry_id=entry_id, error=str(exc))
            return None
        self.metrics.signals_received.inc()
        if not self._require_runner().deliver(sig.run_id, sig.reason or "cancelled"):
            self._log.debug("signal.run_gone", run_id=sig.run_id)
            return sig
        self._log.info(
            "run.cancel_received", run_id=sig.run_id, event_id=sig.event_id, resent=sig.resent
        )
        return sig

    async def _acknowledge(self, signals: list[Signal], read_up_to: str, partition: int) -> None:
        try:
            delays = (
                await self._require_runner()
                .stores[partition]
                .acknowledge_signals(
                    [(sig.run_id, sig.sent_at) for sig in signals],
                    worker_id=self.worker_id,
                    read_up_to=read_up_to,
                )
            )
        except REDIS_ERRORS as exc:  # unacknowledged: re-sent, and applied once
            self._log.warning("signals.ack_failed", error=repr(exc))
            return
        self.metrics.signals_acknowledged.inc(len(signals))
        for seconds in delays:
            self.metrics.signal_delivery.observe(seconds)

    async def _delete_signal_stream(self, redis: RedisClient) -> None:
        with anyio.move_on_after(5, shield=True):
            try:
                for store in self._require_runner().stores:
                    await redis.delete(store.keys.signals(self.worker_id))
            except RedisError as exc:
                self._log.warning("signals.cleanup_failed", error=str(exc))

    # -- triggers ------------------------------------------------------------------

    @property
    def _lookback_ms(self) -> int:
        return round(self.trigger_lookback.total_seconds() * 1000)

    async def _create_groups(self, redis: RedisClient, *, from_start: bool = False) -> None:
        """The function's groups, for its first worker ever: starting the trigger lookback
        back, so that triggers published before any worker of the function started (the
        web app was up first; a rolling deploy adds the function) are run, once each (a
        trigger's run id derives from its event id: read twice, it registers once).
        ``from_start``: after Redis lost its data, from the new streams' first entry."""
        lookback = self._lookback_ms
        groups = [BROKER_GROUP]
        if self._trigger_groups:
            groups += [
                self.keys.function_group(self.app_id, fn.id)
                for fn in self._functions.values()
                if not fn.held
            ]
        for store in self._require_runner().stores:
            # The broker's group too: from the moment a run can exist, cancel events are
            # kept for the broker even if no broker has started yet.
            for group in groups:
                await create_group(
                    redis, store.keys.events, group, lookback_ms=lookback, from_start=from_start
                )

    async def _consume_triggers(self) -> None:
        runner = self._require_runner()
        assert self._tg is not None
        self._triggers = [
            FunctionTriggers(
                fn,
                runner,
                partition=partition,
                redis_url=self.redis_url,
                app_id=self.app_id,
                worker_id=self.worker_id,
                task_group=self._tg,
                capacity=self._wait_for_capacity,
                execute=self._execute,
                log=self._log,
                lookback_ms=self._lookback_ms,
            )
            for fn in self._functions.values()
            if not fn.held
            for partition in range(runner.partitions.count)
        ]
        if not self._triggers:
            # Only functions whose runs their callers hold: serve their signals until told
            # to stop, as any worker does.
            await anyio.sleep_forever()
        async with anyio.create_task_group() as tg:
            for triggers in self._triggers:
                tg.start_soon(triggers.run)

    def _starting(self) -> int:
        return sum(len(triggers.starting) for triggers in self._triggers)

    async def _wait_for_capacity(self) -> int:
        """Wait for a free slot: runs held (running or waiting) and runs being started count.

        Returns how many triggers one reader may take: its share of the free slots. The
        worker has a reader per function and partition, and readers blocked in ``XREADGROUP``
        cannot reserve slots between them; with shares, all of them waking at once take
        fewer extra triggers than there are readers (those runs register and wait for a
        slot), instead of each taking every free slot.
        """
        runner = self._require_runner()
        while (free := self.concurrency - len(runner) - self._starting()) < 1:
            await runner.changed()
        return max(1, free // max(1, len(self._triggers)))
