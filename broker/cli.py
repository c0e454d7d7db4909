"""``cancel-broker``: run the broker, publish an event, inspect or cancel a run."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import msgspec
import structlog

import sdk
from broker.embedded import EmbeddedRedis, EmbeddedRedisError
from broker.findings import SyncState, Windows, collect_state
from broker.http import HttpBindError, create_app, serve_http
from broker.logs import configure_logging
from broker.metrics import BrokerMetrics
from broker.report import format_status
from broker.service import Broker
from sdk import OPERATOR, Client
from sdk.client import Actor
from sdk.connection import REDIS_URL_ENV, command_client, redact_url, resolve_url
from sdk.durations import parse_duration
from sdk.errors import CancelBrokerError
from sdk.keys import DEFAULT_NAMESPACE, Keys

DEFAULT_HTTP_PORT = 8750
#: The longest a broker takes to stop after SIGTERM.
STOP_TIMEOUT_S = 5.0
T = TypeVar("T")

log = structlog.get_logger("broker")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cancel-broker", description="Event-driven cancellation over Redis Streams."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {sdk.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV),
        help=f"Redis URL (env {REDIS_URL_ENV}). `run` without one starts an embedded Redis.",
    )
    common.add_argument(
        "--namespace",
        default=_env("CANCEL_BROKER_NAMESPACE", DEFAULT_NAMESPACE),
        help="prefix of every key (env CANCEL_BROKER_NAMESPACE; default %(default)s)",
    )

    run = commands.add_parser("run", parents=[common], help="run the broker")
    run.add_argument(
        "--http-host",
        default=_env("CANCEL_BROKER_HTTP_HOST", "127.0.0.1"),
        help="address of /healthz and /metrics (env CANCEL_BROKER_HTTP_HOST; default %(default)s)",
    )
    run.add_argument(
        "--http-port",
        type=int,
        default=int(_env("CANCEL_BROKER_HTTP_PORT", str(DEFAULT_HTTP_PORT))),
        help="port of /healthz and /metrics, 0 for any free port"
        " (env CANCEL_BROKER_HTTP_PORT; default %(default)s)",
    )
    run.add_argument(
        "--consumer",
        default=os.environ.get("CANCEL_BROKER_CONSUMER"),
        help="consumer name in the broker group (env CANCEL_BROKER_CONSUMER; default host-pid)",
    )
    run.add_argument(
        "--log-level",
        default=_env("CANCEL_BROKER_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="env CANCEL_BROKER_LOG_LEVEL; default %(default)s",
    )
    run.add_argument(
        "--log-format",
        default=_env("CANCEL_BROKER_LOG_FORMAT", "auto"),
        choices=["auto", "json", "console"],
        help="auto = console on a terminal, JSON otherwise (env CANCEL_BROKER_LOG_FORMAT)",
    )
    run.add_argument(
        "--claim-idle",
        type=_duration,
        default=_duration(_env("CANCEL_BROKER_CLAIM_IDLE", "30s")),
        help="take over events another broker read and left unacknowledged this long"
        " (it died) (env CANCEL_BROKER_CLAIM_IDLE; default 30s)",
    )
    run.add_argument(
        "--dead-letter-maxlen",
        type=int,
        default=int(_env("CANCEL_BROKER_DEAD_LETTER_MAXLEN", "100000")),
        help="dead letters kept, about (env CANCEL_BROKER_DEAD_LETTER_MAXLEN; default 100000)",
    )
    run.add_argument(
        "--tombstone-lookback",
        type=_duration,
        default=_duration(_env("CANCEL_BROKER_TOMBSTONE_LOOKBACK", "10m")),
        help="a cancel event also cancels matching runs that register up to this long after it"
        " was handled, if their trigger is older (env CANCEL_BROKER_TOMBSTONE_LOOKBACK;"
        " default 10m; 0 turns it off)",
    )
    run.add_argument(
        "--history-length",
        type=int,
        default=int(_env("CANCEL_BROKER_HISTORY_LENGTH", "100")),
        help="syncs kept in each app's history (env CANCEL_BROKER_HISTORY_LENGTH; default 100)",
    )
    _add_windows(run)
    run.add_argument(
        "--cancel-event",
        action="append",
        default=_csv_env("CANCEL_BROKER_CANCEL_EVENTS"),
        metavar="NAME",
        help="an event name that means 'cancel' although it does not end in .cancelled or"
        " .cancel.requested; repeatable (env CANCEL_BROKER_CANCEL_EVENTS, comma-separated)",
    )
    run.set_defaults(handler=_run)

    sync = commands.add_parser("sync", help="registration state and stale configurations")
    sync_commands = sync.add_subparsers(dest="sync_command", required=True, metavar="COMMAND")
    status = sync_commands.add_parser(
        "status",
        parents=[common],
        help="live workers, functions and stale findings; exits 1 when something is stale",
    )
    status.add_argument("--json", action="store_true", help="print the state as JSON")
    _add_windows(status)
    status.set_defaults(handler=_sync_status)

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


def _csv_env(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_windows(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dead-rule-window",
        type=_duration,
        default=_duration(_env("CANCEL_BROKER_DEAD_RULE_WINDOW", "24h")),
        help="a rule whose event has not been published for this long is reported dead"
        " (env CANCEL_BROKER_DEAD_RULE_WINDOW; default 24h)",
    )
    parser.add_argument(
        "--orphan-window",
        type=_duration,
        default=_duration(_env("CANCEL_BROKER_ORPHAN_WINDOW", "1h")),
        help="cancel events nobody listened to are reported for this long after the last one"
        " (env CANCEL_BROKER_ORPHAN_WINDOW; default 1h)",
    )


def _windows(args: argparse.Namespace) -> Windows:
    return Windows(dead_rule_after_s=args.dead_rule_window, orphan_window_s=args.orphan_window)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (CancelBrokerError, EmbeddedRedisError, HttpBindError, ValueError) as exc:
        print(f"cancel-broker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# -- run -----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    with ExitStack() as stack:
        url: str | None = args.redis_url
        if not url:
            server = stack.enter_context(EmbeddedRedis())
            url = server.url
            print(
                f"cancel-broker: started an embedded Redis at {url}\n"
                f"  point workers and clients at it:  export {REDIS_URL_ENV}={url}",
                flush=True,
            )
        anyio.run(_serve, url, args)
    return 0


async def _serve(url: str, args: argparse.Namespace) -> None:
    metrics = BrokerMetrics()
    broker = Broker(
        url,
        namespace=args.namespace,
        consumer=args.consumer,
        metrics=metrics,
        windows=_windows(args),
        cancel_event_names=frozenset(args.cancel_event),
        claim_idle_ms=int(args.claim_idle * 1000),
        dead_letter_maxlen=args.dead_letter_maxlen,
        history_length=args.history_length,
        tombstone_lookback_s=args.tombstone_lookback,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, broker, tg.cancel_scope)
        port = await tg.start(
            serve_http,
            create_app(metrics.registry, broker),
            args.http_host,
            args.http_port,
        )
        await tg.start(broker.run)
        log.info(
            "broker.ready",
            redis_url=redact_url(url),
            namespace=args.namespace,
            http=f"http://{args.http_host}:{port}",
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


def _with_client(args: argparse.Namespace, action: Callable[[Client], Awaitable[T]]) -> T:
    async def go() -> T:
        async with Client(args.redis_url, namespace=args.namespace) as client:
            return await action(client)

    return anyio.run(go)


def _print_json(value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2))


def _send(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"data is not JSON: {exc}") from None
    print(_with_client(args, lambda client: client.send(args.name, data)))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    actor: Actor = OPERATOR
    if args.actor is not None:
        try:
            actor = json.loads(args.actor)
        except json.JSONDecodeError:
            actor = args.actor
    result = _with_client(
        args, lambda client: client.cancel(args.run_id, reason=args.reason, actor=actor)
    )
    _print_json(result)
    return 1 if result.outcome in ("not_found", "forbidden") else 0


def _cancel_many(args: argparse.Namespace) -> int:
    results = _with_client(
        args,
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


def _wait(args: argparse.Namespace) -> int:
    run = _with_client(args, lambda client: client.wait(args.run_id, args.timeout))
    _print_json(run)
    return 0


def _sync_status(args: argparse.Namespace) -> int:
    async def collect() -> SyncState:
        redis = command_client(resolve_url(args.redis_url))
        try:
            return await collect_state(redis, Keys(args.namespace), windows=_windows(args))
        finally:
            await redis.aclose()

    state = anyio.run(collect)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(state)).decode())
    else:
        print(format_status(state, args.namespace))
    return 1 if state.stale else 0


def _get_run(args: argparse.Namespace) -> int:
    run = _with_client(args, lambda client: client.get_run(args.run_id))
    if run is None:
        print(f"cancel-broker: no run {args.run_id}", file=sys.stderr)
        return 1
    _print_json(run)
    return 0
