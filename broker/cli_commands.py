"""The client commands of ``cancel-broker``: publish an event, cancel runs (one, or a
function's in bulk), wait for one, show one, list runs, and the dead letters (the entries
the broker and the workers could not handle, with why; one of them published again)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any, Final, cast

import anyio
import msgspec

from broker.cli_client import redis_url, with_client, with_redis
from broker.cli_errors import UsageError
from broker.decisions import dead_letter_view
from broker.findings import SyncState
from broker.output import Output, progress_bar, text
from broker.run_listing import RunsQuery, list_runs
from broker.serve import windows
from broker.settings import Settings
from broker.sync_state import collect_state
from broker.sync_status import format_status, print_status_rich
from sdk import OPERATOR, Client, RunInfo
from sdk.client import Actor
from sdk.connection import REDIS_URL_ENV, RedisClient, command_client, resolve_url_source
from sdk.errors import InvalidEventError
from sdk.keys import EVENT_FIELD, Keys
from sdk.partitions import Partitions
from sdk.wire import decode_event

#: Dead letters listed by default.
DEFAULT_DEAD_LETTERS: Final = 20


def runs_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.event is not None:
        runs = with_client(settings, lambda client: client.runs_for_event(args.event))
        title = f"runs of event {args.event}"
    else:
        query = RunsQuery(
            app=args.app, function=args.function, status=args.status, limit=args.limit
        )

        async def read(redis: RedisClient) -> list[RunInfo]:
            keys = Keys(settings.namespace)
            partitions = await Partitions.open(redis, keys, settings.partitions, store=False)
            return (await list_runs(redis, partitions, query)).runs

        runs = with_redis(settings, read)
        title = f"{len(runs)} run(s)"
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(runs)
        return 0
    out.table(
        title,
        ["run_id", "function", "status", "started_at", "finished_at", "why"],
        [
            (
                run.run_id,
                f"{run.app_id}/{run.function_id}",
                run.status,
                run.started_at,
                run.finished_at,
                run.cancel_reason or run.error or run.rule_error or "",
            )
            for run in runs
        ],
    )
    return 0


def dead_letters_command(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys(settings.namespace)
    if args.republish is not None:
        event_id = with_redis(settings, lambda redis: _republish(redis, keys, args.republish))
        print(event_id)
        return 0

    async def read(redis: RedisClient) -> list[dict[str, Any]]:
        entries = await redis.xrevrange(keys.dead_letters, count=args.limit)
        return [
            dead_letter_view(entry_id, fields)
            for entry_id, fields in cast(list[tuple[str, dict[str, str]]], entries)
        ]

    letters = with_redis(settings, read)
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(letters)
        return 0
    out.table(
        f"{len(letters)} dead letter(s), newest first",
        ["id", "reason", "detail", "event", "consumer"],
        [
            (
                letter["id"],
                letter["reason"],
                letter["detail"],
                letter["event_name"] or letter["original_id"],
                letter["consumer"],
            )
            for letter in letters
        ],
    )
    return 0


async def _republish(redis: RedisClient, keys: Keys, letter_id: str) -> str:
    """Publish a dead letter's original event again (it must be valid now), and remove the
    dead letter in the same transaction; returns the new entry's id."""
    found = cast(
        list[tuple[str, dict[str, str]]],
        await redis.xrange(keys.dead_letters, letter_id, letter_id),
    )
    if not found:
        raise UsageError(
            f"no dead letter {letter_id}", "`cancel-broker dead-letters` lists their ids"
        )
    _, fields = found[0]
    try:
        original = json.loads(fields.get("fields") or "{}")
        if not isinstance(original, dict) or EVENT_FIELD not in original:
            raise InvalidEventError("not_an_event", "the dead letter holds no event")
        decode_event("0-0", original)
    except (ValueError, InvalidEventError) as exc:
        detail = exc.detail if isinstance(exc, InvalidEventError) else str(exc)
        raise UsageError(
            f"dead letter {letter_id} is not a valid event ({detail}): publishing it again"
            " would only dead-letter it again",
            "publish a corrected one with `cancel-broker send NAME DATA`",
        ) from None
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.events, {EVENT_FIELD: original[EVENT_FIELD]})
        pipe.xdel(keys.dead_letters, letter_id)
        new_id, _ = await pipe.execute()
    return str(new_id)


def run_rows(run: RunInfo) -> list[tuple[str, Any]]:
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


def show_run(args: argparse.Namespace, run: RunInfo) -> None:
    out = Output(as_json=args.json)
    if out.as_json:
        out.json(run)
    else:
        out.record(f"run {run.run_id}", run_rows(run))


def send_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"DATA is not JSON: {exc}", """quote it for the shell: '{"reportId": "r1"}'"""
        ) from None
    print(with_client(settings, lambda client: client.send(args.name, data)))
    return 0


def cancel_command(args: argparse.Namespace, settings: Settings) -> int:
    actor: Actor = OPERATOR
    if args.actor is not None:
        try:
            actor = json.loads(args.actor)
        except json.JSONDecodeError:
            actor = args.actor
    result = with_client(
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


def cancel_many_command(args: argparse.Namespace, settings: Settings) -> int:
    with progress_bar(f"cancelling {args.function_id}") as ticker:
        bulk = with_client(
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


def wait_command(args: argparse.Namespace, settings: Settings) -> int:
    async def wait(client: Client) -> RunInfo:
        # Without --timeout, a run that does not exist would be waited for for ever.
        if args.timeout is None and await client.get_run(args.run_id) is None:
            raise UsageError(
                f"no run {args.run_id}",
                "wait for a run not registered yet with --timeout (e.g. --timeout 30s);"
                " `cancel-broker runs --event EVENT_ID` lists an event's runs",
            )
        return await client.wait(args.run_id, args.timeout)

    show_run(args, with_client(settings, wait))
    return 0


def get_run_command(args: argparse.Namespace, settings: Settings) -> int:
    run = with_client(settings, lambda client: client.get_run(args.run_id))
    if run is None:
        print(f"cancel-broker: no run {args.run_id}", file=sys.stderr)
        return 1
    show_run(args, run)
    return 0


def sync_status_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cancel-broker sync status``: exit 1 when a configuration is stale."""
    url = redis_url(settings)

    async def collect() -> SyncState:
        redis = command_client(url)
        try:
            return await collect_state(redis, Keys(settings.namespace), windows=windows(settings))
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


def redis_url_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cancel-broker redis-url``: the URL the other commands would use, and why."""
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
