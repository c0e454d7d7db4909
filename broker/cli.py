"""``cancel-broker``: run the broker, publish an event, inspect or cancel a run."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, cast

import anyio
import msgspec
import structlog

import sdk
from broker.cli_errors import UsageError, diagnose, leaf
from broker.dashboard_access import CancelAccess, DashboardMode, is_loopback
from broker.dashboard_routes import dashboard_routes
from broker.embedded import EmbeddedRedis
from broker.findings import SyncState, Windows
from broker.http import create_app, serve_http
from broker.logs import LogFormat, configure_logging
from broker.metrics import BrokerMetrics
from broker.output import Output, progress_bar, text
from broker.report import format_status, print_status_rich
from broker.service import Broker
from broker.settings import Settings
from broker.sync_state import collect_state
from sdk import OPERATOR, Client, RunInfo
from sdk.client import Actor
from sdk.connection import (
    REDIS_URL_ENV,
    command_client,
    resolve_url,
    resolve_url_source,
)
from sdk.durations import parse_duration
from sdk.keys import Keys
from sdk.local_redis import advertise
from sdk.redis_health import OnEvicting
from sdk.urls import redact_url

#: The longest a broker takes to stop after SIGTERM.
STOP_TIMEOUT_S = 5.0
T = TypeVar("T")

log = structlog.get_logger("broker")


#: Shown by each command's --help; tests parse every line that starts with the program name.
EXAMPLES: Final[dict[str, str]] = {
    "run": """
  cancel-broker run                                   # on an embedded Redis, for trying it out
  cancel-broker run --redis-url redis://redis:6379/0 --http-host 0.0.0.0
  CANCEL_BROKER_REDIS_URL=redis://redis:6379/0 cancel-broker run --log-format json""",
    "sync status": """
  cancel-broker sync status                           # exit 1 when a configuration is stale
  cancel-broker sync status --json | jq .findings
  cancel-broker sync status --dead-rule-window 7d""",
    "send": """
  cancel-broker send report/generate.requested '{"reportId": "r1"}'
  cancel-broker send report/cancel.requested '{"reportId": "r1"}'""",
    "cancel": """
  cancel-broker cancel 0f8e2c1d9b7a4e3f --reason "user clicked cancel"
  cancel-broker cancel 0f8e2c1d9b7a4e3f --actor acct-42 --json""",
    "cancel-many": """
  cancel-broker cancel-many generate-report --started-before 2026-11-25T10:00Z
  cancel-broker cancel-many generate-report --app reports --if 'event.data.tier == "free"'""",
    "wait": """
  cancel-broker wait 0f8e2c1d9b7a4e3f --timeout 30s
  cancel-broker wait 0f8e2c1d9b7a4e3f --json""",
    "get-run": """
  cancel-broker get-run 0f8e2c1d9b7a4e3f
  cancel-broker get-run 0f8e2c1d9b7a4e3f --json | jq .status""",
    "redis-url": """
  cancel-broker redis-url                             # the embedded Redis of `make run`
  CANCEL_BROKER_REDIS_URL=redis://redis:6379/0 cancel-broker redis-url   # from the variable""",
}

