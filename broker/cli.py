"""``cancel-broker``: run the broker, publish an event, inspect or cancel a run."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import anyio
import msgspec
import structlog

import sdk
from broker.embedded import EmbeddedRedis, EmbeddedRedisError
from broker.findings import SyncState, Windows, collect_state
from broker.http import HttpBindError, create_app, serve_http
from broker.logs import LogFormat, configure_logging
from broker.metrics import BrokerMetrics
from broker.report import format_status
from broker.service import Broker
from broker.settings import Settings
from sdk import OPERATOR, Client
from sdk.client import Actor
from sdk.connection import REDIS_URL_ENV, command_client, redact_url, resolve_url
from sdk.durations import parse_duration
from sdk.errors import CancelBrokerError
from sdk.keys import Keys

#: The longest a broker takes to stop after SIGTERM.
STOP_TIMEOUT_S = 5.0
T = TypeVar("T")

log = structlog.get_logger("broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cancel-broker", description="Event-driven cancellation over Redis Streams."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {sdk.__version__}")
    parser.set_defaults(settings_groups=["connection"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    Settings.add_arguments(common, ["connection"])

    run = commands.add_parser("run", parents=[common], help="run the broker")
    Settings.add_arguments(run, ["broker", "detection"])
    run.set_defaults(handler=_run, settings_groups=["connection", "broker", "detection"])

    sync = commands.add_parser("sync", help="registration state and stale configurations")
    sync_commands = sync.add_subparsers(dest="sync_command", required=True, metavar="COMMAND")
    status = sync_commands.add_parser(
        "status",
        parents=[common],
        help="live workers, functions and stale findings; exits 1 when something is stale",
    )
    status.add_argument("--json", action="store_true", help="print the state as JSON")
    Settings.add_arguments(status, ["detection"])
    status.set_defaults(handler=_sync_status, settings_groups=["connection", "detection"])

    send = commands.add_parser("send", parents=[common], help="publish an event")
    send.add_argument("name", help="event name, e.g. report/cancel.requested")
    send.add_argument(
        "data", nargs="?", default="{}", help='a JSON object, e.g. {"reportId": "r1"}'
    )
    send.set_defaults(handler=_send)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel one run by id")
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default=None)
    cancel.add_argument(
        "--actor",
        default=None,
        help="cancel as this owner value (JSON, or a plain string); default: as an operator,"
        " whatever owner the function declares",
    )
    cancel.set_defaults(handler=_cancel)

    many = commands.add_parser(
        "cancel-many", parents=[common], help="cancel the unfinished runs of a function"
    )
    many.add_argument("function_id")
    many.add_argument("--app", default=None, help="only this app's runs (default: every app)")
    many.add_argument(
        "--started-after",
        type=_datetime,
        default=None,
        help="ISO 8601 time, e.g. 2026-11-25T10:00Z",
    )
    many.add_argument("--started-before", type=_datetime, default=None, help="ISO 8601 time")
    many.add_argument(
        "--if",
        dest="if_",
        default=None,
        help="CEL over the trigger, e.g. 'event.data.tier == \"free\"'",
    )
    many.add_argument("--reason", default=None)
    many.set_defaults(handler=_cancel_many)

    wait = commands.add_parser("wait", parents=[common], help="wait for a run to finish")
    wait.add_argument("run_id")
    wait.add_argument("--timeout", type=_duration, default=None, help="e.g. 30s (default: none)")
    wait.set_defaults(handler=_wait)

    get_run = commands.add_parser("get-run", parents=[common], help="show one run")
    get_run.add_argument("run_id")
    get_run.set_defaults(handler=_get_run)
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
    try:
        settings = Settings.resolve(args, groups=args.settings_groups)
        return handler(args, settings)
    except (CancelBrokerError, EmbeddedRedisError, HttpBindError, ValueError) as exc:
        print(f"cancel-broker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- run -----------------------------------------------------------------------------


def _run(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_level, cast(LogFormat, settings.log_format))
    with ExitStack() as stack:
        url = settings.redis_url
        if not url:
            server = stack.enter_context(EmbeddedRedis())
            url = server.url
            print(
                f"cancel-broker: started an embedded Redis at {url}\n"
                f"  point workers and clients at it:  export {REDIS_URL_ENV}={url}",
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
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, broker, tg.cancel_scope)
        port = await tg.start(
            serve_http,
            create_app(metrics.registry, broker),
            settings.http_host,
            settings.http_port,
        )
        await tg.start(broker.run)
        log.info(
            "broker.ready",
            redis_url=redact_url(url),
            namespace=settings.namespace,
            http=f"http://{settings.http_host}:{port}",
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


def _with_client(settings: Settings, action: Callable[[Client], Awaitable[T]]) -> T:
    async def go() -> T:
        async with Client(settings.redis_url, namespace=settings.namespace) as client:
            return await action(client)

    return anyio.run(go)


def _print_json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2))


def _send(args: argparse.Namespace, settings: Settings) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"data is not JSON: {exc}") from None
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
    _print_json(result)
    return 1 if result.outcome in ("not_found", "forbidden") else 0


def _cancel_many(args: argparse.Namespace, settings: Settings) -> int:
    results = _with_client(
        settings,
        lambda client: client.cancel_many(
            args.function_id,
            app_id=args.app,
            started_after=args.started_after,
            started_before=args.started_before,
            if_=args.if_,
            reason=args.reason,
        ),
    )
    outcomes = Counter(result.outcome for result in results)
    _print_json({"runs": len(results), "outcomes": dict(outcomes)})
    return 0


def _wait(args: argparse.Namespace, settings: Settings) -> int:
    run = _with_client(settings, lambda client: client.wait(args.run_id, args.timeout))
    _print_json(run)
    return 0


def _sync_status(args: argparse.Namespace, settings: Settings) -> int:
    async def collect() -> SyncState:
        redis = command_client(resolve_url(settings.redis_url))
        try:
            return await collect_state(redis, Keys(settings.namespace), windows=_windows(settings))
        finally:
            await redis.aclose()

    state = anyio.run(collect)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(state)).decode())
    else:
        print(format_status(state, settings.namespace))
    return 1 if state.stale else 0


def _get_run(args: argparse.Namespace, settings: Settings) -> int:
    run = _with_client(settings, lambda client: client.get_run(args.run_id))
    if run is None:
        print(f"cancel-broker: no run {args.run_id}", file=sys.stderr)
        return 1
    _print_json(run)
    return 0
