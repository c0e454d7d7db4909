"""``cancel-broker``: run the broker, publish an event, inspect or cancel a run."""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, TypeVar

import structlog

import sdk
from broker.cli_commands import (
    DEFAULT_DEAD_LETTERS,
    cancel_command,
    cancel_many_command,
    dead_letters_command,
    get_run_command,
    redis_url_command,
    runs_command,
    send_command,
    sync_status_command,
    wait_command,
)
from broker.cli_errors import diagnose, leaf
from broker.run_listing import MAX_RUNS, STATUSES
from broker.serve import run_command
from broker.settings import Settings
from sdk.connection import (
    resolve_url,
)
from sdk.durations import parse_duration
from sdk.logs import configure_logging

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
    "runs": """
  cancel-broker runs --function generate-report --status running
  cancel-broker runs --event 1732280004567-0          # the runs an event triggered
  cancel-broker runs --app reports --json | jq '.[].run_id'""",
    "dead-letters": """
  cancel-broker dead-letters                          # newest first, with the reason
  cancel-broker dead-letters --json | jq '.[] | {id, reason, detail}'
  cancel-broker dead-letters --republish 1732280000123-0""",
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
    run.set_defaults(handler=run_command, settings_groups=["connection", "broker", "detection"])

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
    status.set_defaults(handler=sync_status_command, settings_groups=["connection", "detection"])

    send = _command(
        commands, "send", example="send", parents=[common], help="publish an event; prints its id"
    )
    send.add_argument("name", help="event name, e.g. report/cancel.requested")
    send.add_argument(
        "data", nargs="?", default="{}", help='a JSON object, e.g. {"reportId": "r1"}'
    )
    send.set_defaults(handler=send_command)

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
    cancel.set_defaults(handler=cancel_command)

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
    many.set_defaults(handler=cancel_many_command)

    wait = _command(
        commands,
        "wait",
        example="wait",
        parents=[common, as_json],
        help="wait for a run to finish and show it",
    )
    wait.add_argument("run_id")
    wait.add_argument("--timeout", type=_duration, default=None, help="e.g. 30s (default: none)")
    wait.set_defaults(handler=wait_command)

    get_run = _command(
        commands, "get-run", example="get-run", parents=[common, as_json], help="show one run"
    )
    get_run.add_argument("run_id")
    get_run.set_defaults(handler=get_run_command)

    runs = _command(
        commands,
        "runs",
        example="runs",
        parents=[common, as_json],
        help="list runs: unfinished first, then recently finished; or an event's runs",
    )
    runs.add_argument("--app", default=None, help="only this app's runs")
    runs.add_argument("--function", default=None, help="only this function's runs")
    runs.add_argument("--status", choices=STATUSES, default=None, help="only runs in this status")
    runs.add_argument(
        "--event", default=None, help="the runs this event (its id, as `send` prints it) triggered"
    )
    runs.add_argument("--limit", type=int, default=50, help=f"at most this many (1-{MAX_RUNS})")
    runs.set_defaults(handler=runs_command)

    letters = _command(
        commands,
        "dead-letters",
        example="dead-letters",
        parents=[common, as_json],
        help="list the entries the broker and workers could not handle, with why",
    )
    letters.add_argument(
        "--limit", type=int, default=DEFAULT_DEAD_LETTERS, help="at most this many"
    )
    letters.add_argument(
        "--republish",
        metavar="ID",
        type=_entry_id,
        default=None,
        help="publish this dead letter's event again (it must be valid) and remove it",
    )
    letters.set_defaults(handler=dead_letters_command)

    url_command = _command(
        commands,
        "redis-url",
        example="redis-url",
        parents=[common],
        help="print the Redis URL the other commands use, and where it comes from (stderr)",
    )
    url_command.set_defaults(handler=redis_url_command)
    return parser


def _datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _entry_id(text: str) -> str:
    if not re.fullmatch(r"\d+-\d+", text):
        raise argparse.ArgumentTypeError(f"not a stream entry id: {text!r} (e.g. 1732280000123-0)")
    return text


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