_EPILOG = """examples:{examples}

Errors are one line with a hint; --debug also prints the traceback."""


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    example: str,
    help: str,
    parents: Sequence[argparse.ArgumentParser],
    description: str | None = None,
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        parents=parents,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=_EPILOG.format(examples=EXAMPLES[example]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cancel-broker",
        description="Event-driven cancellation over Redis Streams.",
        epilog="Run `cancel-broker COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {sdk.__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="print tracebacks and debug logs on errors"
    )
    parser.set_defaults(settings_groups=["connection"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Options every command takes: --debug also after the command name (SUPPRESS keeps
    # `cancel-broker --debug run` from being reset by the subcommand's default).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    Settings.add_arguments(common, ["connection"])
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json",
        action="store_true",
        help="print JSON (default: a table on a terminal, plain text otherwise)",
    )

    run = _command(
        commands,
        "run",
        example="run",
        parents=[common],
        help="run the broker",
        description="Run the broker: consume cancel events, signal the matched runs' workers,"
        " serve /healthz, /readyz, /metrics, /v1/sync and the dashboard at /.\n\nEvery option"
        " has an environment variable; a flag wins over it. Durations are seconds or 90s, 30m,"
        " 2h, 7d.",
    )
    Settings.add_arguments(run, ["broker", "detection"])
    run.set_defaults(handler=_run, settings_groups=["connection", "broker", "detection"])

    sync = commands.add_parser("sync", help="registration state and stale configurations")
    sync_commands = sync.add_subparsers(dest="sync_command", required=True, metavar="COMMAND")
    status = _command(
        sync_commands,
        "status",
        example="sync status",
        parents=[common, as_json],
        help="live workers, functions and stale findings; exits 1 when something is stale",
    )
    Settings.add_arguments(status, ["detection"])
    status.set_defaults(handler=_sync_status, settings_groups=["connection", "detection"])

    send = _command(
        commands, "send", example="send", parents=[common], help="publish an event; prints its id"
    )
    send.add_argument("name", help="event name, e.g. report/cancel.requested")
    send.add_argument(
        "data", nargs="?", default="{}", help='a JSON object, e.g. {"reportId": "r1"}'
    )
    send.set_defaults(handler=_send)

    cancel = _command(
        commands,
        "cancel",
        example="cancel",
        parents=[common, as_json],
        help="cancel one run by id (and the runs started inside it)",
    )
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default=None, help="recorded on the run")
    cancel.add_argument(
        "--actor",
        default=None,
        help="cancel as this owner value (JSON, or a plain string); default: as an operator,"
        " whatever owner the function declares",
    )
    cancel.set_defaults(handler=_cancel)

    many = _command(
        commands,
        "cancel-many",
        example="cancel-many",
        parents=[common, as_json],
        help="cancel the unfinished runs of a function",
    )
    many.add_argument("function_id")
    many.add_argument("--app", default=None, help="only this app's runs (default: every app)")
    many.add_argument(
        "--started-after",
        type=_datetime,
        default=None,
        help="ISO 8601 time, e.g. 2026-11-25T10:00Z (UTC without a zone)",
    )
    many.add_argument("--started-before", type=_datetime, default=None, help="ISO 8601 time")
    many.add_argument(
        "--if",
        dest="if_",
        default=None,
        help="CEL over the trigger, e.g. 'event.data.tier == \"free\"'",
    )
    many.add_argument("--reason", default=None, help="recorded on each run")
    many.set_defaults(handler=_cancel_many)

    wait = _command(
        commands,
        "wait",
        example="wait",
        parents=[common, as_json],
        help="wait for a run to finish and show it",
    )
    wait.add_argument("run_id")
    wait.add_argument("--timeout", type=_duration, default=None, help="e.g. 30s (default: none)")
    wait.set_defaults(handler=_wait)

    get_run = _command(
        commands, "get-run", example="get-run", parents=[common, as_json], help="show one run"
    )
    get_run.add_argument("run_id")
    get_run.set_defaults(handler=_get_run)

    redis_url = _command(
        commands,
        "redis-url",
        example="redis-url",
        parents=[common],
        help="print the Redis URL the other commands use, and where it comes from (stderr)",
    )
    redis_url.set_defaults(handler=_print_redis_url)
    return parser


def _datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _windows(settings: Settings) -> Windows:
    return Windows(
        dead_rule_after_s=settings.dead_rule_window, orphan_window_s=settings.orphan_window
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    debug: bool = args.debug
    redis_url: str | None = args.redis_url
    try:
        settings = Settings.resolve(args, groups=args.settings_groups)
        redis_url = settings.redis_url
        if args.command != "run":
            # Client commands print their result on stdout: their logs go to stderr, and
            # only warnings unless --debug.
            configure_logging("debug" if debug else "warning")
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        if isinstance(leaf(exc), (KeyboardInterrupt, SystemExit)):
            raise
        if debug:
            traceback.print_exception(exc)
        diagnosis = diagnose(exc, resolve_url(redis_url))
        print(diagnosis.line(), file=sys.stderr)
        return diagnosis.exit_code


# -- run -----------------------------------------------------------------------------


def _run(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_level, cast(LogFormat, settings.log_format))
    with ExitStack() as stack:
        url = settings.redis_url
        if not url:
            server = stack.enter_context(EmbeddedRedis())
            url = server.url
            stack.enter_context(advertise(url))
            print(
                f"cancel-broker: started an embedded Redis at {url}\n"
                "  workers, clients and cancel-broker commands on this machine that are given"
                " no Redis URL use it while this broker runs\n"
                f"  (elsewhere: export {REDIS_URL_ENV}={url})",
                flush=True,
            )
        anyio.run(_serve, url, settings)
    return 0


async def _serve(url: str, settings: Settings) -> None:
    metrics = BrokerMetrics()
    broker = Broker(
        url,
        namespace=settings.namespace,
        consumer=settings.consumer,
        metrics=metrics,
        windows=_windows(settings),
        cancel_event_names=frozenset(settings.cancel_events),
        claim_idle_ms=int(settings.claim_idle * 1000),
        dead_letter_maxlen=settings.dead_letter_maxlen,
        history_length=settings.history_length,
        tombstone_lookback_s=settings.tombstone_lookback,
        partitions=settings.partitions,
        pending_cancel_lookback_s=settings.pending_cancel_lookback,
        wait_replicas=settings.wait_replicas,
        wait_timeout_s=settings.wait_timeout,
        trigger_lookback_s=settings.trigger_lookback,
        on_evicting_redis=cast(OnEvicting, settings.on_evicting_redis),
    )
    access = CancelAccess(
        mode=cast(DashboardMode, settings.dashboard),
        token=settings.dashboard_token,
        loopback=is_loopback(settings.http_host),
    )
    if access.mode == "on" and not access.cancel_enabled:
        log.warning("dashboard.cancel_off", reason=access.cancel_disabled_reason)
    routes = dashboard_routes(access, broker.dashboard, namespace=settings.namespace)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, broker, tg.cancel_scope)
        port = await tg.start(
            serve_http,
            create_app(metrics.registry, broker, routes),
            settings.http_host,
            settings.http_port,
        )
        await tg.start(broker.run)
        log.info(
            "broker.ready",
            redis_url=redact_url(url),
            namespace=settings.namespace,
            http=f"http://{settings.http_host}:{port}",
            dashboard=settings.dashboard,
            version=sdk.__version__,
        )


async def _stop_on_signals(broker: Broker, scope: anyio.CancelScope) -> None:
    """SIGTERM/SIGINT: stop reading, finish and acknowledge the batch in hand, exit.

    Within ``STOP_TIMEOUT_S`` in any case; a second signal stops at once.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("broker.stopping", signal=signum.name)
            broker.stop()
            with anyio.move_on_after(STOP_TIMEOUT_S):
                async with anyio.create_task_group() as tg:

                    async def second_signal() -> None:
                        async for _ in signals:
                            tg.cancel_scope.cancel()

                    tg.start_soon(second_signal)
                    await broker.stopped.wait()
                    tg.cancel_scope.cancel()
            scope.cancel()
            return


# -- client commands -------------------------------------------------------------------


def _redis_url(settings: Settings) -> str:
    """The URL a client command uses; says so on stderr when it is the embedded Redis that
    a `cancel-broker run` on this machine advertises (rather than one the user gave)."""
    url, source = resolve_url_source(settings.redis_url)
    if source == "embedded":
        print(
            f"cancel-broker: using the embedded Redis of a running `cancel-broker run`: {url}",
            file=sys.stderr,
        )
    return url


def _with_client(settings: Settings, action: Callable[[Client], Awaitable[T]]) -> T:
    url = _redis_url(settings)

    async def go() -> T:
        async with Client(
            url,
            namespace=settings.namespace,
            partitions=settings.partitions,
            pending_cancel_lookback=settings.pending_cancel_lookback,
            wait_replicas=settings.wait_replicas,
            wait_timeout=settings.wait_timeout,
        ) as client:
            return await action(client)

    return anyio.run(go)


def _run_rows(run: RunInfo) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("run_id", run.run_id),
        ("function", f"{run.app_id}/{run.function_id}"),
        ("status", run.status),
        ("trigger", f"{run.event.name} {json.dumps(run.event.data, separators=(',', ':'))}"),
        ("worker", run.worker_id),
        ("started_at", run.started_at),
        ("finished_at", run.finished_at),
    ]
    optional = [
        ("cancel_requested_at", run.cancel_requested_at),
        ("cancel_reason", run.cancel_reason),
        ("cancelled_by", run.cancelled_by),
        ("cancel_latency_ms", run.cancel_latency_ms),
        ("error", run.error),
        ("rule_error", run.rule_error),
        ("on_cancel_error", run.on_cancel_error),
        ("parent_run_id", run.parent_run_id),
    ]
    rows += [(name, value) for name, value in optional if value is not None]
    if run.abandoned_thread:
        rows.append(("abandoned_thread", True))
    if run.escalated:
        rows.append(("escalated", True))
    if run.terminated:
        rows.append(("terminated", True))
    return rows


def _show_run(args: argparse.Namespace, run: RunInfo) -> None:
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(run)
    else:
        out.record(f"run {run.run_id}", _run_rows(run))


def _send(args: argparse.Namespace, settings: Settings) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"DATA is not JSON: {exc}", """quote it for the shell: '{"reportId": "r1"}'"""
        ) from None
    print(_with_client(settings, lambda client: client.send(args.name, data)))
    return 0


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    actor: Actor = OPERATOR
    if args.actor is not None:
        try:
            actor = json.loads(args.actor)
        except json.JSONDecodeError:
            actor = args.actor
    result = _with_client(
        settings, lambda client: client.cancel(args.run_id, reason=args.reason, actor=actor)
    )
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(result)
    else:
        out.record(
            f"cancel {result.run_id}",
            [
                ("run_id", result.run_id),
                ("outcome", result.outcome),
                ("previous_status", result.previous_status),
                ("status", result.status),
                ("cascaded", ", ".join(result.cascaded) or "-"),
                *([("kept_until", result.kept_until)] if result.kept_until else []),
            ],
        )
        if result.outcome == "pending":
            print(
                f"no run {result.run_id} yet: the cancel is kept until"
                f" {text(result.kept_until)}, and a run that registers with this id by then is"
                " cancelled before its body runs",
                file=sys.stderr,
            )
    return 1 if result.outcome in ("not_found", "forbidden") else 0


def _cancel_many(args: argparse.Namespace, settings: Settings) -> int:
    with progress_bar(f"cancelling {args.function_id}") as ticker:
        bulk = _with_client(
            settings,
            lambda client: client.cancel_many(
                args.function_id,
                app_id=args.app,
                started_after=args.started_after,
                started_before=args.started_before,
                if_=args.if_,
                reason=args.reason,
                progress=ticker,
            ),
        )
    outcomes = Counter(result.outcome for result in bulk.results)
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(
            {
                "runs": len(bulk.results),
                "outcomes": dict(outcomes),
                "started_after": bulk.started_after,
                "started_before": bulk.started_before,
                "kept_until": bulk.kept_until,
            }
        )
        return 0
    out.table(
        f"{len(bulk.results)} run(s) of {args.function_id} considered",
        ["outcome", "runs"],
        sorted(outcomes.items()),
    )
    if bulk.kept_until is not None:
        print(
            f"runs of {args.function_id} triggered up to {text(bulk.started_before)} that have"
            f" not registered yet (queued) are cancelled when they do, until"
            f" {text(bulk.kept_until)}",
            file=sys.stderr,
        )
    return 0


def _wait(args: argparse.Namespace, settings: Settings) -> int:
    run = _with_client(settings, lambda client: client.wait(args.run_id, args.timeout))
    _show_run(args, run)
    return 0


def _sync_status(args: argparse.Namespace, settings: Settings) -> int:
    url = _redis_url(settings)

    async def collect() -> SyncState:
        redis = command_client(url)
        try:
            return await collect_state(redis, Keys(settings.namespace), windows=_windows(settings))
        finally:
            await redis.aclose()

    state = anyio.run(collect)
    out = Output(as_json=args.json)
    if out.as_json:
        print(msgspec.json.format(msgspec.json.encode(state)).decode())
    elif out.rich:
        print_status_rich(state, settings.namespace, out.console())
    else:
        print(format_status(state, settings.namespace))
    return 1 if state.stale else 0


def _print_redis_url(args: argparse.Namespace, settings: Settings) -> int:
    # The flag itself, not the settings (which also hold the variable's value).
    url, source = resolve_url_source(args.redis_url)
    origin = {
        "argument": "--redis-url",
        "environment": f"${REDIS_URL_ENV}",
        "embedded": "the embedded Redis of a running `cancel-broker run`",
        "default": f"the default (no --redis-url, no ${REDIS_URL_ENV}, no running"
        " `cancel-broker run` with an embedded Redis)",
    }[source]
    print(f"cancel-broker: from {origin}", file=sys.stderr)
    print(url)
    return 0


def _get_run(args: argparse.Namespace, settings: Settings) -> int:
    run = _with_client(settings, lambda client: client.get_run(args.run_id))
    if run is None:
        print(f"cancel-broker: no run {args.run_id}", file=sys.stderr)
        return 1
    _show_run(args, run)
    return 0
